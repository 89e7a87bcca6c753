"""The reports of sync runs, kept in the store (``sync/runs/<id>.json``) so that
``GET /api/v1/sync`` on any replica lists the runs of every replica and of the CronJob
(``passthrough sync``), and a pod restart loses none. Only the last :data:`KEEP` are
kept. A run killed midway stays ``running`` in its report: that is what is known."""

from __future__ import annotations

import json
import secrets
from datetime import UTC, datetime
from typing import Any

from passthrough.store import layout
from passthrough.store.content import ContentStore
from passthrough.sync.engine import ImageResult, Summary

#: How many run reports are kept.
KEEP = 20


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class RunLog:
    """The run reports of one store."""

    def __init__(self, store: ContentStore) -> None:
        self.backend = store.backend

    def start(self, trigger: str, *, dry_run: bool = False) -> dict[str, Any]:
        """A new run's report, saved as running."""
        # The start time to the microsecond first: the keys sort as the runs started.
        run_id = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ-") + secrets.token_hex(4)
        run: dict[str, Any] = {
            "id": run_id,
            "state": "running",
            "trigger": trigger,
            "dry_run": dry_run,
            "started": _now(),
            "finished": None,
            "images": 0,
            "bytes": 0,
            "failed": [],
        }
        self._save(run)
        return run

    def progress(self, run: dict[str, Any], result: ImageResult, done: int, total: int) -> None:
        """Count one more image into a running run's report (``done`` of ``total``), so
        ``GET /api/v1/sync`` shows how far it got."""
        if result.error is None:
            run["images"] += 1
            run["bytes"] += result.bytes
        else:
            run["failed"].append(f"{result.image}: {result.error}")
        run["progress"] = f"{done}/{total}"
        self._save(run)

    def finish(
        self, run: dict[str, Any], summary: Summary | None, error: str | None = None
    ) -> None:
        """Close a run: ``succeeded`` when nothing failed, else ``failed``."""
        failed = list(summary.failed) if summary is not None else []
        if error is not None:
            failed.append(error)
        run.update(
            state="failed" if failed else "succeeded",
            finished=_now(),
            images=summary.images if summary is not None else 0,
            bytes=summary.bytes if summary is not None else 0,
            failed=failed,
        )
        self._save(run)
        self._trim()

    def runs(self, limit: int = KEEP) -> list[dict[str, Any]]:
        """The last runs, the newest first."""
        found = []
        for key in sorted(self._keys(), reverse=True)[:limit]:
            data = self.backend.get_bytes(key)
            try:
                run = json.loads(data) if data is not None else None
            except ValueError:
                continue
            if isinstance(run, dict):
                found.append(run)
        return found

    def _keys(self) -> list[str]:
        return [info.key for info in self.backend.list(layout.SYNC_RUNS)]

    def _save(self, run: dict[str, Any]) -> None:
        self.backend.put_bytes(layout.sync_run_key(run["id"]), json.dumps(run).encode())

    def _trim(self) -> None:
        for key in sorted(self._keys(), reverse=True)[KEEP:]:
            self.backend.delete(key)
