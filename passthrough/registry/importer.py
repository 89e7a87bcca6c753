"""Importing archives into the hosted area: ``passthrough import`` and
``POST /api/v1/import`` (what they read: :mod:`passthrough.registry.archives`).

Three steps, so that nothing partial is ever stored:

1. **plan**: the archive's structure is read and checked, each image named (its
   ``RepoTags`` or ``org.opencontainers.image.ref.name``, under ``--repository-prefix``)
   and every target repository checked against HOSTED_REPOSITORIES (and, on the
   endpoint, the user's push permission) before a byte is written;
2. **stage**: every blob the store lacks is copied into a staging file and hashed there
   (a docker save layer is gzip-compressed on the way and its plain bytes checked
   against the config's diff_id); one that does not match fails the import, and every
   staging file goes;
3. **commit**: the staged blobs are committed, linked into their repositories, the
   manifests stored, and only then the tags written.

OCI input keeps its manifests byte for byte, so its digests (and signatures, and
pinned references) stay valid. A docker save archive holds uncompressed layers and no
registry manifest: its layers are compressed here (gzip, deterministic: the same
archive imported twice gives the same digests) and a Docker v2 manifest is written for
its config, which is kept byte for byte (so the image id is the same). Blobs the store
already holds are not staged again (a docker save layer compressed before is not even
read: ``imports/layers/<diff-id>.json`` names its blob), and records already in place
are not rewritten: a second import of the same archive writes nothing.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from passthrough.config import Settings
from passthrough.errors import ArchiveInvalid, disk_full, is_disk_full
from passthrough.oci.endpoint import DOCKER_HUB_ALIASES
from passthrough.oci.manifest import DOCKER_MANIFEST, sha256_digest
from passthrough.oci.reference import TAG_RE, quote_input
from passthrough.registry.access import not_hosted
from passthrough.registry.archives import (
    DockerImage,
    Document,
    Image,
    OciImage,
    Source,
    read_images,
)
from passthrough.registry.hosted import Hosted
from passthrough.registry.routing import check_name, is_hosted, looks_like_host
from passthrough.store.content import ContentStore
from passthrough.store.layout import hex_of, import_layer_key

try:  # isal compresses gzip several times faster than zlib; either gives valid gzip.
    from isal import isal_zlib as _zlib

    _LEVEL = 2
except ImportError:  # pragma: no cover - isal is a dependency; zlib is the fallback
    import zlib as _zlib  # type: ignore[no-redef]

    _LEVEL = 6

DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
_CHUNK = 1 << 20
GZIP_MAGIC = b"\x1f\x8b"

#: Told what is being staged: (what, bytes done of it, its size or None).
Progress = Callable[[str, int, int | None], None]


@dataclass(frozen=True)
class Naming:
    """How images are named: ``prefix`` before every name (``team/``), ``repository``
    for images the archive names only by a tag, or not at all."""

    prefix: str = ""
    repository: str | None = None

    @classmethod
    def of(cls, prefix: str | None, repository: str | None) -> Naming:
        """From the command's options (or the endpoint's query): ``team`` and ``team/``
        are one prefix; an empty repository is none."""
        prefix = (prefix or "").strip()
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        return cls(prefix, repository or None)


@dataclass(frozen=True)
class Target:
    repository: str
    tag: str | None


@dataclass
class ImportReport:
    """What an import did: one entry per image and name, and the counts."""

    images: list[dict[str, Any]] = field(default_factory=list)
    blobs_written: int = 0
    blobs_present: int = 0
    bytes_written: int = 0
    manifests_written: int = 0
    tags_written: int = 0

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


# -- naming -----------------------------------------------------------------------------------


def split_reference(text: str) -> tuple[str | None, str | None]:
    """(repository, tag) of ``name:tag``, ``name@digest`` (no tag) or ``name``; a bare
    tag (no ``/``, no ``:``, as ``ref.name`` may be) is (None, tag)."""
    name, _, _digest = text.partition("@")
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        name, tag = name[:colon], name[colon + 1 :]
    else:
        tag = None
    if "/" not in name and tag is None and not _digest:
        return None, name
    return name or None, tag


def familiar(repository: str) -> str:
    """The repository without its registry host (``docker.io/library/nginx`` is
    ``nginx``, ``host:5000/team/app`` is ``team/app``): a name of this registry."""
    host, _, rest = repository.partition("/")
    if not rest or not looks_like_host(host):
        return repository
    if host in DOCKER_HUB_ALIASES and rest.startswith("library/"):
        return rest.removeprefix("library/")
    return rest


def targets_of(names: list[str], naming: Naming, what: str) -> list[Target]:
    """Where an image goes: each of its names under the prefix; a tag alone goes to
    ``naming.repository``; an image without a name goes there untagged."""
    if not names:
        if naming.repository is None:
            raise ArchiveInvalid(f"{what} has no name: give a repository for it")
        return [Target(naming.repository, None)]
    found: list[Target] = []
    for name in names:
        repository, tag = split_reference(name)
        if repository is None:
            if naming.repository is None:
                raise ArchiveInvalid(
                    f"{what} is named only by its tag {quote_input(name)}: give a repository"
                )
            target = naming.repository
        else:
            target = naming.prefix + familiar(repository)
        if tag is not None and not TAG_RE.fullmatch(tag):
            raise ArchiveInvalid(f"{what}: {quote_input(tag)} is not a valid tag")
        if Target(target, tag) not in found:
            found.append(Target(target, tag))
    return found


# -- staging ----------------------------------------------------------------------------------


class Staging:
    """The blobs of one import in staging files, verified, until :meth:`commit`; every
    file left is removed on exit (a failed import leaves nothing)."""

    def __init__(self, store: ContentStore, report: ImportReport, progress: Progress) -> None:
        self.store = store
        self.report = report
        self.progress = progress
        self.staged: dict[str, tuple[Path, int]] = {}
        #: What each docker save layer (by diff_id) was compressed into.
        self.compressed: dict[str, tuple[str, int]] = {}
        self._parts: list[Path] = []

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, *exc: object) -> None:
        for path in self._parts:
            path.unlink(missing_ok=True)

    def present(self, digest: str) -> bool:
        return digest in self.staged or self.store.blob_size(digest) is not None

    def _new(self, digest: str) -> tuple[Path, BinaryIO]:
        part = self.store.new_part("import-" + hex_of(digest))
        self._parts.append(part[0])
        return part

    def copy(self, chunks: Iterable[bytes], digest: str, size: int, what: str) -> None:
        """Stage a blob, checked against its digest and size (unless already here)."""
        if self.present(digest):
            self.report.blobs_present += 1
            return
        path, handle = self._new(digest)
        hasher, written = hashlib.sha256(), 0
        with handle:
            for chunk in _written(_read(chunks, what), handle):
                hasher.update(chunk)
                written += len(chunk)
                self.progress(what, written, size)
        if written != size or "sha256:" + hasher.hexdigest() != digest:
            raise ArchiveInvalid(f"{what} does not match its digest {digest}")
        self.staged[digest] = (path, size)

    def _compressed_before(self, diff_id: str) -> tuple[str, int] | None:
        """The blob an earlier import made of this layer, when the store still has it."""
        if diff_id in self.compressed:
            return self.compressed[diff_id]
        try:
            record = json.loads(self.store.backend.get_bytes(import_layer_key(diff_id)) or b"")
            digest, size = record["digest"], record["size"]
        except (ValueError, TypeError, KeyError):
            return None
        if not isinstance(digest, str) or self.store.blob_size(digest) != size:
            return None
        return digest, size

    def compress(
        self, chunks: Callable[[], Iterable[bytes]], diff_id: str, size: int, what: str
    ) -> tuple[str, int]:
        """Stage a plain layer tar gzip-compressed (a gzipped one as it is), checked
        against its diff_id: its blob's digest and size. A layer an earlier import
        compressed is not read."""
        known = self._compressed_before(diff_id)
        if known is not None:
            self.report.blobs_present += 1
            return known
        path, handle = self._new(diff_id)
        stream = _read(chunks(), what)
        first = next(stream, b"")
        packer: _Gzip | _Gzipped = _Gzipped() if first[:2] == GZIP_MAGIC else _Gzip()
        packed, done, written = hashlib.sha256(), 0, 0

        def packed_chunks() -> Iterator[bytes]:
            nonlocal done
            for chunk in itertools.chain([first], stream):
                done += len(chunk)
                self.progress(what, done, size)
                yield packer.pack(chunk)
            yield packer.finish()

        with handle:
            try:
                for out in _written(packed_chunks(), handle):
                    packed.update(out)
                    written += len(out)
            except zlib.error:
                raise ArchiveInvalid(f"{what} is not a valid gzip stream") from None
        plain = packer.plain
        if "sha256:" + plain.hexdigest() != diff_id:
            raise ArchiveInvalid(f"{what} does not match its diff_id {diff_id}")
        digest = "sha256:" + packed.hexdigest()
        if self.present(digest):
            self.report.blobs_present += 1
            path.unlink(missing_ok=True)
        else:
            self.staged[digest] = (path, written)
        self.compressed[diff_id] = (digest, written)
        return digest, written

    def commit(self) -> None:
        """Commit every staged blob, then note which blob each layer became."""
        for digest, (path, size) in self.staged.items():
            with path.open("rb") as handle:
                self.store.commit_part((path, handle), "blobs", digest, size)
            self.report.blobs_written += 1
            self.report.bytes_written += size
        for diff_id, (digest, size) in self.compressed.items():
            key = import_layer_key(diff_id)
            if self.store.backend.size(key) is None:
                record = {"digest": digest, "size": size}
                self.store.backend.put_bytes(key, json.dumps(record).encode())


class _Gzip:
    """A plain layer tar in (its digest is the diff_id), gzip out."""

    def __init__(self) -> None:
        self.plain = hashlib.sha256()
        self._compressor = _zlib.compressobj(_LEVEL, _zlib.DEFLATED, 31)

    def pack(self, chunk: bytes) -> bytes:
        self.plain.update(chunk)
        return bytes(self._compressor.compress(chunk))

    def finish(self) -> bytes:
        return bytes(self._compressor.flush())


class _Gzipped:
    """A layer already gzipped (Docker 25+ with the containerd image store saves the
    registry's blobs): kept as it is, its inflated bytes hashed for the diff_id, a
    bounded piece at a time."""

    def __init__(self) -> None:
        self.plain = hashlib.sha256()
        self._inflater = zlib.decompressobj(47)

    def pack(self, chunk: bytes) -> bytes:
        data = self._inflater.decompress(chunk, _CHUNK)
        self.plain.update(data)
        while self._inflater.unconsumed_tail:
            data = self._inflater.decompress(self._inflater.unconsumed_tail, _CHUNK)
            self.plain.update(data)
        return chunk

    def finish(self) -> bytes:
        self.plain.update(self._inflater.flush())
        return b""


def _read(chunks: Iterable[bytes], what: str) -> Iterator[bytes]:
    """An archive member's chunks; a member that cannot be read is one clear error."""
    try:
        yield from chunks
    except OSError as exc:
        raise ArchiveInvalid(f"{what} cannot be read: {exc}") from None
    except EOFError as exc:
        raise ArchiveInvalid(f"{what} is truncated: {exc}") from None


def _written(chunks: Iterable[bytes], handle: BinaryIO) -> Iterator[bytes]:
    """Write each chunk to a staging file, then hand it on (a full disk is a 507)."""
    for chunk in chunks:
        try:
            handle.write(chunk)
        except OSError as exc:
            raise disk_full() if is_disk_full(exc) else exc from None
        yield chunk


# -- the import -------------------------------------------------------------------------------


@dataclass
class Prepared:
    """An image staged: its documents (children first) and every blob they need."""

    kind: str
    documents: list[Document]
    blobs: list[tuple[str, int]]
    targets: list[Target]

    @property
    def digest(self) -> str:
        return self.documents[-1].digest


class Importer:
    """Imports archives into the hosted area of one store."""

    def __init__(
        self,
        settings: Settings,
        store: ContentStore,
        hosted: Hosted,
        progress: Progress | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.hosted = hosted
        self.progress: Progress = progress or (lambda what, done, size: None)

    def plan(self, source: Source, naming: Naming) -> list[tuple[Image, list[Target]]]:
        """The images and where each goes, checked (nothing written)."""
        images = read_images(source, self.settings.hosted_manifest_max_bytes)
        planned = []
        for position, image in enumerate(images, start=1):
            targets = targets_of(image.names, naming, f"{source.label}: image {position}")
            for target in targets:
                check_name(target.repository)
                if not is_hosted(self.settings, target.repository):
                    raise not_hosted(self.settings, target.repository)
            planned.append((image, targets))
        return planned

    def run(
        self,
        source: Source,
        naming: Naming,
        authorize: Callable[[list[str]], None] | None = None,
    ) -> ImportReport:
        """Plan, let ``authorize`` see every target repository, stage, commit."""
        planned = self.plan(source, naming)
        if authorize is not None:
            authorize(sorted({t.repository for _, targets in planned for t in targets}))
        report = ImportReport()
        with Staging(self.store, report, self.progress) as staging:
            prepared = [self._stage(source, image, targets, staging) for image, targets in planned]
            staging.commit()
        for image in prepared:
            self._record(image, report)
        return report

    def _stage(
        self, source: Source, image: Image, targets: list[Target], staging: Staging
    ) -> Prepared:
        if isinstance(image, OciImage):
            for blob in image.blobs:
                what = f"{source.label}: blob {blob.member}"
                staging.copy(source.chunks(blob.member), blob.digest, blob.size, what)
            blobs = [(blob.digest, blob.size) for blob in image.blobs]
            return Prepared("oci", image.documents, blobs, targets)
        return self._stage_docker(source, image, targets, staging)

    def _stage_docker(
        self, source: Source, image: DockerImage, targets: list[Target], staging: Staging
    ) -> Prepared:
        config_digest = image.config_digest
        what = f"{source.label}: config {config_digest[:19]}…"
        staging.copy([image.config], config_digest, len(image.config), what)
        layers: list[tuple[str, int]] = []
        for member, diff_id in image.layers:
            size = source.size(member) or 0
            chunks = functools.partial(source.chunks, member)
            what = f"{source.label}: layer {member}"
            layers.append(staging.compress(chunks, diff_id, size, what))
        manifest = docker_manifest((config_digest, len(image.config)), layers)
        document = Document(sha256_digest(manifest), DOCKER_MANIFEST, manifest)
        blobs = [(config_digest, len(image.config)), *layers]
        return Prepared("docker", [document], blobs, targets)

    def _record(self, image: Prepared, report: ImportReport) -> None:
        """Link the blobs, store the manifests, and only then write the tags."""
        for target in image.targets:
            repository = target.repository
            for digest, size in image.blobs:
                if self.hosted.blob_size(repository, digest) is None:
                    self.hosted.link_blob(repository, digest, size)
            for document in image.documents:
                if not self.hosted.has_manifest(repository, document.digest):
                    self.hosted.put_manifest(
                        repository, document.digest, document.body, document.media_type
                    )
                    report.manifests_written += 1
            if target.tag is not None and self.hosted.tag(repository, target.tag, image.digest):
                report.tags_written += 1
            report.images.append(
                {
                    "repository": repository,
                    "tag": target.tag,
                    "digest": image.digest,
                    "kind": image.kind,
                }
            )


def docker_manifest(config: tuple[str, int], layers: list[tuple[str, int]]) -> bytes:
    """The Docker v2 manifest of a docker save image: its config as it was, its layers
    as compressed here (the same input always gives the same bytes)."""

    def descriptor(media_type: str, entry: tuple[str, int]) -> dict[str, Any]:
        return {"mediaType": media_type, "size": entry[1], "digest": entry[0]}

    document = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": descriptor(DOCKER_CONFIG, config),
        "layers": [descriptor(DOCKER_LAYER_GZIP, layer) for layer in layers],
    }
    return json.dumps(document, indent=3).encode()
