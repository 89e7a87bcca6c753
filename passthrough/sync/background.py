"""``POST /api/v1/sync``'s run: the file checked at once (a bad one is the request's
400), then the run in a thread of the worker, one at a time per pod. The pod's lock is
the store's host lock ``sync`` (:meth:`~passthrough.store.flight.Flight.try_hold`), which
every worker of the pod shares: a second request while a run holds it is a 409."""

from __future__ import annotations

import logging
import threading
from contextlib import ExitStack
from typing import Any

from passthrough.errors import StoreRequired, SyncFileInvalid, SyncRunning
from passthrough.registry.proxy import Proxy
from passthrough.store import layout
from passthrough.sync.engine import Summary, Sync
from passthrough.sync.runs import RunLog
from passthrough.sync.spec import SyncFile, SyncFileError, load_sync_file

log = logging.getLogger(__name__)


def start_run(proxy: Proxy | None) -> dict[str, Any]:
    """Start a run of SYNC_FILE in the background; its report (state ``running``)."""
    if proxy is None:
        raise StoreRequired("sync needs the content store: set CACHE_DIR, or STORE=s3")
    path = proxy.settings.sync_file
    if path is None:
        raise SyncFileInvalid("SYNC_FILE is not set: there is nothing to sync")
    try:
        sync_file = load_sync_file(path, proxy.settings)
    except SyncFileError as exc:
        raise SyncFileInvalid(str(exc)) from None
    hold = proxy.store.flight.try_hold(layout.SYNC_LOCK)
    if hold is None:
        raise SyncRunning()
    try:
        runs = RunLog(proxy.store)
        run = runs.start("api")
    except BaseException:
        hold.close()
        raise
    thread = threading.Thread(
        target=_run,
        args=(proxy, sync_file, runs, {**run, "failed": []}, hold),
        name="sync",
        daemon=True,
    )
    thread.start()
    return run


def _run(
    proxy: Proxy, sync_file: SyncFile, runs: RunLog, run: dict[str, Any], hold: ExitStack
) -> None:
    summary: Summary | None = None
    error: str | None = None
    with hold:
        try:
            engine = Sync(proxy, concurrency=proxy.settings.layer_concurrency)
            summary = engine.run(sync_file, lambda *done: runs.progress(run, *done))
        except Exception as exc:  # the run's report says it failed
            log.exception("sync run %s failed", run["id"])
            error = f"the run stopped: {type(exc).__name__}"
    # Reported once the pod's lock is free: a run seen finished can be followed at once.
    log.info(
        "sync run %s: %d images, %d bytes fetched, %d failed",
        run["id"],
        summary.images if summary else 0,
        summary.bytes if summary else 0,
        len(summary.failed) if summary else 1,
    )
    runs.finish(run, summary, error)
