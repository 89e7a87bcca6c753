"""GET /metrics through the Flask test client (one process, the default registry) and
prometheus-client's multiprocess mode in forked processes: downloads by route and
outcome, bytes, durations, in-flight, upstream requests, 429s, Docker Hub's
ratelimit-remaining, and the cache counters."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import responses
from prometheus_client.parser import text_string_to_metric_families

from passthrough import create_app
from passthrough.observe import metrics
from tests.unit.test_telemetry import FakeRegistry, make_app, token_registry

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKER = "/docker/{filename}"


@pytest.fixture(autouse=True)
def _single_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)


def scrape(app: Any) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of GET /metrics, by name and labels."""
    response = app.test_client().get("/metrics")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(response.get_data(as_text=True)):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(before: dict[Any, float], after: dict[Any, float], name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


@responses.activate
def test_a_download_is_counted_with_bytes_duration_and_upstream_requests(tmp_path):
    FakeRegistry().register(responses)
    app = make_app(tmp_path)
    before = scrape(app)
    body = app.test_client().get("/docker/team__api_v1.tar").data
    after = scrape(app)
    completed = {"route": DOCKER, "outcome": "completed"}
    assert delta(before, after, "passthrough_downloads_total", **completed) == 1
    assert delta(before, after, "passthrough_download_sent_bytes_total", route=DOCKER) == len(body)
    assert delta(before, after, "passthrough_download_duration_seconds_count", **completed) == 1
    upstream = "passthrough_upstream_requests_total"
    assert delta(before, after, upstream, operation="manifest", method="GET", status="200") == 1
    # The config, then each of the two layers; and the two layers' pre-flight HEADs.
    assert delta(before, after, upstream, operation="blob", method="GET", status="200") == 3
    assert delta(before, after, upstream, operation="blob", method="HEAD", status="200") == 2
    assert value(after, "passthrough_downloads_in_flight") == 0


@responses.activate
def test_429s_are_counted_and_the_failure_by_status(tmp_path):
    registry = FakeRegistry(manifest_status=429)
    registry.register(responses)
    app = make_app(tmp_path, UPSTREAM_RETRIES="0")
    before = scrape(app)
    assert app.test_client().get("/docker/team__api_v1.tar").status_code == 429
    after = scrape(app)
    limited = "passthrough_upstream_rate_limited_total"
    assert delta(before, after, limited, operation="manifest") == 1
    assert delta(before, after, "passthrough_downloads_total", route=DOCKER, outcome="failed") == 1
    assert (
        delta(before, after, "passthrough_download_failures_total", route=DOCKER, status="429")
        == 1
    )


@responses.activate
def test_token_exchanges_are_counted_as_their_own_operation(tmp_path):
    token_registry("tok", "alice", "pw").register(responses)
    app = make_app(tmp_path, REGISTRY_USERNAME="alice", REGISTRY_PASSWORD="pw")
    before = scrape(app)
    assert app.test_client().get("/docker/team__api_v1.tar").data
    after = scrape(app)
    upstream = "passthrough_upstream_requests_total"
    assert delta(before, after, upstream, operation="token", method="GET", status="200") == 1
    assert delta(before, after, upstream, operation="manifest", method="GET", status="401") == 1


@responses.activate
def test_docker_hub_ratelimit_remaining_is_a_gauge(tmp_path):
    hub = FakeRegistry(
        repository="library/nginx",
        tag="latest",
        base="https://registry-1.docker.io",
        extra_headers={"ratelimit-remaining": "76;w=21600"},
    )
    hub.register(responses)
    app = create_app(
        {
            "REGISTRY_URL": "docker.io",
            "ENV_FILE": "/nonexistent",
            "TEMP_DIR": str(tmp_path),
            "STORE": "off",
        }
    )
    assert app.test_client().get("/docker/nginx_latest.tar").data
    assert value(scrape(app), "passthrough_upstream_ratelimit_remaining") == 76


@responses.activate
def test_in_flight_while_streaming_and_client_gone(tmp_path):
    FakeRegistry().register(responses)
    app = make_app(tmp_path)
    before = scrape(app)
    response = app.test_client().get("/docker/team__api_v1.tar", buffered=False)
    chunks = iter(response.response)
    next(chunks)
    assert value(scrape(app), "passthrough_downloads_in_flight") == 1
    response.close()
    after = scrape(app)
    assert value(after, "passthrough_downloads_in_flight") == 0
    gone = {"route": DOCKER, "outcome": "client_gone"}
    assert delta(before, after, "passthrough_downloads_total", **gone) == 1


@responses.activate
def test_cache_counters_mirror_the_cache(tmp_path):
    registry = FakeRegistry()
    registry.register(responses)
    app = make_app(tmp_path, CACHE_DIR=str(tmp_path / "cache"))
    stats = app.extensions["passthrough"].store.stats
    before = scrape(app)
    client = app.test_client()
    assert client.get("/docker/team__api_v1.tar").data
    assert client.get("/docker/team__api_v1.tar").data
    after = scrape(app)
    assert delta(before, after, "passthrough_cache_misses_total") == 2 == stats.misses
    assert delta(before, after, "passthrough_cache_hits_total") == 2 == stats.hits
    written = delta(before, after, "passthrough_cache_written_bytes_total")
    assert written == stats.bytes_written > sum(len(t) for t in registry.tars)


def test_every_metric_is_exposed_from_the_first_scrape(tmp_path):
    names = {name for name, _ in scrape(make_app(tmp_path))}
    for expected in (
        "passthrough_downloads_in_flight",
        "passthrough_upstream_ratelimit_remaining",
        "passthrough_cache_hits_total",
        "passthrough_cache_evictions_total",
    ):
        assert expected in names


# -- multiprocess mode -----------------------------------------------------------------------


@pytest.mark.rig  # starts a Python process: the full tier
def test_multiprocess_mode_adds_up_every_process(tmp_path):
    """Forked processes (as gunicorn's workers) each count; a render in any one of them
    sums them all, and a dead process's in-flight gauge stops counting."""
    script = textwrap.dedent(
        f"""
        import os, sys
        sys.path.insert(0, {str(REPO_ROOT)!r})
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = {str(tmp_path)!r}
        from passthrough.observe import metrics   # imported first, as gunicorn's master does
        children = []
        for n in range(2):
            pid = os.fork()
            if pid == 0:
                metrics.download_started()
                metrics.download_finished("/docker/{{filename}}", "completed", 1000 + n, 1.5)
                metrics.download_started()  # still streaming when the process dies
                os._exit(0)
            children.append(pid)
        for pid in children:
            os.waitpid(pid, 0)
        before = metrics.render()[0].decode()
        for pid in children:
            metrics.mark_process_dead(pid)
        after = metrics.render()[0].decode()
        print(before)
        print("----")
        print(after)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 0, done.stderr
    before, after = done.stdout.split("----")
    samples = {}
    for family in text_string_to_metric_families(before):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    completed = {"route": DOCKER, "outcome": "completed"}
    assert value(samples, "passthrough_downloads_total", **completed) == 2
    assert value(samples, "passthrough_download_sent_bytes_total", route=DOCKER) == 2001
    assert value(samples, "passthrough_downloads_in_flight") == 2
    gone = {
        (s.name, frozenset(s.labels.items())): s.value
        for f in text_string_to_metric_families(after)
        for s in f.samples
    }
    assert value(gone, "passthrough_downloads_in_flight") == 0
    assert value(gone, "passthrough_downloads_total", **completed) == 2, "counters stay"


def test_prepare_creates_a_fresh_directory_or_wipes_the_configured_one(tmp_path, monkeypatch):
    configured = tmp_path / "configured"
    configured.mkdir()
    (configured / "counter_99999.db").write_bytes(b"stale")
    (configured / "keep.txt").write_text("not ours")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(configured))
    directory, created = metrics.prepare_multiprocess_dir(
        {"ENV_FILE": "/nonexistent", "PROMETHEUS_MULTIPROC_DIR": str(configured)}
    )
    assert (directory, created) == (str(configured), False)
    assert sorted(p.name for p in configured.iterdir()) == ["keep.txt"]

    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR")
    directory, created = metrics.prepare_multiprocess_dir({"ENV_FILE": "/nonexistent"})
    try:
        assert created and os.path.isdir(directory) and not os.listdir(directory)
        assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == directory
        assert "passthrough-metrics-" in directory
    finally:
        metrics.remove_multiprocess_dir(directory)
        monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR")
    assert not os.path.exists(directory)


def test_metrics_route_never_cached(tmp_path):
    response = make_app(tmp_path).test_client().get("/metrics")
    assert response.headers["Cache-Control"] == "no-store"
