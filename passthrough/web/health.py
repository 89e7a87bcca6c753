"""GET /health: 200 while the process can serve (the liveness probe: it touches nothing).

GET /ready: the readiness probe, as JSON: the content store (a filesystem store takes a
file, an S3 bucket answers a HEAD) and each configured upstream (``GET /v2/``; one in
offline mode is never probed, and ``offline`` lists them). The
answer is 200 while the store is usable, 503 otherwise. Upstreams are informational: a
replica whose registry is down may still serve what its store holds, so taking it out
of the load balancer would only make things worse. The whole answer is kept
:data:`READY_TTL` seconds per worker, so a storm of probes costs one round of checks,
and then refreshed in the background while the last one is given.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from flask import Blueprint, Response, current_app

from passthrough.errors import PassthroughError
from passthrough.registry.routing import configured_upstreams
from passthrough.services import Services, services_of
from passthrough.upstream.offline import offline_reason
from passthrough.upstream.probe import PROBE_TIMEOUT, ProbeResult, probe_registry

log = logging.getLogger(__name__)

bp = Blueprint("health", __name__)

#: Seconds one /ready answer is reused by this worker.
READY_TTL = 5.0
#: Seconds /ready waits for all its checks (each has PROBE_TIMEOUT to connect, and as
#: long again to be answered); a check still running then counts as failed.
READY_DEADLINE = PROBE_TIMEOUT + 1.5
_EXTENSION = "passthrough.ready"


@bp.get("/health")
def health() -> Response:
    return Response("ok\n", mimetype="text/plain", headers={"Cache-Control": "no-store"})


@dataclass
class _ReadyCache:
    """The last /ready answer of this worker. Only the first probe waits for a round of
    checks (the lock makes concurrent ones share it); after that an expired answer is
    given at once while one background round refreshes it, so a probe never waits on an
    upstream that is slow to answer (a kubelet's timeout is a second or two)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    expires: float = 0.0
    report: dict[str, Any] = field(default_factory=dict)
    refreshing: bool = False

    def refresh(self, services: Services) -> None:
        try:
            report = readiness(services)
        finally:
            with self.lock:
                self.refreshing = False
        with self.lock:
            self.report, self.expires = report, time.monotonic() + READY_TTL


@bp.get("/ready")
def ready() -> Response:
    services = services_of(current_app)
    cache: _ReadyCache = current_app.extensions.setdefault(_EXTENSION, _ReadyCache())
    with cache.lock:
        if not cache.report:
            cache.report = readiness(services)
            cache.expires = time.monotonic() + READY_TTL
        elif time.monotonic() >= cache.expires and not cache.refreshing:
            cache.refreshing = True
            threading.Thread(
                target=cache.refresh, args=(services,), name="ready-refresh", daemon=True
            ).start()
        report = cache.report
    status = 200 if report["status"] == "ready" else 503
    return Response(
        json.dumps(report, indent=2) + "\n",
        status=status,
        mimetype="application/json",
        headers={"Cache-Control": "no-store"},
    )


def upstream_targets(services: Services) -> list[tuple[str, str]]:
    """(name, url) of every upstream: REGISTRY_URL as "default", then each UPSTREAMS alias."""
    return [(name, endpoint.url) for name, endpoint in configured_upstreams(services.settings)]


def offline_upstreams(services: Services) -> dict[str, str]:
    """Why each upstream in offline mode is never contacted, by its name."""
    settings = services.settings
    found = {name: offline_reason(settings, e) for name, e in configured_upstreams(settings)}
    return {name: reason for name, reason in found.items() if reason is not None}


def readiness(services: Services) -> dict[str, Any]:
    """Run the checks in parallel (each bounded by its own timeout, all by
    READY_DEADLINE) and assemble the report."""
    offline = offline_upstreams(services)
    targets = upstream_targets(services)
    pool = ThreadPoolExecutor(max_workers=len(targets) + 1, thread_name_prefix="ready")
    try:
        store_future = pool.submit(check_store, services)
        # An upstream in offline mode is never contacted, /ready's probe included.
        upstream_futures = [
            pool.submit(_offline_probe, offline[name])
            if name in offline
            else pool.submit(probe_registry, url, services.policy)
            for name, url in targets
        ]
        everything: list[Future[Any]] = [store_future, *upstream_futures]
        wait(everything, timeout=READY_DEADLINE)
    finally:
        # A check that overran finishes on its own (its timeouts bound it); the answer
        # does not wait for it.
        pool.shutdown(wait=False, cancel_futures=True)
    store = _result(store_future, _late_store(services))
    upstreams = []
    for (name, url), future in zip(targets, upstream_futures, strict=True):
        late = ProbeResult(False, None, f"no answer within {READY_DEADLINE:g} s")
        probe = _result(future, late)
        entry = {"name": name, "url": url, "ok": probe.ok, "status": probe.status}
        entry["detail"] = probe.detail
        if name in offline:
            entry["offline"] = True
        upstreams.append(entry)
    return {
        "status": "ready" if store["ok"] else "unready",
        "offline": sorted(offline),
        "store": store,
        "upstreams": upstreams,
    }


def _offline_probe(reason: str) -> ProbeResult:
    return ProbeResult(True, None, f"offline mode ({reason}): never contacted")


def _result(future: Future[Any], late: Any) -> Any:
    if not future.done() or future.cancelled():
        return late
    try:
        return future.result()
    except Exception:  # a check must never turn /ready into a 500
        log.exception("a readiness check failed unexpectedly")
        return late


def _backend_name(services: Services) -> str:
    return "none" if services.store is None else services.store.backend.name


def _late_store(services: Services) -> dict[str, Any]:
    return {
        "ok": False,
        "backend": _backend_name(services),
        "detail": f"the store did not answer within {READY_DEADLINE:g} s",
    }


def check_store(services: Services) -> dict[str, Any]:
    """The store's own probe (:meth:`~passthrough.store.base.Backend.probe`)."""
    store = services.store
    if store is None:
        # Nothing to fail: tar downloads spool to temporary files; /v2 answers 503.
        return {
            "ok": True,
            "backend": "none",
            "detail": "no content store (CACHE_DIR unset, STORE is not s3): the /v2 API is off",
        }
    try:
        store.backend.probe()
    except PassthroughError as exc:
        return {"ok": False, "backend": store.backend.name, "detail": exc.message}
    return {"ok": True, "backend": store.backend.name, "detail": store.describe()}
