"""Bundles (GET /bundle.tar) and checksums (<tar URL>.sha256/.md5) through Flask's test
client, against a registry simulated with responses: the docker and OCI layouts of a
multi-image archive, shared layers once, names, exact sizes, bad input, and checksums
equal to the bytes sent and kept in the store."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import pytest
import responses

from passthrough import create_app
from passthrough.cli import main
from passthrough.errors import BadRequest
from passthrough.export.bundle import BundleRequest, split_image
from passthrough.export.checksum import split_suffix
from tests.support.helpers import digest
from tests.unit.test_app import REG, FakeImage, read_archive, tar_of

SHARED = tar_of("shared.txt", b"a base layer both images have")


@pytest.fixture
def app(tmp_path):
    (tmp_path / "tmp").mkdir()
    (tmp_path / "cache").mkdir()
    return create_app(
        {
            "REGISTRY_URL": REG,
            "ENV_FILE": "/nonexistent",
            "TEMP_DIR": str(tmp_path / "tmp"),
            "CACHE_DIR": str(tmp_path / "cache"),
        }
    )


def two_images(rsps) -> tuple[FakeImage, FakeImage]:
    one = FakeImage("team/one", "1.0", [SHARED, tar_of("one.txt", b"ONE")])
    two = FakeImage("team/two", "2.0", [SHARED, tar_of("two.txt", b"TWO" * 100)])
    one.register(rsps)
    two.register(rsps)
    return one, two


def names_in(data: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        return archive.getnames()


@responses.activate
def test_docker_bundle_is_docker_save_of_every_image(app):
    one, two = two_images(responses)
    url = "/bundle.tar?image=team/one:1.0&image=team/two:2.0"
    cold = app.test_client().get(url)
    cold_body = cold.data  # read whole (the test client streams lazily)
    assert cold.status_code == 200, cold_body
    assert "Content-Length" not in cold.headers  # layer tars not yet unpacked: sizes unknown
    # Warm, every layer tar's size is known: the bundle's size is, before the first byte.
    response = app.test_client().get(url)
    body = response.data
    assert body == cold_body
    assert int(response.headers["Content-Length"]) == len(body)
    members = read_archive(body)
    manifest = json.loads(members["manifest.json"] or b"")
    host = REG.split("://")[1]
    assert [entry["RepoTags"] for entry in manifest] == [
        [f"{host}/team/one:1.0"],
        [f"{host}/team/two:2.0"],
    ]
    # The shared base layer: written once, both entries point at the same file.
    assert manifest[0]["Layers"][0] == manifest[1]["Layers"][0]
    tars = [name for name in names_in(body) if name.endswith("/layer.tar")]
    assert len(tars) == len(set(tars)) == 3
    assert [members[name] for name in manifest[1]["Layers"]] == two.tars
    for entry, image in zip(manifest, (one, two), strict=True):
        assert members[entry["Config"]] == image.config
    repositories = json.loads(members["repositories"] or b"")
    assert set(repositories) == {f"{host}/team/one", f"{host}/team/two"}


@responses.activate
def test_one_image_under_two_names_is_one_entry_with_both_tags(app):
    one = FakeImage("team/one", "1.0", [SHARED])
    one.register(responses)
    alias = FakeImage("team/one", "latest", [SHARED])
    alias.register(responses)
    response = app.test_client().get("/bundle.tar?image=team/one:1.0&image=team/one")
    manifest = json.loads(read_archive(response.data)["manifest.json"] or b"")
    host = REG.split("://")[1]
    assert [entry["RepoTags"] for entry in manifest] == [
        [f"{host}/team/one:1.0", f"{host}/team/one:latest"]
    ]


@responses.activate
def test_oci_bundle_keeps_the_registry_bytes_and_digests(app):
    one, two = two_images(responses)
    response = app.test_client().get("/bundle.tar?image=team/one:1.0&image=team/two:2.0&format=oci")
    assert response.status_code == 200, response.data
    assert int(response.headers["Content-Length"]) == len(response.data)
    members = read_archive(response.data)
    assert json.loads(members["oci-layout"] or b"") == {"imageLayoutVersion": "1.0.0"}
    index = json.loads(members["index.json"] or b"")
    host = REG.split("://")[1]
    described = {
        entry["annotations"]["org.opencontainers.image.ref.name"]: entry["digest"]
        for entry in index["manifests"]
    }
    assert described == {
        f"{host}/team/one:1.0": digest(one.manifest),
        f"{host}/team/two:2.0": digest(two.manifest),
    }
    blobs = {n: d for n, d in members.items() if n.startswith("blobs/sha256/") and d}
    for name, data in blobs.items():
        assert "sha256:" + hashlib.sha256(data).hexdigest() == "sha256:" + name.rsplit("/")[-1]
    for image in (one, two):
        assert blobs["blobs/sha256/" + digest(image.manifest)[7:]] == image.manifest
        for blob in image.blobs:
            assert blobs["blobs/sha256/" + digest(blob)[7:]] == blob
    # The shared layer's blob once: 2 manifests, 2 configs, 3 distinct layers.
    assert len(blobs) == 7


@responses.activate
def test_an_unknown_image_fails_before_the_first_byte_naming_it(app):
    one, _ = two_images(responses)
    for method in (responses.GET, responses.HEAD):
        responses.add(method, f"{REG}/v2/team/missing/manifests/9.9", status=404)
    response = app.test_client().get("/bundle.tar?image=team/one:1.0&image=team/missing:9.9")
    assert 400 <= response.status_code < 500
    text = response.get_data(as_text=True)
    assert "team/missing:9.9" in text and text.count("\n") == 1
    # No layer of the first image was fetched: the failure came first.
    layers = {digest(blob) for blob in one.blobs}
    fetched = {
        (c.request.url or "").rsplit("/", 1)[1]
        for c in responses.calls
        if c.request.method == "GET"
    }
    assert not layers & fetched


@pytest.mark.parametrize(
    "query",
    ["", "?image=", "?image=team/one:1.0&format=zip", "?image=team/one:1.0&all=1"],
)
def test_bad_bundle_queries_are_400(app, query):
    response = app.test_client().get("/bundle.tar" + query)
    assert response.status_code == 400
    assert response.get_data(as_text=True).count("\n") == 1


@responses.activate
def test_checksums_are_of_the_bytes_sent_and_kept_in_the_store(app):
    two_images(responses)
    client = app.test_client()
    for path in (
        "/docker/team__one_1.0.tar",
        "/bundle.tar?image=team/one:1.0&image=team/two:2.0&format=oci",
    ):
        tar_path, _, query = path.partition("?")
        query = "?" + query if query else ""
        sha = client.get(f"{tar_path}.sha256{query}")
        md5 = client.get(f"{tar_path}.md5{query}")
        assert sha.status_code == md5.status_code == 200, sha.data
        gets = len([c for c in responses.calls if c.request.method == "GET"])
        again = client.get(f"{tar_path}.md5{query}")
        assert again.data == md5.data
        assert len([c for c in responses.calls if c.request.method == "GET"]) == gets
        body = client.get(path).data
        filename = tar_path.rsplit("/", 1)[1]
        assert sha.get_data(as_text=True) == f"{hashlib.sha256(body).hexdigest()}  {filename}\n"
        assert md5.get_data(as_text=True) == f"{hashlib.md5(body).hexdigest()}  {filename}\n"


def test_image_names_and_suffixes():
    assert split_image("nginx") == ("nginx", "latest", None)
    assert split_image("localhost:5000/team/api:2026.06") == (
        "localhost:5000/team/api",
        "2026.06",
        None,
    )
    assert split_image("ghcr.io/org/app@sha256:" + "a" * 64) == (
        "ghcr.io/org/app",
        None,
        "sha256:" + "a" * 64,
    )
    assert split_suffix("nginx_latest.tar.md5") == ("nginx_latest.tar", "md5")
    assert split_suffix("team/api:v1.tar.sha256") == ("team/api:v1.tar", "sha256")
    assert split_suffix("nginx_latest.tar") == ("nginx_latest.tar", None)
    with pytest.raises(BadRequest):
        BundleRequest(images=("nginx",), all_platforms=True)


@pytest.fixture
def export_env(tmp_path, monkeypatch):
    """`passthrough export` configured as a server would be, from the environment."""
    (tmp_path / "cache").mkdir()
    (tmp_path / "out").mkdir()
    monkeypatch.setenv("REGISTRY_URL", REG)
    monkeypatch.setenv("ENV_FILE", "/nonexistent")
    monkeypatch.setenv("CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "out"


@responses.activate
def test_export_writes_the_bundle_and_prints_its_digests(export_env, capsys):
    two_images(responses)
    output = export_env / "site.tar"
    code = main(["export", "-o", str(output), "--json", "team/one:1.0", "team/two:2.0"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out)
    data = output.read_bytes()
    assert summary["sha256"] == hashlib.sha256(data).hexdigest()
    assert summary["bytes"] == len(data)
    assert [image["image"] for image in summary["images"]] == ["team/one:1.0", "team/two:2.0"]
    assert len(json.loads(read_archive(data)["manifest.json"] or b"")) == 2
    assert sorted(p.name for p in export_env.iterdir()) == ["site.tar"]


@responses.activate
def test_export_of_an_unknown_image_names_it_and_leaves_nothing(export_env, capsys):
    two_images(responses)
    for method in (responses.GET, responses.HEAD):
        responses.add(method, f"{REG}/v2/team/missing/manifests/9.9", status=404)
    code = main(["export", "-o", str(export_env / "site.tar"), "team/one:1.0", "team/missing:9.9"])
    assert code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "team/missing:9.9" in lines[0]
    assert list(export_env.iterdir()) == []
