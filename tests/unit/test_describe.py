"""/describe and the route-builder page through Flask's test client, against a registry
simulated with responses: the JSON shape, platform choice and the 404 that lists the
platforms, the routes' URL forms, credentials and challenges, and one-line 4xx for bad
input. No layer blob is ever requested."""

from __future__ import annotations

import base64
import json
import re
from typing import Any

import pytest
import responses

from passthrough import create_app
from passthrough.export.describe import download_path
from passthrough.upstream.target import Route
from tests.support.images import (
    DOCKER_MANIFEST_LIST,
    Dir,
    File,
    Image,
    Index,
    ManifestKind,
    build_image,
    build_index,
    make_layer,
    tar_layer,
)

REG = "http://reg.test:5000"
OTHER = "http://other.test:5000"
CHALLENGE = 'Basic realm="registry credentials"'


def small_image(
    name: str,
    *,
    kind: ManifestKind = "docker",
    arch: str = "amd64",
    variant: str | None = None,
    layers: int = 2,
) -> Image:
    made = [
        make_layer(
            tar_layer([Dir("d"), File(f"d/{name}-{i}", f"{name} {i}\n".encode())]),
            "gzip",
            kind=kind,
        )
        for i in range(layers)
    ]
    return build_image(made, kind=kind, architecture=arch, variant=variant, cmd=["/bin/true"])


def serve_image(
    rsps: responses.RequestsMock,
    registry: str,
    repository: str,
    image: Image,
    tag: str | None = None,
) -> None:
    """Manifest by tag and by digest, and the config; deliberately no layer blob."""
    base = f"{registry}/v2/{repository}"
    for reference in filter(None, (tag, image.digest)):
        rsps.get(
            f"{base}/manifests/{reference}", body=image.manifest, content_type=image.media_type
        )
        rsps.head(
            f"{base}/manifests/{reference}",
            content_type=image.media_type,
            headers={"Docker-Content-Digest": image.digest},
        )
    rsps.get(f"{base}/blobs/{image.config_digest}", body=image.config)


def serve_index(
    rsps: responses.RequestsMock, registry: str, repository: str, index: Index, tag: str
) -> None:
    base = f"{registry}/v2/{repository}"
    for reference in (tag, index.digest):
        rsps.get(
            f"{base}/manifests/{reference}", body=index.manifest, content_type=index.media_type
        )
        rsps.head(
            f"{base}/manifests/{reference}",
            content_type=index.media_type,
            headers={"Docker-Content-Digest": index.digest},
        )
    for image in index.manifests:
        serve_image(rsps, registry, repository, image)


def layer_requests(rsps: responses.RequestsMock, image: Image) -> list[str]:
    digests = {layer.digest for layer in image.layers}
    return [
        c.request.url or ""
        for c in rsps.calls
        if any((c.request.url or "").endswith(d) for d in digests)
    ]


def two_platform_index() -> Index:
    return build_index(
        [
            small_image("amd", kind="oci"),
            small_image("arm", kind="oci", arch="arm64", variant="v8", layers=3),
        ]
    )  # OCI, with buildx attestation manifests


@pytest.fixture
def app(tmp_path):
    return create_app(
        {"REGISTRY_URL": REG, "ENV_FILE": "/nonexistent", "TEMP_DIR": str(tmp_path), "STORE": "off"}
    )


@pytest.fixture
def rsps():
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


def get_json(response: Any) -> dict[str, Any]:
    assert response.mimetype == "application/json", response.get_data(as_text=True)
    document: dict[str, Any] = json.loads(response.get_data(as_text=True))
    return document


def assert_one_line(response: Any, status: int) -> str:
    text: str = response.get_data(as_text=True)
    assert response.status_code == status, text
    assert response.mimetype == "text/plain"
    assert text.startswith(f"{status} ") and text.endswith("\n") and text.count("\n") == 1
    return text


# -- the shape ------------------------------------------------------------------------


def test_single_platform_image(app, rsps):
    image = small_image("single")
    serve_image(rsps, REG, "team/api", image, tag="v1")
    response = app.test_client().get("/describe/docker/team__api_v1.tar")
    assert response.status_code == 200
    assert response.headers["Cache-Control"] == "no-store"
    doc = get_json(response)
    assert list(doc) == [
        "reference",
        "registry",
        "repository",
        "tag",
        "digest",
        "mediaType",
        "requestedPlatform",
        "platforms",
        "selected",
        "download",
    ]
    assert doc["reference"] == "reg.test:5000/team/api:v1"
    assert doc["registry"] == {"url": REG, "name": "reg.test:5000"}
    assert (doc["repository"], doc["tag"]) == ("team/api", "v1")
    assert doc["digest"] == image.digest
    assert doc["mediaType"] == image.media_type
    assert doc["platforms"] == [
        {"platform": "linux/amd64", "digest": image.digest, "size": len(image.manifest)}
    ]
    selected = doc["selected"]
    assert selected["platform"] == "linux/amd64"
    assert selected["manifestDigest"] == image.digest
    assert selected["configDigest"] == image.config_digest
    assert selected["created"] == "2024-01-01T00:00:00Z"
    assert selected["layerCount"] == 2
    assert selected["layers"] == [
        {"digest": layer.digest, "size": layer.size, "mediaType": layer.media_type}
        for layer in image.layers
    ]
    assert selected["compressedSize"] == sum(layer.size for layer in image.layers)
    assert doc["download"] == {
        "url": "/docker/team__api_v1.tar",
        "pinnedUrl": f"/ref/team/api:v1@{image.digest}.tar",
        "repoTag": "reg.test:5000/team/api:v1",
        "filename": "team__api_v1.tar",
    }
    # Nothing cached (no store): the tar's size is an estimate, and says so.
    assert selected["tarSizeExact"] is False
    assert selected["tarSize"] > selected["compressedSize"]
    assert layer_requests(rsps, image) == [], "describe must not touch a layer"


def test_single_platform_platform_comes_from_the_config(app, rsps):
    # A single-platform image is what it is: ?platform= does not apply (as for downloads).
    image = small_image("armonly", arch="arm", variant="v7")
    serve_image(rsps, REG, "team/arm", image, tag="1.0")
    doc = get_json(app.test_client().get("/describe/docker/team__arm_1.0.tar"))
    assert doc["platforms"][0]["platform"] == "linux/arm/v7"
    assert doc["selected"]["platform"] == "linux/arm/v7"


def test_index_lists_platforms_without_attestations_and_picks_the_default(app, rsps):
    index = two_platform_index()
    assert len(index.manifest_json["manifests"]) == 4, "two images, two attestations"
    serve_index(rsps, REG, "team/multi", index, "v2")
    doc = get_json(app.test_client().get("/describe/docker/team__multi_v2.tar"))
    assert doc["digest"] == index.digest
    assert doc["mediaType"] == "application/vnd.oci.image.index.v1+json"
    assert doc["platforms"] == [
        {
            "platform": "linux/amd64",
            "digest": index.images[0].digest,
            "size": len(index.images[0].manifest),
        },
        {
            "platform": "linux/arm64/v8",
            "digest": index.images[1].digest,
            "size": len(index.images[1].manifest),
        },
    ]
    assert doc["requestedPlatform"] == "linux/amd64"
    assert doc["selected"]["platform"] == "linux/amd64"
    assert doc["selected"]["manifestDigest"] == index.images[0].digest
    assert doc["download"]["pinnedUrl"] == f"/ref/team/multi:v2@{index.digest}.tar"
    for image in index.manifests:
        assert layer_requests(rsps, image) == []


def test_index_honours_platform_query(app, rsps):
    index = two_platform_index()
    serve_index(rsps, REG, "team/multi", index, "v2")
    response = app.test_client().get(
        "/describe/docker/team__multi_v2.tar?platform=LINUX/ARM64&format=oci&layers=gzip"
    )
    doc = get_json(response)
    arm = index.images[1]
    assert doc["requestedPlatform"] == "linux/arm64"
    assert doc["selected"]["platform"] == "linux/arm64/v8"
    assert doc["selected"]["manifestDigest"] == arm.digest
    assert doc["selected"]["layerCount"] == 3
    assert doc["selected"]["compressedSize"] == sum(layer.size for layer in arm.layers)
    query = "?platform=linux/arm64&format=oci&layers=gzip"
    assert doc["download"]["url"] == "/docker/team__multi_v2.tar" + query
    assert doc["download"]["pinnedUrl"] == f"/ref/team/multi:v2@{index.digest}.tar" + query


def test_missing_platform_is_404_json_listing_the_platforms(app, rsps):
    index = build_index([small_image("a"), small_image("b", arch="arm64")], kind="docker")
    assert index.media_type == DOCKER_MANIFEST_LIST
    serve_index(rsps, REG, "team/multi", index, "v3")
    response = app.test_client().get("/describe/docker/team__multi_v3.tar?platform=linux/s390x")
    assert response.status_code == 404
    doc = get_json(response)
    assert "selected" not in doc
    assert [p["platform"] for p in doc["platforms"]] == ["linux/amd64", "linux/arm64"]
    assert doc["error"] == (
        "team/multi:v3 has no linux/s390x image; available platforms: linux/amd64, linux/arm64"
    )
    assert doc["download"]["url"] == "/docker/team__multi_v3.tar?platform=linux/s390x"


def test_download_says_the_same_about_a_missing_platform(app, rsps):
    index = build_index([small_image("a")], kind="docker")
    serve_index(rsps, REG, "team/multi", index, "v3")
    response = app.test_client().get("/docker/team__multi_v3.tar?platform=linux/s390x")
    text = assert_one_line(response, 404)
    assert "available platforms: linux/amd64" in text


def test_cache_configured_uses_head_and_cached_documents(tmp_path, rsps):
    app = create_app(
        {
            "REGISTRY_URL": REG,
            "ENV_FILE": "/nonexistent",
            "TEMP_DIR": str(tmp_path),
            "CACHE_DIR": str(tmp_path / "cache"),
        }
    )
    index = two_platform_index()
    serve_index(rsps, REG, "team/multi", index, "v2")
    client = app.test_client()
    first = get_json(client.get("/describe/docker/team__multi_v2.tar"))
    gets = sum(1 for c in rsps.calls if c.request.method == "GET")
    second = get_json(client.get("/describe/docker/team__multi_v2.tar"))
    assert first == second
    assert sum(1 for c in rsps.calls if c.request.method == "GET") == gets, (
        "the second describe is answered from the cache after HEAD requests"
    )


# -- route forms ----------------------------------------------------------------------


def test_registry_route_with_ref_form_and_encoded_host(app, rsps):
    image = small_image("other")
    serve_image(rsps, OTHER, "team/api", image, tag="v1_beta")
    client = app.test_client()
    for path in (
        "/describe/registry/http/other.test%3A5000/ref/team/api:v1_beta.tar",
        "/describe/registry/http/other.test:5000/ref/team/api%3Av1_beta.tar",
    ):
        doc = get_json(client.get(path))
        assert doc["registry"] == {"url": OTHER, "name": "other.test:5000"}
        assert doc["tag"] == "v1_beta"
        assert doc["download"]["url"] == "/registry/http/other.test%3A5000/ref/team/api:v1_beta.tar"
        assert doc["download"]["repoTag"] == "other.test:5000/team/api:v1_beta"


def test_digest_reference(app, rsps):
    image = small_image("pinned")
    serve_image(rsps, REG, "team/api", image)
    doc = get_json(app.test_client().get(f"/describe/ref/team/api@{image.digest}.tar"))
    assert doc["tag"] is None
    assert doc["digest"] == image.digest
    assert doc["reference"] == f"reg.test:5000/team/api@{image.digest}"
    assert doc["download"]["url"] == f"/ref/team/api@{image.digest}.tar"
    assert doc["download"]["pinnedUrl"] == doc["download"]["url"]
    assert doc["download"]["repoTag"] == "reg.test:5000/team/api:" + image.digest.replace(":", "-")


def test_docker_hub_one_component_name_is_library(tmp_path, rsps):
    app = create_app(
        {
            "REGISTRY_URL": "docker.io",
            "ENV_FILE": "/nonexistent",
            "TEMP_DIR": str(tmp_path),
            "STORE": "off",
        }
    )
    image = small_image("nginx")
    hub = "https://registry-1.docker.io"
    # Docker Hub always asks for a token, anonymous ones too.
    rsps.get(re.compile(r"https://auth\.docker\.io/token.*"), json={"token": "anon"})
    serve_image(rsps, hub, "library/nginx", image, tag="latest")
    doc = get_json(app.test_client().get("/describe/docker/nginx_latest.tar"))
    assert doc["reference"] == "docker.io/library/nginx:latest"
    assert doc["registry"] == {"url": hub, "name": "docker.io"}
    assert doc["download"]["repoTag"] == "nginx:latest"


def test_download_path_forms():
    environment = download_path(Route.ENVIRONMENT, filename="nginx_latest.tar")
    assert environment == "/docker/nginx_latest.tar"
    assert download_path(
        Route.REGISTRY_AUTH,
        filename="team__api_v1.tar",
        scheme="http",
        host="127.0.0.1:5000",
        query={"layers": "gzip", "platform": "linux/arm/v7"},
    ) == (
        "/registry-auth/http/127.0.0.1%3A5000/docker/team__api_v1.tar"
        "?platform=linux/arm/v7&layers=gzip"
    )
    assert (
        download_path(
            Route.REGISTRY,
            reference_path="org/app@sha256:" + "a" * 64 + ".tar",
            scheme="https",
            host="ghcr.io",
        )
        == "/registry/https/ghcr.io/ref/org/app@sha256:" + "a" * 64 + ".tar"
    )


# -- credentials and challenges -------------------------------------------------------


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def test_registry_auth_without_credentials_is_challenged(app, rsps):
    path = "/describe/registry-auth/http/other.test%3A5000/docker/x_1.tar"
    response = app.test_client().get(path)
    assert_one_line(response, 401)
    assert response.headers["WWW-Authenticate"] == CHALLENGE
    assert len(rsps.calls) == 0


def test_registry_auth_passes_client_credentials(app, rsps):
    image = small_image("private")
    base = f"{OTHER}/v2/team/api"

    def needs_login(request: Any) -> tuple[int, dict[str, str], bytes]:
        if request.headers.get("Authorization") != basic("alice", "s3cret")["Authorization"]:
            return 401, {"WWW-Authenticate": 'Basic realm="other"'}, b""
        if "/manifests/" in request.url:
            return 200, {"Content-Type": image.media_type}, image.manifest
        return 200, {}, image.config

    for url in (
        f"{base}/manifests/v1",
        f"{base}/manifests/{image.digest}",
        f"{base}/blobs/{image.config_digest}",
    ):
        rsps.add_callback(responses.GET, url, callback=needs_login)
    client = app.test_client()
    path = "/describe/registry-auth/http/other.test%3A5000/docker/team__api_v1.tar"
    doc = get_json(client.get(path, headers=basic("alice", "s3cret")))
    assert doc["selected"]["configDigest"] == image.config_digest
    assert doc["download"]["url"] == "/registry-auth/http/other.test%3A5000/docker/team__api_v1.tar"

    refused = client.get(path, headers=basic("alice", "wrong"))
    text = assert_one_line(refused, 401)
    assert "credentials" in text
    assert refused.headers["WWW-Authenticate"] == CHALLENGE
    assert "wrong" not in text and "s3cret" not in text


def test_upstream_401_on_docker_route_offers_the_challenge(app, rsps):
    rsps.get(
        f"{REG}/v2/team/api/manifests/v1",
        status=401,
        headers={"WWW-Authenticate": 'Basic realm="reg"'},
    )
    response = app.test_client().get("/describe/docker/team__api_v1.tar")
    assert_one_line(response, 401)
    assert response.headers["WWW-Authenticate"] == CHALLENGE


# -- bad input and upstream errors: one line, never a 500 ------------------------------


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/describe/docker/nginx.tar", 400),
        ("/describe/docker/nginx_latest.zip", 400),
        ("/describe/docker/Team__api_v1.tar", 400),
        ("/describe/docker/nginx_latest.tar?platform=linux", 400),
        ("/describe/docker/nginx_latest.tar?format=zip", 400),
        ("/describe/docker/nginx_latest.tar?layers=xz", 400),
        ("/describe/ref/team/api.tar", 400),
        ("/describe/ref/team/api@sha256:abc.tar", 400),
        ("/describe/registry/ftp/other.test/docker/x_1.tar", 400),
        ("/describe/registry/http/bad%20host/docker/x_1.tar", 400),
        ("/describe/docker/%0d%0aX-Evil:%201_1.tar", 400),
        ("/describe/nothing/here", 404),
        ("/describe/", 404),
    ],
)
def test_bad_input_is_a_one_line_4xx(app, rsps, path, status):
    response = app.test_client().get(path)
    text = assert_one_line(response, status)
    assert "X-Evil" not in response.headers
    assert "\r" not in text
    assert len(rsps.calls) == 0


def test_unknown_tag_is_404_text(app, rsps):
    rsps.get(
        f"{REG}/v2/team/api/manifests/nope",
        status=404,
        json={"errors": [{"code": "MANIFEST_UNKNOWN"}]},
    )
    text = assert_one_line(app.test_client().get("/describe/docker/team__api_nope.tar"), 404)
    assert "team/api:nope" in text


def test_schema1_is_422(app, rsps):
    rsps.get(
        f"{REG}/v2/team/old/manifests/v1",
        json={"schemaVersion": 1, "name": "team/old"},
        content_type="application/vnd.docker.distribution.manifest.v1+prettyjws",
    )
    text = assert_one_line(app.test_client().get("/describe/docker/team__old_v1.tar"), 422)
    assert "schema1" in text


def test_invalid_json_from_registry_is_502(app, rsps):
    rsps.get(f"{REG}/v2/team/api/manifests/v1", body=b"<html>", content_type="text/html")
    assert_one_line(app.test_client().get("/describe/docker/team__api_v1.tar"), 502)


# -- the page -------------------------------------------------------------------------


def test_page_is_self_contained(app):
    client = app.test_client()
    page = client.get("/")
    assert page.status_code == 200
    assert page.mimetype == "text/html"
    policy = page.headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy
    html = page.get_data(as_text=True)
    references = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert references, "the page loads its script and style sheet"
    for reference in references:
        assert "//" not in reference, f"{reference} is not served by this app"
    for asset, mimetype in (
        ("common.js", "text/javascript"),
        ("app.js", "text/javascript"),
        ("console.js", "text/javascript"),
        ("style.css", "text/css"),
    ):
        assert f'"ui/static/{asset}"' in html
        served = client.get(f"/ui/static/{asset}")
        assert served.status_code == 200
        assert served.mimetype == mimetype
        text = served.get_data(as_text=True)
        assert "@import" not in text and "url(http" not in text
        served.close()
    for label_for in re.findall(r'<label for="([^"]+)"', html):
        assert f'id="{label_for}"' in html, f"label for a missing control {label_for}"


def test_info_tells_the_registry_and_no_secret(tmp_path):
    app = create_app(
        {
            "REGISTRY_URL": "http://127.0.0.1:5000",
            "ENV_FILE": "/nonexistent",
            "REGISTRY_USERNAME": "svc-user",
            "REGISTRY_PASSWORD": "hunter2-secret",
            "REGISTRY_BEARER_TOKEN": "tok-secret",
            "DEFAULT_PLATFORM": "linux/arm64",
            "STORE": "off",
        }
    )
    response = app.test_client().get("/ui/info")
    assert response.status_code == 200
    doc = get_json(response)
    assert doc == {
        "registry": {"url": "http://127.0.0.1:5000", "name": "127.0.0.1:5000"},
        "defaultPlatform": "linux/arm64",
        "defaultNamespace": None,
        "clientAuth": "optional",
        "hosted": [],
        "pullHost": None,
    }
    text = response.get_data(as_text=True)
    for secret in ("svc-user", "hunter2", "tok-secret"):
        assert secret not in text
