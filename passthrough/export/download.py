"""The download: resolve (:mod:`~passthrough.export.resolve`) → fetch and verify each
layer through the store (:mod:`passthrough.store`) → assemble
(:mod:`~passthrough.export.archive`) → stream (:mod:`~passthrough.export.tarstream`),
after the request was parsed and its registry chosen (:mod:`~passthrough.export.request`).

:func:`prepare_download` runs everything that can fail with an HTTP status before the
first byte: the reference is parsed, manifest and config resolved and verified, and
every layer checked readable. It then starts fetching layers in a bounded pool and
returns a :class:`Download`, whose archive is a list of segments: all metadata is sent
at once, then each layer tar in order as soon as it is verified. A failure after the
first byte aborts the transfer (the generator raises and the server drops the
connection), so a client never sees a clean end to a truncated archive.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial

from passthrough.capacity import check_free_space
from passthrough.config import Settings
from passthrough.errors import (
    BlobUnknown,
    NotAcceptable,
    OfflineNotStored,
    TooLarge,
    UpstreamUnavailable,
)
from passthrough.export.archive import (
    OCI_LAYER_GZIP,
    OCI_LAYER_TAR,
    ArchivePlan,
    WrittenLayer,
    plan_archive,
)
from passthrough.export.hosted import hosted_digest
from passthrough.export.request import (
    DownloadRequest,
    OutputOptions,
    Selection,
    open_client,
    select,
)
from passthrough.export.resolve import resolve_image
from passthrough.export.stale import resolve_download, stale_warning
from passthrough.export.tarstream import (
    END_OF_ARCHIVE,
    BytesSegment,
    DeferredSegment,
    FileEntrySegment,
    Piece,
    PieceT,
    Segment,
    bytes_entry,
    directory_entry,
    produce_range,
    total_size,
)
from passthrough.export.trace import DownloadTrace, annotate_image
from passthrough.observe import metrics, telemetry
from passthrough.oci.manifest import LayerDescriptor, ResolvedImage, layer_what
from passthrough.oci.platforms import Platform
from passthrough.oci.reference import archive_filename, platform_filename
from passthrough.services import Services
from passthrough.store.base import BlobSource, LayerFile, LayerStore
from passthrough.store.temp import TempStore
from passthrough.upstream.blobs import blob_chunks
from passthrough.upstream.client import RegistryClient

log = logging.getLogger(__name__)


class Download:
    """A prepared download: the resolved image, the archive as segments, and the layer
    fetches that fill them."""

    def __init__(
        self,
        selection: Selection,
        image: ResolvedImage,
        plan: ArchivePlan,
        client: RegistryClient,
        store: LayerStore,
        settings: Settings,
        request: DownloadRequest,
    ) -> None:
        self.selection = selection
        self.image = image
        self.plan = plan
        self.client = client
        self.store = store
        self.request = request
        self._settings = settings
        self._cancel = threading.Event()
        if isinstance(store, TempStore):
            # This download's fetches are its own: when it ends, their retries end too.
            # Shared cache fetches keep theirs for whoever else is waiting.
            client.retry.abandoned = self._cancel
        self._pool: ThreadPoolExecutor | None = None
        self._futures: dict[int, Future[LayerFile]] = {}
        self._opened: list[LayerFile] = []
        self.bytes_sent = 0
        self.outcome = "prepared"
        self.started = time.monotonic()
        self._logged = False
        self._on_close: list[Callable[[], None]] = []
        #: Each written layer's entry size when the store holds it (None: to be fetched);
        #: the store is asked once per layer, for the pre-flight and the sizes both.
        self.stored_sizes: dict[int, int | None] = {
            slot.index: store.stored_size(image.layers[slot.index], compressed=slot.compressed)
            for slot in plan.written_layers
        }
        #: Each written layer's entry size, when known before fetching (stored, or the
        #: registry's blob size for ?layers=gzip).
        self.known_sizes: dict[int, int | None] = {
            slot.index: image.layers[slot.index].size
            if slot.compressed
            else self.stored_sizes[slot.index]
            for slot in plan.written_layers
        }
        #: Why the image was not confirmed upstream (stale or offline), for ``Warning``.
        self.stale_reason: str | None = None
        #: error.type of a failure after the first byte.
        self.error_type: str | None = None
        self.trace = DownloadTrace.capture(request.route.value, request.reference_path is not None)
        self.segments = self._build_segments()
        self.total_size = total_size(self.segments)

    # -- assembly ------------------------------------------------------------------------

    @property
    def filename(self) -> str:
        """The archive's name for Content-Disposition, with the platform when it is not
        the server's default (as the route builder names the file)."""
        name = self.request.filename or archive_filename(self.selection.reference)
        default = Platform.parse(self._settings.default_platform)
        return platform_filename(name, self.request.platform, default)

    def _build_segments(self) -> list[Segment]:
        segments: list[Segment] = []
        for entry in self.plan.metadata:
            if entry.data is None:
                segments.append(BytesSegment(directory_entry(entry.name)))
            else:
                segments.append(BytesSegment(bytes_entry(entry.name, entry.data)))
        # Loaders unpack the whole archive before reading it, so entry order is free:
        # the smallest layers go first (a deterministic order: size, then position), so a
        # client receives them while the big ones are still being fetched.
        for slot in sorted(
            self.plan.written_layers, key=lambda s: (self.image.layers[s.index].size, s.index)
        ):
            layer = self.image.layers[slot.index]
            segment = self.trace.layer_segment(
                layer,
                slot.compressed,
                slot.name,
                self._opener(slot.index),
                self.known_sizes[slot.index],
            )
            segment.layer_index = slot.index
            segments.append(segment)
        if self.plan.late is not None:
            segments.append(self._late_segment())
        segments.append(BytesSegment(END_OF_ARCHIVE))
        return segments

    def _written(self, size_of: dict[int, int]) -> list[WrittenLayer]:
        written = []
        for slot in self.plan.written_layers:
            layer = self.image.layers[slot.index]
            if slot.compressed:
                written.append(WrittenLayer(layer.digest, size_of[slot.index], OCI_LAYER_GZIP))
            else:
                written.append(WrittenLayer(layer.diff_id, size_of[slot.index], OCI_LAYER_TAR))
        return written

    def _late_bytes(self, size_of: dict[int, int]) -> bytes:
        assert self.plan.late is not None
        entries = self.plan.late(self._written(size_of))
        return b"".join(bytes_entry(e.name, e.data or b"") for e in entries)

    def _late_segment(self) -> Segment:
        """The OCI manifest and index.json need every layer's final size: built now when
        the sizes are known (cached), else after the last layer was sent."""
        known = {i: size for i, size in self.known_sizes.items() if size is not None}
        if len(known) == len(self.known_sizes):
            return BytesSegment(self._late_bytes(known))

        def build() -> bytes:
            sizes = {s.index: self._layer_file(s.index).size for s in self.plan.written_layers}
            return self._late_bytes(sizes)

        return DeferredSegment(build)

    def _opener(self, index: int) -> _LayerOpener:
        return _LayerOpener(self, index)

    def _layer_file(self, index: int) -> LayerFile:
        future = self._futures.get(index)
        if future is None:  # a layer outside the requested range, needed after all
            future = self._submit(index)
        layer_file = future.result()
        if layer_file not in self._opened:
            self._opened.append(layer_file)
        return layer_file

    # -- fetching ------------------------------------------------------------------------

    def _submit(self, index: int) -> Future[LayerFile]:
        layer = self.image.layers[index]
        fetch = partial(
            self.trace.fetch_layer,
            self.store.layer_file,
            self._source(layer),
            layer,
            compressed=compressed_layer(self.image, self.request.options, index),
            cancel=self._cancel,
        )
        future: Future[LayerFile]
        if self.stored_sizes.get(index) is not None and self.store.opens_locally:
            # Stored on local disk: opening it is a syscall. A pool thread would cost a
            # thread start and two hand-offs of the GIL before the first byte, which
            # under a fleet's load take longer than everything else (docs/benchmarks.md).
            future = Future()
            try:
                future.set_result(fetch())
            except Exception as exc:  # noqa: BLE001 - raised where the layer is read
                future.set_exception(exc)
        else:
            if self._pool is None:
                count = len(self.plan.written_layers)
                workers = max(1, min(self._settings.layer_concurrency, count))
                self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="layer")
            future = self._pool.submit(fetch)
        self._futures[index] = future
        return future

    def _source(self, layer: LayerDescriptor) -> BlobSource:
        """The layer's blob from this download's registry and credentials (for a hosted
        image, the store holds it: there is nowhere else to fetch it from)."""
        client, what = self.client, layer_what(layer)
        if self.selection.hosted or self.selection.offline is not None:
            where = (
                "the hosted area's store" if self.selection.hosted else "the store (offline mode)"
            )

            def missing(cancel: threading.Event | None) -> Iterator[bytes]:
                raise BlobUnknown(f"{what} is missing from {where}")

            return missing
        return lambda cancel: blob_chunks(client, layer, what, cancel)

    def start_fetching(self, start: int = 0, end: int | None = None) -> None:
        """Start the fetches for the layers bytes ``start``–``end`` need (all of them
        unless every size is known and a range was asked for)."""
        position = 0
        wanted: list[int] = []
        for segment in self.segments:
            size = segment.size
            if isinstance(segment, FileEntrySegment) and (
                size is None
                or self.total_size is None
                or (position + size > start and (end is None or position <= end))
            ):
                wanted.append(segment.layer_index)
            position += size or 0
        # The biggest layers are on the critical path: they get the pool first.
        for index in sorted(wanted, key=lambda i: (-self.image.layers[i].size, i)):
            self._submit(index)

    def prefetch(self, indexes: list[int]) -> None:
        """Start the fetches of these layers (a bundle fetches each shared layer once,
        through the first image that has it)."""
        for index in indexes:
            if index not in self._futures:
                self._submit(index)

    @property
    def checksum_identity(self) -> str:
        """What decides this archive's bytes: the image (by digest, so a moved tag is
        another archive), the options and the names written into it."""
        return " ".join(
            (
                self.image.manifest_digest,
                self.request.options.tag,
                self.plan.repo_tag,
                self.selection.full_name,
            )
        )

    # -- streaming -----------------------------------------------------------------------

    def headers(self) -> dict[str, str]:
        headers = {
            "Content-Type": "application/x-tar",
            "Content-Disposition": f'attachment; filename="{self.filename}"',
            "Docker-Content-Digest": self.image.manifest_digest,
            "X-Image-Reference": self.plan.repo_tag,
            # Private images must not land in shared HTTP caches; ranges still work.
            "Cache-Control": "private, no-cache",
            "ETag": self.etag,
        }
        if self.stale_reason is not None:
            headers["Warning"] = stale_warning(self.stale_reason)
        if self.total_size is not None:
            headers["Accept-Ranges"] = "bytes"
            headers["Content-Length"] = str(self.total_size)
        return headers

    @property
    def etag(self) -> str:
        digest = self.image.manifest_digest.split(":", 1)[1]
        return f'"{digest}-{self.request.options.tag}"'

    def body(self, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """The archive (or bytes ``start``–``end``), chunk by chunk. Raises, aborting the
        transfer, on any failure."""
        return self._sent(produce_range(self.segments, start, end), start, end)

    def pieces(self, start: int = 0, end: int | None = None) -> Iterator[Piece]:
        """:meth:`body` with each layer on local disk as one FileRegion, for a server
        that sends it with ``sendfile``."""
        return self._sent(produce_range(self.segments, start, end, regions=True), start, end)

    def _sent(self, chunks: Iterator[PieceT], start: int, end: int | None) -> Iterator[PieceT]:
        self.trace.stream_started(start, end)
        metrics.download_started()
        # Where the answer ends, when known (a warm archive, or a range): the slot goes
        # back as the last piece is handed over, before it is written, so a client
        # that has every byte and starts its next transfer at once finds it free.
        stop = end + 1 if end is not None else self.total_size
        position = start
        try:
            for chunk in chunks:
                self.bytes_sent += len(chunk)
                position += len(chunk)
                if stop is not None and position >= stop:
                    self._run_on_close()
                yield chunk
            self.outcome = "completed"
        except GeneratorExit:
            self.outcome = "client_gone"
            raise
        except Exception as exc:
            self.outcome = "aborted"
            self.error_type = telemetry.error_type(exc)
            log.warning(
                "download of %s aborted after %d bytes: %s",
                self.plan.repo_tag,
                self.bytes_sent,
                getattr(exc, "message", type(exc).__name__),
            )
            raise
        finally:
            self.close()
            seconds = time.monotonic() - self.started
            metrics.download_finished(self.trace.route, self.outcome, self.bytes_sent, seconds)
            self.trace.stream_finished(self.outcome, self.bytes_sent, self.error_type)

    def on_close(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once the download is over: when its last piece is produced,
        or when it is closed, whichever comes first."""
        self._on_close.append(callback)

    def _run_on_close(self) -> None:
        while self._on_close:
            self._on_close.pop()()

    def close(self) -> None:
        """Stop this download's fetches and release its files; safe to call twice.
        Shared cache fetches run on to completion for the others waiting on them."""
        self._cancel.set()
        self._run_on_close()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        for future in self._futures.values():
            future.add_done_callback(_close_result)
        for layer_file in self._opened:
            layer_file.close()
        self._opened.clear()
        self.client.close()
        if not self._logged:
            self._logged = True
            seconds = time.monotonic() - self.started
            log.info(
                "download image=%s digest=%s bytes=%d seconds=%.2f outcome=%s client=%s",
                self.plan.repo_tag,
                self.image.manifest_digest,
                self.bytes_sent,
                seconds,
                self.outcome,
                self.request.client_address or "-",
                extra={
                    "image": self.plan.repo_tag,
                    "digest": self.image.manifest_digest,
                    "bytes": self.bytes_sent,
                    "seconds": round(seconds, 3),
                    "outcome": self.outcome,
                    "client": self.request.client_address,
                    **self.trace.log_fields(),
                },
            )


class _LayerOpener:
    """Callable handed to a segment: waits for layer ``index`` of a download."""

    def __init__(self, download: Download, index: int) -> None:
        self.download = download
        self.index = index

    def __call__(self) -> LayerFile:
        return self.download._layer_file(self.index)


def _close_result(future: Future[LayerFile]) -> None:
    """Close the file of a fetch nobody will read (the download ended first)."""
    if future.cancelled() or future.exception() is not None:
        return
    future.result().close()


def check_single_platform(image: ResolvedImage, wanted: Platform) -> None:
    """An image without an index has the one platform its config names; when a client
    asked for another one explicitly, refuse (an arm64 router cannot run amd64)."""
    if image.index_digest is not None:
        return
    config = image.config_document
    os_name, arch = config.get("os"), config.get("architecture")
    if not isinstance(os_name, str) or not isinstance(arch, str):
        return
    variant = config.get("variant") if isinstance(config.get("variant"), str) else None
    actual = Platform(os_name, arch, variant or None)
    if not wanted.matches(actual):
        raise NotAcceptable(
            f"{image.reference} has no {wanted} image; available platforms: {actual}"
        )


def check_image_limits(image: ResolvedImage, settings: Settings) -> None:
    if len(image.layers) > settings.max_layers:
        raise TooLarge(
            f"the image has {len(image.layers)} layers; MAX_LAYERS is {settings.max_layers}"
        )
    if image.total_compressed_size > settings.max_image_bytes:
        raise TooLarge(
            f"the image is {image.total_compressed_size >> 20} MiB compressed; "
            f"MAX_IMAGE_BYTES is {settings.max_image_bytes >> 20} MiB"
        )


def archive_plan(image: ResolvedImage, selection: Selection, options: OutputOptions) -> ArchivePlan:
    """What the archive holds for these options (its entries, which layers, in which form)."""
    return plan_archive(
        image,
        selection.repo_tag,
        output_format=options.format,
        compressed=lambda index: compressed_layer(image, options, index),
        full_name=selection.full_name,
    )


def compressed_layer(image: ResolvedImage, options: OutputOptions, index: int) -> bool:
    """Whether layer ``index`` is sent as the registry's blob rather than a tar: only
    gzip blobs, only with ``layers=gzip`` (zstd and plain layers are sent as tars);
    every layer with ``layers=blob`` (an OCI bundle keeps the registry's digests)."""
    if options.layers == "blob":
        return True
    return options.layers == "gzip" and image.layers[index].compression == "gzip"


def check_layer_source(
    selection: Selection, client: RegistryClient, digest: str, what: str, stale: str | None
) -> None:
    """A layer the store lacks must be readable upstream; when the upstream is offline
    or was just found failing (``stale``), the download cannot be whole: say so now."""
    if selection.hosted:
        return
    if selection.offline is not None:
        raise OfflineNotStored(
            f"offline mode ({selection.offline}): {what} is not in the store "
            "and the registry is never contacted"
        )
    if stale is not None:
        raise UpstreamUnavailable(f"{what} is not in the store, and {stale}")
    client.blob_exists(digest, what=what)


def _resolve_hosted(
    services: Services, selection: Selection, request: DownloadRequest, client: RegistryClient
) -> ResolvedImage:
    """A hosted image, from the store: the client must be allowed to pull it, as on /v2."""
    digest = hosted_digest(services, selection, request)
    return resolve_image(
        client, selection.reference, request.platform, services.store, offline_digest=digest
    )


def prepare_download(
    services: Services,
    request: DownloadRequest,
    *,
    fetch: bool = True,
    byte_range: tuple[int, int | None] | None = None,
) -> Download:
    """Everything before the first byte; raises a :class:`PassthroughError` on failure."""
    settings = services.settings
    selection = select(services, request)
    client = open_client(services, selection, pool_size=settings.layer_concurrency + 2)
    store: LayerStore = (
        services.store if services.store is not None else TempStore(settings.temp_dir)
    )
    try:
        with telemetry.span("resolve_manifest") as span:
            stale_reason: str | None = None
            if selection.hosted:
                image = _resolve_hosted(services, selection, request, client)
            else:
                resolved = resolve_download(services, selection, client, request.platform)
                image, stale_reason = resolved.image, resolved.stale_reason
            annotate_image(image, span)
        annotate_image(image)
        if request.platform_explicit:
            check_single_platform(image, request.platform)
        check_image_limits(image, settings)
        plan = archive_plan(image, selection, request.options)
        download = Download(selection, image, plan, client, store, settings, request)
        download.stale_reason = stale_reason
        # Pre-flight: every layer the cache does not hold must be readable upstream
        # before we answer 200, and the disk must obviously have room for it. A layer
        # tar whose blob is stored (a /v2 pull or a sync brought it) is made from that
        # blob here, with no upstream: nothing to check there.
        needed = 0
        for slot in plan.written_layers:
            layer = image.layers[slot.index]
            if download.stored_sizes[slot.index] is None:
                needed += layer.size
                if store.stored_size(layer, compressed=True) is None:
                    what = f"layer {slot.index + 1} of {plan.repo_tag}"
                    check_layer_source(selection, client, layer.digest, what, stale_reason)
        # The space needed is local: the cache directory, or (S3, no store) the temp
        # directory that layers are spooled in before they are verified.
        local = settings.cache_dir if settings.store == "filesystem" else None
        check_free_space(local or settings.temp_dir, needed)
        if fetch:
            start, end = byte_range or (0, None)
            download.start_fetching(start, end)
        return download
    except BaseException:
        client.close()
        raise
