"""Registry client edge cases a real registry cannot produce on demand (responses)."""

from __future__ import annotations

import base64
import json
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
import responses

from passthrough.config import load_settings
from passthrough.errors import (
    NotAcceptable,
    UnsupportedImage,
    UpstreamInvalid,
    UpstreamNotFound,
    UpstreamRateLimited,
    UpstreamTimeout,
    UpstreamUnauthorized,
    UpstreamUnavailable,
    UpstreamUnreachable,
)
from passthrough.export.resolve import resolve_image
from passthrough.oci.manifest import DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST
from passthrough.oci.platforms import Platform
from passthrough.oci.reference import ImageReference
from passthrough.upstream.auth import Credentials, TokenCache
from passthrough.upstream.client import RegistryClient, RetryPolicy, Timeouts, parse_retry_after
from passthrough.upstream.target import Route, choose_target, registry_from_url
from tests.support.helpers import digest

REG = "https://reg.example.com"
REALM = "https://auth.example.com/token"
SECRET = "s3cret-Password!"


def make_client(
    creds: Credentials | None = None,
    tokens: TokenCache | None = None,
    repository: str = "team/api",
    retry: RetryPolicy | None = None,
) -> RegistryClient:
    settings = load_settings({"REGISTRY_URL": "http://unused:1", "ENV_FILE": "/nonexistent"})
    target = choose_target(
        settings, Route.REGISTRY, creds, registry_from_url("https", "reg.example.com")
    )
    return RegistryClient(
        target,
        repository,
        tokens if tokens is not None else TokenCache(),
        Timeouts(1, 1),
        retry=retry or RetryPolicy(attempts=0),
    )


def bearer_challenge(scope: str = "repository:team/api:pull", error: str | None = None) -> str:
    value = f'Bearer realm="{REALM}",service="reg.example.com",scope="{scope}"'
    if error:
        value += f',error="{error}"'
    return value


def add_token(rsps, body=None, status=200):
    rsps.add(
        responses.GET,
        REALM,
        json=body if body is not None else {"token": "T1", "expires_in": 300},
        status=status,
    )


@responses.activate
def test_token_exchange_sends_one_scope_per_param_and_is_cached():
    scope = "repository:team/api:pull repository:reg.example.com:5000/other:pull"
    responses.add(
        responses.GET,
        f"{REG}/v2/team/api/manifests/v1",
        status=401,
        headers={"WWW-Authenticate": bearer_challenge(scope)},
    )
    responses.add(responses.GET, f"{REG}/v2/team/api/manifests/v1", body=b"{}", status=200)
    add_token(responses)
    tokens = TokenCache()
    creds = Credentials("alice", SECRET)
    client = make_client(creds, tokens)
    client.request("GET", "/v2/team/api/manifests/v1", what="manifest")
    token_call = next(c for c in responses.calls if str(c.request.url).startswith(REALM))
    query = parse_qs(urlsplit(str(token_call.request.url)).query)
    assert query["service"] == ["reg.example.com"]
    assert sorted(query["scope"]) == [
        "repository:reg.example.com:5000/other:pull",
        "repository:team/api:pull",
    ]
    assert (
        token_call.request.headers["Authorization"]
        == "Basic " + base64.b64encode(f"alice:{SECRET}".encode()).decode()
    )
    assert responses.calls[-1].request.headers["Authorization"] == "Bearer T1"

    # A second request with the same identity reuses the token, and sends it at once:
    # the registry's challenge for this repository is remembered, so no 401 round trip.
    responses.reset()
    responses.add(responses.GET, f"{REG}/v2/team/api/manifests/v1", body=b"{}", status=200)
    add_token(responses, {"token": "T-bob"})
    make_client(Credentials("alice", SECRET), tokens).request(
        "GET", "/v2/team/api/manifests/v1", what="manifest"
    )
    assert not any(str(c.request.url).startswith(REALM) for c in responses.calls)
    assert len(responses.calls) == 1
    assert responses.calls[-1].request.headers["Authorization"] == "Bearer T1"
    # Another identity does not get alice's token: it fetches its own.
    responses.reset()
    add_token(responses, {"token": "T-bob"})
    responses.add(
        responses.GET,
        f"{REG}/v2/team/api/manifests/v1",
        status=401,
        headers={"WWW-Authenticate": bearer_challenge(scope)},
    )
    responses.add(responses.GET, f"{REG}/v2/team/api/manifests/v1", body=b"{}", status=200)
    make_client(Credentials("bob", "other"), tokens).request(
        "GET", "/v2/team/api/manifests/v1", what="manifest"
    )
    assert any(str(c.request.url).startswith(REALM) for c in responses.calls)


@responses.activate
def test_access_token_and_default_expiry():
    responses.add(
        responses.GET,
        f"{REG}/v2/team/api/manifests/v1",
        status=401,
        headers={"WWW-Authenticate": bearer_challenge()},
    )
    responses.add(responses.GET, f"{REG}/v2/team/api/manifests/v1", body=b"{}")
    add_token(responses, {"access_token": "AT"})
    tokens = TokenCache()
    make_client(None, tokens).request("GET", "/v2/team/api/manifests/v1", what="m")
    assert responses.calls[-1].request.headers["Authorization"] == "Bearer AT"
    assert "Authorization" not in responses.calls[1].request.headers  # anonymous token request
    assert tokens.size() == 1


@responses.activate
def test_insufficient_scope_retried_once_then_fails():
    url = f"{REG}/v2/team/api/manifests/v1"
    for _ in range(3):
        responses.add(
            responses.GET,
            url,
            status=401,
            headers={"WWW-Authenticate": bearer_challenge(error="insufficient_scope")},
        )
    add_token(responses)
    add_token(responses, {"token": "T2"})
    with pytest.raises(UpstreamUnauthorized) as raised:
        make_client(Credentials("alice", SECRET)).request(
            "GET", "/v2/team/api/manifests/v1", what="m"
        )
    assert SECRET not in raised.value.message
    token_calls = [c for c in responses.calls if str(c.request.url).startswith(REALM)]
    assert len(token_calls) == 2


@responses.activate
def test_insufficient_scope_then_success_with_fresh_token():
    url = f"{REG}/v2/team/api/manifests/v1"
    responses.add(responses.GET, url, status=401, headers={"WWW-Authenticate": bearer_challenge()})
    responses.add(
        responses.GET,
        url,
        status=401,
        headers={"WWW-Authenticate": bearer_challenge(error="insufficient_scope")},
    )
    responses.add(responses.GET, url, body=b"{}")
    add_token(responses, {"token": "OLD"})
    add_token(responses, {"token": "NEW"})
    make_client().request("GET", "/v2/team/api/manifests/v1", what="m")
    assert responses.calls[-1].request.headers["Authorization"] == "Bearer NEW"


@responses.activate
def test_token_service_rejecting_credentials_never_echoes_them():
    responses.add(
        responses.GET,
        f"{REG}/v2/team/api/manifests/v1",
        status=401,
        headers={"WWW-Authenticate": bearer_challenge()},
    )
    add_token(responses, {"details": "bad"}, status=401)
    with pytest.raises(UpstreamUnauthorized) as raised:
        make_client(Credentials("alice", SECRET)).request(
            "GET", "/v2/team/api/manifests/v1", what="m"
        )
    assert "rejected the credentials" in raised.value.message
    assert SECRET not in raised.value.message and "alice" not in raised.value.message


@responses.activate
def test_basic_challenge_sends_credentials_once():
    url = f"{REG}/v2/team/api/manifests/v1"
    responses.add(responses.GET, url, status=401, headers={"WWW-Authenticate": 'Basic realm="r"'})
    responses.add(responses.GET, url, status=401, headers={"WWW-Authenticate": 'Basic realm="r"'})
    with pytest.raises(UpstreamUnauthorized):
        make_client(Credentials("alice", SECRET)).request(
            "GET", "/v2/team/api/manifests/v1", what="m"
        )
    assert responses.calls[1].request.headers["Authorization"].startswith("Basic ")
    responses.calls.reset()
    with pytest.raises(UpstreamUnauthorized) as raised:
        make_client(None).request("GET", "/v2/team/api/manifests/v1", what="m")
    assert "requires credentials" in raised.value.message


@responses.activate
def test_redirect_to_another_host_carries_no_authorization():
    blob = b"layer-bytes"
    url = f"{REG}/v2/team/api/blobs/{digest(blob)}"
    responses.add(responses.GET, url, status=401, headers={"WWW-Authenticate": bearer_challenge()})
    responses.add(
        responses.GET, url, status=307, headers={"Location": "https://cdn.example.net/blob?sig=abc"}
    )
    responses.add(responses.GET, "https://cdn.example.net/blob", body=blob)
    add_token(responses)
    client = make_client(Credentials("alice", SECRET))
    with client.blob(digest(blob), what="blob") as response:
        assert response.content == blob
    cdn = responses.calls[-1].request
    assert str(cdn.url).startswith("https://cdn.example.net/")
    assert "Authorization" not in cdn.headers


@responses.activate
def test_same_origin_relative_redirect_keeps_authorization():
    url = f"{REG}/v2/team/api/blobs/sha256:{'a' * 64}"
    responses.add(responses.GET, url, status=307, headers={"Location": "/storage/blob"})
    responses.add(responses.GET, f"{REG}/storage/blob", body=b"x")
    settings = load_settings(
        {"REGISTRY_URL": REG, "REGISTRY_BEARER_TOKEN": "STATIC", "ENV_FILE": "/nonexistent"}
    )
    client = RegistryClient(
        choose_target(settings, Route.ENVIRONMENT, None), "team/api", TokenCache(), Timeouts(1, 1)
    )
    with client.blob(f"sha256:{'a' * 64}", what="blob"):
        pass
    assert responses.calls[-1].request.headers["Authorization"] == "Bearer STATIC"


@responses.activate
@pytest.mark.parametrize(
    ("status", "headers", "error", "retry_after"),
    [
        (404, {}, UpstreamNotFound, None),
        (429, {"Retry-After": "17"}, UpstreamRateLimited, "17"),
        (503, {}, UpstreamUnavailable, None),
        (403, {}, Exception, None),
    ],
)
def test_status_mapping(status, headers, error, retry_after):
    responses.add(
        responses.GET,
        f"{REG}/v2/team/api/manifests/v1",
        status=status,
        headers=headers,
        json={"errors": [{"code": "SOME_CODE", "message": "x"}]},
    )
    with pytest.raises(error) as raised:
        make_client().request("GET", "/v2/team/api/manifests/v1", what="manifest")
    assert raised.value.status == status
    assert raised.value.headers.get("Retry-After") == retry_after
    assert "SOME_CODE" in raised.value.message


@responses.activate
@pytest.mark.parametrize(
    ("exception", "error"),
    [
        (requests.ConnectTimeout(), UpstreamTimeout),
        (requests.ConnectionError(), UpstreamUnreachable),
    ],
)
def test_network_failures(exception, error):
    responses.add(responses.GET, f"{REG}/v2/team/api/manifests/v1", body=exception)
    with pytest.raises(error):
        make_client().request("GET", "/v2/team/api/manifests/v1", what="manifest")


# -- resolving -----------------------------------------------------------------------


def image_documents(
    arch: str = "amd64",
    layer_type: str = "application/vnd.oci.image.layer.v1.tar+gzip",
    media_type: str = OCI_MANIFEST,
):
    config = json.dumps(
        {
            "architecture": arch,
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [digest(b"tar")]},
        }
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": media_type,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "size": len(config),
                "digest": digest(config),
            },
            "layers": [{"mediaType": layer_type, "size": 3, "digest": digest(b"gz!")}],
        }
    ).encode()
    return config, manifest


def add_image(rsps, reference: str, config: bytes, manifest: bytes, media_type: str = OCI_MANIFEST):
    rsps.add(
        responses.GET,
        f"{REG}/v2/team/api/manifests/{reference}",
        body=manifest,
        content_type=media_type,
    )
    rsps.add(
        responses.GET,
        f"{REG}/v2/team/api/manifests/{digest(manifest)}",
        body=manifest,
        content_type=media_type,
    )
    rsps.add(responses.GET, f"{REG}/v2/team/api/blobs/{digest(config)}", body=config)


def index_document(entries):
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}).encode()


@responses.activate
def test_index_skips_attestations_and_matches_arm64_variant():
    amd_config, amd = image_documents("amd64")
    arm_config, arm = image_documents("arm64")
    add_image(responses, "unused-amd", amd_config, amd)
    add_image(responses, "unused-arm", arm_config, arm)
    attestation = {
        "mediaType": OCI_MANIFEST,
        "digest": digest(b"att"),
        "size": 3,
        "platform": {"os": "unknown", "architecture": "unknown"},
        "annotations": {"vnd.docker.reference.type": "attestation-manifest"},
    }
    index = index_document(
        [
            attestation,
            {
                "mediaType": OCI_MANIFEST,
                "digest": digest(amd),
                "size": len(amd),
                "platform": {"os": "linux", "architecture": "amd64"},
            },
            {
                "mediaType": OCI_MANIFEST,
                "digest": digest(arm),
                "size": len(arm),
                "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"},
            },
        ]
    )
    responses.add(
        responses.GET, f"{REG}/v2/team/api/manifests/multi", body=index, content_type=OCI_INDEX
    )
    ref = ImageReference("team/api", tag="multi")
    resolved = resolve_image(make_client(), ref)
    assert resolved.manifest_digest == digest(amd) and resolved.index_digest == digest(index)
    resolved = resolve_image(make_client(), ref, Platform.parse("linux/arm64"))
    assert resolved.manifest_digest == digest(arm)
    with pytest.raises(NotAcceptable) as raised:
        resolve_image(make_client(), ref, Platform.parse("linux/s390x"))
    assert "linux/amd64, linux/arm64/v8" in raised.value.message
    assert "unknown" not in raised.value.message


@responses.activate
def test_schema1_is_refused():
    responses.add(
        responses.GET,
        f"{REG}/v2/team/api/manifests/old",
        json={"schemaVersion": 1, "name": "team/api", "fsLayers": []},
        content_type="application/vnd.docker.distribution.manifest.v1+prettyjws",
    )
    with pytest.raises(UnsupportedImage) as raised:
        resolve_image(make_client(), ImageReference("team/api", tag="old"))
    assert "schema1" in raised.value.message


@responses.activate
def test_foreign_layers_are_refused():
    config, manifest = image_documents(
        layer_type="application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
        media_type=DOCKER_MANIFEST,
    )
    add_image(responses, "win", config, manifest, DOCKER_MANIFEST)
    with pytest.raises(UnsupportedImage) as raised:
        resolve_image(make_client(), ImageReference("team/api", tag="win"))
    assert "foreign" in raised.value.message


@responses.activate
def test_config_digest_mismatch_is_an_upstream_error():
    config, manifest = image_documents()
    responses.add(
        responses.GET, f"{REG}/v2/team/api/manifests/v1", body=manifest, content_type=OCI_MANIFEST
    )
    responses.add(
        responses.GET, f"{REG}/v2/team/api/blobs/{digest(config)}", body=config[:-1] + b" "
    )
    with pytest.raises(UpstreamInvalid) as raised:
        resolve_image(make_client(), ImageReference("team/api", tag="v1"))
    assert "digest" in raised.value.message


@responses.activate
def test_pinned_manifest_digest_is_verified():
    _, manifest = image_documents()
    wrong = "sha256:" + "0" * 64
    responses.add(
        responses.GET,
        f"{REG}/v2/team/api/manifests/{wrong}",
        body=manifest,
        content_type=OCI_MANIFEST,
    )
    with pytest.raises(UpstreamInvalid):
        resolve_image(make_client(), ImageReference("team/api", digest=wrong))


@responses.activate
def test_not_json_manifest():
    responses.add(
        responses.GET, f"{REG}/v2/team/api/manifests/v1", body=b"<html>", content_type="text/html"
    )
    with pytest.raises(UpstreamInvalid):
        resolve_image(make_client(), ImageReference("team/api", tag="v1"))


# -- retries ---------------------------------------------------------------------------


@pytest.fixture
def sleeps(monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr("passthrough.upstream.client.time.sleep", slept.append)
    return slept


@responses.activate
def test_5xx_and_connection_errors_are_retried_with_backoff(sleeps):
    url = f"{REG}/v2/team/api/manifests/v1"
    responses.add(responses.GET, url, status=503)
    responses.add(responses.GET, url, body=requests.ConnectionError())
    responses.add(responses.GET, url, status=502)
    responses.add(responses.GET, url, body=b"{}")
    response = make_client(retry=RetryPolicy(attempts=4)).request(
        "GET", "/v2/team/api/manifests/v1", what="m"
    )
    assert response.status_code == 200
    assert len(sleeps) == 3
    # Exponential with jitter: each pause lies in [ceiling/2, ceiling].
    for attempt, pause in enumerate(sleeps):
        ceiling = min(10.0, 0.5 * 2**attempt)
        assert ceiling / 2 <= pause <= ceiling


@responses.activate
def test_429_retry_after_is_honoured_and_capped(sleeps):
    url = f"{REG}/v2/team/api/manifests/v1"
    responses.add(responses.GET, url, status=429, headers={"Retry-After": "3"})
    responses.add(responses.GET, url, status=429, headers={"Retry-After": "9999"})
    responses.add(responses.GET, url, body=b"{}")
    make_client(retry=RetryPolicy(attempts=4, retry_after_max=20)).request(
        "GET", "/v2/team/api/manifests/v1", what="m"
    )
    assert sleeps == [3.0, 20.0]


@responses.activate
def test_retries_exhausted_give_the_mapped_error(sleeps):
    url = f"{REG}/v2/team/api/manifests/v1"
    responses.add(responses.GET, url, status=429, headers={"Retry-After": "1"})
    with pytest.raises(UpstreamRateLimited) as raised:
        make_client(retry=RetryPolicy(attempts=2)).request(
            "GET", "/v2/team/api/manifests/v1", what="m"
        )
    assert raised.value.headers == {"Retry-After": "1"}
    assert len(sleeps) == 2


@responses.activate
def test_no_retry_waits_past_the_deadline(sleeps):
    import time as _time

    url = f"{REG}/v2/team/api/manifests/v1"
    responses.add(responses.GET, url, status=503, headers={"Retry-After": "30"})
    policy = RetryPolicy(attempts=5, deadline=_time.monotonic() + 5)
    with pytest.raises(UpstreamUnavailable):
        make_client(retry=policy).request("GET", "/v2/team/api/manifests/v1", what="m")
    assert sleeps == []


def test_parse_retry_after():
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


class _Body:
    """A response whose body is chunks, then maybe a broken connection."""

    def __init__(self, chunks, *, length=None, breaks=False):
        self.headers = {} if length is None else {"Content-Length": str(length)}
        self.chunks, self.breaks = chunks, breaks

    def iter_content(self, size):
        yield from self.chunks
        if self.breaks:
            raise requests.exceptions.ChunkedEncodingError("cut")


def test_read_limited_bounds_and_maps_a_broken_connection():
    from passthrough.errors import TooLarge
    from passthrough.upstream.client import read_limited

    assert read_limited(_Body([b"ab", b"cd"]), 4, "doc") == b"abcd"  # type: ignore[arg-type]
    with pytest.raises(TooLarge):
        read_limited(_Body([b"ab"], length=5), 4, "doc")  # type: ignore[arg-type]
    with pytest.raises(TooLarge):
        read_limited(_Body([b"abc", b"de"]), 4, "doc")  # type: ignore[arg-type]
    with pytest.raises(UpstreamInvalid):
        read_limited(_Body([b"abcde"]), 4, "doc", error=UpstreamInvalid)  # type: ignore[arg-type]
    with pytest.raises(UpstreamUnreachable):
        read_limited(_Body([b"ab"], breaks=True), 4, "doc")  # type: ignore[arg-type]
