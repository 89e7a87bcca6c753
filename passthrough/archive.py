"""Stage 5, assemble: the entries of a Docker 1.10–24 ``docker save`` archive, the
layout Cisco documents for IOx (IOS XE 17.6 fails on OCI-packaged archives).

::

    <layer-id>/VERSION      "1.0"
    <layer-id>/json         legacy v1 metadata
    <layer-id>/layer.tar    the uncompressed layer
    <config-hex>.json       the registry's config bytes, never re-serialised
    manifest.json           [{"Config", "RepoTags", "Layers"}], Layers in diff_id order
    repositories            {"name": {"tag": "<top layer id>"}}

Everything but the layer tars is known once the manifest and config are, so it is
built here up front and streamed first. No symlinks: a repeated layer is referenced
twice in manifest.json rather than linked. Layer ids are derived from the chain of
diff_ids, so the same image always gives the same bytes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from passthrough.resolve import ResolvedImage

EPOCH = "1970-01-01T00:00:00Z"


def canonical_json(document: Any) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class MetadataEntry:
    name: str
    data: bytes | None  # None for a directory


@dataclass(frozen=True)
class LayerSlot:
    """Where layer ``index`` goes in the archive; only the first occurrence of a repeated
    layer gets a slot with ``first=True`` and a file of its own."""

    index: int
    name: str  # <layer-id>/layer.tar
    first: bool


@dataclass(frozen=True)
class ArchivePlan:
    metadata: tuple[MetadataEntry, ...]
    layers: tuple[LayerSlot, ...]
    repo_tag: str

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


def plan_archive(image: ResolvedImage, repo_tag: str) -> ArchivePlan:
    """Every metadata entry and the name of every layer tar."""
    config = image.config_document
    diff_ids = [layer.diff_id for layer in image.layers]
    ids = layer_ids(diff_ids, image.config_digest)

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
            slots.append(LayerSlot(layer.index, f"{layer_id}/layer.tar", first=True))
            parent = layer_id
        else:
            slots.append(LayerSlot(layer.index, f"{existing}/layer.tar", first=False))

    config_name = image.config_digest.split(":", 1)[1] + ".json"
    metadata.append(MetadataEntry(config_name, image.config))
    manifest = [
        {
            "Config": config_name,
            "RepoTags": [repo_tag],
            "Layers": [slot.name for slot in slots],
        }
    ]
    metadata.append(MetadataEntry("manifest.json", json.dumps(manifest).encode()))
    name, _, tag = repo_tag.rpartition(":")
    top = slots[-1].name.split("/")[0] if slots else ""
    repositories = {name: {tag: top}} if top else {}
    metadata.append(MetadataEntry("repositories", json.dumps(repositories).encode()))
    return ArchivePlan(tuple(metadata), tuple(slots), repo_tag)
