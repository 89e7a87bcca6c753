"""Archives to import, written the way their tools write them: an OCI image layout (a
directory, or a tar of one: skopeo's oci-archive), and docker save archives in Docker
1.10–24's layout (``<id>/layer.tar``, ``<hex>.json`` configs, a repeated layer as a
symlink) and in Docker 25+'s (an OCI layout of uncompressed layers plus manifest.json).
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tests.support.helpers import digest
from tests.support.images import Image, Index, decompress

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def _symlink(tar: tarfile.TarFile, name: str, target: str) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    tar.addfile(info)


def _blob_name(blob_digest: str) -> str:
    return "blobs/sha256/" + blob_digest.removeprefix("sha256:")


def oci_files(entries: Sequence[tuple[Image | Index, dict[str, str] | None]]) -> dict[str, bytes]:
    """The files of an OCI layout holding ``entries`` (an image or an index, and the
    annotations of its index.json entry)."""
    files: dict[str, bytes] = {"oci-layout": b'{"imageLayoutVersion":"1.0.0"}'}
    manifests = []
    for item, notes in entries:
        images = item.manifests if isinstance(item, Index) else (item,)
        for image in images:
            files[_blob_name(image.digest)] = image.manifest
            for blob_digest, blob in image.blobs().items():
                files[_blob_name(blob_digest)] = blob.read()
        files[_blob_name(item.digest)] = item.manifest
        descriptor: dict[str, Any] = {
            "mediaType": item.media_type,
            "digest": item.digest,
            "size": len(item.manifest),
        }
        if notes:
            descriptor["annotations"] = notes
        manifests.append(descriptor)
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}
    files["index.json"] = json.dumps(index).encode()
    return files


def write_tar(path: Path, files: dict[str, bytes], links: Iterable[tuple[str, str]] = ()) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            _add(tar, name, data)
        for name, target in links:
            _symlink(tar, name, target)
    return path


def write_dir(path: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        target = path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return path


def oci_archive(path: Path, entries: Sequence[tuple[Image | Index, dict[str, str] | None]]) -> Path:
    return write_tar(path, oci_files(entries))


def _plain_layers(image: Image) -> list[bytes]:
    return [decompress(layer.read(), layer.compression) for layer in image.layers]


def docker_save_legacy(path: Path, entries: Sequence[tuple[Image, list[str] | None]]) -> Path:
    """Docker 1.10–24's ``docker save``: ``<hex>.json`` configs, ``<id>/layer.tar``, a
    layer seen before written as a symlink to the first copy, manifest.json."""
    files: dict[str, bytes] = {}
    links: list[tuple[str, str]] = []
    manifest = []
    seen: dict[str, str] = {}
    for image, tags in entries:
        config_name = image.config_digest.removeprefix("sha256:") + ".json"
        files[config_name] = image.config
        layer_names = []
        for position, plain in enumerate(_plain_layers(image)):
            layer_id = digest(f"{image.digest}{position}".encode()).removeprefix("sha256:")
            name = f"{layer_id}/layer.tar"
            if digest(plain) in seen:
                links.append((name, f"../{seen[digest(plain)]}"))
            else:
                seen[digest(plain)] = name
                files[name] = plain
            files[f"{layer_id}/VERSION"] = b"1.0"
            layer_names.append(name)
        manifest.append({"Config": config_name, "RepoTags": tags, "Layers": layer_names})
    files["manifest.json"] = json.dumps(manifest).encode()
    return write_tar(path, files, links)


def docker_save_oci(path: Path, entries: Sequence[tuple[Image, list[str]]]) -> Path:
    """Docker 25+'s ``docker save`` with the classic image store: an OCI layout whose
    manifests list the layers uncompressed, plus manifest.json."""
    files: dict[str, bytes] = {"oci-layout": b'{"imageLayoutVersion":"1.0.0"}'}
    manifest, index = [], []
    for image, tags in entries:
        files[_blob_name(image.config_digest)] = image.config
        layers = []
        for plain in _plain_layers(image):
            files[_blob_name(digest(plain))] = plain
            layers.append({"mediaType": OCI_LAYER_TAR, "digest": digest(plain), "size": len(plain)})
        document = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": image.config_digest,
                "size": len(image.config),
            },
            "layers": layers,
        }
        body = json.dumps(document).encode()
        files[_blob_name(digest(body))] = body
        for tag in tags:
            index.append(
                {
                    "mediaType": OCI_MANIFEST,
                    "digest": digest(body),
                    "size": len(body),
                    "annotations": {
                        CONTAINERD_NAME: f"docker.io/library/{tag}",
                        REF_NAME: tag.rpartition(":")[2],
                    },
                }
            )
        manifest.append(
            {
                "Config": _blob_name(image.config_digest),
                "RepoTags": tags,
                "Layers": [_blob_name(str(layer["digest"])) for layer in layers],
            }
        )
    files["index.json"] = json.dumps({"schemaVersion": 2, "manifests": index}).encode()
    files["manifest.json"] = json.dumps(manifest).encode()
    return write_tar(path, files)
