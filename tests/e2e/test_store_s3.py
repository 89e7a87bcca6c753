"""The S3 store shared by replicas: SeaweedFS as S3, redis-server for the lock.

Each "replica" is a separate gunicorn master with its own TMPDIR (so its own temp and
lock files, as a separate pod has), all pointed at one bucket and key prefix. The
FaultFront in front of the registry counts every upstream blob GET.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests

from tests.e2e.helpers import check_archive
from tests.e2e.test_cache import (
    Got,
    HoldingFront,
    Layers,
    fetch,
    fetch_all,
    push,
    worker_pids,
)
from tests.support.fixtures_matrix import s3_env
from tests.support.fronts import FaultFront
from tests.support.helpers import wait_until
from tests.support.images import Layer, big_layer, build_image
from tests.support.procs import free_port
from tests.support.redis_server import RedisServer
from tests.support.registry import RegistryServer
from tests.support.relay import TcpRelay
from tests.support.seaweed import SeaweedS3
from tests.support.server import REPO_ROOT, PassthroughServer

ServerFactory = Callable[..., PassthroughServer]


@pytest.fixture(scope="module")
def store_kind() -> str:
    """Each test sets its servers' store itself (tests/e2e/conftest.py's matrix would
    run every one of them twice)."""
    return "temp"


@pytest.fixture(scope="module")
def layers(tmp_path_factory: pytest.TempPathFactory) -> Layers:
    root = tmp_path_factory.mktemp("s3-layers")
    return Layers(
        small=big_layer(root / "small.gz", 2 << 20, seed=201, name="data/small.bin"),
        mid=big_layer(root / "mid.gz", 8 << 20, seed=202, name="data/mid.bin"),
        big=big_layer(root / "big.gz", 48 << 20, seed=203, name="data/big.bin"),
    )


def shared_store(seaweed: SeaweedS3, bucket: str) -> dict[str, str]:
    """One bucket and prefix, as every replica of one installation has."""
    return s3_env(seaweed, bucket, prefix=f"shared-{uuid.uuid4().hex[:8]}/")


def objects(seaweed: SeaweedS3, bucket: str, prefix: str) -> list[str]:
    client = seaweed.client()
    found: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        found += [item["Key"][len(prefix) :] for item in page.get("Contents", ())]
    return found


def no_secret_in(server: PassthroughServer, *secrets: str) -> None:
    text = server.log_text()
    for secret in secrets:
        assert secret not in text, "a credential reached the log"


# --- a cold download while the store uploads ----------------------------------------------


class Reader(threading.Thread):
    """A client reading an archive to `dest`, counting what arrived so far."""

    def __init__(self, url: str, dest: Path) -> None:
        super().__init__(daemon=True)
        self.url, self.dest = url, dest
        self.received = 0
        self.status = 0

    def run(self) -> None:
        with (
            requests.get(self.url, stream=True, timeout=120) as response,
            self.dest.open("wb") as out,
        ):
            self.status = response.status_code
            for chunk in response.iter_content(64 << 10):
                out.write(chunk)
                self.received += len(chunk)


def test_a_cold_download_is_sent_while_its_layers_are_uploaded(
    passthrough_server: ServerFactory,
    registry_anon: RegistryServer,
    seaweed: SeaweedS3,
    s3_bucket: str,
    layers: Layers,
    tmp_path: Path,
) -> None:
    """The S3 store reached at 2 MB/s, the second layer's fetch held: the first bytes
    come while that fetch is held, each layer's bytes before its object is uploaded,
    and the archive is whole; the objects land after."""
    image = build_image([layers.small, layers.mid])
    _, filename = push(registry_anon, image)
    store = shared_store(seaweed, s3_bucket)
    prefix = store["S3_PREFIX"]
    client = seaweed.client()

    def uploaded(layer: Layer) -> bool:
        with contextlib.suppress(Exception):
            client.head_object(Bucket=s3_bucket, Key=f"{prefix}layers/sha256/{layer.diff_id[7:]}")
            return True
        return False

    with (
        TcpRelay(upload_rate=2 << 20) as slow_s3,
        HoldingFront(registry_anon, layers.mid.digest, after=1 << 20) as front,
    ):
        slow_s3.attach(seaweed.bind_host, seaweed.s3_port)
        env = {"REGISTRY_URL": front.url, **store, "S3_ENDPOINT_URL": slow_s3.url}
        server = passthrough_server(env)
        reader = Reader(f"{server.url}/docker/{filename}", tmp_path / "cold.tar")
        reader.start()
        wait_until(front.reached.is_set, 30, "the second layer's fetch to be held")
        # The metadata and the whole first layer (2 MiB) arrive while the second is held,
        # before the first layer's tar is in the bucket (2 MiB of blob and 2 of tar
        # take 2 s to upload).
        wait_until(lambda: reader.received > 2 << 20, 30, "the first layer to arrive")
        assert not uploaded(layers.small), "the first layer was sent only once uploaded"
        front.release()
        reader.join(120)
        assert reader.status == 200 and not reader.is_alive()
        # Received whole while the second layer (8 MiB + 8 MiB, 8 s) is being uploaded.
        assert not uploaded(layers.mid), "the second layer was sent only once uploaded"
        check_archive(tmp_path / "cold.tar", image)
        wait_until(lambda: uploaded(layers.mid) and uploaded(layers.small), 60, "the uploads")
        wait_until(lambda: server.leftover_temp_files() == [], 10, "the staging area to empty")
        # A second download is a hit on what was uploaded: every size known.
        warm = fetch(f"{server.url}/docker/{filename}", dest=tmp_path / "warm.tar")
        assert warm.status == 200 and warm.headers["Content-Length"] == str(warm.size)
        check_archive(tmp_path / "warm.tar", image)


# --- several replicas, one store ----------------------------------------------------------


def test_an_image_downloaded_through_one_replica_is_a_hit_on_the_other(
    passthrough_server: ServerFactory,
    fault_front: FaultFront,
    seaweed: SeaweedS3,
    s3_bucket: str,
    layers: Layers,
    tmp_path: Path,
) -> None:
    image = build_image([layers.small, layers.mid])
    name, filename = push(fault_front.registry, image)
    store = shared_store(seaweed, s3_bucket)
    first = passthrough_server({"REGISTRY_URL": fault_front.url, **store})
    second = passthrough_server({"REGISTRY_URL": fault_front.url, **store})
    assert first.tmpdir != second.tmpdir

    cold = fetch(f"{first.url}/docker/{filename}", dest=tmp_path / "cold.tar")
    assert cold.status == 200, cold.text
    check_archive(tmp_path / "cold.tar", image)
    # The layers are uploaded once sent: the staging area empties when they are in place.
    wait_until(lambda: first.leftover_temp_files() == [], 60, "the uploads to end")
    # The blobs and the layer tars are in the bucket, under the prefix only.
    stored = objects(seaweed, s3_bucket, store["S3_PREFIX"])
    for layer in image.layers:
        assert f"blobs/sha256/{layer.digest[7:]}" in stored
        assert f"layers/sha256/{layer.diff_id[7:]}" in stored
    gets = {layer.digest: fault_front.count("GET", layer.digest) for layer in image.layers}
    assert set(gets.values()) == {1}

    warm = fetch(f"{second.url}/docker/{filename}", dest=tmp_path / "warm.tar")
    assert (warm.status, warm.sha256) == (200, cold.sha256)
    # A hit: the size of every layer was known, and no blob was fetched again.
    assert warm.headers["Content-Length"] == str(warm.size)
    for layer in image.layers:
        assert fault_front.count("GET", layer.digest) == 1, f"layer {layer.digest[:19]}"
    assert fault_front.count("GET", image.config_digest) == 1
    # Tags are still resolved upstream by each replica (access is proven every time).
    assert fault_front.count_manifest("HEAD", name, "v1") >= 2
    for server in (first, second):
        assert server.leftover_temp_files() == []
        no_secret_in(server, seaweed.secret_key)


@pytest.mark.parametrize("with_redis", [True, False], ids=["redis", "no-redis"])
def test_concurrent_cold_downloads_over_two_replicas(
    passthrough_server: ServerFactory,
    fault_front: FaultFront,
    seaweed: SeaweedS3,
    s3_bucket: str,
    redis_server: RedisServer,
    layers: Layers,
    with_redis: bool,
) -> None:
    """Six cold downloads at once, three per replica: with Redis one upstream GET per
    blob; without it at most one per replica (the flock still holds inside each)."""
    redis_server.ensure_running()
    image = build_image([layers.small, layers.mid, layers.big])
    _, filename = push(fault_front.registry, image)
    env = {"REGISTRY_URL": fault_front.url, **shared_store(seaweed, s3_bucket)}
    if with_redis:
        env["REDIS_URL"] = redis_server.url
    replicas = [passthrough_server(env, threads=6) for _ in range(2)]

    results: list[list[Got]] = [[], []]

    def run(index: int) -> None:
        results[index] = fetch_all(f"{replicas[index].url}/docker/{filename}", 3)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    got = results[0] + results[1]
    assert [g.status for g in got] == [200] * 6, [g.text for g in got]
    assert len({(g.size, g.sha256) for g in got}) == 1, "the archives differ"
    for layer in image.layers:
        count = fault_front.count("GET", layer.digest)
        if with_redis:
            assert count == 1, f"layer {layer.digest[:19]} fetched {count} times"
        else:
            assert 1 <= count <= 2, f"layer {layer.digest[:19]} fetched {count} times"
    # The layers are uploaded after they were sent: the staging area empties then.
    wait_until(
        lambda: all(r.leftover_temp_files() == [] for r in replicas), 60, "the uploads to end"
    )


def test_a_replica_killed_holding_a_lock_delays_the_other_at_most_the_lease(
    passthrough_server: ServerFactory,
    registry_anon: RegistryServer,
    seaweed: SeaweedS3,
    s3_bucket: str,
    redis_server: RedisServer,
    layers: Layers,
    tmp_path: Path,
) -> None:
    redis_server.ensure_running()
    lease = 4.0
    image = build_image([layers.mid])
    _, filename = push(registry_anon, image)
    env = {
        **shared_store(seaweed, s3_bucket),
        "REDIS_URL": redis_server.url,
        "REDIS_LOCK_LEASE": str(lease),
    }
    with HoldingFront(registry_anon, layers.mid.digest, after=1 << 20) as front:
        env["REGISTRY_URL"] = front.url
        doomed = passthrough_server(env)
        other = passthrough_server(env)

        # The first replica takes the blob's lock and is stuck in its fetch.
        def doomed_download() -> None:
            with contextlib.suppress(requests.RequestException):
                fetch(f"{doomed.url}/docker/{filename}")

        started = threading.Thread(target=doomed_download, daemon=True)
        started.start()
        wait_until(front.reached.is_set, 30, "the first replica's fetch to hold")
        client = redis_server.client()
        assert any(client.scan_iter(match="passthrough:*:lock:*")), "no lease in Redis"
        for pid in [*worker_pids(doomed), doomed.pid]:
            os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        front.release()

        got = fetch(f"{other.url}/docker/{filename}", dest=tmp_path / "after.tar")
        waited = time.monotonic() - killed_at
    assert got.status == 200, got.text
    check_archive(tmp_path / "after.tar", image)
    # The lease ran out: the other replica waited for it, and no longer.
    assert waited <= lease + 3.0, f"waited {waited:.1f}s for a lease of {lease:g}s"


# --- faults -----------------------------------------------------------------------------------


def read_some_then_wait(url: str, nbytes: int, go_on: threading.Event) -> tuple[int, int, bool]:
    """GET `url`, read `nbytes`, wait for `go_on`, read the rest. Returns (declared
    length, bytes received, whether the transfer ended cleanly)."""
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    sock = socket.create_connection((parts.hostname, parts.port), timeout=60)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
    with sock:
        request = f"GET {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nConnection: close\r\n\r\n"
        sock.sendall(request.encode())
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        received = len(body)
        while received < nbytes:
            received += len(sock.recv(65536))
        go_on.wait(60)
        clean = True
        while True:
            try:
                chunk = sock.recv(1 << 20)
            except OSError:
                clean = False
                break
            if not chunk:
                break
            received += len(chunk)
        return length, received, clean and received == length


def test_s3_stopped_mid_download_aborts_it_and_the_next_is_whole(
    passthrough_server: ServerFactory,
    registry_anon: RegistryServer,
    seaweed: SeaweedS3,
    s3_bucket: str,
    layers: Layers,
    tmp_path: Path,
) -> None:
    image = build_image([layers.big])
    _, filename = push(registry_anon, image)
    env = {"REGISTRY_URL": registry_anon.url, **shared_store(seaweed, s3_bucket)}
    server = passthrough_server(env)
    url = f"{server.url}/docker/{filename}"
    first = fetch(url, dest=tmp_path / "first.tar")
    assert first.status == 200, first.text
    # Once uploaded (after it was sent), the layer is read from S3.
    wait_until(lambda: server.leftover_temp_files() == [], 60, "the upload to end")

    go_on = threading.Event()
    outcome: list[tuple[int, int, bool]] = []
    reader = threading.Thread(
        target=lambda: outcome.append(read_some_then_wait(url, 4 << 20, go_on)), daemon=True
    )
    reader.start()
    time.sleep(1.0)  # the server is blocked on the slow client, mid-layer
    seaweed.kill()
    try:
        go_on.set()
        reader.join(120)
        assert outcome, "the reader did not finish"
        length, received, clean = outcome[0]
        assert not clean and received < length, "a truncated archive ended cleanly"
        # While S3 is down, a download is refused before its body, naming the store.
        down = fetch(url)
        assert down.status == 503, down.text
        assert "s3 store" in down.text and seaweed.secret_key not in down.text
    finally:
        seaweed.start()
    again = fetch(url, dest=tmp_path / "again.tar")
    assert (again.status, again.sha256) == (200, first.sha256)
    check_archive(tmp_path / "again.tar", image)
    # The abort is logged as such, naming the store (gunicorn logs the raised body).
    assert "aborted after" in server.log_text() and "s3 store" in server.log_text()
    no_secret_in(server, seaweed.secret_key)


def test_redis_down_falls_back_to_one_fetch_per_replica(
    passthrough_server: ServerFactory,
    fault_front: FaultFront,
    seaweed: SeaweedS3,
    s3_bucket: str,
    layers: Layers,
) -> None:
    image = build_image([layers.small])
    _, filename = push(fault_front.registry, image)
    # Nothing listens there: every lock attempt fails, and downloads go on without it.
    password = "redis-" + uuid.uuid4().hex
    env = {
        "REGISTRY_URL": fault_front.url,
        **shared_store(seaweed, s3_bucket),
        "REDIS_URL": f"redis://:{password}@127.0.0.1:{free_port()}/0",
    }
    server = passthrough_server(env)
    got = fetch(f"{server.url}/docker/{filename}")
    assert got.status == 200, got.text
    assert "without the cross-replica lock" in server.log_text()
    no_secret_in(server, password, seaweed.secret_key)


def start_failure(env: dict[str, str], tmp_path: Path) -> str:
    """Start gunicorn with `env`; it must exit at once. Returns what it printed."""
    server = PassthroughServer(env, tmp_root=tmp_path)
    proc = subprocess.run(
        [
            str(Path(sys.executable).with_name("gunicorn")),
            "-c",
            "gunicorn.conf.py",
            "--bind",
            f"127.0.0.1:{free_port()}",
        ],
        cwd=REPO_ROOT,
        env=server.environment(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode != 0
    return proc.stdout + proc.stderr


def test_a_missing_bucket_or_unreachable_s3_stops_start_up_with_one_line(
    seaweed: SeaweedS3, tmp_path: Path
) -> None:
    seaweed.ensure_running()
    missing = s3_env(seaweed, "no-such-bucket-" + uuid.uuid4().hex[:8])
    text = start_failure(missing, tmp_path)
    bucket = missing["S3_BUCKET"]
    assert f"S3_BUCKET: bucket '{bucket}' does not exist at {seaweed.endpoint_url}" in text
    assert "Traceback" not in text and seaweed.secret_key not in text

    nowhere = s3_env(seaweed, "any-bucket")
    nowhere["S3_ENDPOINT_URL"] = f"http://127.0.0.1:{free_port()}"
    text = start_failure(nowhere, tmp_path)
    assert f"S3_ENDPOINT_URL: cannot reach {nowhere['S3_ENDPOINT_URL']}" in text
    assert "Traceback" not in text and seaweed.secret_key not in text
