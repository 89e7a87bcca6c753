"""skopeo pulling through the /v2 proxy (the shared rig is tests/e2e/v2proxy/rig.py):
concurrent cold pulls fetch each blob once, cut pulls, rate limits; two replicas on one
S3 bucket with Redis for the single flight, one killed mid-fetch; S3 presigned redirects."""

from __future__ import annotations

import os
import secrets
import signal
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.e2e.test_cache import HoldingFront
from tests.e2e.v2proxy.rig import (
    CONCURRENT,
    Answer,
    Layers,
    StoreView,
    assert_manifest,
    at_once,
    blob,
    call,
    check_pulled,
    manifest,
    pushed,
    skopeo_pull,
    unfinished,
)
from tests.support.fixtures_matrix import s3_env
from tests.support.fronts import FaultFront
from tests.support.helpers import digest as digest_of
from tests.support.helpers import wait_until
from tests.support.images import (
    build_image,
)
from tests.support.loaders import LoaderError
from tests.support.redis_server import RedisServer
from tests.support.registry import RegistryServer
from tests.support.seaweed import SeaweedS3
from tests.support.server import PassthroughServer

# --- skopeo pulls through the proxy --------------------------------------------------------


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
