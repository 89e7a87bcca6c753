"""Where verified layers live while they are sent: a per-download temporary area, or
the shared content-addressed cache (:mod:`passthrough.cache`).

Both hand out :class:`LayerFile` objects: an open, verified file plus its size. The
stream stage reads them with ``pread``, so a file evicted or replaced on disk meanwhile
is still read whole through the open descriptor.
"""

from __future__ import annotations

import os
import tempfile
import threading
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from passthrough.client import RegistryClient
from passthrough.fetch import blob_chunks, disk_full, fetch_and_verify, is_disk_full, layer_what
from passthrough.resolve import LayerDescriptor


@dataclass
class LayerFile:
    """A verified file for one archive entry: the layer tar, or the registry's blob."""

    handle: BinaryIO
    size: int
    #: True when it came from the cache without an upstream fetch.
    cache_hit: bool = False

    def read_at(self, offset: int, length: int) -> bytes:
        return os.pread(self.handle.fileno(), length, offset)

    def close(self) -> None:
        self.handle.close()


class LayerStore(Protocol):
    def layer_file(
        self,
        client: RegistryClient,
        layer: LayerDescriptor,
        *,
        compressed: bool,
        cancel: threading.Event,
    ) -> LayerFile: ...

    def known_size(self, layer: LayerDescriptor, *, compressed: bool) -> int | None: ...

    def holds(self, layer: LayerDescriptor, *, compressed: bool) -> bool: ...


class TempStore:
    """No cache: each layer is fetched into an anonymous temporary file (O_TMPFILE where
    the kernel has it), which never appears in the directory and vanishes when closed,
    whether the download completes, fails or the client leaves."""

    def __init__(self, temp_dir: str | None) -> None:
        self.temp_dir = temp_dir

    def known_size(self, layer: LayerDescriptor, *, compressed: bool) -> int | None:
        return layer.size if compressed else None

    def holds(self, layer: LayerDescriptor, *, compressed: bool) -> bool:
        return False

    def layer_file(
        self,
        client: RegistryClient,
        layer: LayerDescriptor,
        *,
        compressed: bool,
        cancel: threading.Event,
    ) -> LayerFile:
        try:
            handle = tempfile.TemporaryFile(dir=self.temp_dir)
        except OSError as exc:
            raise disk_full() if is_disk_full(exc) else exc from None
        try:
            chunks = blob_chunks(client, layer, layer_what(layer), cancel)
            if compressed:
                verified = fetch_and_verify(chunks, layer, blob_out=handle)
                size = verified.blob_size
            else:
                verified = fetch_and_verify(chunks, layer, tar_out=handle)
                size = verified.tar_size
            handle.flush()
        except OSError as exc:
            handle.close()
            if is_disk_full(exc):
                raise disk_full() from None
            raise
        except BaseException:
            handle.close()
            raise
        return LayerFile(handle, size)
