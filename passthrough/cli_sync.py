"""``passthrough sync``: bring the images SYNC_FILE (or ``--file``) names into the
content store (:mod:`passthrough.sync`), as the Helm chart's CronJob and compose's
one-shot service run it.

One line per image (``--json``: one JSON object per image, then ``{"summary": …}``),
a progress bar on stderr where stdout is a terminal, a summary; exit 0 when everything
synced, 1 naming what failed, 2 when it cannot run at all (a bad file, no store) with
one line and nothing fetched."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, TextIO

BAR_WIDTH = 30


def add_parser(commands: Any) -> None:
    """The ``sync`` subcommand of ``passthrough``."""
    sync = commands.add_parser(
        "sync", help="fetch the images SYNC_FILE names into the content store"
    )
    sync.add_argument("--file", default=None, help="the sync file (default: SYNC_FILE)")
    sync.add_argument(
        "--dry-run", action="store_true", help="list what would be fetched; fetch nothing"
    )
    sync.add_argument(
        "--json", action="store_true", help="one JSON line per image, then the summary"
    )


def run(args: argparse.Namespace) -> int:
    from passthrough.config import STORE, UPSTREAM, ConfigError, load_settings
    from passthrough.errors import PassthroughError
    from passthrough.sync.spec import SyncFileError, load_sync_file

    try:
        settings = load_settings(concerns={STORE, UPSTREAM})
        path = args.file or settings.sync_file
        if not path:
            raise ConfigError("name the images: set SYNC_FILE, or pass --file")
        sync_file = load_sync_file(path, settings)
        return _sync(settings, sync_file, dry_run=args.dry_run, as_json=args.json)
    except (SyncFileError, ValueError, PassthroughError, OSError) as exc:  # ConfigError too
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"passthrough sync: {message}", file=sys.stderr)
        return 2


def _sync(settings: Any, sync_file: Any, *, dry_run: bool, as_json: bool) -> int:
    from passthrough.config import ConfigError
    from passthrough.registry.proxy import Proxy
    from passthrough.services import outbound_policy
    from passthrough.store import open_store
    from passthrough.sync.engine import Sync
    from passthrough.sync.runs import RunLog
    from passthrough.upstream.auth import TokenCache

    store = open_store(settings)
    if store is None:
        raise ConfigError("sync needs the content store: set CACHE_DIR, or STORE=s3")
    try:
        proxy = Proxy(settings, store, TokenCache(), outbound_policy(settings))
        runs = None if dry_run else RunLog(store)
        record = runs.start("cli") if runs is not None else None
        printer = Printer(sys.stdout, sys.stderr, dry_run=dry_run, as_json=as_json)
        engine = Sync(proxy, dry_run=dry_run, concurrency=settings.layer_concurrency)
        summary = engine.run(sync_file, printer.image)
        if runs is not None and record is not None:
            runs.finish(record, summary)
        printer.summary(summary)
    finally:
        store.backend.close()
    return 1 if summary.failed else 0


class Printer:
    """What the run prints: a line (or JSON) per image, a bar on a terminal, the summary."""

    def __init__(self, out: TextIO, err: TextIO, *, dry_run: bool, as_json: bool) -> None:
        self.out = out
        self.err = err
        self.dry_run = dry_run
        self.as_json = as_json
        self.bar = not as_json and out.isatty()

    def image(self, result: Any, done: int, total: int) -> None:
        if self.as_json:
            print(json.dumps(result.as_json()), file=self.out, flush=True)
            return
        if self.bar:
            self.err.write("\r\033[K")
        print(self._line(result), file=self.out, flush=True)
        if self.bar:
            filled = BAR_WIDTH * done // max(total, 1)
            self.err.write(f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {done}/{total}")
            self.err.flush()

    def _line(self, result: Any) -> str:
        if result.error is not None:
            return f"failed   {result.image}: {result.error}"
        platforms = f" ({', '.join(result.platforms)})" if result.platforms else ""
        verb = "would fetch" if self.dry_run else "synced  "
        return (
            f"{verb} {result.image} {result.digest}{platforms}: {result.blobs} blobs, "
            f"{human(result.bytes)} fetched, {result.present} already stored"
        )

    def summary(self, summary: Any) -> None:
        if self.bar:
            self.err.write("\r\033[K")
            self.err.flush()
        if self.as_json:
            print(json.dumps({"summary": summary.as_json()}), file=self.out, flush=True)
        else:
            verb = "would sync" if self.dry_run else "synced"
            print(
                f"{verb} {summary.images} images: {summary.blobs} blobs, {human(summary.bytes)} "
                f"fetched, {summary.present} already stored, in {summary.seconds:.1f} s",
                file=self.out,
                flush=True,
            )
        for failure in summary.failed:
            print(f"passthrough sync: failed: {failure}", file=self.err, flush=True)


def human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"
