"""What the rest of passthrough asks of a store, whatever keeps the bytes.

A *backend* (:class:`Backend`: one directory, or one S3 bucket and prefix) holds
objects by key and knows nothing of registries; its contract is small, like CNCF
distribution's storage driver: stat, open for reading by range, commit a verified file,
put and get small objects, delete, list. :class:`passthrough.store.content.ContentStore`
puts content addressing, verification, single-flight, eviction and pins on top of any
backend, so each behaviour is written once.

Keys are ``<kind>/sha256/<hex>`` for content (kinds: ``blobs`` for registry blobs and
configs, ``layers`` for verified uncompressed layer tars, ``manifests``), and plain
names for records (``tags/<id>.json``, ``pins/…``, ``hosted/…``, ``uploads/…``): every
one is built and parsed in :mod:`passthrough.store.layout`, which draws the whole tree.

Commit protocol, on every backend: bytes are written to a temporary file and verified
there; only then does :meth:`Backend.commit_file` make them visible under the final key
at once (a rename, or the completion of an S3 multipart upload). Nothing partial or
unverified is ever visible under a final key.
"""

from __future__ import annotations

import os
import secrets
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from passthrough.errors import StoreUnavailable
from passthrough.oci.manifest import LayerDescriptor

#: The bytes of a blob from wherever it comes (the registry, usually), in chunks. The
#: event, when given, stops the transfer: a fetch shared by several downloads gets
#: None, so that one client leaving does not break it for the others.
BlobSource = Callable[[threading.Event | None], Iterator[bytes]]


def replace_file(path: Path, data: bytes) -> None:
    """Write a small local file so that readers see the old content or the new, never
    part of it (a temporary file beside it, then a rename)."""
    temporary = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


class LayerFile(ABC):
    """A verified file for one archive entry (the layer tar, or the registry's blob),
    read by offset. The export stage reads it while other downloads may evict or
    replace the stored entry: an open file keeps its bytes."""

    size: int
    #: True when it came from the store without an upstream fetch.
    cache_hit: bool = False

    @abstractmethod
    def read_at(self, offset: int, length: int) -> bytes: ...

    def fileno(self) -> int | None:
        """The descriptor of a file on local disk, to send from (None: not local)."""
        return None

    @abstractmethod
    def close(self) -> None: ...


class LocalFile(LayerFile):
    """A verified file on local disk, read with ``pread`` through its descriptor: a file
    unlinked or replaced meanwhile is still read whole."""

    def __init__(self, handle: BinaryIO, size: int, *, cache_hit: bool = False) -> None:
        self.handle = handle
        self.size = size
        self.cache_hit = cache_hit

    def read_at(self, offset: int, length: int) -> bytes:
        return os.pread(self.handle.fileno(), length, offset)

    def fileno(self) -> int | None:
        return self.handle.fileno()

    def close(self) -> None:
        self.handle.close()


class LayerStore(Protocol):
    """What the tar export needs: a verified layer file, fetched when it must be."""

    def layer_file(
        self,
        source: BlobSource,
        layer: LayerDescriptor,
        *,
        compressed: bool,
        cancel: threading.Event,
    ) -> LayerFile: ...

    def stored_size(self, layer: LayerDescriptor, *, compressed: bool) -> int | None:
        """The size of the entry the download would read, when it is already stored."""
        ...

    @property
    def opens_locally(self) -> bool:
        """Whether a stored entry opens without a request to a service (see
        :class:`Backend`), so it is opened in the request's thread, not a pool's."""
        ...


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object: its key, size, and when it was last used (the filesystem
    tracks reads in atime; S3 only knows when it was written)."""

    key: str
    size: int
    last_used: float


class Backend(ABC):
    """Where objects live. Implementations: filesystem (one directory), s3 (a bucket and
    key prefix). Every method is safe from many threads and processes at once."""

    #: "filesystem" or "s3": how error messages and metrics name the store.
    name: str
    #: Told the key of an entry found corrupt on reading (and removed).
    on_corrupt: Callable[[str], None] | None = None
    #: Whether a commit copies the file elsewhere (an upload: seconds for a big layer)
    #: rather than renaming it: then a verified layer is read from its local file while
    #: it is committed (:meth:`passthrough.store.content.ContentStore.layer_file`).
    commit_uploads: bool = False
    #: Whether :meth:`open` is local (a file, not a request to a service): cheap enough
    #: to call in the request's own thread.
    opens_locally: bool = True

    @abstractmethod
    def describe(self) -> str:
        """Where this store is, for messages (a directory, or bucket and endpoint);
        never a credential."""

    @abstractmethod
    def staging_dir(self) -> Path:
        """A local directory for temporary files (on the same filesystem as the store,
        where a commit is a rename)."""

    @abstractmethod
    def lock_dir(self) -> Path:
        """A local directory for the lock files shared by this host's processes."""

    @abstractmethod
    def size(self, key: str) -> int | None:
        """The size of a committed object, or None when there is none."""

    @abstractmethod
    def open(self, key: str, digest: str | None) -> LayerFile | None:
        """A committed object for reading, or None when there is none (or, on a
        backend that re-checks content, when it turned out corrupt and was removed)."""

    @abstractmethod
    def commit_file(self, key: str, handle: BinaryIO, path: Path, size: int) -> None:
        """Make a verified temporary file (``path``, open as ``handle``, ``size``
        bytes) visible under ``key`` at once. The handle stays readable afterwards; the
        caller closes it. ``path`` may be gone afterwards."""

    @abstractmethod
    def get_bytes(self, key: str) -> bytes | None: ...

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None:
        """Write a small object atomically (a record, a manifest)."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove an object; no error when it is already gone."""

    @abstractmethod
    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every committed object whose key starts with ``prefix``."""

    def report_corrupt(self, key: str) -> None:
        if self.on_corrupt is not None:
            self.on_corrupt(key)

    def touch(self, key: str) -> None:  # noqa: B027 - optional: only a filesystem tracks reads
        """Note a read, for least-recently-used eviction."""

    def presigned_url(self, key: str, expires: int = 900) -> str | None:
        """A URL a client may GET the object from directly, where the backend has one."""
        return None

    def probe(self) -> None:
        """Whether the store is usable right now, cheaply (GET /ready asks every few
        seconds): raise :class:`~passthrough.errors.StoreUnavailable` naming the cause.
        Here: the staging directory, where every fill starts, takes a new file."""
        directory = self.staging_dir()
        path = directory / f".ready.{os.getpid()}.{threading.get_ident()}"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, b"ready")
            finally:
                os.close(fd)
            path.unlink()
        except OSError as exc:
            raise StoreUnavailable(
                f"the {self.describe()} cannot write to {directory}: {exc.strerror}"
            ) from None

    def check(self) -> None:  # noqa: B027 - optional: a directory is checked by config
        """Fail with :class:`~passthrough.config.ConfigError` (naming the variable)
        when the store cannot be used at all; called once at start-up."""

    def close(self) -> None:  # noqa: B027 - optional
        """Release connections."""
