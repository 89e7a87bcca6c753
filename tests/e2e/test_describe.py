"""End to end: /describe through passthrough under gunicorn against the rig's real
registries. What describe reports is what the download URL it names then delivers (same
manifest digest, same RepoTags); platforms, the 404 that lists them, the /registry-auth
challenge and client credentials, and one-line errors."""

from __future__ import annotations

import base64
import secrets
from typing import Any

import pytest
import requests

from tests.support.images import multi_platform_index, push_image, push_index, runnable_image
from tests.support.registry import ALICE, PUSHER, RegistryServer

pytestmark = pytest.mark.rig

CHALLENGE = 'Basic realm="registry credentials"'


def unique(prefix: str) -> str:
    # The registries are shared by the session: every test uses its own repositories.
    return f"{prefix}/d{secrets.token_hex(4)}"


def session() -> requests.Session:
    http = requests.Session()
    http.trust_env = False  # loopback only: never through a proxy from the environment
    return http


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def described(http: requests.Session, url: str, status: int = 200, **kw: Any) -> dict[str, Any]:
    response = http.get(url, timeout=60, **kw)
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    document: dict[str, Any] = response.json()
    return document


def test_describe_matches_what_the_download_delivers(registry_anon: RegistryServer,
                                                     passthrough_server):
    repository = unique("e2e")
    index = multi_platform_index("describe-e2e")  # OCI index with attestation manifests
    push_index(registry_anon.url, repository, "v1", index)
    server = passthrough_server({"REGISTRY_URL": registry_anon.url})
    http = session()
    filename = repository.replace("/", "__") + "_v1.tar"

    doc = described(http, f"{server.url}/describe/docker/{filename}")
    assert doc["reference"] == f"{registry_anon.host}/{repository}:v1"
    assert doc["registry"] == {"url": registry_anon.url, "name": registry_anon.host}
    assert doc["digest"] == index.digest
    assert [p["platform"] for p in doc["platforms"]] == ["linux/amd64", "linux/arm64/v8"]
    assert [p["digest"] for p in doc["platforms"]] == [i.digest for i in index.images]
    amd64 = index.image_for("linux", "amd64")
    selected = doc["selected"]
    assert selected["platform"] == "linux/amd64"
    assert selected["manifestDigest"] == amd64.digest
    assert selected["configDigest"] == amd64.config_digest
    assert selected["layerCount"] == len(amd64.layers)
    assert selected["compressedSize"] == sum(layer.size for layer in amd64.layers)
    assert doc["download"]["url"] == f"/docker/{filename}"
    assert doc["download"]["repoTag"] == f"{registry_anon.host}/{repository}:v1"

    # The URL describe names downloads exactly the image it described.
    for url in (doc["download"]["url"], doc["download"]["pinnedUrl"]):
        head = http.head(server.url + url, timeout=60)
        assert head.status_code == 200, head.text
        assert head.headers["Docker-Content-Digest"] == amd64.digest
        assert head.headers["X-Image-Reference"] == doc["download"]["repoTag"]

    arm = described(http, f"{server.url}/describe/docker/{filename}?platform=linux/arm64")
    assert arm["selected"]["platform"] == "linux/arm64/v8"
    assert arm["selected"]["manifestDigest"] == index.image_for("linux", "arm64").digest
    assert arm["download"]["url"] == f"/docker/{filename}?platform=linux/arm64"
    head = http.head(server.url + arm["download"]["url"], timeout=60)
    assert head.headers["Docker-Content-Digest"] == arm["selected"]["manifestDigest"]

    missing = described(http, f"{server.url}/describe/docker/{filename}?platform=linux/s390x",
                        status=404)
    assert "selected" not in missing
    assert [p["platform"] for p in missing["platforms"]] == ["linux/amd64", "linux/arm64/v8"]
    assert "available platforms: linux/amd64, linux/arm64/v8" in missing["error"]

    # Through the /registry route naming the same registry, host ':' percent-encoded.
    host = registry_anon.host.replace(":", "%3A")
    via_url = described(http, f"{server.url}/describe/registry/http/{host}/ref/{repository}:v1.tar")
    assert via_url["selected"] == selected
    assert via_url["download"]["url"] == f"/registry/http/{host}/ref/{repository}:v1.tar"

    for path, status in (
        (f"/describe/docker/{repository.replace('/', '__')}_nope.tar", 404),
        ("/describe/docker/Bad_v1.tar", 400),
        (f"/describe/docker/{filename}?platform=nonsense", 400),
        ("/describe/registry/gopher/x/docker/x_1.tar", 400),
    ):
        response = http.get(server.url + path, timeout=60)
        assert response.status_code == status, (path, response.text)
        assert response.headers["Content-Type"].startswith("text/plain")
        assert response.text.count("\n") == 1 and response.text.startswith(f"{status} ")


def test_describe_registry_auth_with_client_credentials(registry_anon: RegistryServer,
                                                        registry_basic: RegistryServer,
                                                        passthrough_server):
    repository = unique("e2e")
    image = runnable_image("describe-auth")
    push_image(registry_basic.url, repository, "v1_beta", image,
               auth=(PUSHER.username, PUSHER.password))
    # The server's own registry is another one: the client's credentials go to this one.
    server = passthrough_server({"REGISTRY_URL": registry_anon.url})
    http = session()
    host = registry_basic.host.replace(":", "%3A")
    url = f"{server.url}/describe/registry-auth/http/{host}/ref/{repository}:v1_beta.tar"

    challenged = http.get(url, timeout=60)
    assert challenged.status_code == 401
    assert challenged.headers["WWW-Authenticate"] == CHALLENGE

    wrong = http.get(url, headers=basic(ALICE.username, "not-her-password"), timeout=60)
    assert wrong.status_code == 401
    assert wrong.headers["WWW-Authenticate"] == CHALLENGE
    assert "not-her-password" not in wrong.text

    doc = described(http, url, headers=basic(ALICE.username, ALICE.password))
    assert doc["tag"] == "v1_beta"
    assert doc["platforms"] == [
        {"platform": "linux/amd64", "digest": image.digest, "size": len(image.manifest)}
    ]
    assert doc["selected"]["manifestDigest"] == image.digest
    assert doc["download"]["url"] == f"/registry-auth/http/{host}/ref/{repository}:v1_beta.tar"
    assert doc["download"]["repoTag"] == f"{registry_basic.host}/{repository}:v1_beta"

    # Anonymous /registry on a registry that wants a login: the same challenge.
    anonymous = http.get(url.replace("/registry-auth/", "/registry/"), timeout=60)
    assert anonymous.status_code == 401
    assert anonymous.headers["WWW-Authenticate"] == CHALLENGE
