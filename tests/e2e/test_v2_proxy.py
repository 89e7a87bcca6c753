"""The /v2 pull-through proxy end to end, transparent mode: the real server under
gunicorn in front of the rig's registry (through a FaultFront that counts and breaks
requests), on the filesystem store and on S3 (SeaweedFS), checked against the OCI
Distribution spec: headers, byte-for-byte manifests, the spec's JSON errors, tags
revalidated or trusted for TAG_TTL, stale tags served with a Warning when upstream
fails, blobs teed into the store (one upstream GET however many clients, followers
reading the growing file, a wrong digest never committed and its transfer aborted),
Range and HEAD, S3 redirects, and skopeo pulling through it all."""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import random
import re
import secrets
import signal
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import urllib3

from tests.e2e.test_cache import HoldingFront, read_then_reset, worker_pids
from tests.support.fixtures_matrix import s3_env
from tests.support.fronts import FaultFront, RedirectFront
from tests.support.helpers import digest as digest_of
from tests.support.helpers import wait_until
from tests.support.images import (
    OCI_INDEX,
    OCI_MANIFEST,
    Blob,
    File,
    Image,
    Layer,
    big_layer,
    build_image,
    build_index,
    make_layer,
    push_image,
    push_index,
    push_raw_manifest,
    tar_layer,
)
from tests.support.loaders import LoaderError, skopeo_copy
from tests.support.redis_server import RedisServer
from tests.support.registry import ALICE, PUSHER, RegistryServer
from tests.support.seaweed import SeaweedS3
from tests.support.server import PassthroughServer

ServerFactory = Callable[..., PassthroughServer]

API_VERSION = "registry/2.0"
IMMUTABLE = "public, max-age=31536000, immutable"
MANIFEST_ACCEPT = ", ".join(
    [
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
)
CONCURRENT = 8
EMPTY_CONFIG = Blob(digest_of(b"{}"), 2, "application/vnd.oci.empty.v1+json", b"{}")


# --- the store under test -----------------------------------------------------------------


@pytest.fixture(scope="module", params=["filesystem", "s3"])
def store_kind(request: pytest.FixtureRequest) -> str:
    """Every test that starts its server through `passthrough_server` runs on both."""
    return str(request.param)


@dataclass
class StoreView:
    """What one server's store holds, read behind its back (the cache directory, or the
    bucket under its prefix): committed blobs and leftovers of unfinished writes."""

    server: PassthroughServer
    seaweed: SeaweedS3 | None

    @property
    def env(self) -> Mapping[str, str]:
        return self.server.overrides

    def _s3_keys(self, prefix: str) -> list[str]:
        assert self.seaweed is not None
        client = self.seaweed.client()
        full = self.env["S3_PREFIX"] + prefix
        keys: list[str] = []
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=self.env["S3_BUCKET"], Prefix=full
        ):
            keys += [item["Key"] for item in page.get("Contents", ())]
        return keys

    def blob(self, digest: str) -> bytes | None:
        """The committed bytes of blob `digest`, or None when there is no such entry."""
        hex_digest = digest.split(":", 1)[1]
        if "CACHE_DIR" in self.env and self.env.get("STORE") != "s3":
            directory = Path(self.env["CACHE_DIR"]) / "blobs" / "sha256"
            if not directory.is_dir():
                return None
            for path in directory.iterdir():
                if path.name.split("-")[0] == hex_digest:
                    return path.read_bytes()
            return None
        keys = self._s3_keys(f"blobs/sha256/{hex_digest}")
        if not keys:
            return None
        assert self.seaweed is not None
        body = self.seaweed.client().get_object(Bucket=self.env["S3_BUCKET"], Key=keys[0])
        data: bytes = body["Body"].read()
        return data

    def growing(self) -> list[Path]:
        """The read-through's growing files (grow-<hex>.<pid>.<token>.part)."""
        if "CACHE_DIR" in self.env and self.env.get("STORE") != "s3":
            roots = [Path(self.env["CACHE_DIR"]) / "tmp"]
        else:
            roots = list(self.server.tmpdir.glob("passthrough-s3-*/tmp"))
        return sorted(p for root in roots if root.is_dir() for p in root.glob("grow-*.part"))

    def partials(self) -> list[str]:
        """Files of writes not finished: the cache's tmp/, and the server's TMPDIR."""
        found = list(self.server.leftover_temp_files())
        if "CACHE_DIR" in self.env and self.env.get("STORE") != "s3":
            tmp = Path(self.env["CACHE_DIR"]) / "tmp"
            if tmp.is_dir():
                found += list(tmp.iterdir())
        return unfinished(found)


def unfinished(paths: list[Path]) -> list[str]:
    """`paths` but for the read-through's state files (flight-<hex>.json), which outlive
    a fetch on purpose: followers behind it, and the record of a failure."""
    return [str(p) for p in paths if not re.fullmatch(r"flight-[0-9a-f]{64}\.json", p.name)]


@pytest.fixture
def view(
    request: pytest.FixtureRequest, store_kind: str
) -> Callable[[PassthroughServer], StoreView]:
    seaweed = request.getfixturevalue("seaweed") if store_kind == "s3" else None
    return lambda server: StoreView(server, seaweed)


# --- images -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layers:
    small: Layer
    other: Layer
    big: Layer  # bigger than any socket buffer: a transfer of it really streams


@pytest.fixture(scope="module")
def layers(tmp_path_factory: pytest.TempPathFactory) -> Layers:
    root = tmp_path_factory.mktemp("v2-layers")
    rng = random.Random(4242)
    return Layers(
        small=make_layer(tar_layer([File("data/small.bin", rng.randbytes(300_000))])),
        other=make_layer(tar_layer([File("data/other.bin", rng.randbytes(200_000))])),
        big=big_layer(root / "big.gz", 12 << 20, seed=4243, name="data/big.bin"),
    )


def repository(prefix: str = "proxy") -> str:
    """A repository no other test uses (the registry is shared by the session)."""
    return f"{prefix}/r{secrets.token_hex(5)}"


def pushed(registry: RegistryServer, image: Image, tag: str = "v1", prefix: str = "proxy") -> str:
    name = repository(prefix)
    push_image(registry.url, name, tag, image)
    return name


# --- a client -----------------------------------------------------------------------------


def _session() -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    return session


@dataclass
class Answer:
    """One answer as the client saw it; `error` says how a broken transfer broke."""

    status: int
    headers: requests.structures.CaseInsensitiveDict[str]
    body: bytes
    error: BaseException | None = None

    def json(self) -> Any:
        return json.loads(self.body)

    def describe(self) -> str:
        return f"HTTP {self.status} {dict(self.headers)} error={self.error!r} {self.body[:400]!r}"


def call(
    url: str,
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
    *,
    redirects: bool = False,
    timeout: float = 120.0,
) -> Answer:
    with (
        _session() as session,
        session.request(
            method,
            url,
            headers=dict(headers or {}),
            stream=True,
            allow_redirects=redirects,
            timeout=timeout,
        ) as response,
    ):
        body = bytearray()
        error: BaseException | None = None
        try:
            for chunk in response.iter_content(1 << 16):
                body += chunk
        except (
            requests.exceptions.ChunkedEncodingError,
            requests.exceptions.ConnectionError,
        ) as exc:
            error = exc
        return Answer(response.status_code, response.headers, bytes(body), error)


def manifest(server: PassthroughServer, name: str, ref: str, method: str = "GET") -> Answer:
    return call(f"{server.url}/v2/{name}/manifests/{ref}", method, {"Accept": MANIFEST_ACCEPT})


def blob(
    server: PassthroughServer,
    name: str,
    digest: str,
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
) -> Answer:
    return call(f"{server.url}/v2/{name}/blobs/{digest}", method, headers)


def spec_error(answer: Answer, status: int | tuple[int, ...], *codes: str) -> dict[str, Any]:
    """The answer is the spec's error document with one of `codes`; returns the error."""
    statuses = (status,) if isinstance(status, int) else status
    assert answer.status in statuses, answer.describe()
    assert answer.headers.get("Content-Type", "").startswith("application/json"), answer.describe()
    errors = answer.json()["errors"]
    assert errors and all({"code", "message"} <= set(e) for e in errors), answer.describe()
    assert errors[0]["code"] in codes, answer.describe()
    return dict(errors[0])


def assert_manifest(answer: Answer, image: Image | Any, *, method: str = "GET") -> None:
    """The spec's manifest answer: exact bytes, media type, digest and length."""
    assert answer.status == 200, answer.describe()
    assert answer.headers["Docker-Content-Digest"] == image.digest
    assert answer.headers["Content-Type"] == image.media_type
    assert answer.headers["Content-Length"] == str(len(image.manifest))
    if method == "GET":
        assert answer.body == image.manifest, "the manifest was not returned byte for byte"
    else:
        assert answer.body == b""


def upstream_manifest_requests(front: FaultFront, name: str, ref: str) -> int:
    return front.count_manifest("GET", name, ref) + front.count_manifest("HEAD", name, ref)


def blob_requests(front: FaultFront, digest: str) -> int:
    return front.count("GET", digest) + front.count("HEAD", digest)


@pytest.fixture
def serve(
    passthrough_server: ServerFactory, fault_front: FaultFront
) -> Callable[..., PassthroughServer]:
    """A server (on the module's store) whose default upstream is the fault front."""

    def start(env: Mapping[str, str] | None = None, **kw: Any) -> PassthroughServer:
        return passthrough_server({"REGISTRY_URL": fault_front.url, **(env or {})}, **kw)

    return start


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


# --- the tee: stream while storing, one upstream GET, verify before commit ------------------


def test_a_miss_streams_to_the_client_and_followers_read_the_growing_file(
    passthrough_server: ServerFactory,
    registry_anon: RegistryServer,
    layers: Layers,
    view: Callable[[PassthroughServer], StoreView],
) -> None:
    """Upstream holds the blob after 4 MiB: the first client gets those bytes before
    upstream finishes (streamed, not stored then forwarded), and so does a second client
    that comes while the fetch is held (it reads the growing file from the start)."""
    big = layers.big
    data = big.read()
    name = pushed(registry_anon, build_image([big]))
    with HoldingFront(registry_anon, big.digest, after=4 << 20) as front:
        server = passthrough_server({"REGISTRY_URL": front.url})
        url = f"{server.url}/v2/{name}/blobs/{big.digest}"
        heads: list[bytes] = []
        rests: list[bytes] = []
        got_head = [threading.Event(), threading.Event()]
        errors: list[BaseException] = []

        def client(i: int) -> None:
            try:
                with _session() as session, session.get(url, stream=True, timeout=120) as r:
                    assert r.status_code == 200, r.status_code
                    assert r.headers["Content-Length"] == str(len(data))
                    heads.append(r.raw.read(1 << 20))
                    got_head[i].set()
                    rests.append(heads[-1] + r.raw.read())
            except BaseException as exc:
                errors.append(exc)
                got_head[i].set()

        leader = threading.Thread(target=client, args=(0,))
        leader.start()
        wait_until(front.reached.is_set, 30, "the upstream fetch to reach the hold")
        assert got_head[0].wait(30), "the first client got nothing while upstream was held"
        follower = threading.Thread(target=client, args=(1,))
        follower.start()
        assert got_head[1].wait(30), "a second client got nothing while the fetch was held"
        assert not errors, errors
        assert heads == [data[: 1 << 20]] * 2
        # Nothing is committed before the whole blob is there and verified.
        assert view(server).blob(big.digest) is None
        front.release()
        leader.join(120)
        follower.join(120)
        assert not errors, errors
        assert [digest_of(r) for r in rests] == [big.digest] * 2
        assert front.count("GET", big.digest) == 1
        wait_until(lambda: view(server).blob(big.digest) is not None, 30, "the commit")
        assert view(server).blob(big.digest) == data


def test_concurrent_misses_of_one_blob_make_one_upstream_get(
    serve: Callable[..., PassthroughServer],
    fault_front: FaultFront,
    layers: Layers,
    view: Callable[[PassthroughServer], StoreView],
) -> None:
    big = layers.big
    name = pushed(fault_front.registry, build_image([big]))
    server = serve(workers=2, threads=8)
    answers = at_once(CONCURRENT, lambda _: blob(server, name, big.digest))
    for got in answers:
        assert got.status == 200 and got.error is None, got.describe()
        assert digest_of(got.body) == big.digest
    assert fault_front.count("GET", big.digest) == 1
    # The last byte goes out once the blob is verified; the commit (an upload to S3)
    # may end a moment later.
    wait_until(lambda: view(server).blob(big.digest) == big.read(), 30, "the commit")
    wait_until(lambda: view(server).partials() == [], 20, "no unfinished write left")


def test_a_blob_whose_bytes_are_wrong_is_never_committed_and_its_transfer_aborts(
    serve: Callable[..., PassthroughServer],
    fault_front: FaultFront,
    layers: Layers,
    view: Callable[[PassthroughServer], StoreView],
) -> None:
    big = layers.big
    data = big.read()
    name = pushed(fault_front.registry, build_image([big]))
    server = serve()
    # One flipped byte in the middle: same length, wrong digest. Three clients read the
    # whole blob and one its last 100 bytes, all during that one fetch (or just after
    # it failed).
    fault_front.inject(big.digest, kind="corrupt", cut_after=len(data) // 2)
    wanted = [None, None, None, "bytes=-100"]

    def one(i: int) -> Answer:
        byte_range = wanted[i]
        headers = {"Range": byte_range} if byte_range else {}
        return blob(server, name, big.digest, headers=headers)

    aborted = refetched = 0
    for byte_range, bad in zip(wanted, at_once(len(wanted), one), strict=True):
        if bad.status >= 500:
            continue  # came after the fetch failed: told so, before any byte
        assert bad.status == (206 if byte_range else 200), bad.describe()
        expected = data[-100:] if byte_range else data
        if bad.error is None:
            # A clean end is only right with the right bytes: a reader that came once
            # the failed fetch let go of the blob and fetched it again (good this time).
            assert bad.body == expected, (
                f"a corrupt blob ended cleanly ({len(bad.body)} bytes, Range {byte_range}): "
                "the client cannot tell it from a good one"
            )
            refetched += 1
        else:
            assert bad.body != expected
            aborted += 1
    # A fast fetch may fail before anyone attached (then all came late): that it
    # aborts every reader attached to it is the next test's.
    assert aborted + refetched >= 1 or fault_front.faults[0].fired == 1
    assert fault_front.faults[0].fired == 1
    assert fault_front.count("GET", big.digest) == 1 + (1 if refetched else 0)
    wait_until(lambda: view(server).partials() == [], 20, "the aborted write to be removed")
    stored = view(server).blob(big.digest)
    assert stored is None or stored == data, "a blob with a wrong digest was committed"
    if not refetched:
        assert stored is None

    good = blob(server, name, big.digest)
    assert good.status == 200 and good.error is None, good.describe()
    assert digest_of(good.body) == big.digest
    assert fault_front.count("GET", big.digest) == 2
    wait_until(lambda: view(server).blob(big.digest) is not None, 30, "the good commit")
    assert view(server).blob(big.digest) == data


def test_every_reader_attached_to_a_corrupt_fetch_is_aborted(
    passthrough_server: ServerFactory,
    registry_anon: RegistryServer,
    layers: Layers,
    view: Callable[[PassthroughServer], StoreView],
) -> None:
    """Upstream holds the corrupt blob after 4 MiB until three readers have each read
    1 MiB of the growing file: all three follow that fetch, and all three must see
    their transfer break when the digest turns out wrong."""
    big = layers.big
    data = big.read()
    name = pushed(registry_anon, build_image([big]))
    with HoldingFront(registry_anon, big.digest, after=4 << 20) as front:
        front.inject(big.digest, kind="corrupt", cut_after=len(data) // 2)
        server = passthrough_server({"REGISTRY_URL": front.url}, workers=2, threads=8)
        url = f"{server.url}/v2/{name}/blobs/{big.digest}"
        attached = [threading.Event() for _ in range(3)]
        outcomes: list[str | None] = [None] * 3

        def read(i: int) -> None:
            received = b""
            try:
                with _session() as session, session.get(url, stream=True, timeout=120) as r:
                    received = r.raw.read(1 << 20)
                    attached[i].set()
                    received += r.raw.read()
                    ended_cleanly = len(received) == len(data)
                    outcomes[i] = "clean" if ended_cleanly else "short"
                    if ended_cleanly:
                        outcomes[i] = "clean-good" if received == data else "clean-corrupt"
            except (
                requests.RequestException,
                urllib3.exceptions.HTTPError,
                http.client.HTTPException,
                OSError,
            ):
                outcomes[i] = "broken"
            finally:
                attached[i].set()

        readers = [threading.Thread(target=read, args=(i,)) for i in range(3)]
        for reader in readers:
            reader.start()
        for event in attached:
            assert event.wait(60), "a reader got nothing from the growing file"
        front.release()
        for reader in readers:
            reader.join(120)
        assert outcomes.count("clean-corrupt") == 0, outcomes
        assert set(outcomes) <= {"broken", "short"}, outcomes
        assert front.count("GET", big.digest) == 1
        wait_until(lambda: view(server).partials() == [], 20, "the aborted write to be removed")
        assert view(server).blob(big.digest) is None


def test_a_client_that_leaves_a_miss_does_not_stop_the_fetch(
    passthrough_server: ServerFactory,
    registry_anon: RegistryServer,
    layers: Layers,
    view: Callable[[PassthroughServer], StoreView],
) -> None:
    big = layers.big
    name = pushed(registry_anon, build_image([big]))
    with HoldingFront(registry_anon, big.digest, after=6 << 20) as front:
        server = passthrough_server({"REGISTRY_URL": front.url})
        read_then_reset(f"{server.url}/v2/{name}/blobs/{big.digest}", 2 << 20)
        wait_until(front.reached.is_set, 30, "the fetch to reach the hold")
        front.release()
        wait_until(lambda: view(server).blob(big.digest) is not None, 60, "the commit")
        got = blob(server, name, big.digest)
        assert got.status == 200 and digest_of(got.body) == big.digest, got.describe()
        assert front.count("GET", big.digest) == 1
        wait_until(lambda: view(server).partials() == [], 20, "no unfinished write left")


def test_readers_of_a_fetch_whose_worker_dies_abort_or_get_the_whole_blob(
    passthrough_server: ServerFactory,
    registry_anon: RegistryServer,
    layers: Layers,
    view: Callable[[PassthroughServer], StoreView],
) -> None:
    """SIGKILL the worker that fetches (its pid is in the growing file's name) while
    four clients read the miss: none may hang or end cleanly with wrong bytes, and the
    next request fetches again and is whole."""
    big = layers.big
    data = big.read()
    name = pushed(registry_anon, build_image([big]))
    with HoldingFront(registry_anon, big.digest, after=4 << 20) as front:
        server = passthrough_server({"REGISTRY_URL": front.url}, workers=2, threads=8)
        wait_until(lambda: len(worker_pids(server)) == 2, 30, "two workers")
        results: list[Answer | BaseException | None] = [None] * 4

        def read(i: int) -> None:
            try:
                results[i] = blob(server, name, big.digest)
            except requests.RequestException as exc:
                results[i] = exc  # the connection died before the headers: an abort

        readers = [threading.Thread(target=read, args=(i,)) for i in range(len(results))]
        for reader in readers:
            reader.start()
        wait_until(front.reached.is_set, 30, "the fetch to reach the hold")
        wait_until(lambda: bool(view(server).growing()), 30, "the growing file")
        fetcher = int(view(server).growing()[0].name.split(".")[1])
        assert fetcher in worker_pids(server), "the growing file names no worker"
        os.kill(fetcher, signal.SIGKILL)
        front.release()
        for reader in readers:
            reader.join(180)
        for got in results:
            assert got is not None, "a reader hung after the fetching worker died"
            if isinstance(got, BaseException):
                continue
            if got.status == 200 and got.error is None:
                assert digest_of(got.body) == big.digest, "a dead fetch ended cleanly"
            else:
                assert got.error is not None or got.status >= 500, got.describe()
        stored = view(server).blob(big.digest)
        assert stored is None or stored == data
        again = blob(server, name, big.digest)
        assert again.status == 200 and again.error is None, again.describe()
        assert digest_of(again.body) == big.digest
        wait_until(lambda: view(server).blob(big.digest) == data, 30, "the commit")


def test_upstream_cut_mid_blob_leaves_nothing_partial(
    serve: Callable[..., PassthroughServer],
    fault_front: FaultFront,
    layers: Layers,
    view: Callable[[PassthroughServer], StoreView],
) -> None:
    big = layers.big
    data = big.read()
    name = pushed(fault_front.registry, build_image([big]))
    server = serve()
    fault_front.inject(big.digest, kind="cut", cut_after=3 << 20)
    first = blob(server, name, big.digest)
    if first.error is None and first.status == 200:
        # The proxy resumed upstream: then the client got the whole, right blob.
        assert digest_of(first.body) == big.digest, "a cut transfer ended cleanly"
    else:
        assert first.status in (200, 502, 503), first.describe()
    wait_until(lambda: view(server).partials() == [], 20, "the cut write to be removed")
    stored = view(server).blob(big.digest)
    assert stored is None or stored == data, "a partial blob was committed"

    second = blob(server, name, big.digest)
    assert second.status == 200 and second.error is None, second.describe()
    assert digest_of(second.body) == big.digest
    assert view(server).blob(big.digest) == data


# --- skopeo pulls through the proxy --------------------------------------------------------


def at_once(count: int, job: Callable[[int], Any]) -> list[Any]:
    """Run `job(i)` for i in range(count) at once (released together); their results
    in that order; re-raise any failure."""
    barrier = threading.Barrier(count)
    results: list[Any] = [None] * count
    failures: list[BaseException] = []

    def one(i: int) -> None:
        try:
            barrier.wait(30)
            results[i] = job(i)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    if failures:
        raise failures[0]
    return results


def skopeo_pull(server: PassthroughServer, ref: str, dest: Path) -> Path:
    """skopeo copy docker://<proxy>/<ref> dir:<dest>, anonymously, over plain HTTP."""
    host = server.url.removeprefix("http://")
    skopeo_copy(f"docker://{host}/{ref}", f"dir:{dest}", src_tls_verify=False)
    return dest


def check_pulled(dest: Path, image: Image) -> None:
    """skopeo's dir: holds the manifest as served and every blob, each hashing right."""
    assert (dest / "manifest.json").read_bytes() == image.manifest
    for digest in [image.config_digest, *(layer.digest for layer in image.layers)]:
        assert digest_of((dest / digest.split(":", 1)[1]).read_bytes()) == digest


@pytest.mark.parametrize("workers, threads", [(1, 16), (2, 8)], ids=["one-worker", "two-workers"])
def test_concurrent_cold_skopeo_pulls_fetch_each_blob_once(
    serve: Callable[..., PassthroughServer],
    fault_front: FaultFront,
    layers: Layers,
    tmp_path: Path,
    workers: int,
    threads: int,
    view: Callable[[PassthroughServer], StoreView],
) -> None:
    image = build_image([layers.small, layers.big, layers.other])
    name = pushed(fault_front.registry, image)
    server = serve(workers=workers, threads=threads)
    dests = [tmp_path / f"pull-{i}" for i in range(CONCURRENT)]

    def pull(i: int) -> Path:
        return skopeo_pull(server, f"{name}:v1", dests[i])

    at_once(CONCURRENT, pull)
    for dest in dests:
        check_pulled(dest, image)
    for digest in [image.config_digest, *(layer.digest for layer in image.layers)]:
        assert fault_front.count("GET", digest) == 1, f"blob {digest[:19]}"
    store = view(server)
    for layer in image.layers:
        assert store.blob(layer.digest) == layer.read()
    wait_until(lambda: store.partials() == [], 20, "no unfinished write left")


def test_a_cut_pull_fails_or_resumes_and_the_next_pull_is_whole(
    serve: Callable[..., PassthroughServer],
    fault_front: FaultFront,
    layers: Layers,
    tmp_path: Path,
    view: Callable[[PassthroughServer], StoreView],
) -> None:
    image = build_image([layers.small, layers.big])
    name = pushed(fault_front.registry, image)
    server = serve()
    fault_front.inject(layers.big.digest, kind="cut", cut_after=2 << 20)
    try:
        skopeo_pull(server, f"{name}:v1", tmp_path / "first")
    except LoaderError:
        pass  # failing is allowed; a pull that claims success must be whole
    else:
        check_pulled(tmp_path / "first", image)
    wait_until(lambda: view(server).partials() == [], 20, "the cut write to be removed")
    stored = view(server).blob(layers.big.digest)
    assert stored is None or stored == layers.big.read(), "a partial blob was committed"
    skopeo_pull(server, f"{name}:v1", tmp_path / "second")
    check_pulled(tmp_path / "second", image)


def test_a_pull_succeeds_from_the_store_when_upstream_rate_limits(
    serve: Callable[..., PassthroughServer],
    fault_front: FaultFront,
    layers: Layers,
    tmp_path: Path,
) -> None:
    image = build_image([layers.small, layers.other])
    name = pushed(fault_front.registry, image)
    server = serve()
    skopeo_pull(server, f"{name}:v1", tmp_path / "warm")
    fault_front.inject_manifest(name, "429", times=1000)
    fault_front.inject(None, kind="429", times=1000)
    skopeo_pull(server, f"{name}:v1", tmp_path / "stale")
    check_pulled(tmp_path / "stale", image)
    for digest in [image.config_digest, *(layer.digest for layer in image.layers)]:
        assert fault_front.count("GET", digest) == 1


# --- two replicas on one S3 bucket, Redis for the single flight -----------------------------


@pytest.fixture
def replicas(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., PassthroughServer]]:
    """Servers started with exactly the env given (no module store)."""
    started: list[PassthroughServer] = []

    def start(env: Mapping[str, str], **kw: Any) -> PassthroughServer:
        server = PassthroughServer(dict(env), tmp_root=tmp_path_factory.mktemp("replica"), **kw)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()
        print(f"--- replica {server.url} log (last 40 lines) ---")
        print("\n".join(server.log_text().splitlines()[-40:]))


def test_two_replicas_sharing_a_bucket_and_redis_fetch_each_blob_once(
    replicas: Callable[..., PassthroughServer],
    fault_front: FaultFront,
    seaweed: SeaweedS3,
    s3_bucket: str,
    redis_server: RedisServer,
    layers: Layers,
    tmp_path: Path,
) -> None:
    redis_server.ensure_running()
    image = build_image([layers.small, layers.big, layers.other])
    name = pushed(fault_front.registry, image)
    env = {
        "REGISTRY_URL": fault_front.url,
        "REDIS_URL": redis_server.url,
        **s3_env(seaweed, s3_bucket, prefix=f"shared-{secrets.token_hex(4)}/"),
    }
    servers = [replicas(env, threads=8) for _ in range(2)]

    def pull(i: int) -> Path:
        return skopeo_pull(servers[i % 2], f"{name}:v1", tmp_path / f"pull-{i}")

    at_once(CONCURRENT, pull)
    for i in range(CONCURRENT):
        check_pulled(tmp_path / f"pull-{i}", image)
    for digest in [image.config_digest, *(layer.digest for layer in image.layers)]:
        assert fault_front.count("GET", digest) == 1, f"blob {digest[:19]}"
    for server in servers:
        assert seaweed.secret_key not in server.log_text()
        wait_until(no_leftovers(server), 20, "no temp file left")


def test_a_replica_killed_mid_fetch_leaves_the_blob_to_the_other(
    replicas: Callable[..., PassthroughServer],
    registry_anon: RegistryServer,
    seaweed: SeaweedS3,
    s3_bucket: str,
    redis_server: RedisServer,
    layers: Layers,
) -> None:
    """Replica A fetches (held upstream); replica B's reader waits on A's Redis lease.
    A's fetching worker is SIGKILLed: its lease runs out (REDIS_LOCK_LEASE=3) and B
    fetches the blob itself; B's client gets it whole, A's client an abort."""
    redis_server.ensure_running()
    big = layers.big
    name = pushed(registry_anon, build_image([big]))
    with HoldingFront(registry_anon, big.digest, after=4 << 20) as front:
        env = {
            "REGISTRY_URL": front.url,
            "REDIS_URL": redis_server.url,
            "REDIS_LOCK_LEASE": "3",
            **s3_env(seaweed, s3_bucket, prefix=f"shared-{secrets.token_hex(4)}/"),
        }
        first, second = replicas(env), replicas(env)
        results: dict[str, Answer | BaseException] = {}

        def read(server: PassthroughServer, key: str) -> None:
            try:
                results[key] = blob(server, name, big.digest)
            except requests.RequestException as exc:
                results[key] = exc

        a = threading.Thread(target=read, args=(first, "a"))
        a.start()
        wait_until(front.reached.is_set, 30, "A's fetch to reach the hold")
        b = threading.Thread(target=read, args=(second, "b"))
        b.start()
        # B's own fetcher waits for A's lease: its state file says so.
        wait_until(
            lambda: bool(list(second.tmpdir.glob("passthrough-s3-*/tmp/flight-*.json"))),
            30,
            "B to wait for the lease",
        )
        grow = StoreView(first, seaweed).growing()
        assert grow, "A has no growing file"
        os.kill(int(grow[0].name.split(".")[1]), signal.SIGKILL)
        front.release()
        a.join(120)
        b.join(180)
        got_b = results.get("b")
        assert isinstance(got_b, Answer), f"B's client: {got_b!r}"
        assert got_b.status == 200 and got_b.error is None, got_b.describe()
        assert digest_of(got_b.body) == big.digest
        got_a = results.get("a")
        assert got_a is not None, "A's client hung"
        if isinstance(got_a, Answer) and got_a.error is None and got_a.status == 200:
            assert digest_of(got_a.body) == big.digest
        assert front.count("GET", big.digest) == 2
        wait_until(lambda: StoreView(second, seaweed).blob(big.digest) == big.read(), 30, "commit")


def no_leftovers(server: PassthroughServer) -> Callable[[], bool]:
    return lambda: unfinished(server.leftover_temp_files()) == []


def test_s3_redirect_sends_blob_hits_to_a_presigned_url(
    replicas: Callable[..., PassthroughServer],
    fault_front: FaultFront,
    seaweed: SeaweedS3,
    s3_bucket: str,
    layers: Layers,
    tmp_path: Path,
) -> None:
    image = build_image([layers.small, layers.other])
    name = pushed(fault_front.registry, image)
    server = replicas(
        {"REGISTRY_URL": fault_front.url, "S3_REDIRECT": "true", **s3_env(seaweed, s3_bucket)}
    )
    digest = layers.small.digest
    cold = blob(server, name, digest)
    assert (cold.status, cold.body) == (200, layers.small.read()), cold.describe()
    wait_until(lambda: blob(server, name, digest).status == 307, 30, "the blob to be a hit (a 307)")
    hit = blob(server, name, digest)
    location = hit.headers["Location"]
    assert location.startswith(seaweed.endpoint_url), location
    assert hit.headers["Docker-Content-Digest"] == digest
    # The presigned URL carries its own signature: the client sends no Authorization.
    followed = call(location)
    assert (followed.status, followed.body) == (200, layers.small.read()), followed.describe()
    ranged = call(location, headers={"Range": "bytes=10-19"})
    assert (ranged.status, ranged.body) == (206, layers.small.read()[10:20])
    assert seaweed.secret_key not in location
    # Manifests are never redirected, and skopeo follows the blob redirects.
    assert_manifest(manifest(server, name, "v1"), image)
    skopeo_pull(server, f"{name}:v1", tmp_path / "pulled")
    check_pulled(tmp_path / "pulled", image)
    assert fault_front.count("GET", digest) == 1
