"""gunicorn settings for passthrough: `gunicorn -c gunicorn.conf.py` from the repo root.

Every value can be overridden on the command line (`--bind 127.0.0.1:9000`) or with
GUNICORN_CMD_ARGS; the environment variables read here (BIND, WEB_CONCURRENCY,
GUNICORN_THREADS, GRACEFUL_TIMEOUT, LOG_LEVEL, HEALTH_BIND, MAX_TRANSFERS) are declared
in passthrough's settings table (:class:`passthrough.config.ServerSettings`) and read
like the app's, `.env` under the real environment, a bad value stopping start-up with
one line naming it. TLS
(TLS_CERT_FILE/TLS_KEY_FILE, or TLS_SELF_SIGNED) is set up in on_starting, from the
validated settings, as is the pod's transfer slot file (MAX_TRANSFERS).
"""

from __future__ import annotations

import os
import subprocess
from typing import TYPE_CHECKING, Any

from passthrough.capacity import threads_per_worker
from passthrough.config import ConfigError, load_server_settings, read_variable

if TYPE_CHECKING:
    from passthrough.config import Settings

try:
    _server = load_server_settings()
    _log_level: str = read_variable("LOG_LEVEL")
    _max_transfers: int = read_variable("MAX_TRANSFERS")
except ConfigError as exc:
    raise SystemExit(f"passthrough: configuration error: {exc}") from None

wsgi_app = "passthrough:create_app()"

# The main port. The probe port (HEALTH_BIND: /health, /ready and /metrics only) is
# served by a process of its own, started in when_ready (passthrough/probes.py).
bind = [_server.bind]

# gthread, with passthrough's changes (passthrough/web/worker.py): closing a connection
# never blocks the event loop, and headers, bodies and sends have deadlines. Each
# transfer holds one thread for its whole life (routers read slowly), and `timeout` is
# only the worker's liveness heartbeat, so a download that lasts an hour is not killed.
worker_class = "passthrough.web.worker.PassthroughWorker"
workers = _server.workers
# MAX_TRANSFERS is the pod's, shared by its workers, and the kernel may hand any one
# worker most of the connections: each worker can hold every slot, plus room for quick
# requests (passthrough.capacity.threads_per_worker). Threads start as needed, so an
# idle one costs nothing.
threads = threads_per_worker(_server.threads, _max_transfers)
# Connections a worker holds (requests, kept-alive and stalled ones): its threads' and
# as many waiting again.
worker_connections = threads + 256
backlog = 2048
timeout = 60
keepalive = 5

# On SIGTERM, in-flight downloads get this long to finish before workers are killed.
graceful_timeout = _server.graceful_timeout

# Worker recycling would cut long downloads mid-transfer.
max_requests = 0

# gunicorn 25+ otherwise opens a control socket under $HOME, which breaks
# read-only containers.
control_socket_disable = True

# The heartbeat file is touched often: keep it in memory when /dev/shm exists.
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None  # noqa: S108

# Bounded request size: a request line (the URL) over 4 KiB, or a header over 8 KiB,
# gets a 400 from gunicorn before it reaches the app.
limit_request_line = 4094
limit_request_fields = 100
limit_request_field_size = 8190

accesslog = "-"
errorlog = "-"
loglevel = _log_level.lower()
# The default access log format records the request line and headers we choose;
# never the Authorization header.
access_log_format = '%(h)s "%(r)s" %(s)s %(B)s %(L)ss "%(a)s"'
# The error and access logs in LOG_FORMAT (text, or json: one object per line), with
# anything shaped like an Authorization value redacted (passthrough.observe.logs).
logger_class = "passthrough.observe.logs.GunicornLogger"

# The Prometheus directory this master created (removed when it exits), if any.
_metrics_dir_created: list[str] = []
# The transfer slot file this master made (removed when it exits).
_slot_file: list[str] = []
#: The probe server's process (when_ready), stopped in on_exit.
_probes: list[subprocess.Popen[bytes]] = []
# The settings on_starting validated, inherited by every forked worker.
_settings: list[Settings] = []


def on_starting(server: object) -> None:
    """Validate the configuration once in the master, so a bad value stops start-up
    with one message naming the variable instead of every worker failing to boot; the
    content store is checked reachable the same way.

    Then settle PROMETHEUS_MULTIPROC_DIR, where every worker writes its metric samples
    and /metrics reads them all: the operator's directory wiped of a previous run's
    files, or a fresh one, before any worker starts."""
    from passthrough.config import load_settings
    from passthrough.config.summary import summary
    from passthrough.observe import metrics
    from passthrough.registry.access import Gate
    from passthrough.store import check_store
    from passthrough.upstream.trust import ca_bundle

    try:
        settings = load_settings()
        # The store too: an unreachable S3 endpoint or a missing bucket stops start-up
        # here, once, naming the variable and the endpoint.
        check_store(settings)
        # HTPASSWD_FILE and ACCESS_FILE too: a non-bcrypt hash or a bad rule stops
        # start-up here with the file's variable and line, not in every worker.
        Gate.create(settings)
        # UPSTREAM_CA_FILE's bundle too: a directory it cannot be written to stops
        # start-up here; the workers then find the same file (named by its content).
        if settings.upstream_ca_file:
            ca_bundle(settings.upstream_ca_file)
        _configure_tls(server, settings)
        _settings.append(settings)
        # One record of what the settings add up to (never a secret).
        server.log.info("%s", summary(settings))  # type: ignore[attr-defined]
    except ConfigError as exc:
        raise SystemExit(f"passthrough: configuration error: {exc}") from None
    _make_slot_file()
    try:
        directory, created = metrics.prepare_multiprocess_dir()
    except OSError as exc:
        raise SystemExit(
            f"passthrough: cannot prepare PROMETHEUS_MULTIPROC_DIR: {exc.strerror}"
        ) from None
    if created:
        _metrics_dir_created.append(directory)


def _make_slot_file() -> None:
    """The pod's MAX_TRANSFERS slots: one file every worker locks bytes of
    (passthrough.capacity), made before the fork and named to the workers in the
    environment; only this master's file, never one inherited from outside."""
    from passthrough import capacity

    os.environ.pop(capacity.SLOTS_FILE_ENV, None)
    path = capacity.create_slot_file()
    _slot_file.append(path)
    os.environ[capacity.SLOTS_FILE_ENV] = path


def _configure_tls(server: Any, settings: Settings) -> None:
    """TLS_CERT_FILE/TLS_KEY_FILE become gunicorn's certfile/keyfile; TLS_SELF_SIGNED
    makes a CA and a certificate for TLS_NAMES first. on_starting runs before the
    master opens its sockets (and reads certfile for them), so setting them here
    counts, and .env values apply as well as the environment's.

    With TLS_SELF_SIGNED the CA is logged once (it is public: clients must be given
    it) with how to trust it, and its path goes to the workers, for GET /ca.crt, in
    an environment variable set before they are forked."""
    from passthrough import tls

    # Only this master says where the CA is: never a value inherited from outside.
    os.environ.pop(tls.CA_FILE_ENV, None)
    cfg = server.cfg
    if settings.tls_cert_file and settings.tls_key_file:
        cfg.set("certfile", settings.tls_cert_file)
        cfg.set("keyfile", settings.tls_key_file)
        return
    if not settings.tls_self_signed:
        return
    files = tls.make_self_signed(settings.tls_names, settings.tls_dir)
    cfg.set("certfile", str(files.cert))
    cfg.set("keyfile", str(files.key))
    os.environ[tls.CA_FILE_ENV] = str(files.ca_cert)
    port = _bound_port(cfg.bind)
    server.log.info(
        "%s\n%s", tls.trust_instructions(files, settings.tls_names, port), files.ca_pem().rstrip()
    )


def _bound_port(binds: list[str]) -> int | None:
    """The TCP port of the first ``host:port`` bind (None for a unix socket)."""
    for address in binds:
        host, _, port = address.rpartition(":")
        if host and port.isdigit() and not address.startswith(("unix:", "fd:")):
            return int(port)
    return None


def when_ready(server: Any) -> None:
    """Bind HEALTH_BIND (a port in use stops start-up, as the main port's would) and
    hand it to the probe server, a process of its own (passthrough/probes.py: a busy
    worker's threads never delay a probe). The master keeps no copy of the socket, so
    the workers forked next hold none either."""
    import socket
    import sys

    if _server.health_bind.strip().lower() == "off":
        return
    address = _server.health_address
    if address is None:
        raise SystemExit(
            f"passthrough: HEALTH_BIND must be host:port or off, not {_server.health_bind!r}"
        )
    if any(probe.poll() is None for probe in _probes):
        return
    try:
        listener = socket.create_server(
            address, family=socket.AF_INET6 if ":" in address[0] else socket.AF_INET,
            backlog=128,
        )  # fmt: skip
    except OSError as exc:
        raise SystemExit(
            f"passthrough: cannot listen on HEALTH_BIND {_server.health_bind}: {exc.strerror}"
        ) from None
    args = [sys.executable, "-m", "passthrough.probes", "--fd", str(listener.fileno()),
            "--parent", str(os.getpid())]  # fmt: skip
    if server.cfg.certfile:
        args += ["--certfile", server.cfg.certfile, "--keyfile", server.cfg.keyfile or ""]
    with listener:
        _probes.append(subprocess.Popen(args, pass_fds=(listener.fileno(),)))
    server.log.info("probes on %s (pid %d)", _server.health_bind, _probes[-1].pid)


def post_fork(server: object, worker: object) -> None:
    """Tracing is per worker, set up after the fork (an export thread and a gRPC
    channel do not survive one); nothing at all unless OTEL_EXPORTER_OTLP_ENDPOINT."""
    from passthrough.observe import telemetry

    if _settings and telemetry.tracing_enabled(_settings[0]):
        telemetry.setup_tracing(_settings[0])


def worker_exit(server: object, worker: object) -> None:
    """Export the spans still waiting in the batch before the worker is gone."""
    from passthrough.observe import telemetry

    telemetry.shutdown_tracing()


def child_exit(server: object, worker: object) -> None:
    """A worker is gone (in the master): its live gauges stop counting."""
    from passthrough.observe import metrics

    pid = getattr(worker, "pid", None)
    if isinstance(pid, int):
        metrics.mark_process_dead(pid)


def on_exit(server: object) -> None:
    """Stop the probe server; remove the Prometheus directory and the slot file this
    master created."""
    from passthrough import capacity
    from passthrough.observe import metrics

    for probe in _probes:
        probe.terminate()
        try:
            probe.wait(5)
        except Exception:  # noqa: BLE001 - it ends with the master in any case
            probe.kill()

    for directory in _metrics_dir_created:
        metrics.remove_multiprocess_dir(directory)
    for path in _slot_file:
        capacity.remove_slot_file(path)


def post_worker_init(worker: object) -> None:
    """Instrument the app for tracing once the worker has it (the Flask app inside the
    worker's RegionSender, passthrough/web/worker.py)."""
    app = getattr(getattr(worker, "wsgi", None), "app", None)
    if app is not None:  # an app preloaded in the master was made before post_fork's setup
        from passthrough.observe import telemetry

        telemetry.instrument_app(app)
