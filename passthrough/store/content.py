"""The content store: verified blobs, layer tars and manifests by digest, over any
backend (:mod:`passthrough.store.filesystem`, :mod:`passthrough.store.s3`).

What it adds to a backend, written once for all of them:

- **verification**: every blob is hashed while it is written, its layer tar
  decompressed and hashed against the config's diff_id (:mod:`passthrough.store.verify`);
  only then is it committed. Small documents are hashed again when read.
- **single-flight**: one upstream fetch per digest (:mod:`passthrough.store.flight`);
  later requests wait for the commit and then read the committed entry. A fetch is never
  cancelled because the client that started it left: others may be waiting for it.
- **eviction**: least recently used first, down to a share of CACHE_MAX_BYTES, never a
  pinned entry (the hosted area pins what its manifests reference).
- **records**: small JSON documents (the last digest seen per tag, and who read it, for
  stale serving and offline mode: :mod:`passthrough.export.stale`, the /v2 proxy).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from passthrough.errors import UpstreamInvalid, disk_full, is_disk_full
from passthrough.observe import metrics
from passthrough.oci.manifest import LayerDescriptor, sha256_digest
from passthrough.store import layout
from passthrough.store.base import Backend, BlobSource, LayerFile, LocalFile
from passthrough.store.flight import Flight
from passthrough.store.layout import content_key, hex_of
from passthrough.store.readthrough import BlobOpener, BlobStream, ReadThrough
from passthrough.store.uploads import FilesystemUploads, Uploads
from passthrough.store.verify import READ_CHUNK, fetch_and_verify

log = logging.getLogger(__name__)

#: Eviction brings the store down to this share of CACHE_MAX_BYTES, so it does not run
#: again on every commit.
EVICT_TARGET = 0.9
STALE_PART_SECONDS = 24 * 3600
#: A verified part to commit: (path, handle), kind, digest, size.
_Commit = tuple[tuple[Path, BinaryIO], str, str, int]


@dataclass
class CacheStats:
    """Counters of this process, mirrored into Prometheus (:mod:`passthrough.observe.metrics`)."""

    hits: int = 0
    misses: int = 0
    bytes_written: int = 0
    evictions: int = 0
    corrupt: int = 0


class ContentStore:
    """Process-wide handle on one store; thread-safe and multi-process safe."""

    def __init__(
        self, backend: Backend, max_bytes: int, flight: Flight, *, evict_interval: float = 0.0
    ) -> None:
        self.backend = backend
        self.max_bytes = max_bytes
        self.flight = flight
        self.stats = CacheStats()
        self._stats_lock = threading.Lock()
        #: Listing a bucket is not free: eviction checks at most this often (seconds).
        self._evict_interval = evict_interval
        self._next_evict_check = 0.0
        backend.on_corrupt = lambda key: self._count(corrupt=1)
        self._remove_stale_parts()
        self._uploads: Uploads | None = None
        self._read_through = ReadThrough(
            backend, flight, commit=self._commit, count=self._count, evict=self.evict_if_needed
        )

    def describe(self) -> str:
        return self.backend.describe()

    def _count(self, **changes: int) -> None:
        with self._stats_lock:
            for name, delta in changes.items():
                setattr(self.stats, name, getattr(self.stats, name) + delta)
        metrics.cache_counts(changes)

    # -- temporary files and locks -----------------------------------------------------

    def _part(self, name: str) -> tuple[Path, BinaryIO]:
        path = self.backend.staging_dir() / layout.part_name(name)
        try:
            return path, path.open("x+b")
        except OSError as exc:
            raise disk_full() if is_disk_full(exc) else exc from None

    def _remove_stale_parts(self) -> None:
        """Parts left by a process that died: its pid is gone, or the file is a day old.

        Age is the inode's change time, not its mtime: a commit seals a part (sets its
        mtime to the digest's seal, years back) just before renaming it into place, and
        a store opened by another process in that instant (``passthrough gc``, a new
        worker) must not take a live writer's sealed part for an old one."""
        now = time.time()
        for part in self.backend.staging_dir().glob("*" + layout.PART_SUFFIX):
            pid = layout.part_pid(part.name)
            if pid is None:
                continue
            try:
                alive = pid != os.getpid() and _pid_alive(pid)
                if not alive or now - part.stat().st_ctime > STALE_PART_SECONDS:
                    part.unlink(missing_ok=True)
            except OSError:
                continue

    def lock(self, digest: str) -> contextlib.AbstractContextManager[None]:
        """The single-flight lock of one digest, across threads, processes and (with
        Redis) replicas."""
        return self.flight.hold(hex_of(digest))

    # -- layers --------------------------------------------------------------------------

    def stored_size(self, layer: LayerDescriptor, *, compressed: bool) -> int | None:
        """The size of the entry this download would read (the blob, or the layer tar)
        when it is already here, else None: one lookup."""
        kind, digest = ("blobs", layer.digest) if compressed else ("layers", layer.diff_id)
        size = self.backend.size(content_key(kind, digest))
        if size is None and self.backend.commit_uploads:
            # Verified and being uploaded: readers get its local file (_open_ready).
            for path in self._ready_paths(kind, digest):
                with contextlib.suppress(OSError):
                    return path.stat().st_size
        return size

    @property
    def opens_locally(self) -> bool:
        return self.backend.opens_locally

    def _open(self, kind: str, digest: str) -> LayerFile | None:
        found = self.backend.open(content_key(kind, digest), digest)
        if found is not None:
            self._count(hits=1)
        return found

    def layer_file(
        self,
        source: BlobSource,
        layer: LayerDescriptor,
        *,
        compressed: bool,
        cancel: threading.Event | None = None,
    ) -> LayerFile:
        """The verified layer tar (or, with ``compressed``, the blob), from the store or
        fetched once for everyone. ``cancel`` is not passed on, on purpose: the fetch
        is shared."""
        kind, digest = ("blobs", layer.digest) if compressed else ("layers", layer.diff_id)
        hit = self._open(kind, digest)
        if hit is not None:
            return hit
        if self.backend.commit_uploads:
            return self._layer_file_uploading(source, layer, kind, digest)
        with self.lock(layer.digest):
            hit = self._open(kind, digest)  # committed while we waited
            if hit is not None:
                return hit
            self._count(misses=1)
            files = self._fill(source, layer)
        return self._keep(files, kind)

    def _keep(self, files: dict[str, LayerFile], kind: str) -> LayerFile:
        wanted = files.pop(kind)
        for other in files.values():
            other.close()
        self.evict_if_needed()
        return wanted

    def _layer_file_uploading(
        self, source: BlobSource, layer: LayerDescriptor, kind: str, digest: str
    ) -> LayerFile:
        """:meth:`layer_file` on a backend whose commit is an upload: the fetcher hands
        its verified local file to its reader at once and uploads it in the background,
        holding the digest's lock until the object is in place; meanwhile the others
        read that local file (its *ready* link) instead of waiting for the upload. They
        poll rather than block on the lock, to see the link appear."""
        hex_digest = hex_of(layer.digest)
        delay = 0.01
        while True:
            found = self._open_ready(kind, digest) or self._open(kind, digest)
            if found is not None:
                return found
            hold = self.flight.try_hold(hex_digest)
            if hold is None:
                time.sleep(delay)
                delay = min(delay * 2, 0.2)
                continue
            with hold:
                self.flight.hold_lease(hex_digest, hold)
                # Store, link, store: a commit that lands between the first look and the
                # link's removal is seen by the second.
                found = self._open(kind, digest) or self._open_ready(kind, digest)
                found = found or self._open(kind, digest)
                if found is not None:
                    return found
                self._count(misses=1)
                files = self._fill(source, layer, hold=hold)
            return self._keep(files, kind)

    def _ready_paths(self, kind: str, digest: str) -> Iterator[Path]:
        """The verified local files of an entry being uploaded by live processes."""
        for path in self.backend.staging_dir().glob(layout.ready_glob(kind, digest)):
            pid = layout.part_pid(path.name)
            if pid is not None and _pid_alive(pid):
                yield path

    def _open_ready(self, kind: str, digest: str) -> LayerFile | None:
        """The verified local file of an entry being uploaded by a live process, or None."""
        for path in self._ready_paths(kind, digest):
            try:
                handle = path.open("rb")
            except OSError:
                continue  # committed (and unlinked) meanwhile
            self._count(hits=1)
            return LocalFile(handle, os.fstat(handle.fileno()).st_size)
        return None

    def _fill(
        self,
        source: BlobSource,
        layer: LayerDescriptor,
        hold: contextlib.ExitStack | None = None,
    ) -> dict[str, LayerFile]:
        """Commit the layer tar (and the blob, when fetched): decompressed from a stored
        blob when there is one, else fetched upstream. The pass that inflates also
        verifies, so a corrupt stored blob shows up there and is fetched again. Returns
        the committed files, still open (read from local disk, whatever the backend)."""
        blob_key = content_key("blobs", layer.digest)
        stored_blob = self.backend.open(blob_key, None)
        if stored_blob is not None:
            try:
                return self._fill_from(
                    stored_chunks(stored_blob), layer, keep_blob=False, hold=hold
                )
            except UpstreamInvalid:
                self.backend.delete(blob_key)
                self._count(corrupt=1)
            except FileNotFoundError:
                pass  # evicted since the lookup
            finally:
                stored_blob.close()
        return self._fill_from(source(None), layer, keep_blob=True, hold=hold)

    def _fill_from(
        self,
        chunks: Iterator[bytes],
        layer: LayerDescriptor,
        *,
        keep_blob: bool,
        hold: contextlib.ExitStack | None = None,
    ) -> dict[str, LayerFile]:
        """Fetch, verify and commit; with ``hold`` (a backend whose commit is an
        upload) the commit runs in the background and takes the hold along."""
        parts: list[tuple[Path, BinaryIO]] = []
        try:
            tar_part = self._part(hex_of(layer.diff_id))
            parts.append(tar_part)
            blob_part = self._part(hex_of(layer.digest)) if keep_blob else None
            if blob_part is not None:
                parts.append(blob_part)
            verified = fetch_and_verify(
                chunks,
                layer,
                blob_out=blob_part[1] if blob_part else None,
                tar_out=tar_part[1],
            )
            commits = [(tar_part, "layers", layer.diff_id, verified.tar_size)]
            if blob_part is not None:
                commits.insert(0, (blob_part, "blobs", layer.digest, verified.blob_size))
            files: dict[str, LayerFile] = {}
            for part, kind, _digest, size in commits:
                part[1].flush()
                files[kind] = LocalFile(part[1], size)
            if hold is None:
                for commit in commits:
                    self._commit(*commit)
            else:
                self._commit_in_background(commits, hold)
            parts.clear()  # the handles now belong to the files
            return files
        except OSError as exc:
            if is_disk_full(exc):
                raise disk_full() from None
            raise
        finally:
            for path, handle in parts:
                handle.close()
                path.unlink(missing_ok=True)

    def _commit_in_background(self, commits: list[_Commit], hold: contextlib.ExitStack) -> None:
        """Link each verified part as *ready* for the other readers, then upload them on
        a thread that owns ``hold`` (the digest's lock) until every commit ended. A
        failed upload only costs the store its copy: the readers have verified bytes."""
        ready: list[Path] = []
        for (path, _), kind, digest, _size in commits:
            link = self.backend.staging_dir() / layout.ready_name(kind, digest)
            os.link(path, link)
            ready.append(link)
        owned = hold.pop_all()

        def upload() -> None:
            with owned:
                for (path, _), kind, digest, size in commits:
                    try:
                        with open(path, "rb") as handle:
                            self._commit((path, handle), kind, digest, size)
                    except Exception as exc:  # noqa: BLE001 - logged; readers are unaffected
                        log.warning("could not store %s %s: %s", kind, digest[:19], exc)
                        path.unlink(missing_ok=True)
                for link in ready:
                    link.unlink(missing_ok=True)
            self.evict_if_needed()

        name = "commit-" + hex_of(commits[0][2])[:12]
        threading.Thread(target=upload, name=name, daemon=True).start()

    def new_part(self, name: str) -> tuple[Path, BinaryIO]:
        """A new staging file (``name`` is a hint: a digest's hex), open for writing;
        removed at start-up once its process is gone (an import stages here)."""
        return self._part(name)

    def commit_part(self, part: tuple[Path, BinaryIO], kind: str, digest: str, size: int) -> None:
        """Make a staging file the caller verified the entry ``digest`` of ``kind``."""
        self._commit(part, kind, digest, size)

    def _commit(self, part: tuple[Path, BinaryIO], kind: str, digest: str, size: int) -> None:
        path, handle = part
        self.backend.commit_file(content_key(kind, digest), handle, path, size)
        # A backend that uploads leaves the local part behind: it is not needed once
        # committed (the open handle still reads it).
        path.unlink(missing_ok=True)
        self._count(bytes_written=size)

    # -- upload sessions of the hosted area ---------------------------------------------------

    @property
    def has_uploads(self) -> bool:
        """Whether this store keeps upload sessions (:func:`has_uploads`)."""
        return has_uploads(self.backend)

    @property
    def uploads(self) -> Uploads:
        """The backend's upload sessions (made on first use)."""
        if self._uploads is None:
            with self._stats_lock:
                if self._uploads is None:
                    self._uploads = open_uploads(self.backend, self.flight)
        return self._uploads

    # -- blobs for the /v2 API -------------------------------------------------------------

    def blob_size(self, digest: str) -> int | None:
        return self.backend.size(content_key("blobs", digest))

    def open_blob(self, digest: str) -> LayerFile | None:
        """A committed blob for reading, verified (see the backend), or None."""
        return self._open("blobs", digest)

    def read_through(self, digest: str, opener: BlobOpener) -> BlobStream:
        """The blob from the store, or streamed while it is fetched once for every
        reader (:mod:`passthrough.store.readthrough`)."""
        return self._read_through.open(digest, opener)

    # -- small documents: configs, manifests ---------------------------------------------

    def get_document(self, kind: str, digest: str) -> bytes | None:
        """A manifest (kind "manifests") or config (kind "blobs") by digest, verified."""
        key = content_key(kind, digest)
        data = self.backend.get_bytes(key)
        if data is None:
            return None
        if sha256_digest(data) != digest:
            self.backend.delete(key)
            self._count(corrupt=1)
            return None
        self.backend.touch(key)
        return data

    def put_document(self, kind: str, digest: str, data: bytes) -> None:
        if sha256_digest(data) != digest:
            return  # never store what does not match its name
        try:
            self.backend.put_bytes(content_key(kind, digest), data)
        except OSError as exc:
            log.warning("could not store %s %s: %s", kind, digest[:19], exc.strerror)
            return
        if kind == "blobs":
            self._count(bytes_written=len(data))

    def presigned_url(self, kind: str, digest: str, expires: int = 900) -> str | None:
        return self.backend.presigned_url(content_key(kind, digest), expires)

    # -- records: tags -------------------------------------------------------------------

    #: The name of a tag's record (:func:`passthrough.store.layout.tag_id`).
    tag_key = staticmethod(layout.tag_id)

    def remember_tag(self, key: str, record: dict[str, str]) -> None:
        self.backend.put_bytes(layout.tag_record_key(key), json.dumps(record).encode())

    def recall_tag(self, key: str) -> dict[str, str] | None:
        try:
            data = self.backend.get_bytes(layout.tag_record_key(key))
            record = json.loads(data) if data is not None else None
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def remember_checksum(self, identity: str, record: dict[str, str | int]) -> None:
        """Keep the digests of one archive (:mod:`passthrough.export.checksum`)."""
        self.backend.put_bytes(layout.checksum_record_key(identity), json.dumps(record).encode())

    def recall_checksum(self, identity: str) -> dict[str, str | int] | None:
        try:
            data = self.backend.get_bytes(layout.checksum_record_key(identity))
            record = json.loads(data) if data is not None else None
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    # -- pins ------------------------------------------------------------------------------

    def pin(self, kind: str, digest: str) -> None:
        """Keep an entry from eviction (until :meth:`unpin`)."""
        self.backend.put_bytes(layout.pin_key(kind, digest), b"")

    def unpin(self, kind: str, digest: str) -> None:
        self.backend.delete(layout.pin_key(kind, digest))

    def pinned(self) -> set[str]:
        """The content keys of the pinned entries."""
        found = (layout.parse_pin_key(info.key) for info in self.backend.list(layout.PINS))
        return {content_key(*entry) for entry in found if entry is not None}

    # -- eviction ------------------------------------------------------------------------

    def entries(self) -> list[tuple[float, int, str]]:
        """(last used, size, key) of every content entry."""
        found: list[tuple[float, int, str]] = []
        for kind in layout.KINDS:
            for info in self.backend.list(layout.content_prefix(kind)):
                found.append((info.last_used, info.size, info.key))
        return found

    def evict_if_needed(self) -> int:
        """Delete least-recently-used entries until the store is under its target.
        Open readers keep their files (POSIX unlink leaves open descriptors intact; an
        S3 GET under way completes)."""
        if self.max_bytes <= 0:
            return 0
        if self._evict_interval:
            now = time.monotonic()
            if now < self._next_evict_check:
                return 0
            self._next_evict_check = now + self._evict_interval
        entries = self.entries()
        total = sum(size for _, size, _ in entries)
        if total <= self.max_bytes:
            return 0
        removed = 0
        with self.flight.hold(layout.EVICT_LOCK, shared=False):
            pinned = self.pinned()
            target = int(self.max_bytes * EVICT_TARGET)
            for _, size, key in sorted(entries, key=lambda e: e[0]):
                if total <= target:
                    break
                if key in pinned:
                    continue
                self.backend.delete(key)
                total -= size
                removed += 1
            if removed:
                self._add_evictions(removed)
        self._count(evictions=removed)
        return removed

    def _add_evictions(self, removed: int) -> None:
        """Add to the store's own count of evictions (every replica's, for the
        inventory): one small write per eviction run, never per entry."""
        try:
            self.backend.put_bytes(layout.EVICTIONS_KEY, str(self.evictions() + removed).encode())
        except OSError as exc:
            log.warning("could not count evictions: %s", exc.strerror)

    def evictions(self) -> int:
        """Entries evicted from this store so far, by every replica (best effort: two
        replicas evicting at the same instant may count one run once)."""
        try:
            data = self.backend.get_bytes(layout.EVICTIONS_KEY)
            return int(data) if data else 0
        except (OSError, ValueError):
            return 0


def stored_chunks(source: LayerFile) -> Iterator[bytes]:
    """A stored file's bytes in order, in chunks."""
    offset = 0
    while offset < source.size:
        chunk = source.read_at(offset, min(READ_CHUNK, source.size - offset))
        if not chunk:
            raise FileNotFoundError("the stored entry ended early")
        offset += len(chunk)
        yield chunk


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def has_uploads(backend: Backend) -> bool:
    """Whether upload sessions can live in this backend: in its directory, or in its
    bucket (a backend of another kind has none)."""
    return backend.name == "s3" or isinstance(getattr(backend, "root", None), Path)


def open_uploads(backend: Backend, flight: Flight) -> Uploads:
    """The upload sessions of a backend: in its directory, or in its bucket."""
    if not has_uploads(backend):
        raise TypeError(f"no upload sessions for the {backend.name} backend")
    if backend.name == "s3":
        from passthrough.store.s3 import S3Backend
        from passthrough.store.s3_uploads import S3Uploads

        if not isinstance(backend, S3Backend):
            raise TypeError(f"an s3 backend that is not an S3Backend: {type(backend).__name__}")
        return S3Uploads(backend, flight)
    root = getattr(backend, "root", None)
    assert isinstance(root, Path)  # has_uploads checked it
    return FilesystemUploads(backend, flight, root)
