"""GET /metrics: the Prometheus exposition of every gunicorn worker's samples (or this
process's, without PROMETHEUS_MULTIPROC_DIR), the pod's transfer slots in use, and the
content store's usage against its cap; see :mod:`passthrough.observe.metrics`.

On the probe port (HEALTH_BIND) it is rendered by the probe server's process
(:mod:`passthrough.probes`), which a busy worker's threads never slow.

The store's usage is a listing of the store (a bucket's costs requests), so a worker
reads it at most once every :data:`USAGE_TTL` seconds and serves that figure between."""

from __future__ import annotations

import logging
import threading
import time

from flask import Blueprint, Response, current_app

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


@bp.get("/metrics")
def prometheus_metrics() -> Response:
    body, content_type = _render(services_of(current_app))
    return Response(body, headers={"Content-Type": content_type, "Cache-Control": "no-store"})


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
