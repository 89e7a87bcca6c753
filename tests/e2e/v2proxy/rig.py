"""The rig shared by the /v2 proxy's end-to-end modules (test_v2_proxy*.py): the store
under test (filesystem and S3, one module fixture per kind), the images, a client that
speaks the spec, and a server in front of the fault front. Kept out of the test modules
so that each module, with its own servers, can run beside the others."""

from __future__ import annotations

import json
import random
import re
import secrets
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.support.fronts import FaultFront
from tests.support.helpers import digest as digest_of
from tests.support.images import (
    Blob,
    File,
    Image,
    Layer,
    big_layer,
    make_layer,
    push_image,
    tar_layer,
)
from tests.support.loaders import skopeo_copy
from tests.support.registry import RegistryServer
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
