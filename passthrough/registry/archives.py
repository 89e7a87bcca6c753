"""Reading what ``passthrough import`` takes: a ``docker save`` archive (Docker 1.10–24's
layout, and Docker 25+'s, which is an OCI image layout plus ``manifest.json``), an OCI
archive (a tar of an OCI image layout, as ``skopeo copy … oci-archive:`` writes) or an
OCI image layout directory.

This module only reads and checks the structure: every member named is there and whole
(a truncated tar is found by its missing end-of-archive marker, not by a short read
halfway through the import), every manifest and config matches its digest, the configs
list one diff_id per layer. Blob contents are hashed later, while they are staged
(:mod:`passthrough.registry.importer`). Nothing here writes anything.

Which reading an input gets: an OCI layout (``index.json``) keeps its manifests and
digests, unless it is a ``docker save`` archive (it also has ``manifest.json``) whose
layers are uncompressed tars, what Docker 25+'s classic image store writes: such
layers are recompressed, as those of the older layout are. Such an archive whose OCI
layout is not whole (Docker 25+'s containerd image store lists a multi-platform index
but saves one platform) is read by its ``manifest.json`` too.
"""

from __future__ import annotations

import json
import os
import posixpath
import tarfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from passthrough.errors import ArchiveInvalid
from passthrough.oci.manifest import (
    DOCKER_MANIFEST_LIST,
    FOREIGN_LAYER_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
    sha256_digest,
)
from passthrough.oci.reference import DIGEST_RE
from passthrough.registry.hosted import sha256_descriptor

#: Manifests, configs and the JSON files of an archive are read whole, up to this size.
DOCUMENT_LIMIT = 4 << 20
#: The annotations that name an image of an OCI layout: a tag or a whole reference, and
#: containerd's (and Docker 25+'s) whole reference.
REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"
#: Layer media types that are plain tars (a docker save layout's own layers).
UNCOMPRESSED_LAYERS = (
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.docker.image.rootfs.diff.tar",
)
_BLOCK = tarfile.BLOCKSIZE


# -- where the files come from ------------------------------------------------------------


class Source(ABC):
    """The files of an archive or a layout directory, by their path inside it."""

    #: For messages: the file or directory name.
    label: str

    @abstractmethod
    def size(self, name: str) -> int | None:
        """The size of a regular file (links followed), None when there is none."""

    @abstractmethod
    def open(self, name: str) -> IO[bytes]:
        """A file for reading (the caller checked it exists)."""

    def close(self) -> None:  # noqa: B027 - optional
        """Release the archive."""

    def read(self, name: str, what: str) -> bytes:
        """A small file whole (a manifest, a config, index.json)."""
        size = self.size(name)
        if size is None:
            raise ArchiveInvalid(f"{self.label}: {what} ({name}) is missing")
        if size > DOCUMENT_LIMIT:
            raise ArchiveInvalid(f"{self.label}: {what} ({name}) is larger than 4 MiB")
        with self.open(name) as handle:
            data = handle.read(size + 1)
        if len(data) != size:
            raise ArchiveInvalid(f"{self.label}: {what} ({name}) is truncated")
        return data

    def chunks(self, name: str, chunk: int = 1 << 20) -> Iterator[bytes]:
        with self.open(name) as handle:
            while data := handle.read(chunk):
                yield data


def clean_name(name: str) -> str | None:
    """A member path as the archive's JSON names it (no ``./``, no leading ``/``), None
    for one that leaves the archive."""
    cleaned = posixpath.normpath("/" + name).lstrip("/")
    return None if cleaned in ("", ".") or cleaned.startswith("..") else cleaned


class TarSource(Source):
    """An uncompressed tar file, its member index read once. A truncated file is refused
    here: a member's data running past the end of the file, or no end-of-archive
    marker (two zero blocks; at least the first must be there) after the last one."""

    def __init__(self, path: Path, label: str | None = None) -> None:
        self.label = label or path.name
        self._file = path.open("rb")
        try:
            self._members = self._index(os.fstat(self._file.fileno()).st_size)
        except BaseException:
            self._file.close()
            raise

    def _index(self, total: int) -> dict[str, tarfile.TarInfo]:
        try:
            self._tar = tarfile.open(fileobj=self._file, mode="r:")
            members = self._tar.getmembers()
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise ArchiveInvalid(f"{self.label} is truncated or not a tar archive: {exc}") from None
        found: dict[str, tarfile.TarInfo] = {}
        end = 0
        for member in members:
            data_end = member.offset_data + (member.size if member.isfile() else 0)
            if data_end > total:
                raise ArchiveInvalid(
                    f"{self.label} is truncated: {member.name} ends at byte {data_end}, "
                    f"the file has {total}"
                )
            end = max(end, data_end + (-data_end % _BLOCK))
            name = clean_name(member.name)
            if name is not None:
                found[name] = member
        if not members or self._marker(end) != bytes(_BLOCK):
            raise ArchiveInvalid(
                f"{self.label} is truncated: no end-of-archive marker after byte {end}"
            )
        return found

    def _marker(self, offset: int) -> bytes:
        self._file.seek(offset)
        return self._file.read(_BLOCK)

    def _member(self, name: str) -> tarfile.TarInfo | None:
        for _ in range(16):  # links to links, but no loops
            member = self._members.get(name)
            if member is None:
                return None
            if member.isfile():
                return member
            if member.issym():
                target = clean_name(posixpath.join(posixpath.dirname(name), member.linkname))
            elif member.islnk():
                target = clean_name(member.linkname)
            else:
                return None
            if target is None:
                return None
            name = target
        return None

    def size(self, name: str) -> int | None:
        member = self._member(name)
        return None if member is None else member.size

    def open(self, name: str) -> IO[bytes]:
        member = self._member(name)
        handle = self._tar.extractfile(member) if member is not None else None
        if handle is None:
            raise ArchiveInvalid(f"{self.label}: {name} is missing")
        return handle

    def close(self) -> None:
        self._tar.close()
        self._file.close()


class DirectorySource(Source):
    """An OCI image layout directory; no path leaves it."""

    def __init__(self, root: Path) -> None:
        self.label = root.name or str(root)
        self.root = root.resolve()

    def _path(self, name: str) -> Path | None:
        cleaned = clean_name(name)
        if cleaned is None:
            return None
        path = (self.root / cleaned).resolve()
        return path if path.is_relative_to(self.root) and path.is_file() else None

    def size(self, name: str) -> int | None:
        path = self._path(name)
        return None if path is None else path.stat().st_size

    def open(self, name: str) -> IO[bytes]:
        path = self._path(name)
        if path is None:
            raise ArchiveInvalid(f"{self.label}: {name} is missing")
        return path.open("rb")


def open_source(path: Path) -> Source:
    """A directory (an OCI layout) or a tar file."""
    if path.is_dir():
        return DirectorySource(path)
    if not path.is_file():
        raise ArchiveInvalid(f"{path} is neither a file nor a directory")
    return TarSource(path)


# -- what an archive holds ------------------------------------------------------------------


@dataclass(frozen=True)
class BlobRef:
    """A blob an image needs, where the archive keeps it."""

    digest: str
    size: int
    member: str


@dataclass(frozen=True)
class Document:
    """A manifest or index, its bytes as the archive holds them."""

    digest: str
    media_type: str
    body: bytes


@dataclass
class OciImage:
    """An image of an OCI layout, stored as it is: its digests kept."""

    names: list[str]
    #: Child manifests before the indexes that list them; the image's own last.
    documents: list[Document]
    blobs: list[BlobRef]

    @property
    def digest(self) -> str:
        return self.documents[-1].digest


@dataclass
class DockerImage:
    """An image of a ``docker save`` archive: its config as it is, its layers (plain
    tars, checked against the config's diff_ids) to be compressed."""

    names: list[str]
    config: bytes
    #: (member, diff_id) per layer, in order.
    layers: list[tuple[str, str]] = field(default_factory=list)

    @property
    def config_digest(self) -> str:
        return sha256_digest(self.config)


Image = OciImage | DockerImage


def read_images(source: Source, manifest_limit: int = DOCUMENT_LIMIT) -> list[Image]:
    """Every image of the archive, its structure checked (ArchiveInvalid naming what
    is wrong)."""
    has_index = source.size("index.json") is not None
    has_docker = source.size("manifest.json") is not None
    if has_index:
        try:
            images: list[Image] = list(_oci_images(source, manifest_limit))
        except ArchiveInvalid:
            if not has_docker:
                raise
            images = []  # manifest.json may still describe every image whole
        if images and (not has_docker or not any(_uncompressed(image) for image in images)):
            return images
    if has_docker:
        return list(_docker_images(source))
    raise ArchiveInvalid(
        f"{source.label} is neither a docker save archive (manifest.json) nor an OCI image "
        "layout (index.json)"
    )


def _uncompressed(image: Image) -> bool:
    if not isinstance(image, OciImage):
        return False
    return any(
        layer.get("mediaType") in UNCOMPRESSED_LAYERS
        for document in image.documents
        for layer in _json(document.body, "manifest").get("layers") or []
        if isinstance(layer, dict)
    )


def _json(data: bytes, what: str) -> dict[str, Any]:
    try:
        document = json.loads(data)
    except ValueError:
        raise ArchiveInvalid(f"{what} is not JSON") from None
    if not isinstance(document, dict):
        raise ArchiveInvalid(f"{what} is not a JSON object")
    return document


# -- OCI image layouts ------------------------------------------------------------------------


def blob_member(digest: str) -> str:
    algorithm, _, hex_part = digest.partition(":")
    return f"blobs/{algorithm}/{hex_part}"


def _descriptor(entry: Any, what: str) -> tuple[str, int, dict[str, Any]]:
    digest, size = sha256_descriptor(entry, what, ArchiveInvalid)
    return digest, size, entry


def _oci_images(source: Source, limit: int) -> Iterator[OciImage]:
    index = _json(source.read("index.json", "index.json"), f"{source.label}: index.json")
    entries = index.get("manifests")
    if not isinstance(entries, list) or not entries:
        raise ArchiveInvalid(f"{source.label}: index.json lists no manifests")
    for position, entry in enumerate(entries, start=1):
        what = f"{source.label}: image {position} of index.json"
        digest, size, descriptor = _descriptor(entry, what)
        image = OciImage(_oci_names(descriptor), [], [])
        _walk(source, image, digest, size, descriptor.get("mediaType"), limit, depth=0)
        yield image


def _oci_names(descriptor: dict[str, Any]) -> list[str]:
    """The name of an index.json entry: ``ref.name`` (a tag, or a whole reference), or
    containerd's whole name when ``ref.name`` is only a tag."""
    annotations = descriptor.get("annotations")
    if not isinstance(annotations, dict):
        return []
    ref_name, full = annotations.get(REF_NAME), annotations.get(CONTAINERD_NAME)
    if isinstance(full, str) and full and (not isinstance(ref_name, str) or "/" not in ref_name):
        return [full]
    return [ref_name] if isinstance(ref_name, str) and ref_name else []


def _walk(
    source: Source,
    image: OciImage,
    digest: str,
    size: int,
    declared: Any,
    limit: int,
    depth: int,
) -> None:
    """Add a manifest (after its children, for an index) and its blobs to ``image``."""
    if depth > 4:
        raise ArchiveInvalid(f"{source.label}: indexes nested too deep at {digest[:19]}…")
    if any(document.digest == digest for document in image.documents):
        return
    member = blob_member(digest)
    if size > limit:
        raise ArchiveInvalid(f"{source.label}: manifest {digest} is larger than the limit")
    body = source.read(member, f"manifest {digest}")
    if len(body) != size or sha256_digest(body) != digest:
        raise ArchiveInvalid(f"{source.label}: manifest {member} does not match its digest")
    document = _json(body, f"{source.label}: manifest {digest}")
    media_type = document.get("mediaType") or declared
    if not isinstance(media_type, str):
        media_type = OCI_INDEX if "manifests" in document else OCI_MANIFEST
    if media_type in (OCI_INDEX, DOCKER_MANIFEST_LIST) or "manifests" in document:
        for position, child in enumerate(document.get("manifests") or [], start=1):
            what = f"{source.label}: manifest {position} of index {digest[:19]}…"
            child_digest, child_size, entry = _descriptor(child, what)
            _walk(source, image, child_digest, child_size, entry.get("mediaType"), limit, depth + 1)
    else:
        _image_blobs(source, image, document, digest)
    image.documents.append(Document(digest, media_type, body))


def _image_blobs(source: Source, image: OciImage, document: dict[str, Any], digest: str) -> None:
    what = f"{source.label}: manifest {digest[:19]}…"
    wanted = [_descriptor(document.get("config"), f"{what}: the config")]
    layers = document.get("layers")
    if not isinstance(layers, list):
        raise ArchiveInvalid(f"{what} has no layers list")
    for position, layer in enumerate(layers, start=1):
        found = _descriptor(layer, f"{what}: layer {position}")
        if found[2].get("mediaType") in FOREIGN_LAYER_TYPES and found[2].get("urls"):
            continue  # foreign layers live elsewhere, by design
        wanted.append(found)
    for blob_digest, size, _ in wanted:
        member = blob_member(blob_digest)
        stored = source.size(member)
        if stored is None:
            raise ArchiveInvalid(f"{what}: blob {blob_digest} is missing from the archive")
        if stored != size:
            raise ArchiveInvalid(
                f"{what}: blob {blob_digest} is {stored} bytes in the archive, not {size}"
            )
        if all(blob.digest != blob_digest for blob in image.blobs):
            image.blobs.append(BlobRef(blob_digest, size, member))


# -- docker save archives --------------------------------------------------------------------


def _docker_images(source: Source) -> Iterator[DockerImage]:
    data = source.read("manifest.json", "manifest.json")
    try:
        entries = json.loads(data)
    except ValueError:
        raise ArchiveInvalid(f"{source.label}: manifest.json is not JSON") from None
    if not isinstance(entries, list) or not entries:
        raise ArchiveInvalid(f"{source.label}: manifest.json lists no images")
    for position, entry in enumerate(entries, start=1):
        yield _docker_image(source, entry, f"{source.label}: image {position} of manifest.json")


def _docker_image(source: Source, entry: Any, what: str) -> DockerImage:
    if not isinstance(entry, dict) or not isinstance(entry.get("Config"), str):
        raise ArchiveInvalid(f"{what} names no Config")
    config_name = entry["Config"]
    config = source.read(config_name, f"the config of {what}")
    named = posixpath.basename(config_name).removesuffix(".json")
    if len(named) == 64 and sha256_digest(config) != f"sha256:{named}":
        raise ArchiveInvalid(f"{what}: config {config_name} does not match its digest")
    rootfs = _json(config, f"{what}: the config").get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    layers = entry.get("Layers")
    if not isinstance(layers, list) or not isinstance(diff_ids, list):
        raise ArchiveInvalid(f"{what} has no Layers list or its config no diff_ids")
    if len(layers) != len(diff_ids):
        raise ArchiveInvalid(
            f"{what} lists {len(layers)} layers, its config {len(diff_ids)} diff_ids"
        )
    image = DockerImage(_docker_names(entry.get("RepoTags"), what), config)
    for position, (member, diff_id) in enumerate(zip(layers, diff_ids, strict=True), start=1):
        if not isinstance(member, str) or not isinstance(diff_id, str):
            raise ArchiveInvalid(f"{what}: layer {position} is not a path and a diff_id")
        if not DIGEST_RE.fullmatch(diff_id) or not diff_id.startswith("sha256:"):
            raise ArchiveInvalid(f"{what}: diff_id {position} is not a sha256 digest")
        if source.size(member) is None:
            raise ArchiveInvalid(f"{what}: layer {member} is missing from the archive")
        image.layers.append((member, diff_id))
    return image


def _docker_names(tags: Any, what: str) -> list[str]:
    if tags is None:
        return []
    if not isinstance(tags, list) or not all(isinstance(tag, str) for tag in tags):
        raise ArchiveInvalid(f"{what}: RepoTags is not a list of names")
    return list(tags)
