"""``passthrough export -o site.tar nginx:1.25 ghcr.io/org/app:2.0 team/api:2026.06``:
several images in one archive for a disk that crosses an air gap
(:mod:`passthrough.export.bundle`).

It runs in this process with the server's configuration (the environment and .env: the
same REGISTRY_URL, UPSTREAMS, credentials, store and policy), where the server runs
(``docker compose exec passthrough passthrough export …`` or ``kubectl exec``), so
everything it fetches also warms the store; from any other machine, ``curl`` the
server's ``/bundle.tar?image=…`` instead. The archive is written to a temporary name
beside the output and renamed when complete: a failure (an unknown image in the list
fails before anything is fetched) leaves nothing behind. Progress goes to stderr on a
terminal, a summary (with the archive's sha256 and md5) to stdout, ``--json`` makes the
summary one JSON object; exit 1 names what failed, 2 is a configuration error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from passthrough.export.archive import FORMATS

if TYPE_CHECKING:
    from passthrough.export.checksum import Hashes
    from passthrough.services import Services

PROGRESS_EVERY = 0.5


def add_parser(commands: Any) -> None:
    """The subcommand's arguments (``commands`` is cli.py's subparsers)."""
    export = commands.add_parser(
        "export", help="write several images into one archive (docker save or OCI layout)"
    )
    export.add_argument(
        "images", nargs="+", metavar="IMAGE", help="nginx:1.25, ghcr.io/org/app:2.0"
    )
    export.add_argument("-o", "--output", required=True, help="the archive to write (site.tar)")
    export.add_argument(
        "--platform", default=None, help="os/arch[/variant] (default DEFAULT_PLATFORM)"
    )
    export.add_argument("--format", default="docker", choices=FORMATS)
    export.add_argument(
        "--layers", default="tar", choices=("tar", "gzip"), help="docker format: layer files"
    )
    export.add_argument(
        "--all", action="store_true", help="oci format: every platform of each image's index"
    )
    export.add_argument("--json", action="store_true", help="the summary as one JSON object")


def run(args: argparse.Namespace) -> int:
    from passthrough.config import ConfigError, load_settings
    from passthrough.errors import PassthroughError
    from passthrough.services import Services

    try:
        settings = load_settings()
        services = Services.create(settings)
    except ConfigError as exc:
        return _fail(args, f"configuration error: {exc}", 2)
    try:
        return _export(args, services)
    except (PassthroughError, OSError) as exc:
        message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
        return _fail(args, message, 1)
    finally:
        if services.store is not None:
            services.store.backend.close()


def _export(args: argparse.Namespace, services: Services) -> int:
    from passthrough.export.bundle import BundleRequest, prepare_bundle
    from passthrough.export.checksum import recorded
    from passthrough.export.request import parse_platform

    started = time.monotonic()
    request = BundleRequest(
        images=tuple(args.images),
        platform=parse_platform(args.platform, services.settings.default_platform),
        platform_explicit=args.platform is not None,
        format=args.format,
        layers=args.layers,
        all_platforms=args.all,
    )
    bundle = prepare_bundle(services, request)
    output = Path(args.output)
    part = output.with_name(f".{output.name}.{os.getpid()}.part")
    show = (
        _progress(sys.stderr, bundle.total_size) if sys.stderr.isatty() and not args.json else None
    )
    try:
        bundle.start_fetching()
        digests = _write(recorded(services.store, bundle, bundle.body()), part, show)
        part.replace(output)
    finally:
        bundle.close()
        part.unlink(missing_ok=True)
    summary = {
        "output": str(output),
        "format": args.format,
        "images": [_described(image) for image in bundle.images],
        "bytes": digests.size,
        "sha256": digests.hashes["sha256"].hexdigest(),
        "md5": digests.hashes["md5"].hexdigest(),
        "seconds": round(time.monotonic() - started, 2),
    }
    _print_summary(args, summary)
    return 0


def _described(image: Any) -> dict[str, Any]:
    first = image.members[0]
    return {
        "image": image.spec,
        "name": first.selection.full_name,
        "digest": image.index[2] if image.index is not None else first.image.manifest_digest,
        "platforms": [str(member.image.platform) for member in image.members],
    }


def _write(chunks: Iterator[bytes], part: Path, show: Callable[[int], None] | None) -> Hashes:
    from passthrough.export.checksum import Hashes

    digests = Hashes()
    with part.open("xb") as out:
        for chunk in chunks:
            out.write(chunk)
            digests.update(chunk)
            if show is not None:
                show(digests.size)
        out.flush()
        os.fsync(out.fileno())
    if show is not None:
        show(-1)
    return digests


def _progress(stream: TextIO, total: int | None) -> Callable[[int], None]:
    """A progress line on the terminal, redrawn at most every PROGRESS_EVERY seconds;
    called with -1 at the end."""
    last = [0.0]

    def show(done: int) -> None:
        now = time.monotonic()
        if done >= 0 and now - last[0] < PROGRESS_EVERY:
            return
        last[0] = now
        if done < 0:
            stream.write("\n")
        elif total:
            stream.write(f"\r{done >> 20} of {total >> 20} MiB ({100 * done // total}%)  ")
        else:
            stream.write(f"\r{done >> 20} MiB  ")
        stream.flush()

    return show


def _print_summary(args: argparse.Namespace, summary: dict[str, Any]) -> None:
    if args.json:
        print(json.dumps(summary))
        return
    for image in summary["images"]:
        platforms = ", ".join(image["platforms"])
        print(f"  {image['name']}  {image['digest'][:19]}  {platforms}")
    print(
        f"exported {len(summary['images'])} images to {summary['output']}: "
        f"{summary['bytes']} bytes in {summary['seconds']} s"
    )
    print(f"sha256 {summary['sha256']}\nmd5    {summary['md5']}")


def _fail(args: argparse.Namespace, message: str, code: int) -> int:
    line = " ".join(message.split())
    if getattr(args, "json", False):
        print(json.dumps({"error": line}))
    print(f"passthrough export: {line}", file=sys.stderr)
    return code
