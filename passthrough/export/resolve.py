"""Stage 3, resolve: tag or digest → one image manifest for the wanted platform, its
config, and the list of layers, each checked before anything is downloaded.

Accepts the four manifest types (OCI index, Docker manifest list, OCI manifest, Docker
v2 manifest); refuses schema1 and foreign (non-distributable) layers with a clear reason.
"""

from __future__ import annotations

import threading
from typing import Any

from passthrough.errors import TooLarge, UnsupportedImage, UpstreamInvalid, UpstreamUnavailable
from passthrough.observe import telemetry
from passthrough.oci.manifest import (
    ACCEPT,
    CONFIG_TYPES,
    FOREIGN_LAYER_TYPES,
    IMAGE_MANIFEST_TYPES,
    INDEX_TYPES,
    LAYER_TYPES,
    MAX_CONFIG_BYTES,
    MAX_LAYERS,
    LayerDescriptor,
    ResolvedImage,
    choose_platform,
    descriptor,
    json_object,
    parse_manifest,
    verify_digest,
)
from passthrough.oci.platforms import DEFAULT_PLATFORM, Platform
from passthrough.oci.reference import DIGEST_RE, ImageReference
from passthrough.store.content import ContentStore
from passthrough.upstream.client import RegistryClient, read_limited

#: A manifest as :func:`~passthrough.oci.manifest.parse_manifest` returns it: the bytes,
#: the media type, the digest and the parsed document.
ParsedManifest = tuple[bytes, str, str, dict[str, Any]]


class _Head:
    """One HEAD in flight, for the requests that asked for the same while it ran."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.digest: str | None = None
        self.failed = True


_heads: dict[tuple[str, ...], _Head] = {}
_heads_lock = threading.Lock()


def head_manifest(client: RegistryClient, reference: str, what: str) -> str | None:
    """The digest a tag points at, by HEAD (free of Docker Hub's pull quota); None when
    the registry does not say.

    Requests of one identity (anonymous, or the service's own credentials) that ask for
    the same tag while a HEAD of it is in flight take that HEAD's answer (a fleet's 500
    downloads of one image cost one upstream HEAD, not 500 before their first byte).
    Each answer is still from the registry, during the request; a client's own
    credentials never share, and a failure is not shared: the others ask themselves."""
    key = _head_key(client, reference)
    if key is None:
        return _head(client, reference, what)
    with _heads_lock:
        head = _heads.get(key)
        leader = head is None
        if head is None:
            head = _heads[key] = _Head()
    if leader:
        try:
            head.digest = _head(client, reference, what)
            head.failed = False
            return head.digest
        finally:
            with _heads_lock:
                del _heads[key]
            head.done.set()
    head.done.wait()
    return _head(client, reference, what) if head.failed else head.digest


def _head(client: RegistryClient, reference: str, what: str) -> str | None:
    digest = client.head_manifest(reference, ACCEPT, what).digest
    return digest if digest.startswith("sha256:") else None


def _head_key(client: RegistryClient, reference: str) -> tuple[str, ...] | None:
    """Who asks what, for sharing a HEAD; None when the identity is the client's own."""
    target = client.target
    if target.credentials_source == "client" or target.bearer_token:
        return None
    identity = target.credentials.identity if target.credentials else ""
    return (target.registry.url, client.repository, reference, target.auth.value, identity)


def fetch_manifest(
    client: RegistryClient, reference: str, what: str, cache: ContentStore | None = None
) -> ParsedManifest:
    """A manifest by tag or digest; returns (bytes, media type, digest, parsed document).

    With a cache, the registry is still asked every time, with this request's
    credentials (a HEAD proves access and resolves the tag), but the body comes from the
    cache when its digest is there.
    """
    body: bytes | None = None
    header_type = ""
    if cache is not None:
        known = head_manifest(client, reference, what)
        if known is not None and (not DIGEST_RE.fullmatch(reference) or known == reference):
            body = cache.get_document("manifests", known)
    if body is not None:  # read from the store: no need to store it again
        return parse_manifest(body, header_type, reference, what)
    body, header_type = _get_manifest(client, reference, what)
    return _parsed_and_stored(body, header_type, reference, what, cache)


def _parsed_and_stored(
    body: bytes, header_type: str, reference: str, what: str, store: ContentStore | None
) -> ParsedManifest:
    """A manifest checked (:func:`parse_manifest`), then kept in the store by digest."""
    parsed = parse_manifest(body, header_type, reference, what)
    if store is not None:
        store.put_document("manifests", parsed[2], body)
    return parsed


def _get_manifest(client: RegistryClient, reference: str, what: str) -> tuple[bytes, str]:
    body, header_type, _ = client.get_manifest(reference, ACCEPT, what)
    return body, header_type


class Documents:
    """Where manifests and configs come from: the registry (through the cache when there
    is one), or, with ``offline_digest``, the cache alone (SERVE_STALE while the registry
    is down)."""

    def __init__(
        self,
        client: RegistryClient,
        cache: ContentStore | None = None,
        offline_digest: str | None = None,
    ) -> None:
        self.client = client
        self.cache = cache
        self.offline_digest = offline_digest

    def _cached(self, kind: str, digest: str, what: str) -> bytes:
        data = self.cache.get_document(kind, digest) if self.cache else None
        if data is None:
            raise UpstreamUnavailable(f"{what}: the registry is unreachable and it is not cached")
        return data

    def top_manifest(self, reference: str, what: str) -> ParsedManifest:
        if self.offline_digest is not None:
            body = self._cached("manifests", self.offline_digest, what)
            return parse_manifest(body, "", self.offline_digest, what)
        return fetch_manifest(self.client, reference, what, self.cache)

    def manifest_by_digest(self, digest: str, what: str) -> ParsedManifest:
        """An index entry: access to the repository was just proven upstream, so it may
        come from the cache without asking again."""
        cached = self.cache.get_document("manifests", digest) if self.cache else None
        if cached is None and self.offline_digest is not None:
            cached = self._cached("manifests", digest, what)
        if cached is not None:
            return parse_manifest(cached, "", digest, what)
        return _parsed_and_stored(
            *_get_manifest(self.client, digest, what), digest, what, self.cache
        )

    def config(self, digest: str, size: int, what: str) -> bytes:
        attributes = {"oci.image.config.digest": digest, "oci.image.config.size": size}
        with telemetry.span("fetch_config_blob", attributes) as span:
            cached = self.cache.get_document("blobs", digest) if self.cache else None
            if cached is None and self.offline_digest is not None:
                cached = self._cached("blobs", digest, what)
            telemetry.set_attributes({"passthrough.cache.hit": cached is not None}, span)
            if cached is not None:
                return cached
            if self.cache is None:
                return fetch_config(self.client, digest, size, what)
            # One upstream GET per blob whatever the concurrency: the first request
            # fetches, the others wait for it and read the cache.
            with self.cache.lock(digest):
                cached = self.cache.get_document("blobs", digest)
                if cached is not None:
                    return cached
                config = fetch_config(self.client, digest, size, what)
                self.cache.put_document("blobs", digest, config)
            return config


def resolve_image(
    client: RegistryClient,
    ref: ImageReference,
    platform: Platform = DEFAULT_PLATFORM,
    cache: ContentStore | None = None,
    *,
    offline_digest: str | None = None,
) -> ResolvedImage:
    """Resolve a reference to one verified image: manifest, config and layer list."""
    image = str(ref)
    documents = Documents(client, cache, offline_digest)
    body, media_type, digest, document = documents.top_manifest(
        ref.reference, f"manifest of {image}"
    )
    index_digest: str | None = None
    chosen_platform = platform
    if media_type in INDEX_TYPES:
        index_digest = digest
        chosen_platform, (body, media_type, digest, document) = _platform_manifest(
            documents, document, platform, image
        )
    # Every check the manifest allows comes before the config is fetched.
    config_digest, config_size = _config_descriptor(document, image)
    layer_fields = _layer_fields(document, image)
    config = documents.config(config_digest, config_size, f"config of {image}")
    diff_ids = _diff_ids(json_object(config, f"the config of {image}"), len(layer_fields), image)
    layers = tuple(
        LayerDescriptor(i, d, s, t, c, diff_ids[i]) for i, (d, s, t, c) in enumerate(layer_fields)
    )
    return ResolvedImage(
        reference=ref,
        manifest_digest=digest,
        manifest_media_type=media_type,
        manifest=body,
        index_digest=index_digest,
        platform=chosen_platform,
        config_digest=config_digest,
        config=config,
        layers=layers,
    )


def _platform_manifest(
    documents: Documents, index: dict[str, Any], platform: Platform, image: str
) -> tuple[Platform, ParsedManifest]:
    """The platform an index offers for ``platform``, and its image manifest."""
    chosen, entry = choose_platform(index, platform, image)
    entry_digest, _, _ = descriptor(entry, f"the {chosen} entry of {image}")
    manifest = documents.manifest_by_digest(entry_digest, f"{chosen} manifest of {image}")
    if manifest[1] not in IMAGE_MANIFEST_TYPES:
        raise UnsupportedImage(f"the {chosen} entry of {image} is not an image manifest")
    return chosen, manifest


def _config_descriptor(manifest: dict[str, Any], image: str) -> tuple[str, int]:
    """The config's digest and size, once it is known to be a container image's config
    small enough to hold in memory."""
    config_digest, config_size, config_type = descriptor(
        manifest.get("config"), f"the config descriptor of {image}"
    )
    if config_type not in CONFIG_TYPES:
        raise UnsupportedImage(
            f"{image} is not a container image (config media type {config_type[:80]!r})"
        )
    if config_size > MAX_CONFIG_BYTES:
        raise TooLarge(f"the config of {image} is larger than {MAX_CONFIG_BYTES >> 20} MiB")
    return config_digest, config_size


def _layer_fields(manifest: dict[str, Any], image: str) -> list[tuple[str, int, str, str]]:
    """Each layer's (digest, size, media type, compression), refusing foreign layers and
    media types no loader can unpack."""
    raw_layers = manifest.get("layers")
    if not isinstance(raw_layers, list):
        raise UpstreamInvalid(f"the manifest of {image} has no layers list")
    if len(raw_layers) > MAX_LAYERS:
        raise TooLarge(f"{image} has more than {MAX_LAYERS} layers")
    layer_fields: list[tuple[str, int, str, str]] = []
    for position, raw in enumerate(raw_layers, start=1):
        layer_digest, size, layer_type = descriptor(raw, f"layer {position} of {image}")
        if layer_type in FOREIGN_LAYER_TYPES:
            raise UnsupportedImage(
                f"layer {position} of {image} is a foreign (non-distributable) layer, "
                "which registries do not serve; it cannot be packaged"
            )
        compression = LAYER_TYPES.get(layer_type)
        if compression is None:
            raise UnsupportedImage(
                f"layer {position} of {image} has an unsupported media type {layer_type[:80]!r}"
            )
        layer_fields.append((layer_digest, size, layer_type, compression))
    return layer_fields


def _diff_ids(config: dict[str, Any], layer_count: int, image: str) -> list[str]:
    """The config's rootfs.diff_ids (the uncompressed layers' digests), one per layer."""
    rootfs = config.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or not all(
        isinstance(d, str) and DIGEST_RE.fullmatch(d) for d in diff_ids
    ):
        raise UpstreamInvalid(f"the config of {image} has no valid rootfs.diff_ids")
    if len(diff_ids) != layer_count:
        raise UpstreamInvalid(
            f"the config of {image} lists {len(diff_ids)} diff_ids for {layer_count} layers"
        )
    return diff_ids


def fetch_config(client: RegistryClient, digest: str, size: int, what: str) -> bytes:
    with client.blob(digest, what=what) as response:
        data = read_limited(response, MAX_CONFIG_BYTES, what)
    if len(data) != size:
        raise UpstreamInvalid(f"{what}: got {len(data)} bytes, the manifest says {size}")
    verify_digest(data, digest, what)
    return data
