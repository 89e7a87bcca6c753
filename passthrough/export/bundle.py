"""Bundles: several images in one tar, for a disk that crosses an air gap
(``GET /bundle.tar?image=…&image=…``, ``passthrough export``).

Each image is prepared as its single-image download would be
(:func:`~passthrough.export.download.prepare_download`: the same routing, access rules,
credentials, limits and pre-flight), so an image the tar routes would refuse is refused
here, by name, before the first byte. The bundle then takes the layer entries of those
downloads, each layer once, and writes its own metadata around them:

``docker`` (default): what ``docker save a b c`` writes: the Docker 1.10–24 layout of
:mod:`~passthrough.export.archive`, one ``manifest.json`` entry per image (an image
under two names is one entry with both RepoTags), ``repositories``, shared layers once.
``docker load`` restores every tag.

``oci``: an OCI image layout (``oci-layout``, ``index.json``, ``blobs/sha256/``) with the
registry's own bytes: every manifest, config and layer blob is byte-identical to the
registry's, so every digest is kept (signatures and pinned digests keep working).
``index.json`` names each image (``org.opencontainers.image.ref.name`` and
``io.containerd.image.name``: the full name, ``ghcr.io/org/app:2.0``). With ``--all``
(``?all=1``) an image's whole index goes in, every platform of it; an index that also
lists entries that are no platform image (attestations) is written without them, so
its digest changes then (each platform manifest keeps its own). ``manifest.json`` is
there too, for docker's loader.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol
from urllib.parse import urlsplit

from passthrough.config import Settings
from passthrough.errors import BadRequest, PassthroughError
from passthrough.export.archive import (
    ArchivePlan,
    LayerSlot,
    LoaderImage,
    MetadataEntry,
    canonical_json,
    loader_entries,
)
from passthrough.export.download import prepare_download
from passthrough.export.request import DownloadRequest, OutputOptions, Selection
from passthrough.export.resolve import Documents, ParsedManifest
from passthrough.export.tarstream import (
    END_OF_ARCHIVE,
    BytesSegment,
    FileEntrySegment,
    Segment,
    bytes_entry,
    directory_entry,
    produce_range,
    total_size,
)
from passthrough.observe import metrics
from passthrough.oci.manifest import (
    IMAGE_MANIFEST_TYPES,
    MAX_CONFIG_BYTES,
    OCI_INDEX,
    ResolvedImage,
    descriptor,
    index_platforms,
    sha256_digest,
)
from passthrough.oci.platforms import DEFAULT_PLATFORM, Platform
from passthrough.oci.reference import quote_input
from passthrough.registry.routing import route_name
from passthrough.services import Services
from passthrough.upstream.auth import Credentials
from passthrough.upstream.target import Route

log = logging.getLogger(__name__)

FILENAME = "bundle.tar"
#: More images than this in one request is a mistake, not a site.
MAX_IMAGES = 200
BLOBS = "blobs/sha256/"


@dataclass(frozen=True)
class BundleRequest:
    """What to bundle and how, from the query or the command line."""

    images: tuple[str, ...]
    platform: Platform = DEFAULT_PLATFORM
    platform_explicit: bool = False
    format: str = "docker"
    #: ``tar`` or ``gzip`` (docker format); an OCI bundle always holds the registry's blobs.
    layers: str = "tar"
    all_platforms: bool = False
    client_credentials: Credentials | None = field(default=None, repr=False)
    client_address: str | None = None

    def __post_init__(self) -> None:
        if not self.images:
            raise BadRequest("name at least one image: ?image=nginx:1.25&image=team/api:1.0")
        if len(self.images) > MAX_IMAGES:
            raise BadRequest(f"a bundle holds at most {MAX_IMAGES} images")
        OutputOptions.from_query(self.layers, self.format)  # the same checks as the tar routes
        if self.all_platforms and self.format != "oci":
            raise BadRequest("all platforms (--all, all=1) need the oci format")

    @property
    def options(self) -> OutputOptions:
        if self.format == "oci":
            return OutputOptions(layers="blob", format="oci")
        return OutputOptions(layers=self.layers, format="docker")


def split_image(spec: str) -> tuple[str, str | None, str | None]:
    """``ghcr.io/org/app:2.0`` → (name, tag, digest); no tag and no digest: ``latest``."""
    name, at, digest = spec.strip().partition("@")
    tag: str | None = None
    if name.rfind(":") > name.rfind("/"):
        name, _, tag = name.rpartition(":")
    if not at and tag is None:
        tag = "latest"
    return name, tag, digest if at else None


def image_request(
    settings: Settings,
    bundle: BundleRequest,
    spec: str,
    *,
    platform: Platform | None = None,
    digest: str | None = None,
) -> DownloadRequest:
    """The single-image download that serves ``spec``: names without a registry host
    on the ``/ref/`` route (REGISTRY_URL, or the hosted area), others on
    ``/registry/<scheme>/<host>/ref/`` (an UPSTREAMS alias, or a host), with the same
    credential rules as those routes."""
    name, tag, pinned = split_image(spec)
    route = route_name(settings, name)

    def path(repository: str) -> str:
        pin = digest or pinned
        return repository + (f":{tag}" if tag else "") + (f"@{pin}" if pin else "") + ".tar"

    base = DownloadRequest(
        Route.ENVIRONMENT,
        None,
        client_credentials=bundle.client_credentials,
        client_address=bundle.client_address,
        platform=platform or bundle.platform,
        platform_explicit=bundle.platform_explicit or platform is not None,
        options=bundle.options,
    )
    if route.via == "default":
        return replace(base, reference_path=path(name))
    if route.upstream.url == settings.registry.url:
        return replace(base, reference_path=path(route.repository))
    parts = urlsplit(route.upstream.url)
    return replace(
        base,
        route=Route.REGISTRY,
        scheme=parts.scheme,
        host=parts.netloc,
        reference_path=path(route.repository),
    )


class Member(Protocol):
    """One prepared image of a bundle (a :class:`Download`)."""

    image: ResolvedImage
    plan: ArchivePlan
    selection: Selection
    segments: list[Segment]
    #: How it ended, for its log line (a bundle's member: ``bundle_<outcome>``).
    outcome: str

    def prefetch(self, indexes: list[int]) -> None: ...

    def close(self) -> None: ...


@dataclass
class BundleImage:
    """One requested image: its download(s), the first for the requested platform, the
    others (``--all``) for the rest of its index, whose document is kept then."""

    spec: str
    members: list[Member]
    index: ParsedManifest | None = None
    #: The index's other entries (attestations): manifests and their blobs by digest.
    artifacts: dict[str, bytes] = field(default_factory=dict)


class _Layers:
    """Each layer once: the first image that has it writes it, the others point to it."""

    def __init__(self) -> None:
        self.name_of: dict[str, str] = {}
        self.chosen: list[tuple[Member, FileEntrySegment]] = []

    def place(self, member: Member, slot: LayerSlot) -> str:
        layer = member.image.layers[slot.index]
        key = f"{slot.compressed} {layer.digest if slot.compressed else layer.diff_id}"
        name = self.name_of.get(key)
        if name is None:
            name = self.name_of[key] = slot.name
            segments = (s for s in member.segments if isinstance(s, FileEntrySegment))
            self.chosen.append((member, next(s for s in segments if s.name == slot.name)))
        return name

    def segments(self) -> list[Segment]:
        """The layer entries, smallest first (as a single download sends them), by the
        registry's size: known cold or warm, so the same bundle is always the same bytes."""

        def order(chosen: tuple[Member, FileEntrySegment]) -> tuple[int, str]:
            member, segment = chosen
            return member.image.layers[segment.layer_index].size, segment.name

        ordered = sorted(self.chosen, key=order)
        return [segment for _, segment in ordered]


def _top(paths: Sequence[str]) -> str:
    """The top layer's id: its directory (docker layout) or its blob's hex (oci)."""
    if not paths:
        return ""
    last = paths[-1]
    return last.split("/")[0] if last.endswith("/layer.tar") else last.rsplit("/", 1)[1]


def docker_entries(images: list[BundleImage], layers: _Layers) -> list[MetadataEntry]:
    """The metadata of a docker-format bundle: every image's own (layer directories and
    config, each once), then one manifest.json and repositories for all."""
    metadata: dict[str, MetadataEntry] = {}
    loaders: list[LoaderImage] = []
    for image in images:
        member = image.members[0]
        for entry in member.plan.metadata:
            if entry.name not in ("manifest.json", "repositories"):
                metadata.setdefault(entry.name, entry)
        paths = tuple(layers.place(member, slot) for slot in member.plan.layers)
        config = member.image.config_digest.split(":", 1)[1] + ".json"
        loaders.append(LoaderImage(config, paths, _top(paths), member.plan.repo_tag))
    return [*metadata.values(), *loader_entries(loaders)]


def oci_entries(images: list[BundleImage], layers: _Layers) -> list[MetadataEntry]:
    """The metadata of an OCI bundle: the registry's manifests, configs and indexes as
    blobs, index.json naming each image, and manifest.json for docker load."""
    blobs: dict[str, bytes] = {}
    descriptors: list[dict[str, object]] = []
    loaders: list[LoaderImage] = []
    for image in images:
        for member in image.members:
            paths = tuple(layers.place(member, slot) for slot in member.plan.layers)
            blobs.setdefault(member.image.config_digest, member.image.config)
            blobs.setdefault(member.image.manifest_digest, member.image.manifest)
            if member is image.members[0]:
                config = BLOBS + member.image.config_digest.split(":", 1)[1]
                loaders.append(LoaderImage(config, paths, _top(paths), member.plan.repo_tag))
        first = image.members[0]
        body, media_type = first.image.manifest, first.image.manifest_media_type
        digest = first.image.manifest_digest
        if image.index is not None:
            body, media_type, digest = _kept_index(image)
            blobs.setdefault(digest, body)
            for artifact, data in image.artifacts.items():
                blobs.setdefault(artifact, data)
        name = first.selection.full_name
        descriptors.append(
            {
                "mediaType": media_type,
                "digest": digest,
                "size": len(body),
                "annotations": {
                    "io.containerd.image.name": name,
                    "org.opencontainers.image.ref.name": name,
                },
            }
        )
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors}
    entries = [
        MetadataEntry("blobs/", None),
        MetadataEntry(BLOBS, None),
        MetadataEntry("oci-layout", canonical_json({"imageLayoutVersion": "1.0.0"})),
        MetadataEntry("index.json", canonical_json(index)),
    ]
    written = set(layers.name_of.values())
    for digest, data in blobs.items():
        name = BLOBS + digest.split(":", 1)[1]
        if name not in written:  # a config that is also a layer's blob goes in once
            entries.append(MetadataEntry(name, data))
            written.add(name)
    return [*entries, *loader_entries(loaders)]


def _kept_index(image: BundleImage) -> tuple[bytes, str, str]:
    """The index as the registry sent it when the bundle holds every entry it lists;
    else (attestations left out) a new one listing what the bundle holds."""
    assert image.index is not None
    body, media_type, digest, document = image.index
    held = {member.image.manifest_digest for member in image.members} | set(image.artifacts)
    entries = document.get("manifests")
    listed = [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []
    if all(entry.get("digest") in held for entry in listed):
        return body, media_type, digest
    kept = dict(document, manifests=[e for e in listed if e.get("digest") in held])
    body = json.dumps(kept, separators=(",", ":")).encode()
    return body, media_type, sha256_digest(body)


class Bundle:
    """A prepared bundle: its images' downloads and the archive as segments."""

    def __init__(self, request: BundleRequest, images: list[BundleImage]) -> None:
        self.request = request
        self.images = images
        self._layers = _Layers()
        if request.format == "oci":
            metadata = oci_entries(images, self._layers)
        else:
            metadata = docker_entries(images, self._layers)
        self.segments: list[Segment] = [
            BytesSegment(directory_entry(e.name) if e.data is None else bytes_entry(e.name, e.data))
            for e in metadata
        ]
        self.segments.extend(self._layers.segments())
        self.segments.append(BytesSegment(END_OF_ARCHIVE))
        self.total_size = total_size(self.segments)
        self.bytes_sent = 0
        self.started = time.monotonic()

    filename = FILENAME

    @property
    def members(self) -> list[Member]:
        return [member for image in self.images for member in image.members]

    @property
    def checksum_identity(self) -> str:
        parts = [f"bundle {self.request.format} {self.request.options.tag}"]
        for image in self.images:
            index = image.index[2] if image.index is not None else "-"
            parts.append(f"{index} " + " | ".join(_identity(m) for m in image.members))
        return "\n".join(parts)

    def headers(self) -> dict[str, str]:
        headers = {
            "Content-Type": "application/x-tar",
            "Content-Disposition": f'attachment; filename="{self.filename}"',
            "Cache-Control": "private, no-cache",
            "X-Bundle-Images": str(len(self.images)),
        }
        if self.total_size is not None:
            headers["Content-Length"] = str(self.total_size)
        return headers

    def start_fetching(self) -> None:
        """Fetch every layer the bundle writes, each through the first image with it."""
        for member, segment in self._layers.chosen:
            member.prefetch([segment.layer_index])

    def body(self) -> Iterator[bytes]:
        """The whole bundle, chunk by chunk; raises (aborting the transfer) on failure."""
        metrics.download_started()
        outcome = "aborted"
        try:
            for chunk in produce_range(self.segments):
                self.bytes_sent += len(chunk)
                yield chunk
            outcome = "completed"
        except GeneratorExit:
            outcome = "client_gone"
            raise
        finally:
            for member in self.members:
                member.outcome = f"bundle_{outcome}"
            self.close()
            seconds = time.monotonic() - self.started
            metrics.download_finished("bundle", outcome, self.bytes_sent, seconds)
            log.info(
                "bundle images=%d bytes=%d seconds=%.2f outcome=%s",
                len(self.images),
                self.bytes_sent,
                seconds,
                outcome,
            )

    def close(self) -> None:
        for member in self.members:
            member.close()


def _identity(member: Member) -> str:
    identity = getattr(member, "checksum_identity", None)
    return identity if isinstance(identity, str) else member.image.manifest_digest


def prepare_bundle(services: Services, request: BundleRequest) -> Bundle:
    """Every image prepared (resolved, checked, readable) before the first byte; the
    first that cannot be is a :class:`PassthroughError` naming it, and nothing is sent."""
    images: list[BundleImage] = []
    try:
        for spec in request.images:
            try:
                images.append(_prepare_image(services, request, spec))
            except PassthroughError as exc:
                exc.message = f"image {quote_input(spec)}: {exc.message}"
                exc.args = (exc.message,)
                raise
        return Bundle(request, images)
    except BaseException:
        for image in images:
            for member in image.members:
                member.close()
        raise


def _prepare_image(services: Services, request: BundleRequest, spec: str) -> BundleImage:
    settings = services.settings
    first = prepare_download(services, image_request(settings, request, spec), fetch=False)
    image = BundleImage(spec, [first])
    index_digest = first.image.index_digest
    if not request.all_platforms or index_digest is None:
        return image
    try:
        documents = Documents(first.client, services.store)
        image.index = documents.manifest_by_digest(index_digest, f"the index of {spec}")
        for platform, _ in index_platforms(image.index[3]):
            if any(m.image.platform == platform for m in image.members):
                continue
            # Pinned to the index's digest: a tag moved meanwhile cannot mix two indexes.
            each = image_request(settings, request, spec, platform=platform, digest=index_digest)
            image.members.append(prepare_download(services, each, fetch=False))
        _add_artifacts(documents, image)
    except BaseException:
        for member in image.members:
            member.close()
        raise
    return image


def _add_artifacts(documents: Documents, image: BundleImage) -> None:
    """The index's entries that are no platform image (attestations), with their
    blobs, so that the index goes in whole and keeps its digest. Small ones only (an
    attestation is kilobytes): an entry that is not is left out, the index rewritten."""
    assert image.index is not None
    held = {member.image.manifest_digest for member in image.members}
    entries = image.index[3].get("manifests")
    for entry in entries if isinstance(entries, list) else ():
        digest = entry.get("digest") if isinstance(entry, dict) else None
        if not isinstance(digest, str) or digest in held or digest in image.artifacts:
            continue
        found = _artifact(documents, digest, f"an entry of the index of {image.spec}")
        if found is not None:
            image.artifacts.update(found)


def _artifact(documents: Documents, digest: str, what: str) -> dict[str, bytes] | None:
    """One image manifest and its blobs, verified, when every blob is small."""
    body, media_type, digest, document = documents.manifest_by_digest(digest, what)
    if media_type not in IMAGE_MANIFEST_TYPES:
        return None
    layers = document.get("layers")
    found = {digest: body}
    for raw in [document.get("config"), *(layers if isinstance(layers, list) else ())]:
        blob, size, _ = descriptor(raw, what)
        if size > MAX_CONFIG_BYTES:
            return None
        found[blob] = documents.config(blob, size, what)
    return found
