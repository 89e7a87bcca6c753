"""The /v2 API through Flask's test client: the spec's error bodies and codes for bad
input, the API version header, and the upstream edge cases a real registry cannot be
made to produce on demand (simulated with responses)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import responses
from flask import Flask

from passthrough import create_app
from passthrough.config import load_settings

REG = "http://reg.test:5000"
MANIFEST = json.dumps(
    {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "size": 2,
                   "digest": "sha256:" + "a" * 64},
        "layers": [],
    },
    separators=(",", ":"),
).encode()
MANIFEST_DIGEST = "sha256:" + hashlib.sha256(MANIFEST).hexdigest()


def app_with(tmp_path: Path, **env: str) -> Flask:
    base = {"REGISTRY_URL": REG, "CACHE_DIR": str(tmp_path / "cache"), "UPSTREAM_RETRIES": "0"}
    settings = load_settings({**base, **env}, env_file=str(tmp_path / "none.env"))
    return create_app({"SETTINGS": settings})


def errors_of(response: Any) -> list[str]:
    assert response.mimetype == "application/json", response.data
    return [e["code"] for e in json.loads(response.data)["errors"]]


def test_base_answers_with_the_api_version(tmp_path: Path) -> None:
    response = app_with(tmp_path).test_client().get("/v2/")
    assert response.status_code == 200 and response.data == b"{}"
    assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/v2/Bad/Name/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/a//b/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/acc/plain/manifests/sha256:xyz", 400, "DIGEST_INVALID"),
        ("/v2/acc/plain/manifests/-bad-tag", 400, "TAG_INVALID"),
        ("/v2/acc/plain/blobs/not-a-digest", 400, "DIGEST_INVALID"),
        ("/v2/acc/plain/referrers/latest", 400, "DIGEST_INVALID"),
        ("/v2/acc/plain/nothing/here", 404, "NAME_UNKNOWN"),
        ("/v2/acc/plain/manifests/latest?ns=bad%20host", 400, "NAME_INVALID"),
    ],
)
def test_bad_input_is_a_4xx_with_the_spec_code(
    tmp_path: Path, path: str, status: int, code: str
) -> None:
    response = app_with(tmp_path).test_client().get(path)
    assert response.status_code == status
    assert errors_of(response) == [code]
    assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"


def test_a_push_to_a_proxied_name_is_denied(tmp_path: Path) -> None:
    client = app_with(tmp_path).test_client()
    response = client.put("/v2/acc/plain/manifests/latest", data=MANIFEST)
    assert response.status_code == 403
    assert errors_of(response) == ["DENIED"]
    assert client.patch("/v2/acc/plain/blobs/uploads/x", data=b"x").status_code == 403


def test_no_store_is_a_503_naming_the_settings(tmp_path: Path) -> None:
    settings = load_settings(
        {"REGISTRY_URL": REG, "STORE": "off"}, env_file=str(tmp_path / "none.env")
    )
    response = create_app({"SETTINGS": settings}).test_client().get("/v2/acc/plain/manifests/1")
    assert response.status_code == 503
    assert "CACHE_DIR" in json.loads(response.data)["errors"][0]["message"]


def test_a_disallowed_host_is_denied_before_any_connection(tmp_path: Path) -> None:
    client = app_with(tmp_path, REGISTRY_ALLOWLIST="ghcr.io").test_client()
    with responses.RequestsMock(assert_all_requests_are_fired=False):
        response = client.get("/v2/evil.example/x/manifests/1")
    assert response.status_code == 403 and errors_of(response) == ["DENIED"]


@responses.activate
def test_upstream_429_on_a_cold_tag_is_toomanyrequests_with_retry_after(tmp_path: Path) -> None:
    responses.head(f"{REG}/v2/acc/plain/manifests/1", status=429, headers={"Retry-After": "7"})
    response = app_with(tmp_path).test_client().get("/v2/acc/plain/manifests/1")
    assert response.status_code == 429
    assert errors_of(response) == ["TOOMANYREQUESTS"]
    assert response.headers["Retry-After"] == "7"


@responses.activate
def test_a_tag_seen_before_is_served_stale_with_a_warning(tmp_path: Path) -> None:
    app = app_with(tmp_path)
    headers = {
        "Docker-Content-Digest": MANIFEST_DIGEST,
        "Content-Type": "application/vnd.oci.image.manifest.v1+json",
        "Content-Length": str(len(MANIFEST)),
    }
    responses.head(f"{REG}/v2/acc/plain/manifests/1", headers=headers)
    responses.get(f"{REG}/v2/acc/plain/manifests/1", body=MANIFEST, headers=headers)
    first = app.test_client().get("/v2/acc/plain/manifests/1")
    assert first.status_code == 200 and first.data == MANIFEST
    assert "Warning" not in first.headers
    responses.replace(responses.HEAD, f"{REG}/v2/acc/plain/manifests/1", status=503)
    stale = app.test_client().get("/v2/acc/plain/manifests/1")
    assert stale.status_code == 200 and stale.data == MANIFEST
    assert stale.headers["Warning"].startswith('110 passthrough "Response is stale')
    assert stale.headers["Docker-Content-Digest"] == MANIFEST_DIGEST
    # Never cached: a 503 for a tag never seen stays an error.
    responses.head(f"{REG}/v2/acc/other/manifests/1", status=503)
    cold = app.test_client().get("/v2/acc/other/manifests/1")
    assert cold.status_code == 503 and errors_of(cold) == ["UNAVAILABLE"]


@responses.activate
def test_a_manifest_whose_bytes_do_not_match_its_digest_is_refused(tmp_path: Path) -> None:
    responses.get(f"{REG}/v2/acc/plain/manifests/{MANIFEST_DIGEST}", body=MANIFEST + b" ")
    response = app_with(tmp_path).test_client().get(f"/v2/acc/plain/manifests/{MANIFEST_DIGEST}")
    assert response.status_code == 502
    assert not list((tmp_path / "cache" / "manifests" / "sha256").iterdir())


@responses.activate
def test_upstream_error_codes_are_passed_on(tmp_path: Path) -> None:
    unknown = {"code": "NAME_UNKNOWN", "message": "repository name not known"}
    body = json.dumps({"errors": [unknown]})
    responses.get(f"{REG}/v2/acc/none/tags/list", status=404, body=body)
    response = app_with(tmp_path).test_client().get("/v2/acc/none/tags/list")
    assert response.status_code == 404 and errors_of(response) == ["NAME_UNKNOWN"]


@responses.activate
def test_tags_list_keeps_the_clients_name_and_rewrites_the_link(tmp_path: Path) -> None:
    responses.get(
        f"{REG}/v2/acc/plain/tags/list",
        json={"name": "acc/plain", "tags": ["1", "2"]},
        headers={"Link": '</v2/acc/plain/tags/list?last=2&n=2>; rel="next"'},
    )
    response = app_with(tmp_path, UPSTREAMS=f"lab={REG}").test_client().get(
        "/v2/lab/acc/plain/tags/list?n=2"
    )
    assert response.status_code == 200
    assert json.loads(response.data) == {"name": "lab/acc/plain", "tags": ["1", "2"]}
    assert response.headers["Link"] == '</v2/lab/acc/plain/tags/list?last=2&n=2>; rel="next"'


@responses.activate
def test_referrers_are_filtered_when_upstream_did_not(tmp_path: Path) -> None:
    subject = "sha256:" + "b" * 64
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {"digest": "sha256:" + "c" * 64, "artifactType": "application/spdx+json"},
            {"digest": "sha256:" + "d" * 64, "artifactType": "application/vnd.cosign"},
        ],
    }
    responses.get(f"{REG}/v2/acc/plain/referrers/{subject}", json=index)
    response = app_with(tmp_path).test_client().get(
        f"/v2/acc/plain/referrers/{subject}?artifactType=application/spdx%2Bjson"
    )
    assert response.status_code == 200
    assert response.headers["OCI-Filters-Applied"] == "artifactType"
    got = json.loads(response.data)["manifests"]
    assert [m["artifactType"] for m in got] == ["application/spdx+json"]
