"""The project's own server under real gunicorn, as the rig's tests talk to it.

`PassthroughServer` runs `gunicorn -c gunicorn.conf.py` from the repository root on a
random loopback port, with an environment scrubbed of the developer's settings, its
own TMPDIR (so tests can assert no temp file is left behind) and no `.env` file.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

from tests.support.procs import LOOPBACK, ManagedProcess, StartupError, free_port, wait_for_http

REPO_ROOT = Path(__file__).resolve().parents[2]

# Settings of the service (and of gunicorn.conf.py) that must come from the test, never
# from whoever runs the suite.
SCRUBBED_PREFIXES = (
    "REGISTRY_", "OTEL_", "CACHE_", "LOG_", "UPSTREAM_", "MAX_", "PROMETHEUS_", "S3_", "AWS_",
    "REDIS_",
)
SCRUBBED_NAMES = frozenset(
    {
        "ENV_FILE",
        "TEMP_DIR",
        "LAYER_CONCURRENCY",
        "BIND",
        "PORT",
        "WEB_CONCURRENCY",
        "GUNICORN_THREADS",
        "GRACEFUL_TIMEOUT",
        "GUNICORN_CMD_ARGS",
        "CLIENT_IDLE_TIMEOUT",
        "DEFAULT_PLATFORM",
        "DOWNLOAD_DEADLINE",
        "SERVE_STALE",
        "STORE",
        # The registries are on loopback: a proxy from the environment would break them.
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "NO_PROXY",
    }
)


def scrubbed_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """`base` (default os.environ) without the variables the service or gunicorn read."""
    env = dict(os.environ if base is None else base)
    return {
        k: v
        for k, v in env.items()
        if not k.upper().startswith(SCRUBBED_PREFIXES) and k.upper() not in SCRUBBED_NAMES
    }


def _gunicorn() -> str:
    # The venv that runs the tests is the project's venv.
    candidate = Path(sys.executable).with_name("gunicorn")
    if candidate.exists():
        return str(candidate)
    found = shutil.which("gunicorn")
    if found is None:
        raise StartupError("gunicorn is not installed in the test environment")
    return found


class PassthroughServer:
    """One gunicorn master with its workers. `url` is http://127.0.0.1:PORT."""

    def __init__(
        self,
        env: Mapping[str, str] | None = None,
        *,
        workers: int = 1,
        threads: int = 8,
        tmp_root: Path | None = None,
        repo_root: Path = REPO_ROOT,
        extra_args: tuple[str, ...] = (),
        startup_timeout: float = 30.0,
    ) -> None:
        self.overrides = dict(env or {})
        self.workers = workers
        self.threads = threads
        self.repo_root = repo_root
        self.extra_args = extra_args
        self.startup_timeout = startup_timeout
        self.root = Path(tempfile.mkdtemp(prefix="rig-passthrough-", dir=tmp_root))
        self.tmpdir = self.root / "tmp"
        self.tmpdir.mkdir()
        self.port = 0
        self.process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError("server not started")
        return self.process.pid

    def environment(self) -> dict[str, str]:
        env = scrubbed_environment()
        env["TMPDIR"] = str(self.tmpdir)
        # A file that does not exist: no developer's .env can leak into a test.
        env["ENV_FILE"] = str(self.root / "no-such.env")
        # Logs must reach the log file as they are written, for log_text() on failure.
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.overrides)
        return env

    def start(self) -> PassthroughServer:
        if self.process is not None:
            raise RuntimeError("server already started")
        for attempt in range(3):
            self.port = free_port()
            args = [
                _gunicorn(),
                "-c",
                "gunicorn.conf.py",
                "--bind",
                f"{LOOPBACK}:{self.port}",
                "--workers",
                str(self.workers),
                "--threads",
                str(self.threads),
                *self.extra_args,
            ]
            log_name = f"gunicorn-{attempt}" if attempt else "gunicorn"
            proc = ManagedProcess(
                args, env=self.environment(), cwd=self.repo_root, log_dir=self.root, name=log_name
            )
            proc.start()
            try:
                wait_for_http(f"{self.url}/health", self.startup_timeout, process=proc)
            except StartupError:
                proc.stop()
                if attempt < 2 and "Address already in use" in proc.log_text():
                    continue
                raise
            self.process = proc
            return self
        raise AssertionError("unreachable")

    def log_text(self) -> str:
        return self.process.log_text() if self.process else ""

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM the master by pid, then SIGKILL; returns its exit code."""
        if self.process is None:
            return None
        return self.process.stop(timeout)

    def cleanup(self) -> None:
        """Stop and delete the temp dir (the log goes with it)."""
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def leftover_temp_files(self) -> list[Path]:
        """Everything the server left in its TMPDIR, but for the S3 store's working
        area there (its empty tmp/ and its lock files, which must outlive requests)."""
        found = []
        for path in sorted(self.tmpdir.rglob("*")):
            relative = path.relative_to(self.tmpdir).parts
            if relative[0].startswith("passthrough-s3-"):
                if len(relative) == 1 or relative[1:] in (("tmp",), ("locks",)):
                    continue
                if relative[1] == "locks" and path.suffix == ".lock":
                    continue
            found.append(path)
        return found

    def __enter__(self) -> PassthroughServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        pid = self.process.pid if self.process else None
        return f"<PassthroughServer {self.url} pid={pid}>"
