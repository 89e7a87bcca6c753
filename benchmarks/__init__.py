"""Benchmarks of passthrough against skopeo and the registry itself: see
docs/benchmarks.md; run with `.venv/bin/python -m benchmarks.run`."""
