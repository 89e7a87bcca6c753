"""The image data model: media types, manifest and index parsing, descriptors, the
resolved image and its layers. Pure functions over bytes and documents, no I/O.

Accepts the four manifest types (OCI index, Docker manifest list, OCI manifest, Docker
v2 manifest); refuses schema1 and foreign (non-distributable) layers with a clear reason.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from passthrough.errors import NotAcceptable, UnsupportedImage, UpstreamInvalid
from passthrough.oci.platforms import Platform
from passthrough.oci.reference import DIGEST_RE, ImageReference

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
SCHEMA1_TYPES = (
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
)
INDEX_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST)
IMAGE_MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
ACCEPT = ", ".join((OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST, DOCKER_MANIFEST))

CONFIG_TYPES = (
    "application/vnd.docker.container.image.v1+json",
    "application/vnd.oci.image.config.v1+json",
)
LAYER_TYPES = {
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.oci.image.layer.v1.tar": "none",
}
FOREIGN_LAYER_TYPES = (
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
)

MAX_MANIFEST_BYTES = 4 << 20
MAX_CONFIG_BYTES = 4 << 20
MAX_LAYERS = 1000


@dataclass(frozen=True)
class LayerDescriptor:
    index: int
    digest: str
    size: int
    media_type: str
    #: gzip, zstd or none, by media type; the fetch stage also sniffs the bytes.
    compression: str
    diff_id: str


def layer_what(layer: LayerDescriptor) -> str:
    """How messages name a layer: its position and a digest prefix."""
    return f"layer {layer.index + 1} ({layer.digest[:19]})"


@dataclass(frozen=True)
class ResolvedImage:
    reference: ImageReference
    manifest_digest: str
    manifest_media_type: str
    manifest: bytes = field(repr=False)
    #: Digest of the index or list the manifest was chosen from, when there was one.
    index_digest: str | None
    platform: Platform
    config_digest: str
    config: bytes = field(repr=False)
    layers: tuple[LayerDescriptor, ...]

    @property
    def config_document(self) -> dict[str, Any]:
        document: dict[str, Any] = json.loads(self.config)
        return document

    @property
    def total_compressed_size(self) -> int:
        return sum(layer.size for layer in self.layers)


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def verify_digest(data: bytes, digest: str, what: str) -> None:
    algorithm, _, expected = digest.partition(":")
    if algorithm not in ("sha256", "sha512"):
        raise UnsupportedImage(f"{what}: unsupported digest algorithm {algorithm!r}")
    actual = hashlib.new(algorithm, data).hexdigest()
    if actual != expected:
        raise UpstreamInvalid(f"{what}: content does not match its digest {digest}")


def json_object(data: bytes, what: str) -> dict[str, Any]:
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise UpstreamInvalid(f"{what} is not valid JSON") from None
    if not isinstance(document, dict):
        raise UpstreamInvalid(f"{what} is not a JSON object")
    return document


def parse_manifest(
    body: bytes, header_type: str, reference: str, what: str
) -> tuple[bytes, str, str, dict[str, Any]]:
    """Check a manifest's bytes: JSON, a supported media type (told by shape when the
    OCI ``mediaType`` is omitted), and, for a digest reference, that digest. Returns
    (bytes, media type, digest, parsed document)."""
    document = json_object(body, what)
    media_type = document.get("mediaType") or header_type
    if document.get("schemaVersion") == 1 or media_type in SCHEMA1_TYPES:
        raise UnsupportedImage(
            f"{what} is a Docker schema1 manifest, which is deprecated and not supported; "
            "push the image again with a current Docker or buildx"
        )
    if media_type not in INDEX_TYPES + IMAGE_MANIFEST_TYPES:
        # OCI allows mediaType to be omitted: tell an index from a manifest by shape.
        if "manifests" in document:
            media_type = OCI_INDEX
        elif "config" in document and "layers" in document:
            media_type = OCI_MANIFEST
        else:
            raise UnsupportedImage(f"{what} has an unsupported media type {media_type[:80]!r}")
    digest = sha256_digest(body)
    if DIGEST_RE.fullmatch(reference):
        verify_digest(body, reference, what)
        digest = reference
    return body, media_type, digest, document


def is_attestation(entry: dict[str, Any]) -> bool:
    platform = entry.get("platform") or {}
    annotations = entry.get("annotations") or {}
    return annotations.get("vnd.docker.reference.type") == "attestation-manifest" or (
        platform.get("os") == "unknown" and platform.get("architecture") == "unknown"
    )


def index_platforms(document: dict[str, Any]) -> list[tuple[Platform, dict[str, Any]]]:
    """The real image entries of an index, attestation manifests left out."""
    entries = document.get("manifests")
    if not isinstance(entries, list):
        raise UpstreamInvalid("the image index has no manifests list")
    found: list[tuple[Platform, dict[str, Any]]] = []
    for entry in entries:
        if not isinstance(entry, dict) or is_attestation(entry):
            continue
        platform = entry.get("platform")
        if not isinstance(platform, dict):
            continue
        os_name, arch = platform.get("os"), platform.get("architecture")
        if not isinstance(os_name, str) or not isinstance(arch, str):
            continue
        variant = platform.get("variant")
        found.append(
            (
                Platform(os_name, arch, variant if isinstance(variant, str) and variant else None),
                entry,
            )
        )
    return found


def choose_platform(
    document: dict[str, Any], wanted: Platform, image: str
) -> tuple[Platform, dict[str, Any]]:
    candidates = index_platforms(document)
    exact = [c for c in candidates if c[0] == wanted]
    matching = exact or [c for c in candidates if wanted.matches(c[0])]
    if not matching:
        available = sorted({str(p) for p, _ in candidates})
        raise NotAcceptable(
            f"{image} has no {wanted} image; available platforms: "
            + (", ".join(available) if available else "none")
        )
    return matching[0]


def descriptor(entry: Any, what: str) -> tuple[str, int, str]:
    if not isinstance(entry, dict):
        raise UpstreamInvalid(f"{what} is not a descriptor")
    digest, size, media_type = entry.get("digest"), entry.get("size"), entry.get("mediaType")
    if not isinstance(digest, str) or not DIGEST_RE.fullmatch(digest):
        raise UpstreamInvalid(f"{what} has an invalid digest")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise UpstreamInvalid(f"{what} has an invalid size")
    if not isinstance(media_type, str):
        raise UpstreamInvalid(f"{what} has no media type")
    return digest, size, media_type
