"""The /v2 pull-through proxy end to end, transparent mode (the shared rig is
tests/e2e/v2proxy/rig.py): the real server under gunicorn in front of the rig's registry
(through a FaultFront that counts and breaks requests), on the filesystem store and on S3
(SeaweedFS), checked against the OCI Distribution spec: headers, byte-for-byte
manifests, the spec's JSON errors, tags revalidated or trusted for TAG_TTL, stale tags
served with a Warning when upstream fails, Range and HEAD. The tee is in
test_v2_proxy_tee.py, skopeo pulls, replicas and S3 redirects in test_v2_proxy_pulls.py:
modules apart, so that they run side by side."""

from __future__ import annotations

import base64
import contextlib
import json
import secrets
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.e2e.v2proxy.rig import (
    API_VERSION,
    EMPTY_CONFIG,
    IMMUTABLE,
    MANIFEST_ACCEPT,
    Layers,
    ServerFactory,
    StoreView,
    assert_manifest,
    blob,
    call,
    check_pulled,
    manifest,
    pushed,
    repository,
    skopeo_pull,
    spec_error,
    upstream_manifest_requests,
)
from tests.support.fronts import FaultFront, RedirectFront
from tests.support.helpers import digest as digest_of
from tests.support.helpers import wait_until
from tests.support.images import (
    OCI_INDEX,
    OCI_MANIFEST,
    Blob,
    build_image,
    build_index,
    push_image,
    push_index,
    push_raw_manifest,
)
from tests.support.registry import ALICE, PUSHER
from tests.support.server import PassthroughServer

# --- the base endpoint and the spec's answers ----------------------------------------------


def test_base_endpoint_answers_200_with_the_api_version(
    serve: Callable[..., PassthroughServer],
) -> None:
    server = serve()
    for path in ("/v2/", "/v2"):
        got = call(f"{server.url}{path}", redirects=True)
        assert got.status == 200, got.describe()
        assert got.headers["Docker-Distribution-API-Version"] == API_VERSION
        assert got.json() == {}
    head = call(f"{server.url}/v2/", "HEAD")
    assert head.status == 200 and head.body == b""
    assert head.headers["Docker-Distribution-API-Version"] == API_VERSION


def test_manifests_by_tag_and_digest_are_the_upstream_bytes(
    serve: Callable[..., PassthroughServer], fault_front: FaultFront, layers: Layers
) -> None:
    image = build_image([layers.small, layers.other])
    oci = build_image([layers.other], kind="oci", annotations={"org.example": "x"})
    index = build_index([oci])
    name = pushed(fault_front.registry, image)
    push_index(fault_front.registry.url, name, "multi", index)
    server = serve()

    for method in ("GET", "HEAD"):
        by_tag = manifest(server, name, "v1", method)
        assert_manifest(by_tag, image, method=method)
        assert by_tag.headers["Docker-Distribution-API-Version"] == API_VERSION
        # A tag moves: its answer must never be cached as immutable.
        assert "immutable" not in by_tag.headers.get("Cache-Control", "")
        by_digest = manifest(server, name, image.digest, method)
        assert_manifest(by_digest, image, method=method)
        assert by_digest.headers["Cache-Control"] == IMMUTABLE

    got_index = manifest(server, name, "multi")
    assert_manifest(got_index, index)
    child = manifest(server, name, oci.digest)
    assert_manifest(child, oci)
    assert child.headers["Cache-Control"] == IMMUTABLE

    # Once a manifest is in the store by digest, asking for it again needs nobody.
    before = upstream_manifest_requests(fault_front, name, image.digest)
    for _ in range(3):
        assert_manifest(manifest(server, name, image.digest), image)
    assert upstream_manifest_requests(fault_front, name, image.digest) == before
    assert upstream_manifest_requests(fault_front, name, "v1") >= 2


def test_manifests_keep_their_formatting_and_a_cold_head_needs_no_body(
    serve: Callable[..., PassthroughServer], fault_front: FaultFront, layers: Layers
) -> None:
    """Byte for byte means whitespace, key order and the final newline too; a HEAD of a
    tag never fetched is answered from upstream's HEAD."""
    image = build_image([layers.small])
    name = pushed(fault_front.registry, image)
    pretty = (json.dumps(json.loads(image.manifest), indent=3, sort_keys=True) + "\n").encode()
    digest = push_raw_manifest(fault_front.registry.url, name, "pretty", pretty, image.media_type)
    server = serve()

    head = manifest(server, name, "pretty", "HEAD")
    assert head.status == 200 and head.body == b"", head.describe()
    assert head.headers["Docker-Content-Digest"] == digest
    assert head.headers["Content-Length"] == str(len(pretty))
    assert head.headers["Content-Type"] == image.media_type
    assert fault_front.count_manifest("GET", name, "pretty") == 0
    for ref in ("pretty", digest):
        got = manifest(server, name, ref)
        assert got.status == 200 and got.body == pretty, got.describe()
        assert got.headers["Docker-Content-Digest"] == digest == digest_of(pretty)


def test_a_manifest_whose_bytes_are_wrong_is_never_served_nor_stored(
    serve: Callable[..., PassthroughServer], fault_front: FaultFront, layers: Layers
) -> None:
    image = build_image([layers.small])
    name = pushed(fault_front.registry, image)
    server = serve()
    fault_front.inject_manifest(name, "corrupt", times=1000)
    by_digest = manifest(server, name, image.digest)
    spec_error(by_digest, (502, 503), "UNAVAILABLE", "UNKNOWN", "MANIFEST_INVALID")
    by_tag = manifest(server, name, "v1")
    # The registry named the tag's digest (HEAD, and on the GET): bytes that do not
    # hash to it are not the tag's manifest, whatever they are.
    assert by_tag.status >= 500 or by_tag.body == image.manifest, by_tag.describe()
    if by_tag.status == 200:
        assert by_tag.headers["Docker-Content-Digest"] == digest_of(by_tag.body)
    fault_front.reset()
    assert_manifest(manifest(server, name, image.digest), image)
    assert_manifest(manifest(server, name, "v1"), image)


def test_an_upstreams_alias_routes_to_that_registry(
    passthrough_server: ServerFactory, fault_front: FaultFront, layers: Layers
) -> None:
    image = build_image([layers.small])
    name = pushed(fault_front.registry, image)
    # No REGISTRY_URL: only the alias leads to the registry.
    server = passthrough_server({"UPSTREAMS": f"rig={fault_front.url}"})
    assert_manifest(manifest(server, f"rig/{name}", "v1"), image)
    got = blob(server, f"rig/{name}", layers.small.digest)
    assert got.status == 200, got.describe()
    assert got.body == layers.small.read()
    assert fault_front.count("GET", layers.small.digest) == 1
    tags = call(f"{server.url}/v2/rig/{name}/tags/list")
    assert tags.status == 200, tags.describe()
    assert tags.json()["tags"] == ["v1"]


def test_blob_get_head_and_range_follow_the_spec(
    serve: Callable[..., PassthroughServer],
    fault_front: FaultFront,
    layers: Layers,
    view: Callable[[PassthroughServer], StoreView],
) -> None:
    image = build_image([layers.big, layers.small])
    name = pushed(fault_front.registry, image)
    server = serve()
    big = layers.big
    data = big.read()
    size = len(data)

    # HEAD of a blob nobody fetched yet: answered from an upstream HEAD, no download.
    head = blob(server, name, big.digest, "HEAD")
    assert head.status == 200, head.describe()
    assert head.body == b""
    assert head.headers["Docker-Content-Digest"] == big.digest
    assert head.headers["Content-Length"] == str(size)
    assert fault_front.count("HEAD", big.digest) == 1
    assert fault_front.count("GET", big.digest) == 0

    # A Range on a miss: 206 with just those bytes.
    first = blob(server, name, big.digest, headers={"Range": "bytes=1000-1999"})
    assert first.status == 206, first.describe()
    assert first.headers["Content-Range"] == f"bytes 1000-1999/{size}"
    assert first.headers["Content-Length"] == "1000"
    assert first.body == data[1000:2000]

    full = blob(server, name, big.digest)
    assert full.status == 200, full.describe()
    assert full.error is None
    assert digest_of(full.body) == big.digest
    assert full.headers["Docker-Content-Digest"] == big.digest
    assert full.headers["Content-Length"] == str(size)
    assert full.headers["Cache-Control"] == IMMUTABLE
    wait_until(lambda: view(server).blob(big.digest) is not None, 30, "the blob's commit")
    fetched = fault_front.count("GET", big.digest)
    assert 1 <= fetched <= 2, f"{fetched} upstream GETs for one blob"

    # Hits: ranges, a suffix range, HEAD, and a range past the end.
    for first_byte, last_byte in ((0, 0), (5 << 20, (5 << 20) + 65535), (size - 10, size - 1)):
        part = blob(server, name, big.digest, headers={"Range": f"bytes={first_byte}-{last_byte}"})
        assert part.status == 206, part.describe()
        assert part.headers["Content-Range"] == f"bytes {first_byte}-{last_byte}/{size}"
        assert part.body == data[first_byte : last_byte + 1]
    tail = blob(server, name, big.digest, headers={"Range": "bytes=-100"})
    assert (tail.status, tail.body) == (206, data[-100:])
    warm_head = blob(server, name, big.digest, "HEAD")
    assert warm_head.status == 200 and warm_head.body == b""
    assert warm_head.headers["Content-Length"] == str(size)
    assert warm_head.headers["Docker-Content-Digest"] == big.digest
    beyond = blob(server, name, big.digest, headers={"Range": f"bytes={size}-"})
    assert beyond.status == 416, beyond.describe()
    assert fault_front.count("GET", big.digest) == fetched, "a hit went upstream"

    # The config is a blob like any other.
    config = blob(server, name, image.config_digest)
    assert (config.status, config.body) == (200, image.config)
    # The client has its last byte once the blob is verified, maybe before the commit
    # (an upload to S3) is done; the part goes then.
    wait_until(lambda: view(server).partials() == [], 20, "no unfinished write left")


def test_errors_are_the_specs_json_and_never_cached(
    serve: Callable[..., PassthroughServer], fault_front: FaultFront, layers: Layers
) -> None:
    image = build_image([layers.small])
    name = pushed(fault_front.registry, image)
    server = serve()
    missing_digest = digest_of(b"no such content " + secrets.token_bytes(8))

    spec_error(manifest(server, name, "nope"), 404, "MANIFEST_UNKNOWN")
    spec_error(manifest(server, name, missing_digest), 404, "MANIFEST_UNKNOWN")
    spec_error(
        manifest(server, repository("absent"), "v1"), 404, "MANIFEST_UNKNOWN", "NAME_UNKNOWN"
    )
    spec_error(blob(server, name, missing_digest), 404, "BLOB_UNKNOWN")
    head = blob(server, name, missing_digest, "HEAD")
    assert head.status == 404 and head.body == b"", head.describe()
    spec_error(call(f"{server.url}/v2/{repository('absent')}/tags/list"), 404, "NAME_UNKNOWN")
    # Bad input is a clear 4xx, never a 5xx nor an upstream request.
    spec_error(blob(server, name, "sha256:not-hex"), (400, 404), "DIGEST_INVALID", "BLOB_UNKNOWN")
    spec_error(manifest(server, "Upper/Case", "v1"), (400, 404), "NAME_INVALID", "NAME_UNKNOWN")
    spec_error(
        manifest(server, name, "bad:tag!"),
        (400, 404),
        "DIGEST_INVALID",  # with a colon it can only be a digest
        "MANIFEST_UNKNOWN",
    )
    spec_error(manifest(server, name, "-leading"), (400, 404), "TAG_INVALID", "MANIFEST_UNKNOWN")
    assert fault_front.count_manifest("GET", "Upper/Case", "v1") == 0

    # A 404 is not remembered: the tag and the blob appear upstream, and are served.
    newer = build_image([layers.other])
    push_image(fault_front.registry.url, name, "nope", newer)
    assert_manifest(manifest(server, name, "nope"), newer)
    got = blob(server, name, layers.other.digest)
    assert (got.status, got.body) == (200, layers.other.read())
    spec_error(blob(server, name, missing_digest), 404, "BLOB_UNKNOWN")
    assert fault_front.count("GET", missing_digest) + fault_front.count("HEAD", missing_digest) >= 2


def test_a_host_the_client_names_must_pass_the_outbound_policy(
    serve: Callable[..., PassthroughServer],
) -> None:
    """A host-like first component or ?ns= names the upstream: a link-local address
    (cloud metadata) is refused with the spec's error before any connection."""
    server = serve()
    for path in (
        "/v2/169.254.169.254/latest/manifests/v1",
        "/v2/latest/meta/manifests/v1?ns=169.254.169.254",
        "/v2/169.254.169.254/latest/blobs/" + digest_of(b"x"),
    ):
        got = call(f"{server.url}{path}", headers={"Accept": MANIFEST_ACCEPT})
        spec_error(got, (400, 403), "DENIED", "NAME_INVALID", "UNSUPPORTED")
        assert "169.254.169.254" not in got.headers.get("Location", "")


def test_tags_list_with_n_and_last(
    serve: Callable[..., PassthroughServer], fault_front: FaultFront, layers: Layers
) -> None:
    image = build_image([layers.small])
    name = repository()
    tags = ["a1", "b2", "c3", "d4", "e5"]
    for tag in tags:
        push_image(fault_front.registry.url, name, tag, image)
    server = serve()
    url = f"{server.url}/v2/{name}/tags/list"

    whole = call(url)
    assert whole.status == 200, whole.describe()
    assert whole.headers["Content-Type"].startswith("application/json")
    assert whole.json() == {"name": name, "tags": tags}

    page = call(f"{url}?n=2")
    assert page.status == 200, page.describe()
    assert page.json() == {"name": name, "tags": ["a1", "b2"]}
    link = page.headers.get("Link", "")
    assert 'rel="next"' in link, page.describe()
    # The next page's link leads back to the proxy, never to the upstream registry.
    assert fault_front.host not in link
    following = call(f"{url}?n=2&last=b2")
    assert following.json() == {"name": name, "tags": ["c3", "d4"]}
    last = call(f"{url}?n=2&last=d4")
    assert last.json() == {"name": name, "tags": ["e5"]}
    spec_error(call(f"{url}?n=lots"), 400, "PAGINATION_NUMBER_INVALID", "UNSUPPORTED")


def test_referrers_answer_an_index_filtered_by_artifact_type(
    serve: Callable[..., PassthroughServer], fault_front: FaultFront, layers: Layers
) -> None:
    """The rig's registry (distribution 2.8) has no referrers API: clients push the
    spec's fallback tag (sha256-<hex>, an index of the referrers) and the proxy must
    answer GET /v2/<name>/referrers/<digest> from it."""
    image = build_image([layers.small], kind="oci")
    name = pushed(fault_front.registry, image)
    signature = Blob(
        digest_of(b"a signature"), len(b"a signature"), "application/octet-stream", b"a signature"
    )
    artifact_type = "application/vnd.example.signature.v1"
    artifact_raw = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": artifact_type,
            "config": EMPTY_CONFIG.descriptor(),
            "layers": [signature.descriptor()],
            "subject": image.descriptor(platform=False),
            "annotations": {"org.example.kind": "signature"},
        },
        separators=(",", ":"),
    ).encode()
    artifact_digest = digest_of(artifact_raw)
    push_raw_manifest(
        fault_front.registry.url,
        name,
        artifact_digest,
        artifact_raw,
        OCI_MANIFEST,
        blobs=[EMPTY_CONFIG, signature],
    )
    descriptor = {
        "mediaType": OCI_MANIFEST,
        "digest": artifact_digest,
        "size": len(artifact_raw),
        "artifactType": artifact_type,
        "annotations": {"org.example.kind": "signature"},
    }
    fallback = json.dumps(
        {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [descriptor]}
    ).encode()
    push_raw_manifest(
        fault_front.registry.url,
        name,
        "sha256-" + image.digest.split(":", 1)[1],
        fallback,
        OCI_INDEX,
    )
    server = serve()
    url = f"{server.url}/v2/{name}/referrers/{image.digest}"

    got = call(url)
    assert got.status == 200, got.describe()
    assert got.headers["Content-Type"].startswith(OCI_INDEX)
    found = got.json()
    assert found["schemaVersion"] == 2 and found["mediaType"] == OCI_INDEX
    assert [m["digest"] for m in found["manifests"]] == [artifact_digest], got.describe()
    assert found["manifests"][0]["artifactType"] == artifact_type

    wanted = call(f"{url}?artifactType={artifact_type}")
    assert wanted.status == 200
    assert [m["digest"] for m in wanted.json()["manifests"]] == [artifact_digest]
    assert wanted.headers.get("OCI-Filters-Applied") == "artifactType"
    other = call(f"{url}?artifactType=application/vnd.example.other")
    assert other.status == 200 and other.json()["manifests"] == []
    assert other.headers.get("OCI-Filters-Applied") == "artifactType"

    # A digest nobody refers to: an empty index, never 404 (the spec forbids it).
    lonely = call(f"{server.url}/v2/{name}/referrers/{digest_of(b'lonely')}")
    assert lonely.status == 200, lonely.describe()
    assert lonely.json()["manifests"] == []
    bad = call(f"{server.url}/v2/{name}/referrers/sha256:zz")
    assert bad.status == 400, bad.describe()
    # The artifact itself is a manifest by digest like any other.
    art = manifest(server, name, artifact_digest)
    assert art.status == 200 and art.body == artifact_raw, art.describe()


# --- tags: revalidated, or trusted for TAG_TTL; stale when upstream fails -------------------


def test_tags_are_revalidated_on_every_request_by_default(
    serve: Callable[..., PassthroughServer], fault_front: FaultFront, layers: Layers
) -> None:
    first = build_image([layers.small])
    name = pushed(fault_front.registry, first)
    server = serve()
    for n in range(1, 4):
        assert_manifest(manifest(server, name, "v1"), first)
        assert upstream_manifest_requests(fault_front, name, "v1") >= n
    # Revalidation is a HEAD: the manifest body is fetched once (by tag or by digest).
    bodies = fault_front.count_manifest("GET", name, "v1") + fault_front.count_manifest(
        "GET", name, first.digest
    )
    assert bodies == 1, f"{bodies} manifest GETs upstream for three requests of one tag"

    # The tag moves upstream: the very next request sees it.
    second = build_image([layers.other])
    push_image(fault_front.registry.url, name, "v1", second)
    assert_manifest(manifest(server, name, "v1"), second)
    assert_manifest(manifest(server, name, first.digest), first)


def test_a_tag_trusted_for_tag_ttl_is_revalidated_after_it(
    serve: Callable[..., PassthroughServer], fault_front: FaultFront, layers: Layers
) -> None:
    first = build_image([layers.small])
    name = pushed(fault_front.registry, first)
    server = serve({"TAG_TTL": "1"})
    assert_manifest(manifest(server, name, "v1"), first)
    second = build_image([layers.other])
    push_image(fault_front.registry.url, name, "v1", second)
    wait_until(
        lambda: manifest(server, name, "v1").body == second.manifest, 30, "TAG_TTL to expire"
    )
    assert_manifest(manifest(server, name, "v1"), second)


def test_tag_ttl_trusts_a_tag_for_that_long(
    serve: Callable[..., PassthroughServer], fault_front: FaultFront, layers: Layers
) -> None:
    first = build_image([layers.small])
    name = pushed(fault_front.registry, first)
    server = serve({"TAG_TTL": "3600"})
    assert_manifest(manifest(server, name, "v1"), first)
    seen = upstream_manifest_requests(fault_front, name, "v1")
    assert seen >= 1
    second = build_image([layers.other])
    push_image(fault_front.registry.url, name, "v1", second)
    for method in ("GET", "HEAD", "GET"):
        assert_manifest(manifest(server, name, "v1", method), first, method=method)
    assert upstream_manifest_requests(fault_front, name, "v1") == seen, "TAG_TTL was not trusted"


@pytest.mark.parametrize("fault", ["503", "429", "unreachable"])
def test_a_tag_seen_before_is_served_stale_when_upstream_fails(
    serve: Callable[..., PassthroughServer],
    fault_front: FaultFront,
    layers: Layers,
    fault: str,
) -> None:
    image = build_image([layers.small])
    name = pushed(fault_front.registry, image)
    cold = repository("cold")
    push_image(fault_front.registry.url, cold, "v1", image)
    server = serve()
    assert_manifest(manifest(server, name, "v1"), image)
    assert blob(server, name, layers.small.digest).status == 200
    assert "Warning" not in manifest(server, name, "v1").headers

    if fault == "unreachable":
        fault_front.stop()
    else:
        fault_front.inject_manifest(None, fault, times=1000)  # type: ignore[arg-type]
    for method in ("GET", "HEAD"):
        stale = manifest(server, name, "v1", method)
        assert_manifest(stale, image, method=method)
        # RFC 9111's 110 (Response is Stale) or 111 (Revalidation Failed).
        assert stale.headers.get("Warning", "")[:4] in ("110 ", "111 "), stale.describe()
    # What is immutable needs no upstream at all.
    assert_manifest(manifest(server, name, image.digest), image)
    hit = blob(server, name, layers.small.digest)
    assert (hit.status, hit.body) == (200, layers.small.read())

    # A tag never seen: nothing to serve, an error that names the upstream's answer.
    miss = manifest(server, cold, "v1")
    if fault == "429":
        error = spec_error(miss, 429, "TOOMANYREQUESTS")
        assert miss.headers.get("Retry-After"), miss.describe()
    elif fault == "503":
        error = spec_error(miss, (502, 503), "UNAVAILABLE", "UNKNOWN")
        assert "503" in error["message"], miss.describe()
    else:
        error = spec_error(miss, (502, 503, 504), "UNAVAILABLE", "UNKNOWN")
    assert fault_front.host in error["message"] or "upstream" in error["message"].lower(), (
        miss.describe()
    )

    if fault != "unreachable":
        # The failures were not cached: upstream back, the cold tag is served.
        fault_front.reset()
        assert_manifest(manifest(server, cold, "v1"), image)
        assert "Warning" not in manifest(server, name, "v1").headers


def test_without_serve_stale_an_upstream_failure_is_an_error(
    serve: Callable[..., PassthroughServer], fault_front: FaultFront, layers: Layers
) -> None:
    image = build_image([layers.small])
    name = pushed(fault_front.registry, image)
    server = serve({"PROXY_SERVE_STALE": "false"})
    assert_manifest(manifest(server, name, "v1"), image)
    fault_front.inject_manifest(name, "503", times=1000)
    spec_error(manifest(server, name, "v1"), (502, 503), "UNAVAILABLE", "UNKNOWN")
    # By digest it is still immutable content from the store.
    assert_manifest(manifest(server, name, image.digest), image)


@pytest.mark.parametrize("fault", ["429", "503"])
def test_a_blob_miss_while_upstream_fails_is_an_error_and_not_remembered(
    serve: Callable[..., PassthroughServer],
    fault_front: FaultFront,
    layers: Layers,
    view: Callable[[PassthroughServer], StoreView],
    fault: str,
) -> None:
    name = pushed(fault_front.registry, build_image([layers.small]))
    server = serve()
    digest = layers.small.digest
    fault_front.inject(digest, kind=fault, times=50, retry_after=7)  # type: ignore[arg-type]
    failed = blob(server, name, digest)
    if fault == "429":
        spec_error(failed, 429, "TOOMANYREQUESTS")
        assert failed.headers.get("Retry-After") == "7", failed.describe()
    else:
        spec_error(failed, (502, 503), "UNAVAILABLE", "UNKNOWN")
    assert "immutable" not in failed.headers.get("Cache-Control", "")
    assert view(server).blob(digest) is None
    fault_front.reset()
    good = blob(server, name, digest)
    assert (good.status, good.body) == (200, layers.small.read()), good.describe()


def test_a_private_upstream_refusing_the_services_identity_is_denied_not_challenged(
    passthrough_server: ServerFactory, fault_front_token: FaultFront, layers: Layers
) -> None:
    """Transparent mode, no REGISTRY_AUTH_FILE: upstream's 401 is for the service, and
    a challenge would send the client's credentials nowhere useful."""
    name = repository("private")
    push_image(
        fault_front_token.registry.url,
        name,
        "v1",
        build_image([layers.small]),
        auth=(PUSHER.username, PUSHER.password),
    )
    server = passthrough_server({"REGISTRY_URL": fault_front_token.url})
    for got in (manifest(server, name, "v1"), blob(server, name, layers.small.digest)):
        spec_error(got, 403, "DENIED")
        assert "WWW-Authenticate" not in got.headers, got.describe()


def test_registry_auth_file_credentials_and_blob_redirects_without_authorization(
    passthrough_server: ServerFactory,
    redirect_front_token: RedirectFront,
    layers: Layers,
    tmp_path: Path,
) -> None:
    """The service's own identity (REGISTRY_AUTH_FILE) reads a private repository of a
    registry that redirects blobs to a signed URL, which must get no Authorization."""
    image = build_image([layers.small, layers.other])
    name = repository("private")
    push_image(
        redirect_front_token.registry.url,
        name,
        "v1",
        image,
        auth=(PUSHER.username, PUSHER.password),
    )
    raw = base64.b64encode(f"{ALICE.username}:{ALICE.password}".encode()).decode()
    auth_file = tmp_path / "auth.json"
    auth_file.write_text(json.dumps({"auths": {redirect_front_token.host: {"auth": raw}}}))
    server = passthrough_server(
        {"REGISTRY_URL": redirect_front_token.url, "REGISTRY_AUTH_FILE": str(auth_file)}
    )
    assert_manifest(manifest(server, name, "v1"), image)
    for layer in image.layers:
        got = blob(server, name, layer.digest)
        assert (got.status, digest_of(got.body)) == (200, layer.digest), got.describe()
    host = redirect_front_token.blob_host
    assert host.requests >= len(image.layers)
    assert host.requests_with_authorization == 0, "a signed blob URL got the credentials"
    assert ALICE.password not in server.log_text()
    if "CACHE_DIR" in server.overrides:
        for path in Path(server.overrides["CACHE_DIR"]).rglob("*"):
            # Parts come and go (committed meanwhile): read what is still there.
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                content = path.read_bytes()
                assert ALICE.password.encode() not in content, path
                assert raw.encode() not in content, path
    skopeo_pull(server, f"{name}:v1", tmp_path / "pulled")
    check_pulled(tmp_path / "pulled", image)
