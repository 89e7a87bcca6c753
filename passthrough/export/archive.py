"""Stage 5, assemble: the entries of the archive, in two layouts.

``docker`` (default) is the Docker 1.10–24 ``docker save`` layout, the one Cisco
documents for IOx (IOS XE 17.6 fails on OCI-packaged archives)::

    <layer-id>/VERSION      "1.0"
    <layer-id>/json         legacy v1 metadata
    <layer-id>/layer.tar    the uncompressed layer
    <config-hex>.json       the registry's config bytes, never re-serialised
    manifest.json           [{"Config", "RepoTags", "Layers"}], Layers in diff_id order
    repositories            {"name": {"tag": "<top layer id>"}}

``oci`` is the Docker 25+ layout, an OCI image layout that docker load, podman, skopeo
(oci-archive:) and containerd all read::

    oci-layout              {"imageLayoutVersion": "1.0.0"}
    index.json              one manifest, with the image name annotations
    blobs/sha256/<hex>      layers (named by diff_id), config, OCI manifest
    manifest.json, repositories   as above, pointing into blobs/

Everything but the layers is known once the manifest and config are, and is sent
first. In the OCI layout the manifest and index.json need the layers' final sizes; they
are "late" entries, built when the sizes are known (at once when cached). No symlinks:
a repeated layer is referenced twice. Layer ids derive from the chain of diff_ids, so
the same image always gives the same bytes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from passthrough.oci.manifest import ResolvedImage

EPOCH = "1970-01-01T00:00:00Z"
FORMATS = ("docker", "oci")
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


def canonical_json(document: Any) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class MetadataEntry:
    name: str
    data: bytes | None  # None for a directory


@dataclass(frozen=True)
class LayerSlot:
    """Where layer ``index`` goes in the archive; a repeated layer's later occurrences
    (``first=False``) reuse the first one's file."""

    index: int
    name: str
    first: bool
    #: Sent as the registry's compressed blob rather than an uncompressed tar.
    compressed: bool = False


@dataclass(frozen=True)
class WrittenLayer:
    """What the late entries need to know of a layer once it is fetched."""

    digest: str
    size: int
    media_type: str


LateBuilder = Callable[[list[WrittenLayer]], tuple[MetadataEntry, ...]]


@dataclass(frozen=True)
class ArchivePlan:
    metadata: tuple[MetadataEntry, ...]
    layers: tuple[LayerSlot, ...]
    repo_tag: str
    #: Entries built from the written layers' sizes (OCI manifest, index.json).
    late: LateBuilder | None = None

    @property
    def written_layers(self) -> tuple[LayerSlot, ...]:
        return tuple(slot for slot in self.layers if slot.first)


def layer_ids(diff_ids: list[str], config_digest: str) -> list[str]:
    """Deterministic v1-style ids: each depends on its parent and its own diff_id (the
    chain), the top one also on the config, as docker's were."""
    ids: list[str] = []
    parent = ""
    for position, diff_id in enumerate(diff_ids):
        material = f"{parent}\n{diff_id}"
        if position == len(diff_ids) - 1:
            material += f"\n{config_digest}"
        layer_id = hashlib.sha256(material.encode()).hexdigest()
        ids.append(layer_id)
        parent = layer_id
    return ids


def _v1_json(config: dict[str, Any], layer_id: str, parent: str | None, is_top: bool) -> bytes:
    """The legacy ``<layer-id>/json``; the top layer carries the image config, as docker
    save writes it."""
    if is_top:
        document = {k: v for k, v in config.items() if k not in ("history", "rootfs")}
    else:
        document = {"created": EPOCH, "container_config": {}}
        if "os" in config:
            document["os"] = config["os"]
    document["id"] = layer_id
    if parent:
        document["parent"] = parent
    else:
        document.pop("parent", None)
    return canonical_json(document)


def _split_repo_tag(repo_tag: str) -> tuple[str, str]:
    name, _, tag = repo_tag.rpartition(":")
    return name, tag


def plan_archive(
    image: ResolvedImage,
    repo_tag: str,
    *,
    output_format: str = "docker",
    compressed: Callable[[int], bool] = lambda index: False,
    full_name: str | None = None,
) -> ArchivePlan:
    """Every entry of the archive; ``compressed(index)`` tells which layers are sent as
    the registry's blobs (``?layers=gzip``)."""
    if output_format == "oci":
        return _plan_oci(image, repo_tag, compressed, full_name or repo_tag)
    return _plan_docker(image, repo_tag, compressed)


def _plan_docker(
    image: ResolvedImage, repo_tag: str, compressed: Callable[[int], bool]
) -> ArchivePlan:
    config = image.config_document
    ids = layer_ids([layer.diff_id for layer in image.layers], image.config_digest)

    metadata: list[MetadataEntry] = []
    slots: list[LayerSlot] = []
    first_dir_for: dict[str, str] = {}
    parent: str | None = None
    for position, (layer, layer_id) in enumerate(zip(image.layers, ids, strict=True)):
        is_top = position == len(ids) - 1
        existing = first_dir_for.get(layer.diff_id)
        if existing is None:
            first_dir_for[layer.diff_id] = layer_id
            metadata.append(MetadataEntry(f"{layer_id}/", None))
            metadata.append(MetadataEntry(f"{layer_id}/VERSION", b"1.0"))
            metadata.append(
                MetadataEntry(f"{layer_id}/json", _v1_json(config, layer_id, parent, is_top))
            )
            slots.append(
                LayerSlot(layer.index, f"{layer_id}/layer.tar", True, compressed(layer.index))
            )
            parent = layer_id
        else:
            slots.append(
                LayerSlot(layer.index, f"{existing}/layer.tar", False, compressed(layer.index))
            )

    config_name = image.config_digest.split(":", 1)[1] + ".json"
    metadata.append(MetadataEntry(config_name, image.config))
    top = slots[-1].name.split("/")[0] if slots else ""
    metadata.extend(_loader_entries(config_name, repo_tag, slots, top))
    return ArchivePlan(tuple(metadata), tuple(slots), repo_tag)


def _loader_entries(
    config_name: str, repo_tag: str, slots: list[LayerSlot], top: str
) -> list[MetadataEntry]:
    """``manifest.json`` and ``repositories``, which docker load reads in both layouts;
    ``top`` names the top layer (its directory, or its blob), empty without layers."""
    return loader_entries([LoaderImage(config_name, tuple(s.name for s in slots), top, repo_tag)])


@dataclass(frozen=True)
class LoaderImage:
    """One image as ``manifest.json`` lists it: config and layer paths in the archive,
    the top layer's id (empty without layers) and a name."""

    config: str
    layers: tuple[str, ...]
    top: str
    repo_tag: str


def loader_entries(images: list[LoaderImage]) -> list[MetadataEntry]:
    """``manifest.json`` (one entry per image, as ``docker save a b c`` writes: the same
    image under two names is one entry with both RepoTags) and ``repositories``."""
    tags_of: dict[tuple[str, tuple[str, ...], str], list[str]] = {}
    for image in images:
        tags = tags_of.setdefault((image.config, image.layers, image.top), [])
        if image.repo_tag not in tags:
            tags.append(image.repo_tag)
    manifest = [
        {"Config": config, "RepoTags": tags, "Layers": list(layers)}
        for (config, layers, _), tags in tags_of.items()
    ]
    repositories: dict[str, dict[str, str]] = {}
    for (_, _, top), tags in tags_of.items():
        for repo_tag in tags if top else ():
            name, tag = _split_repo_tag(repo_tag)
            repositories.setdefault(name, {})[tag] = top
    return [
        MetadataEntry("manifest.json", json.dumps(manifest).encode()),
        MetadataEntry("repositories", json.dumps(repositories).encode()),
    ]


def _plan_oci(
    image: ResolvedImage, repo_tag: str, compressed: Callable[[int], bool], full_name: str
) -> ArchivePlan:
    slots = _oci_slots(image, compressed)
    config_name = "blobs/sha256/" + image.config_digest.split(":", 1)[1]
    metadata = [
        MetadataEntry("blobs/", None),
        MetadataEntry("blobs/sha256/", None),
        MetadataEntry("oci-layout", canonical_json({"imageLayoutVersion": "1.0.0"})),
    ]
    # A config that is also a layer's blob (the same bytes) is written once.
    if config_name not in {slot.name for slot in slots}:
        metadata.append(MetadataEntry(config_name, image.config))
    top = slots[-1].name.rsplit("/", 1)[1] if slots else ""
    metadata.extend(_loader_entries(config_name, repo_tag, slots, top))
    _, tag = _split_repo_tag(repo_tag)
    return ArchivePlan(
        tuple(metadata), tuple(slots), repo_tag, _oci_late(image, slots, full_name, tag)
    )


def _oci_slots(image: ResolvedImage, compressed: Callable[[int], bool]) -> list[LayerSlot]:
    """Each layer as a blob named by its digest (the registry's blob when sent
    compressed, else its diff_id); a blob already written is referenced again."""
    slots: list[LayerSlot] = []
    seen: set[str] = set()
    for layer in image.layers:
        is_compressed = compressed(layer.index)
        digest = layer.digest if is_compressed else layer.diff_id
        name = "blobs/sha256/" + digest.split(":", 1)[1]
        slots.append(LayerSlot(layer.index, name, name not in seen, is_compressed))
        seen.add(name)
    return slots


def _oci_late(
    image: ResolvedImage, slots: list[LayerSlot], full_name: str, tag: str
) -> LateBuilder:
    """The builder of the OCI manifest and index.json, once the written layers' final
    sizes and media types are known."""

    def late(layers: list[WrittenLayer]) -> tuple[MetadataEntry, ...]:
        by_index = dict(zip((s.index for s in slots if s.first), layers, strict=True))
        first_of = {s.name: s.index for s in slots if s.first}
        # Every occurrence of a repeated layer is listed, described by its first one.
        described = [by_index[first_of[slot.name]] for slot in slots]
        oci_manifest = _oci_manifest(image, described)
        manifest_digest = "sha256:" + hashlib.sha256(oci_manifest).hexdigest()
        return (
            MetadataEntry("blobs/sha256/" + manifest_digest.split(":", 1)[1], oci_manifest),
            MetadataEntry("index.json", _oci_index(oci_manifest, manifest_digest, full_name, tag)),
        )

    return late


def _oci_manifest(image: ResolvedImage, layers: list[WrittenLayer]) -> bytes:
    return canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": OCI_CONFIG,
                "digest": image.config_digest,
                "size": len(image.config),
            },
            "layers": [
                {"mediaType": layer.media_type, "digest": layer.digest, "size": layer.size}
                for layer in layers
            ],
        }
    )


def _oci_index(manifest: bytes, manifest_digest: str, full_name: str, tag: str) -> bytes:
    """index.json: the one manifest, with the names containerd and OCI tools read."""
    return canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {
                    "mediaType": OCI_MANIFEST,
                    "digest": manifest_digest,
                    "size": len(manifest),
                    "annotations": {
                        "io.containerd.image.name": full_name,
                        "org.opencontainers.image.ref.name": tag,
                    },
                }
            ],
        }
    )
