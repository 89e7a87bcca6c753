"""Prometheus metrics: what the service counts, and the text ``GET /metrics`` serves.

Under gunicorn every worker is a process of its own, so the metrics use
prometheus-client's multiprocess mode: each worker writes its samples into files under
``PROMETHEUS_MULTIPROC_DIR`` (gunicorn.conf.py creates a fresh directory when it is
unset and marks dead workers), and ``/metrics`` adds them up over every worker, live or
gone. Without that variable (the Flask test client, ``flask run``) the process's own
default registry is served.

The metric objects are made on first use, never at import: the gunicorn master imports
this package before it settles ``PROMETHEUS_MULTIPROC_DIR``, and prometheus-client
chooses where a metric keeps its values when the metric is created.

Metric names (all prefixed ``passthrough_``):

- ``downloads_total{route,outcome}``: GET downloads; outcome is ``completed``,
  ``aborted`` (failed after the first byte), ``client_gone`` or ``failed`` (an error
  answer before the first byte, whose status is in ``download_failures_total``).
- ``download_failures_total{route,status}``, ``download_sent_bytes_total{route}``,
  ``download_duration_seconds{route,outcome}`` (histogram, request to last byte),
  ``downloads_in_flight`` (archives being streamed now).
- ``upstream_requests_total{operation,method,status}``: every HTTP exchange with a
  registry, its token service or its blob storage (operation ``manifest``, ``blob``,
  ``token``, ``redirect`` or ``other``; status the HTTP code, or ``timeout``,
  ``connection_error``, ``tls_error``, ``error``); ``upstream_rate_limited_total{operation}``
  (429s); ``upstream_ratelimit_remaining`` (the last ``ratelimit-remaining`` Docker Hub sent).
- ``login_failures_total{reason}``: refused logins of HTPASSWD_FILE's users
  (``wrong_password``, ``unknown_user``, ``rate_limited``).
- ``cache_hits_total``, ``cache_misses_total``, ``cache_written_bytes_total``,
  ``cache_evictions_total``, ``cache_corrupt_total``: the shared layer cache.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator, Mapping
from typing import Any

MULTIPROC_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"

#: Download durations run from a second (small image, warm cache) to an hour.
DURATION_BUCKETS = (0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)

#: CacheStats field → the counter that mirrors it.
CACHE_COUNTERS = {
    "hits": "cache_hits",
    "misses": "cache_misses",
    "bytes_written": "cache_written_bytes",
    "evictions": "cache_evictions",
    "corrupt": "cache_corrupt",
}


def multiprocess_dir() -> str | None:
    """The directory the workers share, when multiprocess mode is on."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class _Metrics:
    """Every metric of the service; one instance per process, made on first use."""

    def __init__(self) -> None:
        from prometheus_client import Counter, values

        if multiprocess_dir() and values.ValueClass is values.MutexValue:
            # prometheus_client was imported before the directory was set: choose again.
            values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
        self._define_downloads()
        self._define_upstream()
        self._define_registry()
        self._define_fleet()
        self._define_sync()
        self.cache: dict[str, Any] = {
            field: Counter(f"passthrough_{name}", f"Shared layer cache: {field.replace('_', ' ')}")
            for field, name in CACHE_COUNTERS.items()
        }

    def _define_downloads(self) -> None:
        """The tar export's downloads."""
        from prometheus_client import Counter, Gauge, Histogram

        self.downloads = Counter(
            "passthrough_downloads", "GET downloads by route and outcome", ["route", "outcome"]
        )
        self.download_failures = Counter(
            "passthrough_download_failures",
            "Downloads answered with an error status before the first byte",
            ["route", "status"],
        )
        self.sent_bytes = Counter(
            "passthrough_download_sent_bytes", "Archive bytes sent to clients", ["route"]
        )
        self.duration = Histogram(
            "passthrough_download_duration_seconds",
            "Time from the request to the last byte sent (or the abort)",
            ["route", "outcome"],
            buckets=DURATION_BUCKETS,
        )
        self.in_flight = Gauge(
            "passthrough_downloads_in_flight",
            "Archives being streamed now",
            multiprocess_mode="livesum",
        )

    def _define_upstream(self) -> None:
        """What passthrough asks of registries."""
        from prometheus_client import Counter, Gauge

        self.upstream = Counter(
            "passthrough_upstream_requests",
            "HTTP exchanges with registries, token services and blob storage",
            ["operation", "method", "status"],
        )
        self.rate_limited = Counter(
            "passthrough_upstream_rate_limited",
            "Upstream answers 429 Too Many Requests",
            ["operation"],
        )
        self.ratelimit_remaining = Gauge(
            "passthrough_upstream_ratelimit_remaining",
            "The last ratelimit-remaining Docker Hub sent (pulls left in its window)",
            multiprocess_mode="mostrecent",
        )

    def _define_registry(self) -> None:
        """The /v2 API, the hosted area's pushes and the users' logins."""
        from prometheus_client import Counter

        self.v2_requests = Counter(
            "passthrough_v2_requests",
            "/v2 API requests by operation (manifest, blob, tags, referrers, token), "
            "what answered them (store, upstream, stale, error) and status",
            ["operation", "source", "status"],
        )
        self.v2_sent_bytes = Counter(
            "passthrough_v2_sent_bytes",
            "Blob and manifest bytes sent by the /v2 API, by where they came from",
            ["source"],
        )
        self.v2_errors = Counter(
            "passthrough_v2_errors",
            "/v2 requests answered with an error, by operation and the spec's error code",
            ["operation", "code", "status"],
        )
        self.push_bytes = Counter(
            "passthrough_push_bytes", "Blob bytes received by the hosted area's uploads"
        )
        self.uploads = Counter(
            "passthrough_uploads",
            "Hosted blob uploads finished, by outcome (committed, mounted, failed)",
            ["outcome"],
        )
        self.login_failures = Counter(
            "passthrough_login_failures",
            "Refused logins of passthrough's users (HTPASSWD_FILE) by reason: "
            "wrong_password, unknown_user, rate_limited",
            ["reason"],
        )

    def _define_fleet(self) -> None:
        """What a fleet of slow clients costs: refusals at the limit, stalled connections."""
        from prometheus_client import Counter

        self.transfers_refused = Counter(
            "passthrough_transfers_refused",
            "Transfers answered 503 at once because the pod's MAX_TRANSFERS were all taken, "
            "by kind (tar, v2)",
            ["kind"],
        )
        self.connections_dropped = Counter(
            "passthrough_connections_dropped",
            "Connections dropped for stalling, by phase: idle (no request), headers, body "
            "(an upload too slow), send (a response the client stopped reading)",
            ["phase"],
        )

    def _define_sync(self) -> None:
        """What ``passthrough sync`` and ``POST /api/v1/sync`` brought into the store."""
        from prometheus_client import Counter

        self.sync_images = Counter(
            "passthrough_sync_images",
            "Images a sync run went through, by outcome (synced, failed)",
            ["outcome"],
        )
        self.sync_bytes = Counter(
            "passthrough_sync_bytes", "Blob bytes a sync run fetched from upstream"
        )


_instance: _Metrics | None = None
_lock = threading.Lock()


def _metrics() -> _Metrics:
    global _instance
    if _instance is None:
        with _lock:
            if _instance is None:
                _instance = _Metrics()
    return _instance


# -- recording -----------------------------------------------------------------------------


def sync_image(outcome: str, fetched_bytes: int) -> None:
    """One image of a sync run: synced (its blobs now stored) or failed."""
    _metrics().sync_images.labels(outcome).inc()
    if fetched_bytes:
        _metrics().sync_bytes.inc(fetched_bytes)


def download_started() -> None:
    _metrics().in_flight.inc()


def download_finished(route: str, outcome: str, sent_bytes: int, seconds: float) -> None:
    """A streamed download ended (completed, aborted or the client left)."""
    metrics = _metrics()
    metrics.in_flight.dec()
    metrics.downloads.labels(route, outcome).inc()
    metrics.sent_bytes.labels(route).inc(sent_bytes)
    metrics.duration.labels(route, outcome).observe(seconds)


def transfer_refused(kind: str) -> None:
    _metrics().transfers_refused.labels(kind).inc()


def connection_dropped(phase: str) -> None:
    _metrics().connections_dropped.labels(phase).inc()


def download_failed(route: str, status: int) -> None:
    """A download answered with an error status before its first byte."""
    metrics = _metrics()
    metrics.downloads.labels(route, "failed").inc()
    metrics.download_failures.labels(route, str(status)).inc()


def upstream_response(operation: str, method: str, status: str) -> None:
    """One HTTP exchange upstream; ``status`` is the code, or what went wrong."""
    metrics = _metrics()
    metrics.upstream.labels(operation, method, status).inc()
    if status == "429":
        metrics.rate_limited.labels(operation).inc()


def v2_request(operation: str, source: str, status: int) -> None:
    """One /v2 answer: ``source`` is store, upstream, stale, redirect or error."""
    _metrics().v2_requests.labels(operation, source, str(status)).inc()


def v2_error(operation: str, code: str, status: int) -> None:
    _metrics().v2_errors.labels(operation, code, str(status)).inc()


def push_received(received_bytes: int) -> None:
    if received_bytes > 0:
        _metrics().push_bytes.inc(received_bytes)


def upload_finished(outcome: str) -> None:
    _metrics().uploads.labels(outcome).inc()


def v2_sent(source: str, sent_bytes: int) -> None:
    if sent_bytes > 0:
        _metrics().v2_sent_bytes.labels(source).inc(sent_bytes)


def login_failure(reason: str) -> None:
    """A refused login: wrong_password, unknown_user, or rate_limited (the client's
    address had too many failures; its attempt was not even checked)."""
    _metrics().login_failures.labels(reason).inc()


def ratelimit_remaining(value: str) -> None:
    """Docker Hub's ``ratelimit-remaining`` (already cut to its number, e.g. ``76``)."""
    try:
        number = float(value)
    except ValueError:
        return
    _metrics().ratelimit_remaining.set(number)


def cache_counts(changes: Mapping[str, int]) -> None:
    """Mirror a change of :class:`passthrough.store.filesystem.CacheStats` into the counters."""
    counters = _metrics().cache
    for field, delta in changes.items():
        counter = counters.get(field)
        if counter is not None and delta > 0:
            counter.inc(delta)


# -- exposition ----------------------------------------------------------------------------


class _Gauges:
    """Gauges read at scrape time (name: (help, value)), such as the pod's slots in use,
    which the slot file knows better than any one worker's samples."""

    def __init__(self, gauges: Mapping[str, tuple[str, float]]) -> None:
        self.gauges = gauges

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        for name, (documentation, value) in self.gauges.items():
            yield GaugeMetricFamily(name, documentation, value=value)


def render(gauges: Mapping[str, tuple[str, float]] | None = None) -> tuple[bytes, str]:
    """The exposition text and its content type: every worker's samples in multiprocess
    mode, this process's otherwise; plus ``gauges``, read now."""
    from prometheus_client import (
        CONTENT_TYPE_PLAIN_0_0_4,
        REGISTRY,
        CollectorRegistry,
        generate_latest,
        multiprocess,
    )

    _metrics()  # every metric shows up, at zero, from the first scrape on
    if multiprocess_dir():
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        body = generate_latest(registry)
    else:
        body = generate_latest(REGISTRY)
    if gauges:
        extra = CollectorRegistry(auto_describe=False)
        extra.register(_Gauges(gauges))
        body += generate_latest(extra)
    return body, CONTENT_TYPE_PLAIN_0_0_4


# -- gunicorn's master (gunicorn.conf.py) ------------------------------------------------


def prepare_multiprocess_dir(environ: Mapping[str, str] | None = None) -> tuple[str, bool]:
    """Settle the directory the workers share, before any worker starts: the operator's
    PROMETHEUS_MULTIPROC_DIR (environment or .env) wiped of a previous run's files, or a
    fresh directory (in /dev/shm where it exists: memory, and never in the temp dir
    downloads use). Returns the directory and whether it was created here (and is
    removed at exit)."""
    from passthrough.config import read_environment

    configured = (read_environment(environ).get("PROMETHEUS_MULTIPROC_DIR") or "").strip()
    if configured:
        os.environ[MULTIPROC_DIR_VARIABLE] = configured
        os.makedirs(configured, exist_ok=True)
        for name in os.listdir(configured):
            if name.endswith(".db"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(configured, name))
        return configured, False
    parent = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None  # noqa: S108
    created = tempfile.mkdtemp(prefix="passthrough-metrics-", dir=parent)
    os.environ[MULTIPROC_DIR_VARIABLE] = created
    return created, True


def mark_process_dead(pid: int) -> None:
    """A worker exited: drop its live gauges (its counters keep counting)."""
    if multiprocess_dir():
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def remove_multiprocess_dir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
