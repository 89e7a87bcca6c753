"""The filesystem backend (STORE=filesystem, CACHE_DIR): one directory of one host.

Every key is a file under the root, as :mod:`passthrough.store.layout` draws the tree,
with one twist: blobs and layer tars carry their size in their name::

    blobs/sha256/<hex>-<size>        verified compressed blobs (and configs)
    layers/sha256/<diff-hex>-<size>  verified uncompressed layer tars
    manifests/sha256/<hex>           manifests by digest
    tags/, pins/, hosted/, uploads/  records and upload sessions, named as their keys
    tmp/                             files being written
    locks/                           one lock file per digest

A commit is an atomic rename from ``tmp/`` on the same filesystem. Sizes are part of
the names: they come from verified data, so an archive's size is known before a byte
is read. Every read hashes the entry again before it is used, unless its seal (below)
says that it has not changed since it was verified, so a corrupted entry is detected,
deleted and fetched again instead of served.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from passthrough.errors import disk_full, is_disk_full
from passthrough.store import layout
from passthrough.store.base import Backend, LayerFile, LocalFile, ObjectInfo

log = logging.getLogger(__name__)


class FilesystemBackend(Backend):
    name = "filesystem"

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self._lock = threading.Lock()
        self._verified: dict[tuple[int, int, int, int], str] = {}
        directories = [layout.content_prefix(kind) for kind in layout.KINDS]
        for part in (*directories, layout.TAGS, layout.PINS, layout.STAGING_DIR):
            (self.root / part).mkdir(parents=True, exist_ok=True)

    def describe(self) -> str:
        return f"filesystem store {self.root}"

    def staging_dir(self) -> Path:
        return self.root / layout.STAGING_DIR

    def lock_dir(self) -> Path:
        return self.root / layout.LOCK_DIR

    # -- naming ------------------------------------------------------------------------

    def _find(self, key: str) -> Path | None:
        content = layout.parse_content_key(key)
        if content is None:
            path = self.root / key
            return path if path.exists() else None
        kind, digest = content
        hex_digest = layout.hex_of(digest)
        directory = self.root / layout.content_prefix(kind)
        if kind == "manifests":
            path = directory / hex_digest
            return path if path.exists() else None
        prefix = hex_digest + "-"
        # One entry per digest; the size suffix is read back from the name.
        for candidate in directory.glob(prefix + "*"):
            if candidate.name[len(prefix) :].isdigit():
                return candidate
        return None

    def _final(self, key: str, size: int) -> Path:
        content = layout.parse_content_key(key)
        if content is None:
            return self.root / key
        kind, digest = content
        hex_digest = layout.hex_of(digest)
        name = hex_digest if kind == "manifests" else f"{hex_digest}-{size}"
        return self.root / layout.content_prefix(kind) / name

    @staticmethod
    def _size_in_name(path: Path) -> int | None:
        head, _, tail = path.name.rpartition("-")
        return int(tail) if head and tail.isdigit() else None

    # -- reading -----------------------------------------------------------------------

    def size(self, key: str) -> int | None:
        path = self._find(key)
        if path is None:
            return None
        named = self._size_in_name(path)
        if named is not None:
            return named
        try:
            return path.stat().st_size
        except FileNotFoundError:
            return None

    def open(self, key: str, digest: str | None) -> LayerFile | None:
        """Open an entry after hashing it (unless sealed or already hashed by this
        process); a corrupt one is deleted and None returned."""
        path = self._find(key)
        if path is None:
            return None
        try:
            handle = path.open("rb")
        except FileNotFoundError:
            return None  # evicted between the lookup and the open
        try:
            stat = os.fstat(handle.fileno())
            identity = _identity(stat)
            size = stat.st_size
            named = self._size_in_name(path)
            if digest is not None:
                sealed = stat.st_mtime_ns == seal_ns(digest) and size == named
                if not sealed and self._verified_as(identity) != digest:
                    actual, size = _hash_handle(handle)
                    if actual != digest or (named is not None and size != named):
                        log.warning("store entry %s is corrupt; fetching it again", key[:28])
                        path.unlink(missing_ok=True)
                        handle.close()
                        self.report_corrupt(key)
                        return None
                    self._remember_verified(identity, digest)
                # Least-recently-used order follows atime; mtime stays the seal, so it
                # keeps telling whether the content changed since it was verified.
                os.utime(path, ns=(time.time_ns(), seal_ns(digest)))
        except BaseException:
            handle.close()
            raise
        return LocalFile(handle, size, cache_hit=True)

    def get_bytes(self, key: str) -> bytes | None:
        path = self._find(key)
        if path is None:
            return None
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None

    # -- writing -----------------------------------------------------------------------

    def commit_file(self, key: str, handle: BinaryIO, path: Path, size: int) -> None:
        """Rename a part verified while it was written into place, sealed; it is
        remembered as verified, so its first reader does not hash it again."""
        content = layout.parse_content_key(key)
        final = self._final(key, size)
        if content is not None:
            digest = content[1]
            os.utime(path, ns=(time.time_ns(), seal_ns(digest)))
            self._remember_verified(_identity(os.stat(path)), digest)
        else:
            final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, final)

    def put_bytes(self, key: str, data: bytes) -> None:
        # <name>.<pid>.<random>.part, as every part: the pid tells a dead writer's part.
        path = self.staging_dir() / layout.part_name(f"put-{threading.get_ident()}")
        try:
            with path.open("xb") as handle:
                handle.write(data)
            with path.open("rb") as handle:
                self.commit_file(key, handle, path, len(data))
        except OSError as exc:
            path.unlink(missing_ok=True)
            if is_disk_full(exc):
                raise disk_full() from None
            raise

    def delete(self, key: str) -> None:
        path = self._find(key)
        if path is not None:
            path.unlink(missing_ok=True)

    def touch(self, key: str) -> None:
        path = self._find(key)
        if path is not None:
            try:
                stat = path.stat()
                os.utime(path, ns=(time.time_ns(), stat.st_mtime_ns))
            except FileNotFoundError:
                pass

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        top = prefix.split("/", 1)[0]
        if top in layout.KINDS:
            with os.scandir(self.root / layout.content_prefix(top)) as listing:
                for entry in listing:
                    name = entry.name
                    hex_digest = name if top == "manifests" else name.rpartition("-")[0]
                    digest = layout.digest_of_hex(hex_digest)
                    key = layout.content_key(top, digest) if digest else ""
                    if not key.startswith(prefix) or not key:
                        continue
                    try:
                        stat = entry.stat()
                    except FileNotFoundError:
                        continue
                    yield ObjectInfo(key, stat.st_size, stat.st_atime)
            return
        base = self.root / top
        if not base.is_dir():
            return
        for dirpath, _, files in os.walk(base):
            for file_name in files:
                full = Path(dirpath) / file_name
                key = full.relative_to(self.root).as_posix()
                if not key.startswith(prefix):
                    continue
                try:
                    stat = full.stat()
                except FileNotFoundError:
                    continue
                yield ObjectInfo(key, stat.st_size, stat.st_atime)

    # -- the verified-inode memo ---------------------------------------------------------

    def _verified_as(self, identity: tuple[int, int, int, int]) -> str | None:
        with self._lock:
            return self._verified.get(identity)

    def _remember_verified(self, identity: tuple[int, int, int, int], digest: str) -> None:
        """Entries this process has hashed (or written while hashing) need no second
        pass while they stay the same file with the same size and mtime: any write to
        the content changes the mtime, and then the entry is hashed again."""
        with self._lock:
            if len(self._verified) > 100_000:
                self._verified.clear()
            self._verified[identity] = digest


def seal_ns(digest: str) -> int:
    """The mtime a verified entry carries (2000-01-01 plus a few digest-derived seconds).

    Written at commit, after the content was hashed. Any later write to the file sets the
    mtime to the present, which breaks the seal, and the entry is hashed again before
    use; an intact seal lets a warm read (even in a freshly started worker) skip a full
    sha256 pass over hundreds of megabytes. Silent media corruption that leaves the
    mtime alone is out of its reach (the filesystem's job)."""
    return (946_684_800 + int(digest.partition(":")[2][:6], 16)) * 1_000_000_000


def _identity(stat: os.stat_result) -> tuple[int, int, int, int]:
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


def _hash_handle(handle: BinaryIO) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    while chunk := handle.read(4 << 20):
        digest.update(chunk)
        size += len(chunk)
    handle.seek(0)
    return "sha256:" + digest.hexdigest(), size
