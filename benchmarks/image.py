"""The benchmark image: one layer per directory of real files (shared libraries, a
Python standard library, documentation), built once with umoci into an OCI layout under
benchmarks/out/ and reused by later runs."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
import types
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

_gzip: types.ModuleType
try:  # the service's own inflater, when installed: twice as fast as zlib
    from isal import isal_zlib as _gzip
except ImportError:  # pragma: no cover - isal is a dependency of passthrough
    _gzip = zlib

#: About 830 MB as tar and 350 MB gzip on the Debian 12 machine this was written on.
DEFAULT_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/python3.11", "/usr/share/doc")
TAG = "bench"
UMOCI = "umoci"
READ = 4 << 20


@dataclass(frozen=True)
class LayerInfo:
    source: str
    digest: str
    size: int
    diff_id: str
    tar_size: int


@dataclass(frozen=True)
class BenchImage:
    layout: Path
    tag: str
    manifest_digest: str
    config_digest: str
    layers: tuple[LayerInfo, ...]
    built: str
    build_seconds: float

    @property
    def gzip_bytes(self) -> int:
        return sum(layer.size for layer in self.layers)

    @property
    def tar_bytes(self) -> int:
        return sum(layer.tar_size for layer in self.layers)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["layout"] = str(self.layout)
        data["gzip_bytes"] = self.gzip_bytes
        data["tar_bytes"] = self.tar_bytes
        return data


def _blob(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / digest.split(":", 1)[1]


def _umoci(*args: str) -> None:
    subprocess.run([UMOCI, *args], check=True, capture_output=True, text=True)


def _inflate(path: Path) -> tuple[str, int]:
    """diff_id and size of a gzip layer's tar, streaming."""
    digest = hashlib.sha256()
    size = 0
    decoder: Any = _gzip.decompressobj(31)
    with path.open("rb") as source:
        while chunk := source.read(READ):
            out = decoder.decompress(chunk)
            digest.update(out)
            size += len(out)
    out = decoder.flush()
    digest.update(out)
    size += len(out)
    return "sha256:" + digest.hexdigest(), size


def _read_layout(layout: Path, tag: str, sources: Sequence[str]) -> tuple[str, str, list[Any]]:
    index = json.loads((layout / "index.json").read_text())
    (entry,) = [
        m
        for m in index["manifests"]
        if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag
    ]
    manifest = json.loads(_blob(layout, entry["digest"]).read_bytes())
    config_digest = manifest["config"]["digest"]
    config = json.loads(_blob(layout, config_digest).read_bytes())
    diff_ids = config["rootfs"]["diff_ids"]
    if len(manifest["layers"]) != len(sources) or len(diff_ids) != len(sources):
        raise RuntimeError(f"{layout}: expected {len(sources)} layers")
    return entry["digest"], config_digest, list(zip(manifest["layers"], diff_ids, strict=True))


def build(layout: Path, sources: Sequence[str], log: Callable[[str], None] = print) -> BenchImage:
    """A fresh OCI layout at `layout`, one `umoci insert` layer per source directory
    (inserted at its own path); every layer's diff_id is checked."""
    if shutil.which(UMOCI) is None:
        raise RuntimeError("umoci is not installed (Debian package umoci)")
    shutil.rmtree(layout, ignore_errors=True)
    layout.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    _umoci("init", "--layout", str(layout))
    _umoci("new", "--image", f"{layout}:{TAG}")
    for source in sources:
        if not Path(source).is_dir():
            raise RuntimeError(f"{source} is not a directory")
        log(f"  umoci insert {source}")
        _umoci("insert", "--image", f"{layout}:{TAG}", source, source)
    seconds = time.monotonic() - started
    manifest_digest, config_digest, pairs = _read_layout(layout, TAG, sources)
    layers = []
    for source, (descriptor, diff_id) in zip(sources, pairs, strict=True):
        actual, tar_size = _inflate(_blob(layout, descriptor["digest"]))
        if actual != diff_id:
            raise RuntimeError(f"layer of {source}: diff_id {actual} != config's {diff_id}")
        layers.append(
            LayerInfo(source, descriptor["digest"], descriptor["size"], diff_id, tar_size)
        )
    return BenchImage(
        layout=layout,
        tag=TAG,
        manifest_digest=manifest_digest,
        config_digest=config_digest,
        layers=tuple(layers),
        built=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        build_seconds=round(seconds, 1),
    )


def _load(meta: Path, layout: Path, sources: Sequence[str]) -> BenchImage | None:
    """The image described by `meta`, if it is the one asked for and still whole."""
    try:
        data = json.loads(meta.read_text())
        layers = tuple(LayerInfo(**layer) for layer in data["layers"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if [layer.source for layer in layers] != list(sources):
        return None
    for layer in layers:
        blob = _blob(layout, layer.digest)
        if not blob.is_file() or blob.stat().st_size != layer.size:
            return None
    return BenchImage(
        layout=layout,
        tag=data["tag"],
        manifest_digest=data["manifest_digest"],
        config_digest=data["config_digest"],
        layers=layers,
        built=data["built"],
        build_seconds=data["build_seconds"],
    )


def load_or_build(
    out: Path,
    sources: Sequence[str] = DEFAULT_DIRS,
    *,
    rebuild: bool = False,
    log: Callable[[str], None] = print,
) -> BenchImage:
    """The cached image under `out` (oci/ and image.json), built first if missing, stale
    (other sources) or damaged."""
    layout, meta = out / "oci", out / "image.json"
    if not rebuild:
        cached = _load(meta, layout, sources)
        if cached is not None:
            log(f"image: reusing {layout} (built {cached.built})")
            return cached
    log(f"image: building {layout} from {', '.join(sources)}")
    image = build(layout, sources, log)
    meta.write_text(json.dumps(image.to_json(), indent=2) + "\n")
    return image
