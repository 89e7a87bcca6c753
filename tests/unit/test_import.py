"""Importing archives into the hosted area, in process on a real filesystem store: OCI
archives and layout directories keep their digests, both docker save layouts are
recompressed with their configs kept, a second import writes nothing, and every kind
of broken archive is one error naming what is wrong, with nothing stored."""

from __future__ import annotations

import base64
import gzip
import io
import json
import tarfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from passthrough import cli, create_app
from passthrough.cli_import import TerminalProgress
from passthrough.config import load_settings
from passthrough.errors import ArchiveInvalid, Denied
from passthrough.registry.archives import TarSource, open_source
from passthrough.registry.importer import (
    Importer,
    ImportReport,
    Naming,
    familiar,
    split_reference,
)
from passthrough.services import services_of
from tests.support.archives import (
    REF_NAME,
    docker_save_legacy,
    docker_save_oci,
    oci_archive,
    oci_files,
    write_dir,
    write_tar,
)
from tests.support.helpers import digest
from tests.support.htpasswd import bcrypt_line
from tests.support.images import File as Entry
from tests.support.images import Image, build_image, build_index, make_layer, tar_layer

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"


def runnable_image(
    marker: str,
    *,
    kind: str = "docker",
    extras: tuple[str, ...] = (),
    architecture: str = "amd64",
) -> Image:
    """A small image of two layers (three with "duplicate": the second twice); the
    real runnable ones are for the rig, where a container runs them."""
    layers = [
        make_layer(tar_layer([Entry(f"{name}/{marker}", marker.encode() * 50)]), "gzip", kind=kind)  # type: ignore[arg-type]
        for name in ("base", "app")
    ]
    if "duplicate" in extras:
        layers.append(layers[1])
    return build_image(layers, kind=kind, architecture=architecture)  # type: ignore[arg-type]


@pytest.fixture
def app(tmp_path: Path) -> Flask:
    settings = load_settings({"CACHE_DIR": str(tmp_path / "cache")}, env_file="/nonexistent")
    settings = replace(settings, hosted_repositories=("team/**",))
    return create_app({"SETTINGS": settings})


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def run_import(app: Flask, path: Path, naming: Naming | None = None) -> ImportReport:
    services = services_of(app)
    assert services.store is not None and services.hosted is not None
    source = open_source(path)
    try:
        importer = Importer(services.settings, services.store, services.hosted)
        return importer.run(source, naming or Naming())
    finally:
        source.close()


def stored(app: Flask) -> dict[str, tuple[int, int]]:
    """Every object of the store (not its staging files or locks): size and mtime."""
    store = services_of(app).store
    assert store is not None
    root = Path(store.backend.staging_dir()).parent
    skip = {store.backend.staging_dir(), store.backend.lock_dir()}
    return {
        str(path.relative_to(root)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in root.rglob("*")
        if path.is_file() and not any(path.is_relative_to(s) for s in skip)
    }


def staging_left(app: Flask) -> list[Path]:
    store = services_of(app).store
    assert store is not None
    return [p for p in store.backend.staging_dir().iterdir() if p.name.startswith("import")]


def manifest(client: FlaskClient, name: str, reference: str) -> tuple[str, bytes]:
    got = client.get(f"/v2/{name}/manifests/{reference}")
    assert got.status_code == 200, got.data
    return got.headers["Docker-Content-Digest"], got.data


def blob(client: FlaskClient, name: str, blob_digest: str) -> bytes:
    got = client.get(f"/v2/{name}/blobs/{blob_digest}")
    assert got.status_code == 200, got.data
    return bytes(got.data)


# -- OCI input keeps its digests --------------------------------------------------------------


def test_oci_archive_keeps_its_digests(app: Flask, client: FlaskClient, tmp_path: Path) -> None:
    image = runnable_image("oci-import", kind="oci", extras=("duplicate",))
    archive = oci_archive(tmp_path / "app.tar", [(image, {REF_NAME: "team/app:1.0"})])
    report = run_import(app, archive)
    assert report.images == [
        {"repository": "team/app", "tag": "1.0", "digest": image.digest, "kind": "oci"}
    ]
    assert report.blobs_written == len(image.blobs()) and report.tags_written == 1
    assert manifest(client, "team/app", "1.0") == (image.digest, image.manifest)
    for blob_digest, expected in image.blobs().items():
        assert blob(client, "team/app", blob_digest) == expected.read()


def test_oci_layout_directory_with_an_index_and_a_tag_only_name(
    app: Flask, client: FlaskClient, tmp_path: Path
) -> None:
    images = [
        runnable_image(f"multi {arch}", kind="oci", architecture=arch)
        for arch in ("amd64", "arm64")
    ]
    index = build_index(images, kind="oci")
    layout = write_dir(tmp_path / "layout", oci_files([(index, {REF_NAME: "2.0"})]))
    with pytest.raises(ArchiveInvalid, match=r'named only by its tag "2\.0"'):
        run_import(app, layout)
    report = run_import(app, layout, Naming(repository="team/multi"))
    assert report.images[0]["digest"] == index.digest
    assert report.manifests_written == len(index.manifests) + 1
    assert manifest(client, "team/multi", "2.0") == (index.digest, index.manifest)
    for child in index.manifests:
        assert manifest(client, "team/multi", child.digest) == (child.digest, child.manifest)


def test_a_second_import_writes_nothing(app: Flask, tmp_path: Path) -> None:
    image = runnable_image("twice", kind="oci")
    archive = oci_archive(tmp_path / "a.tar", [(image, {REF_NAME: "team/twice:1"})])
    saved = docker_save_legacy(tmp_path / "d.tar", [(runnable_image("twice-d"), ["d:1"])])
    run_import(app, archive)
    run_import(app, saved, Naming(prefix="team/"))
    before = stored(app)
    again = run_import(app, archive)
    again_docker = run_import(app, saved, Naming(prefix="team/"))
    assert stored(app) == before
    for report in (again, again_docker):
        assert (report.blobs_written, report.manifests_written, report.tags_written) == (0, 0, 0)
        assert report.blobs_present > 0
    assert again_docker.images == run_import(app, saved, Naming(prefix="team/")).images
    assert not staging_left(app)


# -- docker save input is recompressed, its config kept ----------------------------------------


@pytest.mark.parametrize("layout", ["legacy", "oci"])
def test_docker_save_is_recompressed_with_its_config_kept(
    app: Flask, client: FlaskClient, tmp_path: Path, layout: str
) -> None:
    image = runnable_image(f"docker-{layout}", extras=("duplicate",))
    tags = ["127.0.0.1:5000/acc/app:1.0", "app:latest"]
    if layout == "legacy":
        archive = docker_save_legacy(tmp_path / "save.tar", [(image, tags)])
    else:
        archive = docker_save_oci(tmp_path / "save.tar", [(image, tags)])
    report = run_import(app, archive, Naming(prefix="team/"))
    names = [(entry["repository"], entry["tag"], entry["kind"]) for entry in report.images]
    assert names == [("team/acc/app", "1.0", "docker"), ("team/app", "latest", "docker")]
    got_digest, body = manifest(client, "team/app", "latest")
    document = json.loads(body)
    assert document["mediaType"] == DOCKER_MANIFEST and got_digest == digest(body)
    assert document["config"]["digest"] == image.config_digest
    assert blob(client, "team/app", image.config_digest) == image.config
    plain = [
        gzip.decompress(blob(client, "team/acc/app", layer["digest"]))
        for layer in document["layers"]
    ]
    assert [digest(data) for data in plain] == image.diff_ids


# -- broken archives: one error, nothing stored ----------------------------------------------


def broken_cases(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    image = runnable_image("broken", kind="oci")
    files = oci_files([(image, {REF_NAME: "team/broken:1"})])
    whole = write_tar(tmp_path / "whole.tar", files)
    data = whole.read_bytes()
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(data[: len(data) // 2])
    cut_trailer = tmp_path / "cut.tar"
    cut_trailer.write_bytes(data[: len(data) - 10240 + 100].rstrip(b"\0")[:-1])
    layer = image.layers[0].digest
    missing = dict(files)
    del missing["blobs/sha256/" + layer.removeprefix("sha256:")]
    flipped = dict(files)
    name = "blobs/sha256/" + layer.removeprefix("sha256:")
    flipped[name] = bytes([files[name][0] ^ 1]) + files[name][1:]
    docker = runnable_image("bad-diff")
    saved = docker_save_legacy(tmp_path / "diff.tar", [(docker, ["team/bad:1"])])
    altered = saved.read_bytes().replace(b'"amd64"', b'"AMD64"')
    (tmp_path / "altered.tar").write_bytes(altered)
    return {
        "truncated": (truncated, "truncated"),
        "no end marker": (cut_trailer, "truncated"),
        "missing blob": (write_tar(tmp_path / "m.tar", missing), f"blob {layer} is missing"),
        "digest mismatch": (write_tar(tmp_path / "f.tar", flipped), "does not match its digest"),
        "not an archive": (write_tar(tmp_path / "e.tar", {"x": b"y"}), "neither a docker save"),
        "config altered": (tmp_path / "altered.tar", "does not match its digest"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "truncated",
        "no end marker",
        "missing blob",
        "digest mismatch",
        "not an archive",
        "config altered",
    ],
)
def test_a_broken_archive_is_one_error_and_nothing_is_stored(
    app: Flask, client: FlaskClient, tmp_path: Path, case: str
) -> None:
    path, message = broken_cases(tmp_path)[case]
    before = stored(app)
    with pytest.raises(ArchiveInvalid, match=message) as raised:
        run_import(app, path)
    assert "\n" not in str(raised.value)
    assert stored(app) == before and not staging_left(app)
    assert client.get("/v2/team/broken/tags/list").status_code == 404


def test_a_layer_that_does_not_match_its_diff_id(app: Flask, tmp_path: Path) -> None:
    good = runnable_image("diff-id")
    other = make_layer(tar_layer([Entry("other", b"other\n")]), "gzip")
    wrong = replace(good, layers=(other, good.layers[1]))
    archive = docker_save_legacy(tmp_path / "w.tar", [(wrong, ["team/w:1"])])
    before = stored(app)
    with pytest.raises(ArchiveInvalid, match="does not match its diff_id"):
        run_import(app, archive)
    assert stored(app) == before and not staging_left(app)


def test_a_name_outside_the_hosted_area_is_refused(app: Flask, tmp_path: Path) -> None:
    image = runnable_image("elsewhere", kind="oci")
    archive = oci_archive(tmp_path / "x.tar", [(image, {REF_NAME: "other/app:1"})])
    before = stored(app)
    with pytest.raises(Denied, match="not a hosted repository"):
        run_import(app, archive)
    assert stored(app) == before


def test_a_tar_member_past_the_end_is_found_before_anything_is_read(tmp_path: Path) -> None:
    image = runnable_image("short", kind="oci")
    archive = oci_archive(tmp_path / "a.tar", [(image, None)])
    whole = archive.read_bytes()
    with tarfile.open(archive) as tar:
        last = tar.getmembers()[-1]
    data_end = last.offset_data + last.size
    for cut in (data_end + (-data_end % 512), data_end - 1, 700, 513):
        (tmp_path / "cut.tar").write_bytes(whole[:cut])
        with pytest.raises(ArchiveInvalid, match=r"cut\.tar"):
            TarSource(tmp_path / "cut.tar")


# -- naming -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("team/app:1.0", ("team/app", "1.0")),
        ("127.0.0.1:5000/acc/app:1.0", ("127.0.0.1:5000/acc/app", "1.0")),
        ("localhost:5000/app", ("localhost:5000/app", None)),
        ("team/app", ("team/app", None)),
        ("latest", (None, "latest")),
        ("app:2", ("app", "2")),
        (f"team/app@sha256:{'a' * 64}", ("team/app", None)),
    ],
)
def test_split_reference(text: str, expected: tuple[str | None, str | None]) -> None:
    assert split_reference(text) == expected


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("docker.io/library/nginx", "nginx"),
        ("ghcr.io/org/app", "org/app"),
        ("localhost/app", "app"),
        ("team/app", "team/app"),
        ("nginx", "nginx"),
    ],
)
def test_familiar(name: str, expected: str) -> None:
    assert familiar(name) == expected


# -- the upload endpoint and the command ------------------------------------------------------


@pytest.fixture
def users_app(tmp_path: Path) -> Flask:
    """A hosted area with users: alice may push team/**, bob only pull."""
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(
        bcrypt_line("alice", "alice-pw-7Hq") + "\n" + bcrypt_line("bob", "bob-pw-3Zx") + "\n"
    )
    access = tmp_path / "access.yaml"
    access.write_text('rules:\n  - repositories: ["team/**"]\n    pull: ["*"]\n    push: [alice]\n')
    env = {
        "CACHE_DIR": str(tmp_path / "cache"),
        "HOSTED_REPOSITORIES": "team/**",
        "HTPASSWD_FILE": str(htpasswd),
        "ACCESS_FILE": str(access),
        "PUBLIC_URL": "http://door.example",
        "TOKEN_SECRET": "import-unit-secret-0123456789abcdef",
    }
    return create_app({"SETTINGS": load_settings(env, env_file="/nonexistent")})


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def test_the_endpoint_asks_who_may_push_every_repository(users_app: Flask, tmp_path: Path) -> None:
    client = users_app.test_client()
    image = runnable_image("endpoint", kind="oci")
    body = oci_archive(tmp_path / "e.tar", [(image, {REF_NAME: "app:1"})]).read_bytes()
    url = "/api/v1/import?repository-prefix=team"
    before = stored(users_app)

    anonymous = client.post(url, data=body)
    assert anonymous.status_code == 401 and anonymous.json is not None
    assert anonymous.json["errors"][0]["code"] == "UNAUTHORIZED"
    assert anonymous.headers["WWW-Authenticate"].startswith("Basic ")
    wrong = client.post(url, data=body, headers=basic("alice", "nope"))
    assert wrong.status_code == 401
    bob = client.post(url, data=body, headers=basic("bob", "bob-pw-3Zx"))
    assert bob.status_code == 403 and bob.json is not None
    assert bob.json["errors"][0] == {
        "code": "DENIED",
        "message": "user 'bob' may not push \"team/app\"",
        "detail": None,
    }
    empty = client.post(url, data=b"", headers=basic("alice", "alice-pw-7Hq"))
    assert empty.status_code == 400 and empty.json is not None
    assert empty.json["errors"][0]["code"] == "ARCHIVE_INVALID"
    assert stored(users_app) == before and not staging_left(users_app)

    issued = client.get(
        "/v2/token", query_string={"service": "passthrough"}, headers=basic("alice", "alice-pw-7Hq")
    )
    assert issued.status_code == 200 and issued.json is not None
    bearer = {"Authorization": f"Bearer {issued.json['token']}"}
    forged = client.post(url, data=body, headers={"Authorization": "Bearer not-a-token"})
    assert forged.status_code == 401 and stored(users_app) == before
    done = client.post(url, data=body, headers=bearer)
    assert done.status_code == 201, done.data
    assert done.json is not None and done.json["images"] == [
        {"repository": "team/app", "tag": "1", "digest": image.digest, "kind": "oci"}
    ]
    assert not staging_left(users_app)


def test_the_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    monkeypatch.setenv("CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HOSTED_REPOSITORIES", "team/**")
    monkeypatch.setenv("ENV_FILE", str(tmp_path / "none.env"))
    image = runnable_image("command", kind="oci")
    archive = oci_archive(tmp_path / "c.tar", [(image, {REF_NAME: "1.0"})])
    assert cli.main(["import", str(archive), "--repository", "team/cmd", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["images"][0]["digest"] == image.digest and report["tags_written"] == 1
    assert cli.main(["import", str(archive), "--repository", "team/cmd"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"team/cmd:1.0 {image.digest} (oci)"
    assert "0 blob(s) written" in out[-1] and "0 tag(s) written" in out[-1]

    truncated = tmp_path / "t.tar"
    truncated.write_bytes(archive.read_bytes()[:1000])
    assert cli.main(["import", str(truncated), "--repository", "team/cmd"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("passthrough import: t.tar is truncated") and error.count("\n") == 1


def test_a_containerd_store_save_keeps_its_gzip_layers(
    app: Flask, client: FlaskClient, tmp_path: Path
) -> None:
    """Docker 25+ with the containerd image store: manifest.json names the registry's
    gzip blobs, index.json an index whose other platform was not saved."""
    image = runnable_image("containerd-store")
    arm = runnable_image("containerd-arm", architecture="arm64")
    index = build_index([image, arm], kind="oci", attestations=False)
    files = oci_files([(index, {REF_NAME: "1.0"})])
    del files["blobs/sha256/" + arm.digest.removeprefix("sha256:")]
    files["manifest.json"] = json.dumps(
        [
            {
                "Config": "blobs/sha256/" + image.config_digest.removeprefix("sha256:"),
                "RepoTags": ["app:1.0"],
                "Layers": [
                    "blobs/sha256/" + layer.digest.removeprefix("sha256:") for layer in image.layers
                ],
            }
        ]
    ).encode()
    report = run_import(app, write_tar(tmp_path / "c.tar", files), Naming(prefix="team/"))
    assert [(i["repository"], i["kind"]) for i in report.images] == [("team/app", "docker")]
    document = json.loads(manifest(client, "team/app", "1.0")[1])
    assert [layer["digest"] for layer in document["layers"]] == [
        layer.digest for layer in image.layers
    ]
    assert document["config"]["digest"] == image.config_digest


def test_progress_shows_on_a_terminal_only() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    shown, piped = Terminal(), io.StringIO()
    for out in (shown, piped):
        progress = TerminalProgress(out)
        progress("site.tar: layer abc/layer.tar", 1 << 20, 4 << 20)
        progress("site.tar: layer abc/layer.tar", 4 << 20, 4 << 20)
        progress.end()
    assert "importing site.tar: layer abc/layer.tar 100% (4 MiB)" in shown.getvalue()
    assert shown.getvalue().endswith("\r\x1b[K") and piped.getvalue() == ""
