"""Describe and the tar routes on hosted images, through Flask's test client on a real
filesystem store with passthrough users (htpasswd lines made by Debian's htpasswd) and
an ACCESS_FILE: describe answers for a user who may pull (from the store, no upstream),
challenges one without a login and refuses one without the permission; the archive's
size is exact once its layers are cached (and with layers=gzip), an estimate before;
the filename carries a non-default platform, in describe and in Content-Disposition.
Also the page's /ui/route (which tar route serves a /v2 name)."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from passthrough import create_app
from passthrough.config import Settings
from passthrough.oci.platforms import Platform
from passthrough.oci.reference import platform_filename
from tests.support.helpers import digest
from tests.support.images import Dir, File, Image, build_image, build_index, make_layer, tar_layer
from tests.unit.test_access_hosted import PASSWORDS, basic, files  # noqa: F401 (fixture)

ACCESS = """\
rules:
  - repositories: ["team/*"]
    pull: [alice]
    push: [alice]
"""


@pytest.fixture
def client(files: dict[str, Path], tmp_path: Path) -> FlaskClient:  # noqa: F811
    access = tmp_path / "access.yaml"
    access.write_text(ACCESS)
    settings = Settings(
        public_url="https://door.example",
        token_secret="a shared secret for every replica",
        htpasswd_file=str(files["users"]),
        access_file=str(access),
        hosted_repositories=("team/*",),
        cache_dir=str(tmp_path / "cache"),
        registry=dataclasses.replace(Settings().registry, url="http://127.0.0.1:9"),
    )
    return create_app({"SETTINGS": settings}).test_client()


ALICE = {"Authorization": basic("alice")}


def image(name: str, arch: str = "amd64", variant: str | None = None) -> Image:
    layers = [
        make_layer(tar_layer([Dir("d"), File(f"d/{name}-{i}", f"{name} {i}\n".encode() * 50)]))
        for i in range(2)
    ]
    return build_image(layers, kind="oci", architecture=arch, variant=variant, cmd=["/bin/true"])


def put(client: FlaskClient, path: str, data: bytes, content_type: str | None = None) -> None:
    headers = dict(ALICE)
    if content_type:
        headers["Content-Type"] = content_type
    response = client.put(path, data=data, headers=headers)
    assert response.status_code == 201, response.data


def push_image(client: FlaskClient, name: str, reference: str, pushed: Image) -> None:
    for blob in (pushed.config, *(layer.read() for layer in pushed.layers)):
        response = client.post(
            f"/v2/{name}/blobs/uploads/?digest={digest(blob)}", data=blob, headers=ALICE
        )
        assert response.status_code == 201, response.data
    put(client, f"/v2/{name}/manifests/{reference}", pushed.manifest, pushed.media_type)


def describe(client: FlaskClient, path: str, headers: dict[str, str] | None = None) -> Any:
    response = client.get("/describe" + path, headers=headers or ALICE)
    assert response.status_code == 200, response.data
    return json.loads(response.data)


def test_describe_of_a_hosted_image_with_a_valid_user(client: FlaskClient) -> None:
    pushed = image("app")
    push_image(client, "team/app", "2.0", pushed)
    doc = describe(client, "/docker/team__app_2.0.tar")
    assert doc["repository"] == "team/app"
    assert doc["digest"] == pushed.digest
    assert doc["reference"] == "door.example/team/app:2.0"
    selected = doc["selected"]
    assert selected["compressedSize"] == sum(layer.size for layer in pushed.layers)
    assert doc["download"]["filename"] == "team__app_2.0.tar"
    # The layer tars are not in the store yet (only the pushed gzip blobs): an estimate.
    assert selected["tarSizeExact"] is False
    archive = client.get("/docker/team__app_2.0.tar", headers=ALICE)
    assert archive.status_code == 200
    # Once downloaded, the layer tars are cached: the size is the archive's, exactly.
    warm = warm_size(client, "/ref/team/app:2.0.tar")
    assert warm["tarSizeExact"] is True
    assert warm["tarSize"] == len(archive.data)
    assert client.head("/docker/team__app_2.0.tar", headers=ALICE).headers[
        "Content-Length"
    ] == str(warm["tarSize"])


def warm_size(client: FlaskClient, path: str) -> dict[str, Any]:
    """describe's sizes once the download's layer tars are committed (just after its body
    ended, as the last reader tails the file)."""
    deadline = time.monotonic() + 10
    selected: dict[str, Any] = describe(client, path)["selected"]
    while not selected["tarSizeExact"] and time.monotonic() < deadline:
        time.sleep(0.05)
        selected = describe(client, path)["selected"]
    return selected


def test_oci_archive_size_estimated_cold_and_exact_warm(client: FlaskClient) -> None:
    pushed = image("oci")
    push_image(client, "team/oci", "1.0", pushed)
    path = "/docker/team__oci_1.0.tar?format=oci"
    cold = describe(client, path)["selected"]
    assert cold["tarSizeExact"] is False
    archive = client.get(path, headers=ALICE)
    assert archive.status_code == 200
    warm = warm_size(client, path)
    assert warm["tarSizeExact"] is True
    assert warm["tarSize"] == len(archive.data)
    # The estimate counts each layer tar at twice its blob: near the truth, not equal.
    assert cold["tarSize"] != warm["tarSize"]
    assert abs(cold["tarSize"] - warm["tarSize"]) < warm["tarSize"]


def test_layers_gzip_sizes_are_exact_before_any_download(client: FlaskClient) -> None:
    push_image(client, "team/gz", "1.0", image("gz"))
    selected = describe(client, "/docker/team__gz_1.0.tar?layers=gzip")["selected"]
    assert selected["tarSizeExact"] is True
    archive = client.get("/docker/team__gz_1.0.tar?layers=gzip", headers=ALICE)
    assert len(archive.data) == selected["tarSize"]


def test_describe_of_a_hosted_image_keeps_the_pull_rules(client: FlaskClient) -> None:
    push_image(client, "team/secret", "1.0", image("secret"))
    anonymous = client.get("/describe/docker/team__secret_1.0.tar")
    assert anonymous.status_code == 401
    assert anonymous.headers["WWW-Authenticate"].startswith("Basic ")
    assert b"passthrough user" in anonymous.data
    wrong = client.get(
        "/describe/docker/team__secret_1.0.tar", headers={"Authorization": basic("alice", "no")}
    )
    assert wrong.status_code == 401
    assert PASSWORDS["alice"].encode() not in wrong.data
    bob_login = {"Authorization": basic("bob")}
    bob = client.get("/describe/docker/team__secret_1.0.tar", headers=bob_login)
    assert bob.status_code == 403
    missing = client.get("/describe/docker/team__secret_9.tar", headers=ALICE)
    assert missing.status_code == 404


def test_hosted_index_platforms_and_platform_filenames(client: FlaskClient) -> None:
    amd64, arm64 = image("m", "amd64"), image("m", "arm64", "v8")
    index = build_index([amd64, arm64], kind="oci", attestations=False)
    for child in (amd64, arm64):
        push_image(client, "team/multi", child.digest, child)
    put(client, "/v2/team/multi/manifests/1.0", index.manifest, index.media_type)

    doc = describe(client, "/docker/team__multi_1.0.tar?platform=linux/arm64")
    assert [p["platform"] for p in doc["platforms"]] == ["linux/amd64", "linux/arm64/v8"]
    assert doc["selected"]["manifestDigest"] == arm64.digest
    assert doc["download"]["filename"] == "team__multi_1.0_linux-arm64.tar"
    default = describe(client, "/docker/team__multi_1.0.tar?platform=linux/amd64")
    assert default["download"]["filename"] == "team__multi_1.0.tar"

    arm = client.head("/docker/team__multi_1.0.tar?platform=linux/arm64", headers=ALICE)
    assert arm.status_code == 200
    assert arm.headers["Content-Disposition"] == (
        'attachment; filename="team__multi_1.0_linux-arm64.tar"'
    )
    ref = client.head("/ref/team/multi:1.0.tar?platform=linux/arm64/v8", headers=ALICE)
    assert ref.headers["Content-Disposition"] == (
        'attachment; filename="team__multi_1.0_linux-arm64-v8.tar"'
    )
    plain = client.head("/docker/team__multi_1.0.tar", headers=ALICE)
    assert plain.headers["Content-Disposition"] == 'attachment; filename="team__multi_1.0.tar"'


@pytest.mark.parametrize(
    ("platform", "default", "expected"),
    [
        ("linux/amd64", "linux/amd64", "nginx_latest.tar"),
        ("linux/arm64", "linux/amd64", "nginx_latest_linux-arm64.tar"),
        ("linux/arm/v7", "linux/amd64", "nginx_latest_linux-arm-v7.tar"),
        # arm64 is arm64/v8 (containerd's rule): the default by either spelling.
        ("linux/arm64/v8", "linux/arm64", "nginx_latest.tar"),
        ("linux/amd64", "linux/arm64", "nginx_latest_linux-amd64.tar"),
    ],
)
def test_platform_filename(platform: str, default: str, expected: str) -> None:
    assert (
        platform_filename("nginx_latest.tar", Platform.parse(platform), Platform.parse(default))
        == expected
    )


def test_ui_route_names_the_tar_route_of_a_v2_name(client: FlaskClient) -> None:
    def route(name: str) -> Any:
        response = client.get("/ui/route", query_string={"name": name})
        assert response.status_code == 200, response.data
        return json.loads(response.data)

    assert route("team/app") == {"prefix": "", "repository": "team/app", "hosted": True}
    assert route("library/nginx") == {
        "prefix": "",
        "repository": "library/nginx",
        "hosted": False,
    }
    assert route("ghcr.io/org/app") == {
        "prefix": "registry/https/ghcr.io/",
        "repository": "org/app",
        "hosted": False,
    }
    assert route("docker.io/nginx")["repository"] == "library/nginx"
    missing = client.get("/ui/route")
    assert missing.status_code == 400
    assert b"name is required" in missing.data
