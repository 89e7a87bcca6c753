"""The size of the archive a download would deliver, before any layer is fetched.

Every entry but the layer tars is known from the manifest and config. A layer tar's
size is known when the store holds the layer (a warm image), and with ``layers=gzip``
(the registry's blob size); then the archive's size is exact, byte for byte what the
download's ``Content-Length`` says. A layer not held yet (a cold image) is only known
once fetched and decompressed: the size is then an estimate, counting such a layer as
twice its compressed size (typical of gzip'd filesystem layers), and says so.
"""

from __future__ import annotations

from passthrough.export.download import Download, archive_plan
from passthrough.export.request import DownloadRequest, Selection
from passthrough.export.tarstream import BLOCK, DeferredSegment, FileEntrySegment
from passthrough.oci.manifest import ResolvedImage
from passthrough.services import Services
from passthrough.store.base import LayerStore
from passthrough.store.temp import TempStore
from passthrough.upstream.client import RegistryClient

#: An uncached layer's tar counted as this many times its compressed blob.
EXPANSION = 2


def archive_size(
    services: Services,
    selection: Selection,
    request: DownloadRequest,
    image: ResolvedImage,
    client: RegistryClient,
) -> dict[str, int | bool]:
    """``{"tarSize": bytes, "tarSizeExact": bool}`` for this request's format and layer
    mode; nothing is fetched (the store is asked which layers it holds)."""
    settings = services.settings
    store: LayerStore = (
        services.store if services.store is not None else TempStore(settings.temp_dir)
    )
    plan = archive_plan(image, selection, request.options)
    download = Download(selection, image, plan, client, store, settings, request)
    if download.total_size is not None:
        return {"tarSize": download.total_size, "tarSizeExact": True}
    estimated = {
        index: size if size is not None else EXPANSION * image.layers[index].size
        for index, size in download.known_sizes.items()
    }
    total = 0
    for segment in download.segments:
        if segment.size is not None:
            total += segment.size
        elif isinstance(segment, FileEntrySegment):
            total += BLOCK + _padded(estimated[segment.layer_index])
        elif isinstance(segment, DeferredSegment):
            # The OCI manifest and index.json, written with the estimated layer sizes.
            total += len(download._late_bytes(estimated))
    return {"tarSize": total, "tarSizeExact": False}


def _padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK
