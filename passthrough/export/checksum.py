"""Checksums a device can verify: ``GET <tar URL>.sha256`` and ``.md5`` (IOS-XE's
``verify /md5 flash:<file>``) answer with the digest of exactly the bytes the tar URL
sends, in the ``sha256sum``/``md5sum`` format (``<hex>  <filename>``).

An archive's bytes are decided by a few things (:attr:`Download.checksum_identity`:
the manifest digest, the options, the names written into it), so the digests are
computed once, while a whole archive is streamed to a client or by building it for the
checksum request, and kept in the store (``checksums/<id>.json``, see
:mod:`passthrough.store.layout`). Asking again costs one small read; a moved tag has
another manifest digest, so another id. Without a store each request builds the
archive again.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Iterator
from typing import Protocol

from passthrough.export.tarstream import FileRegion, PieceT, Segment, produce_range
from passthrough.store.content import ContentStore

log = logging.getLogger(__name__)

ALGORITHMS = ("sha256", "md5")
#: Part of every archive id: bump it when the archive layout changes, so that no digest
#: of the old bytes is ever served for the new ones.
LAYOUT_VERSION = "1"


class Archive(Protocol):
    """What a checksum needs of a prepared archive (a download or a bundle)."""

    segments: list[Segment]

    @property
    def filename(self) -> str: ...

    @property
    def checksum_identity(self) -> str: ...

    def start_fetching(self) -> None: ...

    def close(self) -> None: ...


def split_suffix(name: str) -> tuple[str, str | None]:
    """``nginx_latest.tar.md5`` → (``nginx_latest.tar``, ``md5``); other names as they are."""
    for algorithm in ALGORITHMS:
        suffix = f".tar.{algorithm}"
        if name.endswith(suffix):
            return name[: -len(algorithm) - 1], algorithm
    return name, None


def archive_id(archive: Archive) -> str:
    return hashlib.sha256(f"{LAYOUT_VERSION}\n{archive.checksum_identity}".encode()).hexdigest()


class Hashes:
    def __init__(self) -> None:
        self.hashes = {name: hashlib.new(name) for name in ALGORITHMS}
        self.size = 0

    def update(self, chunk: bytes) -> None:
        for hashed in self.hashes.values():
            hashed.update(chunk)
        self.size += len(chunk)

    def record(self) -> dict[str, str | int]:
        found: dict[str, str | int] = {n: h.hexdigest() for n, h in self.hashes.items()}
        found["size"] = self.size
        return found


def _valid(record: dict[str, str | int] | None) -> bool:
    return record is not None and all(isinstance(record.get(n), str) for n in ALGORITHMS)


def checksums(store: ContentStore | None, archive: Archive) -> dict[str, str | int]:
    """The archive's digests: the store's record, or built (every layer fetched, as a
    download would) and then recorded. Closes the archive."""
    identity = archive_id(archive)
    try:
        record = store.recall_checksum(identity) if store is not None else None
        if record is not None and _valid(record):
            return record
        hashes = Hashes()
        archive.start_fetching()
        for chunk in produce_range(archive.segments):
            hashes.update(chunk)
    finally:
        archive.close()
    found = hashes.record()
    _remember(store, identity, found)
    return found


def checksum_line(record: dict[str, str | int], algorithm: str, filename: str) -> str:
    """The ``sha256sum`` / ``md5sum`` line."""
    return f"{record[algorithm]}  {filename}\n"


class _Known:
    """The archive ids this process knows to be recorded: a fleet downloading one image
    costs the store one read of its record, not one per download."""

    LIMIT = 4096

    def __init__(self) -> None:
        self._ids: dict[str, None] = {}
        self._lock = threading.Lock()

    def __contains__(self, identity: str) -> bool:
        return identity in self._ids

    def add(self, identity: str) -> None:
        with self._lock:
            self._ids[identity] = None
            while len(self._ids) > self.LIMIT:
                del self._ids[next(iter(self._ids))]


KNOWN = _Known()


class _Hashing:
    """The archive ids a download of this process is hashing now: a fleet downloading
    one cold image hashes it in one download, not in all of them (500 concurrent
    downloads of an 8 MB archive hashed 4 GB twice over, a sixth of the CPU spent)."""

    def __init__(self) -> None:
        self._ids: set[str] = set()
        self._lock = threading.Lock()

    def claim(self, identity: str) -> bool:
        with self._lock:
            if identity in self._ids:
                return False
            self._ids.add(identity)
            return True

    def release(self, identity: str) -> None:
        with self._lock:
            self._ids.discard(identity)


HASHING = _Hashing()


def recorded(
    store: ContentStore | None, archive: Archive, chunks: Iterator[PieceT]
) -> Iterator[PieceT]:
    """``chunks`` (a whole archive) passed on while hashed, and the digests recorded once
    the last byte went out, unless the store holds them already or another download of
    this process is hashing the same archive (one that fails leaves it to the next).
    The download that hashes gets a FileRegion as bytes (it reads them anyway)."""
    if store is None:
        yield from chunks
        return
    identity = archive_id(archive)
    known = f"{id(store)} {identity}"  # per store: tests open several in one process
    if known in KNOWN or not HASHING.claim(known):
        yield from chunks
        return
    try:
        if _valid(store.recall_checksum(identity)):
            KNOWN.add(known)
            yield from chunks
            return
        hashes = Hashes()
        try:
            for chunk in chunks:
                for data in chunk.chunks() if isinstance(chunk, FileRegion) else (chunk,):
                    hashes.update(data)
                    yield data
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()  # a client that left: the archive's own cleanup runs now
        _remember(store, identity, hashes.record())
    finally:
        HASHING.release(known)


def _remember(store: ContentStore | None, identity: str, record: dict[str, str | int]) -> None:
    if store is None:
        return
    try:
        store.remember_checksum(identity, record)
        KNOWN.add(f"{id(store)} {identity}")
    except OSError as exc:
        log.warning("could not record the checksum of an archive: %s", exc.strerror)
