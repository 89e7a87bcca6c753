"""GET /metrics: the Prometheus exposition of every gunicorn worker's samples (or this
process's, without PROMETHEUS_MULTIPROC_DIR), the pod's transfer slots in use, and the
content store's usage against its cap; see :mod:`passthrough.observe.metrics`.

On the probe port (HEALTH_BIND, where the chart's ServiceMonitor scrapes) the answer is
a snapshot at most :data:`SNAPSHOT_TTL` old, made in the background (:class:`_Snapshot`).

The store's usage is a listing of the store (a bucket's costs requests), so a worker
reads it at most once every :data:`USAGE_TTL` seconds and serves that figure between."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from functools import cache

from flask import Blueprint, Response, current_app, request

from passthrough.config import load_server_settings
from passthrough.errors import PassthroughError
from passthrough.observe import metrics
from passthrough.services import Services, services_of
from passthrough.store.content import ContentStore

bp = Blueprint("metrics", __name__)
log = logging.getLogger(__name__)

#: Seconds a worker reuses its last listing of the store for the usage gauges.
USAGE_TTL = 30.0

_usage_lock = threading.Lock()
_usage: dict[int, tuple[float, int, int]] = {}  # id(store) → (read at, bytes, pinned bytes)


@dataclass
class _Snapshot:
    """The probe port's last exposition: a scrape there gets it at once when it is
    under :data:`SNAPSHOT_TTL` old, else the last one while one background round makes
    the next. Rendering reads every worker's sample files, each read a wait for the GIL
    on a busy worker (seconds under 500 transfers); a scrape must not wait for that."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    body: bytes = b""
    content_type: str = ""
    made: float = 0.0
    refreshing: bool = False

    def refresh(self, services: Services) -> None:
        try:
            body, content_type = _render(services)
        finally:
            with self.lock:
                self.refreshing = False
        with self.lock:
            self.body, self.content_type, self.made = body, content_type, time.monotonic()


#: Seconds the probe port's exposition is given as it is (see :class:`_Snapshot`).
SNAPSHOT_TTL = 1.0
_snapshot = _Snapshot()


@bp.get("/metrics")
def prometheus_metrics() -> Response:
    services = services_of(current_app)
    port = request.server[1] if request.server else None  # the port the request came to
    if port is None or port != _probe_port():
        body, content_type = _render(services)
    else:
        body, content_type = _from_snapshot(services)
    return Response(body, headers={"Content-Type": content_type, "Cache-Control": "no-store"})


@cache
def _probe_port() -> int | None:
    """HEALTH_BIND's port (gunicorn's setting, read once per process)."""
    return load_server_settings().health_port


def _from_snapshot(services: Services) -> tuple[bytes, str]:
    with _snapshot.lock:
        if not _snapshot.body:
            _snapshot.body, _snapshot.content_type = _render(services)
            _snapshot.made = time.monotonic()
        elif time.monotonic() - _snapshot.made >= SNAPSHOT_TTL and not _snapshot.refreshing:
            _snapshot.refreshing = True
            threading.Thread(
                target=_snapshot.refresh, args=(services,), name="metrics-refresh", daemon=True
            ).start()
        return _snapshot.body, _snapshot.content_type


def _render(services: Services) -> tuple[bytes, str]:
    slots = services.slots
    gauges = {
        "passthrough_transfers_in_use": (
            "Transfer slots held now, by every worker of the pod",
            float(slots.in_use()),
        ),
        "passthrough_transfers_limit": ("The pod's MAX_TRANSFERS", float(slots.capacity)),
    }
    if services.store is not None:
        try:
            gauges.update(_store_gauges(services.store))
        except (OSError, PassthroughError) as exc:
            # An unreachable bucket must not cost the other metrics: /ready reports it.
            log.warning("store usage not read for /metrics: %s", exc)
    return metrics.render(gauges)


def _store_gauges(store: ContentStore) -> dict[str, tuple[str, float]]:
    used, pinned = _store_usage(store)
    return {
        "passthrough_store_bytes": (
            "Bytes of content in the store (blobs, layers, manifests)",
            used,
        ),
        "passthrough_store_pinned_bytes": (
            "Bytes of pinned content (hosted pushes): never evicted",
            pinned,
        ),
        "passthrough_store_cap_bytes": (
            "The store's cap, CACHE_MAX_BYTES (0: no cap)",
            float(store.max_bytes),
        ),
    }


def _store_usage(store: ContentStore) -> tuple[float, float]:
    """(bytes, pinned bytes) of the store, listed at most once per USAGE_TTL."""
    with _usage_lock:
        now = time.monotonic()
        cached = _usage.get(id(store))
        if cached is None or now - cached[0] >= USAGE_TTL:
            entries = store.entries()
            pinned = store.pinned()
            used = sum(size for _, size, _ in entries)
            held = sum(size for _, size, key in entries if key in pinned)
            cached = _usage[id(store)] = (now, used, held)
    return float(cached[1]), float(cached[2])
