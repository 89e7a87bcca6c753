"""``passthrough import``: put the images of a docker save archive, an OCI archive or an
OCI image layout directory into the hosted area of the store
(:mod:`passthrough.registry.importer`).

Progress goes to stderr while it is a terminal; the summary to stdout, or with
``--json`` one JSON document. Exit 0 when every image is in, 2 with one line naming
what failed (nothing is stored then)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TextIO

__all__ = ["add_import_parser", "import_command"]


def add_import_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "import",
        help="put the images of a docker save archive, an OCI archive or an OCI layout "
        "directory into the hosted area",
    )
    parser.add_argument("archive", type=Path, help="a tar file or an OCI layout directory")
    parser.add_argument(
        "--repository-prefix",
        default="",
        help="put before every image's repository name (team/: nginx:1.25 goes to team/nginx:1.25)",
    )
    parser.add_argument(
        "--repository",
        default=None,
        help="the repository of images the archive names only by a tag, or not at all",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


class TerminalProgress:
    """One line on stderr, rewritten at most ten times a second, when it is a TTY."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.enabled = out.isatty()
        self._next = 0.0
        self._shown = False

    def __call__(self, what: str, done: int, size: int | None) -> None:
        now = time.monotonic()
        if not self.enabled or (now < self._next and done != size):
            return
        self._next = now + 0.1
        share = f" {100 * done // size:3d}%" if size else ""
        line = f"importing {what[-60:]}{share} ({done >> 20} MiB)"
        self.out.write("\r\x1b[K" + line)
        self.out.flush()
        self._shown = True

    def end(self) -> None:
        if self._shown:
            self.out.write("\r\x1b[K")
            self.out.flush()


def import_command(args: argparse.Namespace) -> int:
    from passthrough.config import STORE, ConfigError, load_settings
    from passthrough.errors import PassthroughError
    from passthrough.registry.archives import open_source
    from passthrough.registry.hosted import Hosted
    from passthrough.registry.importer import Importer, Naming
    from passthrough.store import open_store

    progress = TerminalProgress(sys.stderr)
    try:
        settings = load_settings(concerns={STORE})
        store = open_store(settings)
        if store is None:
            raise ConfigError("import needs the content store: set CACHE_DIR, or STORE=s3")
        try:
            naming = Naming.of(args.repository_prefix, args.repository)
            importer = Importer(settings, store, Hosted(settings, store), progress)
            source = open_source(args.archive)
            try:
                report = importer.run(source, naming)
            finally:
                source.close()
        finally:
            progress.end()
            store.backend.close()
    except (ValueError, PassthroughError, OSError) as exc:  # ConfigError is a ValueError
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"passthrough import: {message}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.as_json()))
        return 0
    for image in report.images:
        name = image["repository"] + (f":{image['tag']}" if image["tag"] else "")
        print(f"{name} {image['digest']} ({image['kind']})")
    print(
        f"imported {len(report.images)} image name(s): {report.blobs_written} blob(s) written "
        f"({report.bytes_written} bytes), {report.blobs_present} already stored, "
        f"{report.manifests_written} manifest(s) and {report.tags_written} tag(s) written"
    )
    return 0
