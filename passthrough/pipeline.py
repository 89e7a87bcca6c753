"""The download pipeline, one stage per module:

parse (reference) → choose registry and credentials (registry) → resolve (resolve) →
fetch and verify (fetch) → assemble (archive) → stream (tarstream).

:func:`prepare_download` runs everything that can fail with an HTTP status before the
first byte: the reference is parsed, manifest and config resolved and verified, and
every layer checked readable. It then starts fetching layers in parallel and returns a
:class:`Download` whose :meth:`~Download.body` streams the archive: all metadata at once,
then each layer tar in order as soon as it is verified. A failure after the first byte
aborts the transfer (the generator raises, the server drops the connection), so a client
never sees a clean end to a truncated archive.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from passthrough.archive import ArchivePlan, plan_archive
from passthrough.auth import Credentials, TokenCache
from passthrough.client import RegistryClient, Timeouts
from passthrough.config import RegistryEndpoint, Settings
from passthrough.errors import InsufficientStorage
from passthrough.fetch import LayerFile, fetch_layer
from passthrough.reference import ImageReference, familiar_name, parse_filename, qualify
from passthrough.registry import Route, Target, choose_target, registry_from_url
from passthrough.resolve import DEFAULT_PLATFORM, Platform, ResolvedImage, resolve_image
from passthrough.tarstream import END_OF_ARCHIVE, bytes_entry, directory_entry, file_entry

log = logging.getLogger(__name__)


@dataclass
class Services:
    """What lives for the whole process: settings and the token cache."""

    settings: Settings
    tokens: TokenCache = field(default_factory=TokenCache)


@dataclass(frozen=True)
class DownloadRequest:
    """What the client asked for, straight from the URL and headers."""

    route: Route
    filename: str
    scheme: str | None = None
    host: str | None = None
    client_credentials: Credentials | None = field(default=None, repr=False)
    client_address: str | None = None
    platform: Platform = DEFAULT_PLATFORM


@dataclass(frozen=True)
class Selection:
    """Stages 1 and 2: the parsed reference and the chosen registry and credentials."""

    reference: ImageReference
    target: Target

    @property
    def repo_tag(self) -> str:
        name = familiar_name(self.target.registry, self.reference.repository)
        return f"{name}:{self.reference.tag}"


def select(services: Services, request: DownloadRequest) -> Selection:
    """Parse the filename and choose registry and credentials; no upstream call yet."""
    settings = services.settings
    reference = parse_filename(request.filename)
    registry: RegistryEndpoint | None = None
    if request.route is not Route.ENVIRONMENT:
        registry = registry_from_url(request.scheme or "", request.host or "")
    target = choose_target(settings, request.route, request.client_credentials, registry)
    reference = qualify(reference, target.registry, settings.default_namespace)
    return Selection(reference, target)


class Download:
    """A prepared download: resolved image, archive plan and layers being fetched."""

    def __init__(
        self,
        selection: Selection,
        image: ResolvedImage,
        plan: ArchivePlan,
        client: RegistryClient,
        settings: Settings,
        request: DownloadRequest,
    ) -> None:
        self.selection = selection
        self.image = image
        self.plan = plan
        self.client = client
        self.request = request
        self._settings = settings
        self._cancel = threading.Event()
        self._workdir: Path | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._futures: dict[int, Future[LayerFile]] = {}
        self.bytes_sent = 0
        self.outcome = "prepared"
        self._logged = False
        self.started = time.monotonic()

    def start_fetching(self) -> None:
        """Create the temp area and start the bounded pool of layer fetches."""
        try:
            self._workdir = Path(
                tempfile.mkdtemp(prefix="passthrough-", dir=self._settings.temp_dir)
            )
        except OSError:
            raise InsufficientStorage("cannot create a temporary directory") from None
        written = self.plan.written_layers
        workers = max(1, min(self._settings.layer_concurrency, len(written)))
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="layer")
        for slot in written:
            layer = self.image.layers[slot.index]
            self._futures[slot.index] = self._pool.submit(
                fetch_layer, self.client, layer, self._workdir, self._cancel
            )

    def headers(self) -> dict[str, str]:
        return {
            "Content-Type": "application/x-tar",
            "Content-Disposition": f'attachment; filename="{self.request.filename}"',
            "Docker-Content-Digest": self.image.manifest_digest,
            "X-Image-Reference": self.plan.repo_tag,
            "Cache-Control": "no-store",
        }

    def body(self) -> Iterator[bytes]:
        """The archive, chunk by chunk. Raises (aborting the transfer) on any failure."""
        try:
            for entry in self.plan.metadata:
                chunk = (
                    directory_entry(entry.name)
                    if entry.data is None
                    else bytes_entry(entry.name, entry.data)
                )
                self.bytes_sent += len(chunk)
                yield chunk
            for slot in self.plan.written_layers:
                layer_file = self._futures[slot.index].result()
                for chunk in file_entry(slot.name, layer_file.path, layer_file.size):
                    self.bytes_sent += len(chunk)
                    yield chunk
                # Sent: the temp file can go now rather than at the end.
                layer_file.path.unlink(missing_ok=True)
            self.bytes_sent += len(END_OF_ARCHIVE)
            yield END_OF_ARCHIVE
            self.outcome = "completed"
        except GeneratorExit:
            self.outcome = "client_gone"
            raise
        except Exception as exc:
            self.outcome = "aborted"
            log.warning(
                "download of %s aborted after %d bytes: %s",
                self.plan.repo_tag,
                self.bytes_sent,
                getattr(exc, "message", type(exc).__name__),
            )
            raise
        finally:
            self.close()

    def close(self) -> None:
        """Stop fetches and remove every temp file; safe to call more than once."""
        self._cancel.set()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        self.client.close()
        if not self._logged:
            self._logged = True
            log.info(
                "download image=%s digest=%s bytes=%d seconds=%.2f outcome=%s client=%s",
                self.plan.repo_tag,
                self.image.manifest_digest,
                self.bytes_sent,
                time.monotonic() - self.started,
                self.outcome,
                self.request.client_address or "-",
            )


def prepare_download(
    services: Services, request: DownloadRequest, *, fetch: bool = True
) -> Download:
    """Everything before the first byte; raises a :class:`PassthroughError` on failure."""
    settings = services.settings
    selection = select(services, request)
    client = RegistryClient(
        selection.target,
        selection.reference.repository,
        services.tokens,
        Timeouts(settings.connect_timeout, settings.read_timeout),
        pool_size=settings.layer_concurrency + 2,
    )
    try:
        image = resolve_image(client, selection.reference, request.platform)
        # Pre-flight: every layer must be readable before we answer 200.
        for digest in dict.fromkeys(layer.digest for layer in image.layers):
            client.blob_exists(digest, what=f"layer {digest[:19]} of {selection.reference}")
        plan = plan_archive(image, selection.repo_tag)
        download = Download(selection, image, plan, client, settings, request)
        if fetch:
            download.start_fetching()
        return download
    except BaseException:
        client.close()
        raise
