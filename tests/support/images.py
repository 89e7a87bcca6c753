"""Deterministic container image factory and registry pusher for the test rig.

Builds layers, configs, manifests (Docker v2 schema2, OCI), and indexes (OCI
index with buildx-style attestation manifests, Docker manifest list) entirely
in Python, with fixed mtimes and uid/gid 0, so the same call always yields the
same digests. `runnable_image` makes a busybox image whose command prints a
marker line, for loaders that really run what passthrough produced.
`push_image`/`push_index` upload through the registry V2 API with anonymous,
Basic, or Docker token auth.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import json
import random
import re
import shlex
import tarfile
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit, urlunsplit

import requests
import zstandard

from tests.support.helpers import digest as digest_of

__all__ = [
    "ALL_EXTRAS",
    "CREATED",
    "DOCKER_CONFIG_MEDIA_TYPE",
    "DOCKER_LAYER_GZIP",
    "DOCKER_MANIFEST",
    "DOCKER_MANIFEST_LIST",
    "EMPTY_TAR",
    "EMPTY_TAR_DIFF_ID",
    "INTOTO_MEDIA_TYPE",
    "MTIME",
    "OCI_CONFIG_MEDIA_TYPE",
    "OCI_INDEX",
    "OCI_LAYER",
    "OCI_LAYER_GZIP",
    "OCI_LAYER_ZSTD",
    "OCI_MANIFEST",
    "Blob",
    "Compression",
    "Dir",
    "Entry",
    "Extra",
    "File",
    "Hardlink",
    "Image",
    "Index",
    "Layer",
    "ManifestKind",
    "Opaque",
    "PushError",
    "Symlink",
    "Whiteout",
    "attestation_for",
    "big_layer",
    "build_image",
    "build_index",
    "busybox_bytes",
    "compress",
    "decompress",
    "layer_media_type",
    "make_config",
    "make_layer",
    "multi_platform_index",
    "push_image",
    "push_index",
    "push_raw_manifest",
    "runnable_image",
    "tar_layer",
]

# --- constants ---------------------------------------------------------------

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG_MEDIA_TYPE = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG_MEDIA_TYPE = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
INTOTO_MEDIA_TYPE = "application/vnd.in-toto+json"

# Every timestamp is fixed so builds are byte-for-byte reproducible.
MTIME = 1704067200  # 2024-01-01T00:00:00Z
CREATED = "2024-01-01T00:00:00Z"

# Go's archive/tar (and so Docker) ends a tar with exactly two zero blocks and no
# record padding; a layer with no entries is just those 1024 bytes. Docker's own
# empty layer (moby layer/empty.go) has this diff_id.
EMPTY_TAR = bytes(1024)
EMPTY_TAR_DIFF_ID = "sha256:5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef"

BUSYBOX = Path("/bin/busybox")

Compression = Literal["gzip", "zstd", "none"]
ManifestKind = Literal["docker", "oci"]
Extra = Literal["empty", "duplicate", "whiteout", "links"]
ALL_EXTRAS: tuple[Extra, ...] = ("empty", "duplicate", "whiteout", "links")

_LAYER_MEDIA_TYPES: dict[tuple[ManifestKind, Compression], str] = {
    ("docker", "gzip"): DOCKER_LAYER_GZIP,
    ("oci", "gzip"): OCI_LAYER_GZIP,
    ("oci", "zstd"): OCI_LAYER_ZSTD,
    ("oci", "none"): OCI_LAYER,
}


def _json_bytes(obj: Any) -> bytes:
    # Compact and in insertion order, like Go's encoding/json on a struct.
    return json.dumps(obj, separators=(",", ":")).encode()


# --- layer entries and tar -------------------------------------------------


@dataclass(frozen=True)
class File:
    path: str
    content: bytes
    mode: int = 0o644


@dataclass(frozen=True)
class Dir:
    path: str
    mode: int = 0o755


@dataclass(frozen=True)
class Symlink:
    path: str
    target: str


@dataclass(frozen=True)
class Hardlink:
    """A hard link to `target`, a path (no leading slash) earlier in the same layer."""

    path: str
    target: str


@dataclass(frozen=True)
class Whiteout:
    """Deletes `path` (file or directory) of a lower layer: writes `dir/.wh.name`."""

    path: str


@dataclass(frozen=True)
class Opaque:
    """Hides everything lower layers put in directory `path`: writes `.wh..wh..opq`."""

    path: str


Entry = File | Dir | Symlink | Hardlink | Whiteout | Opaque


def _clean(path: str) -> str:
    return path.strip("/")


def _tarinfo(entry: Entry, link_mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    data = b""
    if isinstance(entry, File):
        info = tarfile.TarInfo(_clean(entry.path))
        info.size = len(entry.content)
        info.mode = entry.mode
        data = entry.content
    elif isinstance(entry, Dir):
        info = tarfile.TarInfo(_clean(entry.path))
        info.type = tarfile.DIRTYPE
        info.mode = entry.mode
    elif isinstance(entry, Symlink):
        info = tarfile.TarInfo(_clean(entry.path))
        info.type = tarfile.SYMTYPE
        info.linkname = entry.target
        info.mode = 0o777
    elif isinstance(entry, Hardlink):
        info = tarfile.TarInfo(_clean(entry.path))
        info.type = tarfile.LNKTYPE
        info.linkname = _clean(entry.target)
        info.mode = link_mode
    elif isinstance(entry, Whiteout):
        parent, _, name = _clean(entry.path).rpartition("/")
        info = tarfile.TarInfo(f"{parent}/.wh.{name}" if parent else f".wh.{name}")
        info.mode = 0o644
    else:
        info = tarfile.TarInfo(f"{_clean(entry.path)}/.wh..wh..opq")
        info.mode = 0o644
    info.mtime = MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info, data


def _tar_header(info: tarfile.TarInfo) -> bytes:
    # PAX only adds an extended header when a field does not fit ustar, so
    # ordinary entries come out as plain ustar headers, as Go writes them.
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _pad(size: int) -> bytes:
    return bytes(-size % tarfile.BLOCKSIZE)


def tar_layer(entries: Iterable[Entry]) -> bytes:
    """An uncompressed layer tar, ended like Go's writer (no record padding)."""
    out = io.BytesIO()
    modes: dict[str, int] = {}
    for entry in entries:
        # A hard link header carries the target's mode, as Go's writer does:
        # Docker's applier chmods the (shared) inode to the link header's mode,
        # so 0644 on a link to /bin/busybox would make busybox non-executable.
        link_mode = modes.get(_clean(entry.target), 0o644) if isinstance(
            entry, Hardlink) else 0o644
        info, data = _tarinfo(entry, link_mode)
        if isinstance(entry, File):
            modes[_clean(entry.path)] = entry.mode
        out.write(_tar_header(info))
        out.write(data)
        out.write(_pad(len(data)))
    out.write(EMPTY_TAR)
    return out.getvalue()


# --- compression -------------------------------------------------------------


def _gzip_compressor(level: int = 6) -> Any:
    # wbits=31 writes a gzip header with mtime 0 and no file name: reproducible.
    return zlib.compressobj(level, zlib.DEFLATED, 31)


def compress(data: bytes, compression: Compression, level: int | None = None) -> bytes:
    if compression == "gzip":
        comp = _gzip_compressor(6 if level is None else level)
        return bytes(comp.compress(data) + comp.flush())
    if compression == "zstd":
        cctx = zstandard.ZstdCompressor(level=3 if level is None else level)
        return bytes(cctx.compress(data))
    if compression == "none":
        return data
    raise ValueError(f"unknown compression {compression!r}")


def decompress(data: bytes, compression: Compression) -> bytes:
    if compression == "gzip":
        return zlib.decompress(data, 47)
    if compression == "zstd":
        # Streamed frames have no content size, so read them as a stream.
        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    if compression == "none":
        return data
    raise ValueError(f"unknown compression {compression!r}")


def layer_media_type(kind: ManifestKind, compression: Compression) -> str:
    try:
        return _LAYER_MEDIA_TYPES[(kind, compression)]
    except KeyError:
        raise ValueError(
            f"a {kind} manifest has no layer media type for {compression!r} "
            "(zstd and uncompressed layers exist only in OCI); pass media_type= explicitly"
        ) from None


# --- blobs, layers, images --------------------------------------------------


@dataclass(frozen=True)
class Blob:
    """Any content-addressed blob: bytes in memory, or a file for big ones."""

    digest: str
    size: int
    media_type: str
    data: bytes | None = field(default=None, repr=False)
    path: Path | None = None
    annotations: dict[str, str] | None = None

    def __hash__(self) -> int:
        # Content-addressed: the digest stands for the whole (dicts are unhashable).
        return hash(self.digest)

    def read(self) -> bytes:
        if self.data is not None:
            return self.data
        assert self.path is not None
        return self.path.read_bytes()

    def open(self) -> BinaryIO:
        if self.data is not None:
            return io.BytesIO(self.data)
        assert self.path is not None
        return self.path.open("rb")

    def chunks(self, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        with self.open() as f:
            while chunk := f.read(chunk_size):
                yield chunk

    def descriptor(self) -> dict[str, Any]:
        desc: dict[str, Any] = {"mediaType": self.media_type, "size": self.size,
                                "digest": self.digest}
        if self.annotations:
            desc["annotations"] = dict(self.annotations)
        return desc


@dataclass(frozen=True)
class Layer(Blob):
    """A layer blob plus its diff_id (digest of the uncompressed tar)."""

    diff_id: str = ""
    compression: Compression = "gzip"
    created_by: str = ""

    def __hash__(self) -> int:
        # Content-addressed: the digest stands for the whole (dicts are unhashable).
        return hash(self.digest)


def make_layer(
    tar: bytes,
    compression: Compression = "gzip",
    *,
    kind: ManifestKind = "docker",
    media_type: str | None = None,
    created_by: str = "",
    level: int | None = None,
) -> Layer:
    """Compress a layer tar; the media type follows kind+compression unless given."""
    blob = compress(tar, compression, level)
    return Layer(
        digest=digest_of(blob),
        size=len(blob),
        media_type=media_type or layer_media_type(kind, compression),
        data=blob,
        diff_id=digest_of(tar),
        compression=compression,
        created_by=created_by,
    )


def big_layer(
    dest: Path,
    size: int,
    *,
    compression: Compression = "gzip",
    kind: ManifestKind = "docker",
    seed: int = 0,
    name: str = "big/blob.bin",
    chunk_size: int = 4 << 20,
    level: int = 1,
) -> Layer:
    """A file-backed layer holding one file of `size` seeded pseudo-random bytes.

    Streams to `dest` so multi-GB layers never sit in memory; digest and diff_id
    are computed on the way.
    """
    rng = random.Random(seed)
    tar_hash = hashlib.sha256()
    blob_hash = hashlib.sha256()
    written = 0
    comp: Any
    if compression == "gzip":
        comp = _gzip_compressor(level)
    elif compression == "zstd":
        comp = zstandard.ZstdCompressor(level=level).compressobj()
    elif compression == "none":
        comp = None
    else:
        raise ValueError(f"unknown compression {compression!r}")
    dirs = [Dir(p) for p in _parents(name)]
    with dest.open("wb") as out:

        def emit(raw: bytes) -> None:
            nonlocal written
            tar_hash.update(raw)
            chunk = raw if comp is None else comp.compress(raw)
            if chunk:
                blob_hash.update(chunk)
                out.write(chunk)
                written += len(chunk)

        for d in dirs:
            emit(_tar_header(_tarinfo(d)[0]))
        info = _tarinfo(File(name, b"", 0o644))[0]
        info.size = size
        emit(_tar_header(info))
        left = size
        while left:
            n = min(left, chunk_size)
            emit(rng.randbytes(n))
            left -= n
        emit(_pad(size) + EMPTY_TAR)
        if comp is not None:
            tail = comp.flush()
            blob_hash.update(tail)
            out.write(tail)
            written += len(tail)
    return Layer(
        digest="sha256:" + blob_hash.hexdigest(),
        size=written,
        media_type=layer_media_type(kind, compression),
        path=dest,
        diff_id="sha256:" + tar_hash.hexdigest(),
        compression=compression,
        created_by=f"big layer {size} bytes seed {seed}",
    )


def _parents(path: str) -> list[str]:
    parts = _clean(path).split("/")[:-1]
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


@dataclass(frozen=True)
class Image:
    """One image manifest with its config and layers (layers may repeat)."""

    manifest: bytes = field(repr=False)
    media_type: str
    digest: str
    config: bytes = field(repr=False)
    config_digest: str
    config_media_type: str
    layers: tuple[Layer, ...]
    platform: dict[str, str]
    marker: str | None = None

    def __hash__(self) -> int:
        # Content-addressed: the digest stands for the whole (dicts are unhashable).
        return hash(self.digest)

    @property
    def manifest_json(self) -> dict[str, Any]:
        return dict(json.loads(self.manifest))

    @property
    def config_json(self) -> dict[str, Any]:
        return dict(json.loads(self.config))

    @property
    def diff_ids(self) -> list[str]:
        return [layer.diff_id for layer in self.layers]

    @property
    def size(self) -> int:
        return len(self.manifest)

    @property
    def config_blob(self) -> Blob:
        return Blob(self.config_digest, len(self.config), self.config_media_type, self.config)

    def blobs(self) -> dict[str, Blob]:
        """Config and every distinct layer, by digest."""
        out: dict[str, Blob] = {self.config_digest: self.config_blob}
        for layer in self.layers:
            out.setdefault(layer.digest, layer)
        return out

    def descriptor(self, *, platform: bool = True,
                   annotations: dict[str, str] | None = None) -> dict[str, Any]:
        desc: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest,
                                "size": len(self.manifest)}
        if annotations:
            desc["annotations"] = annotations
        if platform:
            desc["platform"] = dict(self.platform)
        return desc


@dataclass(frozen=True)
class Index:
    """An OCI index or Docker manifest list with the manifests it names."""

    manifest: bytes = field(repr=False)
    media_type: str
    digest: str
    images: tuple[Image, ...]
    attestations: tuple[Image, ...] = ()

    def __hash__(self) -> int:
        # Content-addressed: the digest stands for the whole (dicts are unhashable).
        return hash(self.digest)

    @property
    def manifest_json(self) -> dict[str, Any]:
        return dict(json.loads(self.manifest))

    @property
    def manifests(self) -> tuple[Image, ...]:
        """Every child manifest, platform images first, as pushed."""
        return self.images + self.attestations

    def image_for(self, os: str, architecture: str, variant: str | None = None) -> Image:
        for image in self.images:
            p = image.platform
            if p["os"] == os and p["architecture"] == architecture and (
                variant is None or p.get("variant") == variant
            ):
                return image
        raise KeyError(f"{os}/{architecture}/{variant}")

    def blobs(self) -> dict[str, Blob]:
        out: dict[str, Blob] = {}
        for image in self.manifests:
            for digest, blob in image.blobs().items():
                out.setdefault(digest, blob)
        return out


def make_config(
    diff_ids: Sequence[str],
    *,
    architecture: str = "amd64",
    os: str = "linux",
    variant: str | None = None,
    cmd: Sequence[str] | None = None,
    env: Sequence[str] | None = ("PATH=/bin",),
    entrypoint: Sequence[str] | None = None,
    working_dir: str | None = None,
    created_by: Sequence[str] | None = None,
    empty_layer_history: bool = True,
) -> bytes:
    """An image config; history has one entry per layer plus empty_layer ENV/CMD rows."""
    container_config: dict[str, Any] = {}
    if env is not None:
        container_config["Env"] = list(env)
    if entrypoint is not None:
        container_config["Entrypoint"] = list(entrypoint)
    if cmd is not None:
        container_config["Cmd"] = list(cmd)
    if working_dir is not None:
        container_config["WorkingDir"] = working_dir
    history: list[dict[str, Any]] = []
    for i, _ in enumerate(diff_ids):
        what = created_by[i] if created_by and created_by[i] else f"layer {i}"
        history.append({"created": CREATED, "created_by": what})
    if empty_layer_history:
        # Like a Dockerfile's ENV and CMD: history rows that add no layer.
        history.append({"created": CREATED,
                        "created_by": f"ENV {' '.join(env or [])}", "empty_layer": True})
        history.append({"created": CREATED,
                        "created_by": f"CMD {json.dumps(list(cmd or []))}",
                        "empty_layer": True})
    config: dict[str, Any] = {"architecture": architecture, "os": os}
    if variant:
        config["variant"] = variant
    config["created"] = CREATED
    config["config"] = container_config
    config["rootfs"] = {"type": "layers", "diff_ids": list(diff_ids)}
    config["history"] = history
    return _json_bytes(config)


def build_image(
    layers: Sequence[Layer],
    *,
    kind: ManifestKind = "docker",
    architecture: str = "amd64",
    os: str = "linux",
    variant: str | None = None,
    cmd: Sequence[str] | None = None,
    env: Sequence[str] | None = ("PATH=/bin",),
    entrypoint: Sequence[str] | None = None,
    working_dir: str | None = None,
    annotations: dict[str, str] | None = None,
    marker: str | None = None,
    config: bytes | None = None,
    config_media_type: str | None = None,
) -> Image:
    """A Docker v2 schema2 or OCI image manifest over `layers` (order kept, repeats allowed)."""
    if config is None:
        config = make_config(
            [layer.diff_id for layer in layers], architecture=architecture, os=os,
            variant=variant, cmd=cmd, env=env, entrypoint=entrypoint,
            working_dir=working_dir, created_by=[layer.created_by for layer in layers],
        )
    if config_media_type is None:
        config_media_type = DOCKER_CONFIG_MEDIA_TYPE if kind == "docker" else OCI_CONFIG_MEDIA_TYPE
    media_type = DOCKER_MANIFEST if kind == "docker" else OCI_MANIFEST
    config_digest = digest_of(config)
    manifest: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": {"mediaType": config_media_type, "size": len(config), "digest": config_digest},
        "layers": [layer.descriptor() for layer in layers],
    }
    if annotations:
        if kind == "docker":
            raise ValueError("Docker v2 schema2 manifests have no annotations")
        manifest["annotations"] = annotations
    raw = _json_bytes(manifest)
    platform = {"architecture": architecture, "os": os}
    if variant:
        platform["variant"] = variant
    return Image(
        manifest=raw, media_type=media_type, digest=digest_of(raw), config=config,
        config_digest=config_digest, config_media_type=config_media_type,
        layers=tuple(layers), platform=platform, marker=marker,
    )


def attestation_for(image: Image, *, name: str = "pkg:docker/passthrough/test") -> Image:
    """A buildx-style attestation manifest (unknown/unknown) holding an in-toto statement."""
    statement = {
        "_type": "https://in-toto.io/Statement/v0.1",
        "predicateType": "https://slsa.dev/provenance/v0.2",
        "subject": [{"name": name, "digest": {"sha256": image.digest.split(":", 1)[1]}}],
        "predicate": {"builder": {"id": ""}, "buildType": "https://mobyproject.org/buildkit@v1",
                      "metadata": {"buildStartedOn": CREATED, "buildFinishedOn": CREATED}},
    }
    raw = _json_bytes(statement)
    layer = Layer(
        digest=digest_of(raw), size=len(raw), media_type=INTOTO_MEDIA_TYPE, data=raw,
        annotations={"in-toto.io/predicate-type": "https://slsa.dev/provenance/v0.2"},
        diff_id=digest_of(raw), compression="none", created_by="attestation",
    )
    config = _json_bytes({
        "architecture": "unknown", "os": "unknown", "config": {},
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id]},
    })
    return build_image([layer], kind="oci", architecture="unknown", os="unknown", config=config)


def build_index(
    images: Sequence[Image],
    *,
    kind: ManifestKind = "oci",
    attestations: bool | None = None,
    annotations: dict[str, str] | None = None,
) -> Index:
    """An OCI index (with attestations by default) or a Docker manifest list."""
    if attestations is None:
        attestations = kind == "oci"
    if attestations and kind == "docker":
        raise ValueError("buildx puts attestation manifests only in OCI indexes")
    media_type = OCI_INDEX if kind == "oci" else DOCKER_MANIFEST_LIST
    entries = [image.descriptor() for image in images]
    atts: list[Image] = []
    if attestations:
        for image in images:
            att = attestation_for(image)
            atts.append(att)
            entries.append(att.descriptor(annotations={
                "vnd.docker.reference.digest": image.digest,
                "vnd.docker.reference.type": "attestation-manifest",
            }))
    index: dict[str, Any] = {"schemaVersion": 2, "mediaType": media_type, "manifests": entries}
    if annotations:
        index["annotations"] = annotations
    raw = _json_bytes(index)
    return Index(manifest=raw, media_type=media_type, digest=digest_of(raw),
                 images=tuple(images), attestations=tuple(atts))


# --- runnable images ---------------------------------------------------------


@functools.lru_cache(maxsize=4)
def busybox_bytes(path: Path = BUSYBOX) -> bytes:
    """Debian busybox-static; must be static so it runs in an otherwise empty image."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF":
        raise RuntimeError(f"{path} is not an ELF binary (install busybox-static)")
    # A dynamic binary has a PT_INTERP naming its loader; a static one does not.
    if b"/lib64/ld-linux" in data[:4096] or b"/lib/ld-linux" in data[:4096]:
        raise RuntimeError(f"{path} is dynamically linked (install busybox-static)")
    return data


def runnable_image(
    marker: str,
    *,
    kind: ManifestKind = "docker",
    compression: Compression = "gzip",
    extras: Iterable[Extra] = (),
    sh_link: Literal["symlink", "hardlink"] = "symlink",
    architecture: str = "amd64",
    variant: str | None = None,
    extra_layers: Sequence[Layer] = (),
    busybox: Path = BUSYBOX,
) -> Image:
    """A busybox image whose command prints `marker` only if its file system is right.

    extras adds layers whose effects the command checks: "empty" (a tar with no
    entries), "duplicate" (one layer listed twice), "whiteout" (a file, a
    directory, and an opaque directory of an earlier layer removed), "links"
    (symlinks and a hard link). `extra_layers` are appended as they are.
    """
    chosen = set(extras)
    unknown = chosen - set(ALL_EXTRAS)
    if unknown:
        raise ValueError(f"unknown extras {sorted(unknown)}")
    bb = "/bin/busybox"

    def layer(entries: Sequence[Entry], what: str) -> Layer:
        return make_layer(tar_layer(entries), compression, kind=kind, created_by=what)

    sh: Entry = Symlink("bin/sh", "busybox") if sh_link == "symlink" else Hardlink(
        "bin/sh", "bin/busybox")
    layers = [layer([Dir("bin"), File("bin/busybox", busybox_bytes(busybox), 0o755), sh,
                     Dir("tmp", 0o1777)], f"busybox with /bin/sh as {sh_link}")]
    checks: list[str] = []
    if sh_link == "symlink":
        checks.append("[ -L /bin/sh ]")
    else:
        checks.append("[ /bin/sh -ef /bin/busybox ] && [ ! -L /bin/sh ]")
    if "empty" in chosen:
        layers.append(make_layer(EMPTY_TAR, compression, kind=kind, created_by="empty layer"))
    if "duplicate" in chosen:
        dup = layer([Dir("dup"), File("dup/file", b"dup\n")], "duplicated layer")
        layers += [dup, dup]
        checks.append(f'[ "$({bb} cat /dup/file)" = dup ]')
    if "whiteout" in chosen:
        layers.append(layer([
            Dir("gone"), File("gone/file", b"gone\n"), Dir("keep"), File("keep/file", b"keep\n"),
            Dir("gonedir"), File("gonedir/a", b"a\n"), Dir("opq"), File("opq/old", b"old\n"),
        ], "files a later layer deletes"))
        layers.append(layer([
            Whiteout("gone/file"), Whiteout("gonedir"), Dir("opq"), Opaque("opq"),
            File("opq/new", b"new\n"),
        ], "whiteouts and an opaque directory"))
        checks += ["[ ! -e /gone/file ]", "[ -d /gone ]", "[ ! -e /gonedir ]",
                   "[ ! -e /opq/old ]", '[ "$(/bin/busybox cat /opq/new)" = new ]',
                   '[ "$(/bin/busybox cat /keep/file)" = keep ]']
    if "links" in chosen:
        layers.append(layer([
            Dir("links"), File("links/target", b"linked\n"), Symlink("links/rel", "target"),
            Symlink("links/abs", "/links/target"), Hardlink("links/hard", "links/target"),
            Symlink("links/dangling", "/nowhere"),
        ], "symlinks and a hard link"))
        checks += ["[ -L /links/rel ]", "[ -L /links/abs ]", "[ ! -L /links/hard ]",
                   "[ /links/hard -ef /links/target ]", "[ -L /links/dangling ]",
                   "[ ! -e /links/dangling ]",
                   f'[ "$({bb} cat /links/rel)" = linked ]',
                   f'[ "$({bb} cat /links/abs)" = linked ]']
    layers.extend(extra_layers)
    script = " && ".join([*checks, f"echo {shlex.quote(marker)}"])
    return build_image(layers, kind=kind, architecture=architecture, variant=variant,
                       cmd=["/bin/sh", "-c", script], marker=marker)


def multi_platform_index(
    marker: str,
    *,
    kind: ManifestKind = "oci",
    platforms: Sequence[tuple[str, str, str | None]] = (
        ("linux", "amd64", None), ("linux", "arm64", "v8")),
    compression: Compression = "gzip",
    attestations: bool | None = None,
    extras: Iterable[Extra] = (),
) -> Index:
    """An index of runnable images, one per platform; each prints `<marker> os/arch[/variant]`.

    Every image holds the host's (amd64) busybox, so only amd64 really runs; the
    printed platform tells which manifest a client picked.
    """
    images = []
    extras = tuple(extras)
    for os_, arch, variant in platforms:
        plat = "/".join(p for p in (os_, arch, variant) if p)
        img = runnable_image(f"{marker} {plat}", kind=kind, compression=compression,
                             extras=extras, architecture=arch, variant=variant)
        if os_ != "linux":
            # runnable_image fixes os=linux; rebuild the config for other OSes.
            img = build_image(img.layers, kind=kind, architecture=arch, os=os_, variant=variant,
                              cmd=img.config_json["config"]["Cmd"], marker=img.marker)
        images.append(img)
    return build_index(images, kind=kind, attestations=attestations)


# --- pushing -----------------------------------------------------------------


class PushError(RuntimeError):
    pass


_CHALLENGE_PARAM = re.compile(r'(\w+)\s*=\s*"([^"]*)"')


class _RegistrySession:
    """requests.Session that answers 401 challenges (Basic or Bearer) once per request."""

    def __init__(self, base_url: str, repository: str, auth: tuple[str, str] | None,
                 verify: bool | str, timeout: float) -> None:
        if "://" not in base_url:
            base_url = "http://" + base_url
        self.base_url = base_url.rstrip("/")
        self.repository = repository
        self.auth = auth
        self.timeout = timeout
        self.http = requests.Session()
        # Loopback registries must never go through an HTTP(S)_PROXY from the env.
        self.http.trust_env = False
        self.http.verify = verify
        self.authorization: str | None = None

    def url(self, path_or_url: str) -> str:
        return urljoin(self.base_url + "/", path_or_url)

    def request(self, method: str, path_or_url: str, *, data: bytes | None = None,
                headers: dict[str, str] | None = None) -> requests.Response:
        url = self.url(path_or_url)
        for attempt in range(2):
            hdrs = dict(headers or {})
            if self.authorization:
                hdrs["Authorization"] = self.authorization
            resp = self.http.request(method, url, data=data, headers=hdrs,
                                     timeout=self.timeout, allow_redirects=True)
            if resp.status_code != 401 or attempt == 1 or not self._answer(resp):
                return resp
        raise AssertionError("unreachable")

    def _answer(self, resp: requests.Response) -> bool:
        challenge = resp.headers.get("WWW-Authenticate", "")
        scheme, _, rest = challenge.partition(" ")
        params = dict(_CHALLENGE_PARAM.findall(rest))
        if scheme.lower() == "basic":
            if self.auth is None:
                return False
            user, password = self.auth
            basic = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
            if self.authorization == basic:
                return False
            self.authorization = basic
            return True
        if scheme.lower() == "bearer" and "realm" in params:
            scopes = [f"repository:{self.repository}:pull,push"]
            if params.get("scope") and params["scope"] not in scopes:
                scopes.append(params["scope"])
            query: list[tuple[str, str]] = [("scope", s) for s in scopes]
            if "service" in params:
                query.insert(0, ("service", params["service"]))
            token_resp = self.http.get(params["realm"], params=query, auth=self.auth,
                                       timeout=self.timeout)
            if token_resp.status_code != 200:
                raise PushError(f"token request to {params['realm']} failed: "
                                f"{token_resp.status_code} {token_resp.text[:300]}")
            body = token_resp.json()
            token = body.get("token") or body.get("access_token")
            if not token:
                raise PushError(f"token response without a token: {body}")
            bearer = f"Bearer {token}"
            if self.authorization == bearer:
                return False
            self.authorization = bearer
            return True
        return False

    def close(self) -> None:
        self.http.close()


def _with_query(url: str, **params: str) -> str:
    parts = urlsplit(url)
    query = [*parse_qsl(parts.query, keep_blank_values=True), *params.items()]
    return urlunsplit(parts._replace(query=urlencode(query)))


def _expect(resp: requests.Response, codes: tuple[int, ...], what: str) -> requests.Response:
    if resp.status_code not in codes:
        raise PushError(f"{what}: HTTP {resp.status_code} {resp.text[:500]}")
    return resp


def _push_blob(session: _RegistrySession, blob: Blob, *,
              chunk_size: int = 8 << 20) -> bool:
    """Upload one blob unless present; True if it was uploaded.

    In-memory blobs go monolithically (POST then PUT ?digest=); file-backed
    ones in chunked PATCHes with Content-Range, then a PUT with no body.
    """
    name = session.repository
    head = session.request("HEAD", f"/v2/{name}/blobs/{blob.digest}")
    if head.status_code == 200:
        return False
    start = _expect(session.request("POST", f"/v2/{name}/blobs/uploads/"), (202,),
                    f"start upload of {blob.digest}")
    location = session.url(start.headers["Location"])
    octet = {"Content-Type": "application/octet-stream"}
    if blob.data is not None:
        _expect(session.request("PUT", _with_query(location, digest=blob.digest),
                                data=blob.data, headers=octet), (201,),
                f"PUT blob {blob.digest}")
        return True
    offset = 0
    for chunk in blob.chunks(chunk_size):
        hdrs = {**octet, "Content-Range": f"{offset}-{offset + len(chunk) - 1}"}
        resp = _expect(session.request("PATCH", location, data=chunk, headers=hdrs), (202,),
                       f"PATCH blob {blob.digest} at {offset}")
        location = session.url(resp.headers["Location"])
        offset += len(chunk)
    _expect(session.request("PUT", _with_query(location, digest=blob.digest), data=b""),
            (201,), f"finish upload of {blob.digest}")
    return True


def _push_manifest(session: _RegistrySession, reference: str, manifest: bytes,
                  media_type: str) -> str:
    """PUT a manifest by tag or digest; returns the digest the registry reports."""
    resp = _expect(session.request(
        "PUT", f"/v2/{session.repository}/manifests/{reference}", data=manifest,
        headers={"Content-Type": media_type}), (201,), f"PUT manifest {reference}")
    expected = digest_of(manifest)
    got = resp.headers.get("Docker-Content-Digest", expected)
    if got != expected:
        raise PushError(f"registry says manifest digest {got}, expected {expected}")
    return expected


def _push_image_with(session: _RegistrySession, tag: str | None, image: Image) -> str:
    for blob in image.blobs().values():
        _push_blob(session, blob)
    return _push_manifest(session, tag or image.digest, image.manifest, image.media_type)


def push_image(
    registry_url: str,
    repository: str,
    tag: str | None,
    image: Image,
    auth: tuple[str, str] | None = None,
    *,
    verify: bool | str = True,
    timeout: float = 120.0,
) -> str:
    """Push blobs and manifest; tag=None pushes by digest only. Returns the digest.

    registry_url is like "http://127.0.0.1:5000" (http assumed without a scheme);
    auth is (username, password) used for Basic or for the token realm.
    """
    session = _RegistrySession(registry_url, repository, auth, verify, timeout)
    try:
        return _push_image_with(session, tag, image)
    finally:
        session.close()


def push_index(
    registry_url: str,
    repository: str,
    tag: str | None,
    index: Index,
    auth: tuple[str, str] | None = None,
    *,
    verify: bool | str = True,
    timeout: float = 120.0,
) -> str:
    """Push every child manifest by digest, then the index (by tag, or by digest)."""
    session = _RegistrySession(registry_url, repository, auth, verify, timeout)
    try:
        for image in index.manifests:
            _push_image_with(session, None, image)
        return _push_manifest(session, tag or index.digest, index.manifest, index.media_type)
    finally:
        session.close()


def push_raw_manifest(
    registry_url: str,
    repository: str,
    reference: str,
    manifest: bytes,
    media_type: str,
    blobs: Iterable[Blob] = (),
    auth: tuple[str, str] | None = None,
    *,
    verify: bool | str = True,
    timeout: float = 120.0,
) -> str:
    """Push `blobs` then any manifest bytes as they are (hand-made or broken ones too)."""
    session = _RegistrySession(registry_url, repository, auth, verify, timeout)
    try:
        for blob in blobs:
            _push_blob(session, blob)
        return _push_manifest(session, reference, manifest, media_type)
    finally:
        session.close()
