"""The shared, content-addressed cache on disk (CACHE_DIR, CACHE_MAX_BYTES).

Layout::

    blobs/sha256/<hex>-<size>        verified compressed blobs (and configs)
    layers/sha256/<diff-hex>-<size>  verified uncompressed layer tars
    manifests/sha256/<hex>           manifests by digest
    tags/<key>.json                  last digest seen per tag (for SERVE_STALE)
    tmp/                             files being written
    locks/                           one lock file per blob digest

Commit protocol: write into ``tmp/`` while hashing → check size and digest → atomic
rename into place. Nothing partial or unverified is ever visible under a final name.
Every read hashes the file again before it is sent (in the layer pool, ahead of the
stream), so a corrupted entry is detected, deleted and fetched again instead of served.
Sizes are part of the names: they come from verified data, so the archive's size is
known before a single byte is read.

One upstream fetch per blob, whatever the concurrency: threads and gunicorn worker
processes coordinate through ``flock`` on a per-digest lock file; later requests wait for
the commit and then read the committed file. A fetch is never cancelled because the
client that started it left: others may be waiting for it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from passthrough import metrics
from passthrough.client import RegistryClient
from passthrough.errors import UpstreamInvalid
from passthrough.fetch import (
    blob_chunks,
    disk_full,
    fetch_and_verify,
    file_chunks,
    is_disk_full,
    layer_what,
)
from passthrough.resolve import LayerDescriptor
from passthrough.store import LayerFile

log = logging.getLogger(__name__)

#: Eviction brings the cache down to this share of CACHE_MAX_BYTES, so it does not run
#: again on every commit.
EVICT_TARGET = 0.9
STALE_PART_SECONDS = 24 * 3600


@dataclass
class CacheStats:
    """Counters of this process, mirrored into Prometheus (:mod:`passthrough.metrics`)."""

    hits: int = 0
    misses: int = 0
    bytes_written: int = 0
    evictions: int = 0
    corrupt: int = 0


def _hex(digest: str) -> str:
    algorithm, _, value = digest.partition(":")
    if algorithm != "sha256" or len(value) != 64 or not all(c in "0123456789abcdef" for c in value):
        raise ValueError("only sha256 digests are cached")
    return value


class BlobCache:
    """Process-wide handle on the cache directory; thread-safe, multi-process safe."""

    def __init__(self, root: str | os.PathLike[str], max_bytes: int) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.stats = CacheStats()
        self._stats_lock = threading.Lock()
        self._verified: dict[tuple[int, int, int, int], str] = {}
        for part in ("blobs/sha256", "layers/sha256", "manifests/sha256", "tags", "tmp", "locks"):
            (self.root / part).mkdir(parents=True, exist_ok=True)
        self._remove_stale_parts()

    # -- naming ------------------------------------------------------------------------

    def _find(self, kind: str, digest: str) -> Path | None:
        prefix = _hex(digest) + "-"
        directory = self.root / kind / "sha256"
        # One entry per digest; the size suffix is read back from the name.
        for candidate in directory.glob(prefix + "*"):
            if candidate.name[len(prefix) :].isdigit():
                return candidate
        return None

    @staticmethod
    def _size_of(path: Path) -> int:
        return int(path.name.rsplit("-", 1)[1])

    def _count(self, **changes: int) -> None:
        with self._stats_lock:
            for name, delta in changes.items():
                setattr(self.stats, name, getattr(self.stats, name) + delta)
        metrics.cache_counts(changes)

    # -- temp files and locks ------------------------------------------------------------

    def _part(self, name: str) -> tuple[Path, BinaryIO]:
        path = self.root / "tmp" / f"{name}.{os.getpid()}.{secrets.token_hex(6)}.part"
        try:
            return path, path.open("xb")
        except OSError as exc:
            raise disk_full() if is_disk_full(exc) else exc from None

    def _remove_stale_parts(self) -> None:
        """Parts left by a process that died: its pid is gone, or the file is a day old."""
        now = time.time()
        for part in (self.root / "tmp").glob("*.part"):
            try:
                pid = int(part.name.split(".")[1])
                alive = pid != os.getpid() and _pid_alive(pid)
                if not alive or now - part.stat().st_mtime > STALE_PART_SECONDS:
                    part.unlink(missing_ok=True)
            except (ValueError, IndexError, OSError):
                continue

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """An exclusive lock across threads and processes, for one digest (hex)."""
        with self._lock(_hex(name) if ":" in name else name):
            yield

    @contextlib.contextmanager
    def _lock(self, name: str) -> Iterator[None]:
        path = self.root / "locks" / f"{name}.lock"
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _commit(self, part: Path, kind: str, digest: str, size: int) -> Path:
        """Rename a part verified while it was written into place; it is remembered as
        verified, so its first reader does not hash it again."""
        final = self.root / kind / "sha256" / f"{_hex(digest)}-{size}"
        os.utime(part, ns=(time.time_ns(), seal_ns(digest)))
        stat = os.stat(part)
        os.replace(part, final)
        self._remember_verified(_identity(stat), digest)
        self._count(bytes_written=size)
        return final

    # -- reading -----------------------------------------------------------------------

    def _open_verified(self, kind: str, digest: str) -> LayerFile | None:
        """Open an entry after hashing it; a corrupt one is deleted and None returned."""
        path = self._find(kind, digest)
        if path is None:
            return None
        try:
            handle = path.open("rb")
        except FileNotFoundError:
            return None  # evicted between the lookup and the open
        try:
            stat = os.fstat(handle.fileno())
            key = _identity(stat)
            size = stat.st_size
            sealed = stat.st_mtime_ns == seal_ns(digest) and size == self._size_of(path)
            if not sealed and self._verified_as(key) != digest:
                actual, size = _hash_handle(handle)
                if actual != digest or size != self._size_of(path):
                    log.warning(
                        "cache entry %s/%s is corrupt; fetching it again", kind, digest[:19]
                    )
                    self._count(corrupt=1)
                    path.unlink(missing_ok=True)
                    handle.close()
                    return None
                self._remember_verified(key, digest)
            # Least-recently-used order follows atime; mtime stays the seal, so it
            # keeps telling whether the content changed since it was verified.
            os.utime(path, ns=(time.time_ns(), seal_ns(digest)))
        except BaseException:
            handle.close()
            raise
        return LayerFile(handle, size, cache_hit=True)

    def _verified_as(self, key: tuple[int, int, int, int]) -> str | None:
        with self._stats_lock:
            return self._verified.get(key)

    def _remember_verified(self, key: tuple[int, int, int, int], digest: str) -> None:
        """Entries this process has hashed (or written while hashing) need no second
        pass while they stay the same file with the same size and mtime: any write to
        the content changes the mtime, and then the entry is hashed again."""
        with self._stats_lock:
            if len(self._verified) > 100_000:
                self._verified.clear()
            self._verified[key] = digest

    def known_size(self, layer: LayerDescriptor, *, compressed: bool) -> int | None:
        if compressed:
            return layer.size
        path = self._find("layers", layer.diff_id)
        return self._size_of(path) if path is not None else None

    def holds(self, layer: LayerDescriptor, *, compressed: bool) -> bool:
        """Whether the entry this download would read is already here (a known size is
        not enough: a blob's size comes from the manifest)."""
        if compressed:
            return self._find("blobs", layer.digest) is not None
        return self._find("layers", layer.diff_id) is not None

    # -- layers --------------------------------------------------------------------------

    def layer_file(
        self,
        client: RegistryClient,
        layer: LayerDescriptor,
        *,
        compressed: bool,
        cancel: threading.Event | None = None,
    ) -> LayerFile:
        """The verified layer tar (or, with ``compressed``, the blob), from the cache or
        fetched once for everyone. ``cancel`` is ignored on purpose: the fetch is shared."""
        kind, digest = ("blobs", layer.digest) if compressed else ("layers", layer.diff_id)
        hit = self._open_verified(kind, digest)
        if hit is not None:
            self._count(hits=1)
            return hit
        with self._lock(_hex(layer.digest)):
            hit = self._open_verified(kind, digest)  # committed while we waited
            if hit is not None:
                self._count(hits=1)
                return hit
            self._count(misses=1)
            self._fill(client, layer)
        found = self._open_verified(kind, digest)
        if found is None:  # evicted at once by a tiny CACHE_MAX_BYTES: still serve it
            raise disk_full()
        found.cache_hit = False  # fetched upstream just now
        return found

    def _fill(self, client: RegistryClient, layer: LayerDescriptor) -> None:
        """Commit the layer tar (and the blob, when fetched): decompressed from a cached
        blob when there is one, else fetched upstream. The pass that inflates also
        verifies, so a corrupt cached blob shows up there and is fetched again."""
        cached_blob = self._find("blobs", layer.digest)
        if cached_blob is not None:
            try:
                self._fill_from(file_chunks(cached_blob), layer, keep_blob=False)
                return
            except UpstreamInvalid:
                cached_blob.unlink(missing_ok=True)
                self._count(corrupt=1)
            except FileNotFoundError:
                pass  # evicted since the lookup
        self._fill_from(blob_chunks(client, layer, layer_what(layer), None), layer, keep_blob=True)

    def _fill_from(
        self, chunks: Iterator[bytes], layer: LayerDescriptor, *, keep_blob: bool
    ) -> None:
        blob_part: Path | None = None
        tar_part: Path | None = None
        blob_out: BinaryIO | None = None
        tar_out: BinaryIO | None = None
        try:
            tar_part, tar_out = self._part(_hex(layer.diff_id))
            if keep_blob:
                blob_part, blob_out = self._part(_hex(layer.digest))
            verified = fetch_and_verify(chunks, layer, blob_out=blob_out, tar_out=tar_out)
            tar_out.close()
            if blob_out is not None:
                blob_out.close()
            if blob_part is not None:
                self._commit(blob_part, "blobs", layer.digest, verified.blob_size)
                blob_part = None
            self._commit(tar_part, "layers", layer.diff_id, verified.tar_size)
            tar_part = None
        except OSError as exc:
            if is_disk_full(exc):
                raise disk_full() from None
            raise
        finally:
            for handle in (tar_out, blob_out):
                if handle is not None:
                    handle.close()
            for part in (tar_part, blob_part):
                if part is not None:
                    part.unlink(missing_ok=True)
        self.evict_if_needed()

    # -- small documents: configs, manifests, tags --------------------------------------

    def get_document(self, kind: str, digest: str) -> bytes | None:
        """A manifest (kind "manifests") or config (kind "blobs") by digest, verified."""
        path = self._find(kind, digest) if kind == "blobs" else self._manifest_path(digest)
        if path is None or not path.exists():
            return None
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            path.unlink(missing_ok=True)
            self._count(corrupt=1)
            return None
        return data

    def put_document(self, kind: str, digest: str, data: bytes) -> None:
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            return  # never cache what does not match its name
        try:
            part, handle = self._part(_hex(digest))
            with handle:
                handle.write(data)
            if kind == "blobs":
                self._commit(part, "blobs", digest, len(data))
            else:
                os.replace(part, self._manifest_path(digest))
        except OSError as exc:
            log.warning("could not cache %s %s: %s", kind, digest[:19], exc.strerror)

    def _manifest_path(self, digest: str) -> Path:
        return self.root / "manifests" / "sha256" / _hex(digest)

    @staticmethod
    def tag_key(registry: str, repository: str, tag: str) -> str:
        return hashlib.sha256(f"{registry}\0{repository}\0{tag}".encode()).hexdigest()

    def remember_tag(self, key: str, record: dict[str, str]) -> None:
        part, handle = self._part(key)
        with handle:
            handle.write(json.dumps(record).encode())
        os.replace(part, self.root / "tags" / f"{key}.json")

    def recall_tag(self, key: str) -> dict[str, str] | None:
        try:
            record = json.loads((self.root / "tags" / f"{key}.json").read_bytes())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    # -- eviction ------------------------------------------------------------------------

    def entries(self) -> list[tuple[float, int, Path]]:
        found: list[tuple[float, int, Path]] = []
        for kind in ("blobs", "layers", "manifests"):
            with os.scandir(self.root / kind / "sha256") as listing:
                for entry in listing:
                    try:
                        stat = entry.stat()
                    except FileNotFoundError:
                        continue
                    found.append((stat.st_atime, stat.st_size, Path(entry.path)))
        return found

    def total_bytes(self) -> int:
        return sum(size for _, size, _ in self.entries())

    def evict_if_needed(self) -> int:
        """Delete least-recently-used entries until the cache is under its target.
        Open readers keep their files: POSIX unlink leaves open descriptors intact."""
        entries = self.entries()
        total = sum(size for _, size, _ in entries)
        if total <= self.max_bytes:
            return 0
        removed = 0
        with self._lock("evict"):
            target = int(self.max_bytes * EVICT_TARGET)
            for _, size, path in sorted(entries, key=lambda e: e[0]):
                if total <= target:
                    break
                try:
                    path.unlink()
                except FileNotFoundError:
                    continue
                total -= size
                removed += 1
        self._count(evictions=removed)
        return removed


def seal_ns(digest: str) -> int:
    """The mtime a verified entry carries (2000-01-01 plus a few digest-derived seconds).

    Written at commit, after the content was hashed. Any later write to the file sets the
    mtime to the present, which breaks the seal, and the entry is hashed again before
    use; an intact seal lets a warm read (even in a freshly started worker) skip a full
    sha256 pass over hundreds of megabytes. Silent media corruption that leaves the
    mtime alone is out of its reach (the filesystem's job)."""
    return (946_684_800 + int(_hex(digest)[:6], 16)) * 1_000_000_000


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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
