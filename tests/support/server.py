"""The project's own server under real gunicorn, as the rig's tests talk to it.

`PassthroughServer` runs `gunicorn -c gunicorn.conf.py` from the repository root on a
random loopback port, with an environment scrubbed of the developer's settings, its
own TMPDIR (so tests can assert no temp file is left behind) and no `.env` file.
"""

from __future__ import annotations

import os
import shutil
import ssl
import sys
import tempfile
import weakref
from collections.abc import Mapping
from pathlib import Path

from passthrough.config import VARIABLES
from tests.support.procs import (
    LOOPBACK,
    ManagedProcess,
    StartupError,
    free_port,
    wait_for_http,
    wait_for_port,
)

REPO_ROOT = Path(__file__).resolve().parents[2]

# Settings of the service (and of gunicorn.conf.py) that must come from the test, never
# from whoever runs the suite.
SCRUBBED_PREFIXES = (
    "REGISTRY_", "OTEL_", "CACHE_", "LOG_", "UPSTREAM_", "MAX_", "PROMETHEUS_", "S3_", "AWS_",
    "REDIS_", "TLS_", "PASSTHROUGH_TLS_", "PROXY_", "TOKEN_",
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
        "UPSTREAMS",
        "PUBLIC_URL",
        "TAG_TTL",
        "TRUSTED_PROXIES",
        # The registries are on loopback: a proxy from the environment would break them.
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "NO_PROXY",
    }
)


#: Every variable the settings table declares, and the older names it still reads.
DECLARED_NAMES = frozenset(
    name for variable in VARIABLES for name in (variable.name, *variable.aliases)
)


def scrubbed_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """`base` (default os.environ) without the variables the service or gunicorn read."""
    env = dict(os.environ if base is None else base)
    return {
        k: v
        for k, v in env.items()
        if not k.upper().startswith(SCRUBBED_PREFIXES)
        and k.upper() not in SCRUBBED_NAMES | DECLARED_NAMES
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


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


#: Servers started and not yet stopped: a failing test's report shows their errors.
_RUNNING: weakref.WeakSet[PassthroughServer] = weakref.WeakSet()


def running_servers() -> list[PassthroughServer]:
    return list(_RUNNING)


def log_errors(text: str, limit: int = 80) -> list[str]:
    """The error lines of a server log with their tracebacks, the last `limit` of them:
    what a CI report needs when a request failed in the server."""
    picked: list[str] = []
    in_traceback = False
    for line in text.splitlines():
        if line.startswith("Traceback") or " ERROR " in line or " CRITICAL " in line:
            in_traceback = line.startswith("Traceback")
            picked.append(line)
        elif in_traceback and (line.startswith((" ", "\t")) or not line.strip()):
            picked.append(line)
        elif in_traceback:
            picked.append(line)  # the exception line ends the traceback
            in_traceback = False
    return picked[-limit:]


class PassthroughServer:
    """One gunicorn master with its workers. `url` is http://127.0.0.1:PORT, or
    https://127.0.0.1:PORT when the environment turns TLS on (TLS_SELF_SIGNED, or
    TLS_CERT_FILE with `ca_file` the CA that signed it); `ca_file` is then what
    clients verify against (`requests.get(url, verify=server.ca_file)`)."""

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
        ca_file: str | Path | None = None,
        port: int | None = None,
    ) -> None:
        self.overrides = dict(env or {})
        self._ca_file = Path(ca_file) if ca_file is not None else None
        self.workers = workers
        self.threads = threads
        self.repo_root = repo_root
        self.extra_args = extra_args
        self.startup_timeout = startup_timeout
        self.root = Path(tempfile.mkdtemp(prefix="rig-passthrough-", dir=tmp_root))
        self.tmpdir = self.root / "tmp"
        self.tmpdir.mkdir()
        # A port chosen beforehand (free_port()), for settings that must name the
        # server's own address, such as PUBLIC_URL; 0 = pick one at start.
        self.fixed_port = port or 0
        self.port = self.fixed_port
        self.process: ManagedProcess | None = None

    @property
    def self_signed(self) -> bool:
        return _truthy(self.overrides.get("TLS_SELF_SIGNED"))

    @property
    def scheme(self) -> str:
        tls = self.self_signed or bool(self.overrides.get("TLS_CERT_FILE"))
        return "https" if tls else "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{LOOPBACK}:{self.port}"

    @property
    def tls_dir(self) -> Path:
        """Where TLS_SELF_SIGNED puts its files: TLS_DIR, else the private directory
        the service makes under its TMPDIR."""
        chosen = self.overrides.get("TLS_DIR")
        return Path(chosen) if chosen else self.tmpdir / f"passthrough-tls-{os.getuid()}"

    @property
    def ca_file(self) -> Path | None:
        """The CA an https client verifies this server with (None over plain HTTP)."""
        if self.scheme != "https":
            return None
        if self._ca_file is not None:
            return self._ca_file
        if self.self_signed:
            return self.tls_dir / "ca.crt"
        raise RuntimeError("TLS_CERT_FILE is set: pass ca_file= (the CA that signed it)")

    def ssl_context(self) -> ssl.SSLContext | None:
        """A client context that trusts only `ca_file` (None over plain HTTP)."""
        ca_file = self.ca_file
        return None if ca_file is None else ssl.create_default_context(cafile=str(ca_file))

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
        # The service has a store by default (./passthrough-store, the repository's
        # working directory here): a test without one of its own asks for none.
        if not self.overrides.get("CACHE_DIR") and "STORE" not in self.overrides:
            env["STORE"] = "off"
        # Nor a probe server on 0.0.0.0:8081 (HEALTH_BIND's default), unless asked for one.
        env["HEALTH_BIND"] = "off"
        env.update(self.overrides)
        return env

    def start(self) -> PassthroughServer:
        if self.process is not None:
            raise RuntimeError("server already started")
        for attempt in range(3):
            self.port = self.fixed_port or free_port()
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
                context = None
                if self.scheme == "https":
                    # The master makes the certificate before it listens: once the port
                    # answers, the CA is there to verify with.
                    wait_for_port(LOOPBACK, self.port, self.startup_timeout, process=proc)
                    context = self.ssl_context()
                wait_for_http(
                    f"{self.url}/health", self.startup_timeout, process=proc, context=context
                )
                probes = self.overrides.get("HEALTH_BIND", "off")
                if probes != "off":
                    # The probe server (its own process) is up once it answers too:
                    # a test that times probes measures them, not its start-up.
                    probe_url = f"{self.scheme}://{probes}/health"
                    wait_for_http(probe_url, self.startup_timeout, process=proc, context=context)
            except StartupError:
                proc.stop()
                busy = "Address already in use" in proc.log_text()
                if attempt < 2 and busy and not self.fixed_port:
                    continue
                raise
            self.process = proc
            _RUNNING.add(self)
            return self
        raise AssertionError("unreachable")

    def log_text(self) -> str:
        return self.process.log_text() if self.process else ""

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM the master by pid, then SIGKILL; returns its exit code."""
        if self.process is None:
            return None
        _RUNNING.discard(self)
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
            if relative[0].startswith("passthrough-tls-"):
                continue  # TLS_SELF_SIGNED's CA and certificate: kept for the next start
            if relative[0].startswith("passthrough-upstream-ca-"):
                continue  # UPSTREAM_CA_FILE's bundle: public CAs, named by its content
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
