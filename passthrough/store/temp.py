"""No store (no CACHE_DIR, STORE=filesystem): each layer is fetched for one download
into an anonymous temporary file (O_TMPFILE where the kernel has it), which never
appears in the directory and vanishes when closed, whether the download completes,
fails or the client leaves."""

from __future__ import annotations

import tempfile
import threading

from passthrough.errors import disk_full, is_disk_full
from passthrough.oci.manifest import LayerDescriptor
from passthrough.store.base import BlobSource, LayerFile, LocalFile
from passthrough.store.verify import fetch_and_verify


class TempStore:
    def __init__(self, temp_dir: str | None) -> None:
        self.temp_dir = temp_dir

    def stored_size(self, layer: LayerDescriptor, *, compressed: bool) -> int | None:
        return None

    @property
    def opens_locally(self) -> bool:
        return False  # nothing is stored

    def layer_file(
        self,
        source: BlobSource,
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
            chunks = source(cancel)
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
        return LocalFile(handle, size)
