"""The image factory's bytes are what its descriptors say, and always the same bytes."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from tests.support.helpers import digest
from tests.support.images import (
    ALL_EXTRAS,
    DOCKER_CONFIG_MEDIA_TYPE,
    DOCKER_LAYER_GZIP,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    EMPTY_TAR,
    EMPTY_TAR_DIFF_ID,
    INTOTO_MEDIA_TYPE,
    MTIME,
    OCI_CONFIG_MEDIA_TYPE,
    OCI_INDEX,
    OCI_LAYER,
    OCI_LAYER_GZIP,
    OCI_LAYER_ZSTD,
    OCI_MANIFEST,
    Dir,
    Entry,
    File,
    Hardlink,
    Image,
    Opaque,
    Symlink,
    Whiteout,
    big_layer,
    build_image,
    build_index,
    busybox_bytes,
    compress,
    decompress,
    make_layer,
    multi_platform_index,
    runnable_image,
    tar_layer,
)

ENTRIES: list[Entry] = [
    Dir("etc"),
    File("etc/hello", b"hello\n", 0o640),
    File("bin/tool", b"#!/bin/sh\n", 0o755),
    Symlink("etc/link", "hello"),
    Hardlink("bin/tool2", "bin/tool"),
    Whiteout("var/old"),
    Whiteout("top"),
    Opaque("opt/app"),
]


def members(tar: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        return t.getmembers()


def check_image(image: Image) -> None:
    """Every descriptor's digest and size match the bytes they describe."""
    m = image.manifest_json
    assert image.digest == digest(image.manifest)
    assert m["schemaVersion"] == 2
    assert m["mediaType"] == image.media_type
    assert m["config"] == {
        "mediaType": image.config_media_type,
        "size": len(image.config),
        "digest": digest(image.config),
    }
    assert len(m["layers"]) == len(image.layers)
    for desc, layer in zip(m["layers"], image.layers, strict=True):
        blob = layer.read()
        assert desc["digest"] == layer.digest == digest(blob)
        assert desc["size"] == layer.size == len(blob)
        assert desc["mediaType"] == layer.media_type
        assert digest(decompress(blob, layer.compression)) == layer.diff_id
    config = image.config_json
    assert config["rootfs"] == {"type": "layers", "diff_ids": image.diff_ids}
    history = config.get("history", [])
    if history:
        assert sum(1 for h in history if not h.get("empty_layer")) == len(image.layers)
    assert set(image.blobs()) == {image.config_digest} | {la.digest for la in image.layers}


# --- tar ----------------------------------------------------------------------


def test_empty_tar_is_two_zero_blocks_with_dockers_diff_id() -> None:
    assert tar_layer([]) == EMPTY_TAR == bytes(1024)
    assert digest(EMPTY_TAR) == EMPTY_TAR_DIFF_ID
    assert make_layer(EMPTY_TAR, "gzip").diff_id == EMPTY_TAR_DIFF_ID
    assert members(EMPTY_TAR) == []


def test_tar_layer_has_go_framing_and_fixed_metadata() -> None:
    tar = tar_layer(ENTRIES)
    assert len(tar) % 512 == 0
    assert tar.endswith(bytes(1024))
    # No 10240-byte record padding (Python's tarfile default): one block per
    # header, file data rounded to blocks, then exactly the two end blocks.
    assert len(tar) == 512 * len(ENTRIES) + 512 * 2 + 1024
    assert tar_layer(ENTRIES) == tar
    infos = {m.name: m for m in members(tar)}
    assert list(infos) == [
        "etc",
        "etc/hello",
        "bin/tool",
        "etc/link",
        "bin/tool2",
        "var/.wh.old",
        ".wh.top",
        "opt/app/.wh..wh..opq",
    ]
    for info in infos.values():
        assert (info.mtime, info.uid, info.gid, info.uname, info.gname) == (MTIME, 0, 0, "", "")
    assert infos["etc"].isdir()
    assert infos["etc/hello"].mode == 0o640 and infos["etc/hello"].size == 6
    assert infos["etc/link"].issym() and infos["etc/link"].linkname == "hello"
    assert infos["bin/tool2"].islnk() and infos["bin/tool2"].linkname == "bin/tool"
    # Docker chmods the shared inode to the link header's mode: it must be the target's.
    assert infos["bin/tool2"].mode == 0o755
    assert infos["var/.wh.old"].isfile() and infos["var/.wh.old"].size == 0
    assert tar[:100].rstrip(b"\0") == b"etc/"  # directory names end in a slash, as in Go


def test_long_names_use_pax_headers() -> None:
    name = "d/" + "x" * 200
    tar = tar_layer([File(name, b"1")])
    assert [m.name for m in members(tar)] == [name]


# --- compression and layers -------------------------------------------------


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_compression_round_trip_and_determinism(compression: str) -> None:
    tar = tar_layer(ENTRIES)
    a = compress(tar, compression)  # type: ignore[arg-type]
    assert a == compress(tar, compression)  # type: ignore[arg-type]
    assert decompress(a, compression) == tar  # type: ignore[arg-type]
    if compression == "gzip":
        assert a[:2] == b"\x1f\x8b" and a[4:8] == bytes(4)  # gzip mtime 0
    if compression == "zstd":
        assert a[:4] == b"\x28\xb5\x2f\xfd"


@pytest.mark.parametrize(
    ("kind", "compression", "media_type"),
    [
        ("docker", "gzip", DOCKER_LAYER_GZIP),
        ("oci", "gzip", OCI_LAYER_GZIP),
        ("oci", "zstd", OCI_LAYER_ZSTD),
        ("oci", "none", OCI_LAYER),
    ],
)
def test_layer_media_types(kind: str, compression: str, media_type: str) -> None:
    layer = make_layer(tar_layer(ENTRIES), compression, kind=kind)  # type: ignore[arg-type]
    assert layer.media_type == media_type
    assert layer.digest == digest(layer.read())
    assert layer.diff_id == digest(tar_layer(ENTRIES))
    if compression == "none":
        assert layer.digest == layer.diff_id


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_docker_manifests_refuse_oci_only_compressions(compression: str) -> None:
    with pytest.raises(ValueError, match="only in OCI"):
        make_layer(EMPTY_TAR, compression, kind="docker")  # type: ignore[arg-type]
    layer = make_layer(
        EMPTY_TAR,
        compression,  # type: ignore[arg-type]
        kind="docker",
        media_type="application/x-custom",
    )
    assert layer.media_type == "application/x-custom"


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_big_layer_streams_to_a_file(tmp_path: Path, compression: str) -> None:
    size = 300_000
    layer = big_layer(
        tmp_path / "a",
        size,
        compression=compression,  # type: ignore[arg-type]
        kind="oci",
        seed=3,
        chunk_size=65536,
    )
    again = big_layer(
        tmp_path / "b",
        size,
        compression=compression,  # type: ignore[arg-type]
        kind="oci",
        seed=3,
        chunk_size=65536,
    )
    assert layer.data is None and layer.path == tmp_path / "a"
    blob = layer.read()
    assert (layer.digest, layer.size) == (digest(blob), len(blob))
    assert (again.digest, again.diff_id) == (layer.digest, layer.diff_id)
    tar = decompress(blob, layer.compression)
    assert digest(tar) == layer.diff_id and tar.endswith(bytes(1024))
    infos = members(tar)
    assert [(m.name, m.size) for m in infos] == [("big", 0), ("big/blob.bin", size)]
    assert b"".join(layer.chunks(1000)) == blob
    other = big_layer(
        tmp_path / "c",
        size,
        compression=compression,  # type: ignore[arg-type]
        kind="oci",
        seed=4,
    )
    assert other.diff_id != layer.diff_id


# --- images ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "compression"), [("docker", "gzip"), ("oci", "gzip"), ("oci", "zstd"), ("oci", "none")]
)
def test_runnable_image_descriptors(kind: str, compression: str) -> None:
    image = runnable_image(
        "hello world",
        kind=kind,  # type: ignore[arg-type]
        compression=compression,  # type: ignore[arg-type]
        extras=ALL_EXTRAS,
    )
    check_image(image)
    assert image.media_type == (DOCKER_MANIFEST if kind == "docker" else OCI_MANIFEST)
    assert image.config_media_type == (
        DOCKER_CONFIG_MEDIA_TYPE if kind == "docker" else OCI_CONFIG_MEDIA_TYPE
    )
    config = image.config_json
    assert (config["architecture"], config["os"]) == ("amd64", "linux")
    assert config["config"]["Cmd"][:2] == ["/bin/sh", "-c"]
    assert config["config"]["Cmd"][2].endswith("echo 'hello world'")
    assert config["config"]["Env"] == ["PATH=/bin"]
    assert [h for h in config["history"] if h.get("empty_layer")]
    # base, empty, duplicate twice, whiteout pair, links
    assert len(image.layers) == 7
    assert image.layers[1].diff_id == EMPTY_TAR_DIFF_ID
    assert image.layers[2] == image.layers[3]
    assert len(image.blobs()) == 1 + 6
    assert image.platform == {"architecture": "amd64", "os": "linux"}
    assert image.marker == "hello world"


def test_runnable_image_holds_busybox_and_sh() -> None:
    for sh_link in ("symlink", "hardlink"):
        image = runnable_image("m", sh_link=sh_link)
        infos = {m.name: m for m in members(decompress(image.layers[0].read(), "gzip"))}
        assert infos["bin/busybox"].mode == 0o755
        assert infos["bin/busybox"].size == len(busybox_bytes())
        sh = infos["bin/sh"]
        assert sh.issym() if sh_link == "symlink" else sh.islnk()


def test_whiteout_layers_delete_what_the_earlier_layer_added() -> None:
    image = runnable_image("m", extras=["whiteout"])
    first = {m.name for m in members(decompress(image.layers[1].read(), "gzip"))}
    second = {m.name for m in members(decompress(image.layers[2].read(), "gzip"))}
    assert {"gone/file", "gonedir/a", "opq/old", "keep/file"} <= first
    assert {"gone/.wh.file", ".wh.gonedir", "opq/.wh..wh..opq", "opq/new"} <= second


def test_images_are_deterministic_and_marker_only_changes_the_config() -> None:
    a = runnable_image("one", kind="oci", compression="zstd", extras=ALL_EXTRAS)
    b = runnable_image("one", kind="oci", compression="zstd", extras=ALL_EXTRAS)
    c = runnable_image("two", kind="oci", compression="zstd", extras=ALL_EXTRAS)
    assert (a.manifest, a.config, a.digest) == (b.manifest, b.config, b.digest)
    assert a.digest != c.digest and a.config_digest != c.config_digest
    assert [la.digest for la in a.layers] == [la.digest for la in c.layers]


def test_unknown_extra_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown extras"):
        runnable_image("m", extras=["nope"])  # type: ignore[list-item]


def test_build_image_config_fields_and_annotations() -> None:
    layer = make_layer(tar_layer([File("a", b"a")]), "gzip", kind="oci")
    image = build_image(
        [layer],
        kind="oci",
        architecture="arm",
        variant="v7",
        entrypoint=["/x"],
        cmd=["y"],
        working_dir="/w",
        env=["A=1"],
        annotations={"org.opencontainers.image.title": "t"},
    )
    check_image(image)
    config = image.config_json
    assert config["variant"] == "v7"
    assert config["config"] == {
        "Env": ["A=1"],
        "Entrypoint": ["/x"],
        "Cmd": ["y"],
        "WorkingDir": "/w",
    }
    assert image.manifest_json["annotations"] == {"org.opencontainers.image.title": "t"}
    assert image.platform == {"architecture": "arm", "os": "linux", "variant": "v7"}
    with pytest.raises(ValueError, match="annotations"):
        build_image([layer], kind="docker", annotations={"a": "b"})


# --- indexes -----------------------------------------------------------------------


def test_oci_index_lists_platforms_then_attestations() -> None:
    index = multi_platform_index("m", kind="oci")
    assert index.media_type == OCI_INDEX
    assert index.digest == digest(index.manifest)
    doc = index.manifest_json
    assert doc["mediaType"] == OCI_INDEX
    entries = doc["manifests"]
    assert len(entries) == 4
    amd64, arm64 = index.images
    assert arm64.platform["architecture"] == "arm64"
    assert entries[0] == {
        "mediaType": OCI_MANIFEST,
        "digest": amd64.digest,
        "size": len(amd64.manifest),
        "platform": {"architecture": "amd64", "os": "linux"},
    }
    assert entries[1]["platform"] == {"architecture": "arm64", "os": "linux", "variant": "v8"}
    assert index.image_for("linux", "arm64").marker == "m linux/arm64/v8"
    for entry, image, att in zip(entries[2:], index.images, index.attestations, strict=True):
        assert entry["platform"] == {"architecture": "unknown", "os": "unknown"}
        assert entry["annotations"] == {
            "vnd.docker.reference.digest": image.digest,
            "vnd.docker.reference.type": "attestation-manifest",
        }
        assert entry["digest"] == att.digest and entry["size"] == len(att.manifest)
        check_image(att)
        (layer,) = att.layers
        assert layer.media_type == INTOTO_MEDIA_TYPE
        statement = json.loads(layer.read())
        assert statement["subject"][0]["digest"] == {"sha256": image.digest.split(":")[1]}
    for image in index.manifests:
        check_image(image)
    assert set(index.blobs()) == set().union(*(i.blobs() for i in index.manifests))


def test_docker_manifest_list_has_no_attestations() -> None:
    index = multi_platform_index("m", kind="docker")
    assert index.media_type == DOCKER_MANIFEST_LIST
    assert index.attestations == ()
    entries = index.manifest_json["manifests"]
    assert [e["mediaType"] for e in entries] == [DOCKER_MANIFEST] * 2
    assert [e["digest"] for e in entries] == [i.digest for i in index.images]
    with pytest.raises(ValueError, match="attestation"):
        build_index(index.images, kind="docker", attestations=True)
    assert multi_platform_index("m", kind="docker").digest == index.digest


def test_index_without_attestations() -> None:
    images = [runnable_image("a"), runnable_image("b", architecture="s390x")]
    index = build_index(images, kind="oci", attestations=False)
    assert len(index.manifest_json["manifests"]) == 2
    with pytest.raises(KeyError):
        index.image_for("linux", "riscv64")
