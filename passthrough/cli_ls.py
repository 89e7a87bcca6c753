"""``passthrough ls [--cached|--hosted] [PATTERN] [--tags] [--json]``: what the door
holds, read from the store directly (the admin's view of ``GET /api/v1/repositories``,
:mod:`passthrough.registry.inventory`), for a shell on the host or in the pod.

PATTERN is a glob over the names (``library/*``, ``*nginx*``); a plain word matches as
a substring. ``--json`` prints the API's documents: ``{"repositories": [...]}``, with
each repository's ``tag_list`` under ``--tags``.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
from typing import Any


def add_parser(commands: Any) -> None:
    """The ``ls`` subcommand on ``passthrough``'s parser."""
    listing = commands.add_parser(
        "ls", help="list the hosted and cached repositories in the store (admin view)"
    )
    which = listing.add_mutually_exclusive_group()
    which.add_argument("--cached", action="store_true", help="only cached repositories")
    which.add_argument("--hosted", action="store_true", help="only hosted repositories")
    listing.add_argument("pattern", nargs="?", default=None, help="glob or substring of names")
    listing.add_argument("--tags", action="store_true", help="list each repository's tags")
    listing.add_argument("--json", action="store_true", help="print JSON (the API's shapes)")


def matches(pattern: str | None, name: str) -> bool:
    if not pattern:
        return True
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return pattern.lower() in name.lower()


def run(args: argparse.Namespace) -> int:
    """Exit 0 after printing, 2 with one line on stderr when the store cannot be read."""
    from passthrough.config import STORE, ConfigError, load_settings
    from passthrough.errors import PassthroughError
    from passthrough.registry.inventory import Inventory
    from passthrough.store import open_store

    source = "cached" if args.cached else "hosted" if args.hosted else None
    try:
        settings = load_settings(concerns={STORE})
        store = open_store(settings)
        if store is None:
            raise ConfigError("ls reads the content store: set CACHE_DIR, or STORE=s3")
        try:
            found = [
                e
                for e in Inventory(settings, store).repositories(source)
                if matches(args.pattern, e.name)
            ]
        finally:
            store.backend.close()
    except (ValueError, PassthroughError, OSError) as exc:  # ConfigError is a ValueError
        print(f"passthrough ls: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    documents = []
    for entry in found:
        document = entry.summary()
        if args.tags:
            document["tag_list"] = [t.document() for t in entry.tags]
        documents.append(document)
    if args.json:
        print(json.dumps({"repositories": documents}, indent=2))
    else:
        _print_table(documents)
    return 0


def _size(value: Any) -> str:
    if not isinstance(value, int):
        return "-"
    from passthrough.registry.gc import human_bytes

    return human_bytes(value)


def _print_table(documents: list[dict[str, Any]]) -> None:
    rows = [("NAME", "SOURCE", "UPSTREAM", "TAGS", "SIZE", "LAST PULLED", "PULLS")]
    for d in documents:
        rows.append(
            (
                d["name"],
                d["source"],
                d["upstream"] or "-",
                str(d["tags"]),
                _size(d["size"]),
                d["last_pulled"] or "-",
                str(d["pulls"]),
            )
        )
        for tag in d.get("tag_list", []):
            platforms = ",".join(tag["platforms"]) or "-"
            rows.append(
                (
                    f"  :{tag['tag']}",
                    tag["digest"][:19],
                    platforms,
                    "",
                    f"{_size(tag['compressed_size'])} (tar {_size(tag['tar_size'])})",
                    tag["last_pulled"] or "-",
                    str(tag["pulls"]),
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
    print(f"{len(documents)} repositor{'y' if len(documents) == 1 else 'ies'}", file=sys.stderr)
