"""The shared layer cache (CACHE_DIR) end to end: the real server under gunicorn against
the rig's registries. One upstream GET per blob whatever the concurrency (threads and
worker processes), Range and HEAD on warm downloads, clients that leave mid-download,
corrupted entries, private images behind a cache, and warm archives docker runs."""

from __future__ import annotations

import hashlib
import http.client
import json
import secrets
import socket
import struct
import tarfile
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import pytest
import requests

from tests.e2e.helpers import check_archive
from tests.support.fronts import FaultFront
from tests.support.helpers import wait_until
from tests.support.images import Image, Layer, big_layer, build_image, push_image, runnable_image
from tests.support.loaders import docker_load_and_run
from tests.support.registry import ALICE, BOB, PUSHER, RegistryServer
from tests.support.server import PassthroughServer

CHUNK = 1 << 20
CONCURRENT = 6

ServerFactory = Callable[..., PassthroughServer]


# --- images -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Layers:
    """Random (incompressible) layers, built once for the module."""

    small: Layer
    mid: Layer
    big: Layer


@pytest.fixture(scope="module")
def layers(tmp_path_factory: pytest.TempPathFactory) -> Layers:
    root = tmp_path_factory.mktemp("cache-layers")
    return Layers(
        small=big_layer(root / "small.gz", 3 << 20, seed=101, name="data/small.bin"),
        mid=big_layer(root / "mid.gz", 24 << 20, seed=102, name="data/mid.bin"),
        big=big_layer(root / "big.gz", 40 << 20, seed=103, name="data/big.bin"),
    )


def push(
    registry: RegistryServer,
    image: Image,
    prefix: str = "cache",
    auth: tuple[str, str] | None = None,
) -> tuple[str, str]:
    """Push under a fresh repository (session registries are shared); returns the
    repository and the /docker/ filename."""
    name = f"{prefix}/t{secrets.token_hex(5)}"
    push_image(registry.url, name, "v1", image, auth=auth)
    return name, f"{name.replace('/', '_')}_v1.tar"


# --- a client ---------------------------------------------------------------------------


def _session() -> requests.Session:
    session = requests.Session()
    # Loopback only: no proxy from the environment, no ~/.netrc credentials.
    session.trust_env = False
    return session


@dataclass
class Got:
    status: int
    headers: Mapping[str, str]
    size: int
    sha256: str
    head: bytes  # the first bytes of the body, for error messages

    @property
    def text(self) -> str:
        return self.head.decode(errors="replace")


def fetch(
    url: str,
    *,
    headers: Mapping[str, str] | None = None,
    auth: tuple[str, str] | None = None,
    dest: Path | None = None,
    method: str = "GET",
) -> Got:
    """One request; the body is hashed (and written to `dest`) as it arrives."""
    digest = hashlib.sha256()
    size = 0
    head = b""
    with (
        _session() as session,
        session.request(
            method, url, headers=dict(headers or {}), auth=auth, stream=True, timeout=120
        ) as response,
    ):
        out = dest.open("wb") if dest is not None else None
        try:
            for chunk in response.iter_content(CHUNK):
                digest.update(chunk)
                size += len(chunk)
                if len(head) < 4096:
                    head += chunk[: 4096 - len(head)]
                if out is not None:
                    out.write(chunk)
        finally:
            if out is not None:
                out.close()
        return Got(response.status_code, response.headers, size, digest.hexdigest(), head)


def fetch_all(url: str, count: int) -> list[Got]:
    """`count` downloads at once (released together by a barrier)."""
    barrier = threading.Barrier(count)
    results: list[Got | BaseException | None] = [None] * count

    def one(i: int) -> None:
        try:
            barrier.wait(30)
            results[i] = fetch(url)
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    done: list[Got] = []
    for result in results:
        if isinstance(result, BaseException):
            raise result
        assert result is not None, "a download did not finish in time"
        done.append(result)
    return done


def read_then_reset(url: str, nbytes: int) -> int:
    """GET `url`, read about `nbytes` of the answer, then drop the connection with a
    RST (SO_LINGER 0), as a client that crashes or is killed does."""
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    sock = socket.create_connection((parts.hostname, parts.port), timeout=60)
    try:
        request = f"GET {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nConnection: close\r\n\r\n"
        sock.sendall(request.encode())
        got = 0
        while got < nbytes:
            data = sock.recv(CHUNK)
            if not data:
                raise AssertionError(f"the server ended the answer after {got} bytes")
            got += len(data)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return got
    finally:
        sock.close()


def saw_client_leave(server: PassthroughServer) -> bool:
    """The server noticed a client leave: its log or its metrics say so."""
    if "client_gone" in server.log_text():
        return True
    try:
        with _session() as session:
            metrics = session.get(f"{server.url}/metrics", timeout=5).text
    except requests.RequestException:
        return False
    return 'outcome="client_gone"' in metrics


# --- the cache directory and the server's processes --------------------------------------


def entries(cache: Path, kind: str) -> dict[str, Path]:
    """Committed entries of one kind, by `sha256:<hex>` (the size suffix dropped)."""
    found = {}
    for path in (cache / kind / "sha256").iterdir():
        found["sha256:" + path.name.split("-")[0]] = path
    return found


def in_progress(cache: Path) -> list[Path]:
    return sorted((cache / "tmp").iterdir())


def worker_pids(server: PassthroughServer) -> list[int]:
    text = Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text()
    return [int(pid) for pid in text.split()]


def bytes_read(pid: int) -> int:
    """rchar of a process: every byte it read with read/pread (cache files included)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError(f"no rchar in /proc/{pid}/io")


def flip_byte(path: Path, offset: int) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        (value,) = f.read(1)
        f.seek(offset)
        f.write(bytes([value ^ 0x55]))


# --- single flight ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "workers, threads, extra",
    [
        # Enough threads that six downloads fit well under the per-worker download cap
        # (threads less a few kept for /health).
        (1, 12, ()),
        # At most three connections per worker: the six downloads are shared out between
        # the two processes, so the flock coordination across processes is exercised.
        (2, 8, ("--worker-connections", "3")),
    ],
    ids=["one-worker-threads", "two-workers"],
)
def test_concurrent_cold_downloads_fetch_each_blob_once(
    passthrough_server: ServerFactory,
    fault_front: FaultFront,
    layers: Layers,
    tmp_path: Path,
    workers: int,
    threads: int,
    extra: tuple[str, ...],
) -> None:
    image = build_image([layers.small, layers.mid, layers.big])
    name, filename = push(fault_front.registry, image)
    cache = tmp_path / "cache"
    server = passthrough_server(
        {"REGISTRY_URL": fault_front.url, "CACHE_DIR": str(cache)},
        workers=workers,
        threads=threads,
        extra_args=extra,
    )
    # /health answers once one worker is up; the others may still be booting.
    wait_until(lambda: len(worker_pids(server)) == workers, 30, f"{workers} workers")
    pids = worker_pids(server)
    read_before = {pid: bytes_read(pid) for pid in pids}

    got = fetch_all(f"{server.url}/docker/{filename}", CONCURRENT)

    assert [g.status for g in got] == [200] * CONCURRENT, got[0].text
    assert len({(g.size, g.sha256) for g in got}) == 1, "the archives differ"
    for layer in image.layers:
        assert fault_front.count("GET", layer.digest) == 1, f"layer {layer.digest[:19]}"
    # Tags still resolve upstream during every request; requests of one identity at
    # the same time share the HEAD in flight (export/resolve.py): one at least.
    assert 1 <= fault_front.count_manifest("HEAD", name, "v1") <= CONCURRENT
    if workers > 1:
        archive_size = got[0].size
        served = [pid for pid in pids if bytes_read(pid) - read_before[pid] >= archive_size]
        assert served == pids, "not every worker process served a download"

    # The archive is right, and a warm download gives the very same bytes.
    warm = fetch(f"{server.url}/docker/{filename}", dest=tmp_path / "warm.tar")
    assert (warm.status, warm.size, warm.sha256) == (200, got[0].size, got[0].sha256)
    assert warm.headers["Content-Length"] == str(warm.size)
    check_archive(tmp_path / "warm.tar", image)
    assert fault_front.count("GET", layers.big.digest) == 1
    assert in_progress(cache) == []
    assert server.leftover_temp_files() == []


def test_concurrent_cold_downloads_fetch_the_config_once(
    passthrough_server: ServerFactory, fault_front: FaultFront, layers: Layers, tmp_path: Path
) -> None:
    """The config is a blob too, cached under blobs/: one upstream GET, like the layers."""
    image = build_image([layers.small])
    _, filename = push(fault_front.registry, image)
    server = passthrough_server(
        {"REGISTRY_URL": fault_front.url, "CACHE_DIR": str(tmp_path / "cache")}, threads=12
    )
    got = fetch_all(f"{server.url}/docker/{filename}", CONCURRENT)
    assert [g.status for g in got] == [200] * CONCURRENT, got[0].text
    assert len({g.sha256 for g in got}) == 1
    assert fault_front.count("GET", layers.small.digest) == 1
    assert fault_front.count("GET", image.config_digest) == 1, (
        f"the config blob was fetched {fault_front.count('GET', image.config_digest)} times "
        f"by {CONCURRENT} concurrent cold downloads"
    )


# --- Range, HEAD, ETag ------------------------------------------------------------------


def test_warm_range_resumes_to_the_same_bytes_and_head_matches(
    passthrough_server: ServerFactory, fault_front: FaultFront, layers: Layers, tmp_path: Path
) -> None:
    image = build_image([layers.small, layers.mid])
    name, filename = push(fault_front.registry, image)
    server = passthrough_server(
        {"REGISTRY_URL": fault_front.url, "CACHE_DIR": str(tmp_path / "cache")}
    )
    url = f"{server.url}/docker/{filename}"
    full_path = tmp_path / "full.tar"
    cold = fetch(url)
    assert cold.status == 200, cold.text
    full = fetch(url, dest=full_path)
    assert (full.status, full.sha256) == (200, cold.sha256)
    total = full.size
    etag = full.headers["ETag"]
    assert full.headers["Content-Length"] == str(total)
    assert full.headers["Accept-Ranges"] == "bytes"
    data = full_path.read_bytes()

    # A client that read part of a warm download, then resumes.
    cut = 5_000_003
    with (
        _session() as session,
        session.get(url, stream=True, timeout=60) as partial,
    ):
        head = partial.raw.read(cut)
    assert head == data[:cut]
    rest = fetch(url, headers={"Range": f"bytes={cut}-", "If-Range": etag})
    assert rest.status == 206, rest.text
    assert rest.headers["Content-Range"] == f"bytes {cut}-{total - 1}/{total}"
    assert rest.headers["Content-Length"] == str(total - cut)
    assert rest.headers["ETag"] == etag
    assert hashlib.sha256(head + data[cut:]).hexdigest() == full.sha256
    assert rest.sha256 == hashlib.sha256(data[cut:]).hexdigest()

    # A range inside a layer, and one across a layer boundary, and the last bytes.
    for first, last in ((1_000_000, 1_999_999), (3 << 20, (3 << 20) + 2_000_000)):
        middle = fetch(url, headers={"Range": f"bytes={first}-{last}"})
        assert middle.status == 206
        assert middle.headers["Content-Range"] == f"bytes {first}-{last}/{total}"
        assert middle.sha256 == hashlib.sha256(data[first : last + 1]).hexdigest()
    tail = fetch(url, headers={"Range": "bytes=-700"})
    assert tail.status == 206 and tail.sha256 == hashlib.sha256(data[-700:]).hexdigest()
    # A stale If-Range gets the whole archive; a range past the end gets 416.
    stale = fetch(url, headers={"Range": f"bytes={cut}-", "If-Range": '"something-else"'})
    assert (stale.status, stale.sha256) == (200, full.sha256)
    beyond = fetch(url, headers={"Range": f"bytes={total}-"})
    assert beyond.status == 416
    assert beyond.headers["Content-Range"] == f"bytes */{total}"

    # HEAD: the GET's headers, no body.
    head_answer = fetch(url, method="HEAD")
    assert head_answer.status == 200 and head_answer.size == 0
    for header in (
        "Content-Length",
        "Content-Type",
        "Content-Disposition",
        "ETag",
        "Accept-Ranges",
        "Docker-Content-Digest",
        "X-Image-Reference",
    ):
        assert head_answer.headers.get(header) == full.headers.get(header), header
    ranged_head = fetch(url, method="HEAD", headers={"Range": f"bytes={cut}-"})
    assert ranged_head.status == 206 and ranged_head.size == 0
    assert ranged_head.headers["Content-Length"] == str(total - cut)

    # The ETag names the content: stable across requests and a server restart.
    assert fetch(url).headers["ETag"] == etag
    again = passthrough_server(
        {"REGISTRY_URL": fault_front.url, "CACHE_DIR": str(tmp_path / "cache")}
    )
    assert fetch(f"{again.url}/docker/{filename}", method="HEAD").headers["ETag"] == etag
    for layer in image.layers:
        assert fault_front.count("GET", layer.digest) == 1
    assert fault_front.count_manifest("HEAD", name, "v1") >= 10


# --- a client that leaves ---------------------------------------------------------------


class _HeldBody:
    """The registry's answer, with the body held after `after` bytes until `gate`."""

    def __init__(
        self,
        response: http.client.HTTPResponse,
        gate: threading.Event,
        reached: threading.Event,
        after: int,
    ) -> None:
        self._response = response
        self._gate = gate
        self._reached = reached
        self._left = after
        self.status = response.status
        self.reason = response.reason

    def getheaders(self) -> list[tuple[str, str]]:
        return self._response.getheaders()

    def getheader(self, name: str, default: str | None = None) -> str | None:
        return self._response.getheader(name, default)

    def read(self, amount: int) -> bytes:
        if self._left <= 0:
            self._reached.set()
            self._gate.wait(120)
            return self._response.read(amount)
        data = self._response.read(min(amount, self._left))
        self._left -= len(data)
        return data


class HoldingFront(FaultFront):
    """A FaultFront that holds the body of one blob after `after` bytes until
    `release()`: a fetch that is certainly still running when a client leaves."""

    def __init__(self, registry: RegistryServer, digest: str, after: int) -> None:
        super().__init__(registry)
        self.held_digest = digest
        self.after = after
        self.gate = threading.Event()
        self.reached = threading.Event()

    def relay(self, handler: Any, conn: Any, response: Any, **kw: Any) -> None:
        path = urlsplit(handler.path).path
        if handler.command == "GET" and path.endswith(f"/blobs/{self.held_digest}"):
            held = _HeldBody(response, self.gate, self.reached, self.after)
            response = cast(http.client.HTTPResponse, held)
        super().relay(handler, conn, response, **kw)

    def release(self) -> None:
        self.gate.set()

    def stop(self) -> None:
        self.gate.set()
        super().stop()


def test_client_that_leaves_does_not_stop_the_shared_fetch(
    passthrough_server: ServerFactory, registry_anon: RegistryServer, layers: Layers, tmp_path: Path
) -> None:
    # The client reads into the first layer and leaves while the second layer's fetch is
    # held half-way by the front.
    image = build_image([layers.mid, layers.big])
    name, filename = push(registry_anon, image)
    cache = tmp_path / "cache"
    with HoldingFront(registry_anon, layers.big.digest, after=8 << 20) as front:
        server = passthrough_server({"REGISTRY_URL": front.url, "CACHE_DIR": str(cache)})
        url = f"{server.url}/docker/{filename}"

        read_then_reset(url, 4 << 20)
        wait_until(lambda: saw_client_leave(server), 20, "the server to see the client leave")
        wait_until(front.reached.is_set, 20, "the held fetch to reach the hold")
        # The fetch is under way: parts in tmp/, nothing committed for the big layer.
        assert in_progress(cache), "no fetch in progress"
        assert layers.big.diff_id not in entries(cache, "layers")
        assert layers.big.digest not in entries(cache, "blobs")

        front.release()
        wait_until(lambda: layers.big.diff_id in entries(cache, "layers"), 60, "the layer's commit")
        wait_until(lambda: not in_progress(cache), 10, "tmp/ to empty")
        assert server.leftover_temp_files() == []
        assert layers.big.digest in entries(cache, "blobs")

        after = fetch(url, dest=tmp_path / "after.tar")
        assert after.status == 200, after.text
        assert after.headers["Content-Length"] == str(after.size)
        check_archive(tmp_path / "after.tar", image)
        for layer in image.layers:
            assert front.count("GET", layer.digest) == 1, f"layer {layer.digest[:19]}"
        assert in_progress(cache) == []
        assert server.leftover_temp_files() == []
        assert front.count_manifest("HEAD", name, "v1") >= 2


# --- corruption -------------------------------------------------------------------------


def test_corrupted_cache_entry_is_detected_and_fetched_again(
    passthrough_server: ServerFactory, fault_front: FaultFront, layers: Layers, tmp_path: Path
) -> None:
    image = build_image([layers.small, layers.mid])
    _, filename = push(fault_front.registry, image)
    cache = tmp_path / "cache"
    server = passthrough_server({"REGISTRY_URL": fault_front.url, "CACHE_DIR": str(cache)})
    url = f"{server.url}/docker/{filename}"
    first = fetch(url)
    assert first.status == 200, first.text
    assert [fault_front.count("GET", layer.digest) for layer in image.layers] == [1, 1]

    victim = layers.mid
    tar_entry = entries(cache, "layers")[victim.diff_id]
    blob_entry = entries(cache, "blobs")[victim.digest]
    flip_byte(tar_entry, tar_entry.stat().st_size // 2)
    flip_byte(blob_entry, blob_entry.stat().st_size // 2)

    second = fetch(url, dest=tmp_path / "second.tar")
    assert second.status == 200, second.text
    assert (second.size, second.sha256) == (first.size, first.sha256)
    check_archive(tmp_path / "second.tar", image)
    assert fault_front.count("GET", victim.digest) == 2, "the corrupt layer must be fetched again"
    assert fault_front.count("GET", layers.small.digest) == 1
    # The entries on disk are whole again, and the next download needs nothing upstream.
    repaired = entries(cache, "layers")[victim.diff_id]
    assert "sha256:" + hashlib.sha256(repaired.read_bytes()).hexdigest() == victim.diff_id
    third = fetch(url)
    assert third.sha256 == first.sha256
    assert fault_front.count("GET", victim.digest) == 2
    assert in_progress(cache) == []
    assert server.leftover_temp_files() == []


# --- private images ---------------------------------------------------------------------


def test_cached_private_image_is_refused_without_credentials(
    passthrough_server: ServerFactory,
    registry_token: RegistryServer,
    layers: Layers,
    tmp_path: Path,
) -> None:
    image = build_image([layers.small])
    pusher = (PUSHER.username, PUSHER.password)
    _, filename = push(registry_token, image, prefix="private", auth=pusher)
    # The environment names no registry and holds no credentials: only the client's count.
    server = passthrough_server({"CACHE_DIR": str(tmp_path / "cache")})
    url = f"{server.url}/registry/http/{registry_token.host}/docker/{filename}"
    alice = (ALICE.username, ALICE.password)

    cold = fetch(url, auth=alice)
    assert cold.status == 200, cold.text
    warm = fetch(url, auth=alice)
    assert (warm.status, warm.sha256) == (200, cold.sha256)
    assert warm.headers["Content-Length"] == str(cold.size)

    for who, auth in (("anonymous", None), ("bob", (BOB.username, BOB.password))):
        for method in ("GET", "HEAD"):
            refused = fetch(url, auth=auth, method=method)
            assert refused.status in (401, 403, 404), f"{who} {method}: {refused.status}"
            assert refused.headers.get("Content-Type", "").startswith("text/plain"), who
            assert "ETag" not in refused.headers and refused.size < 4096, who
        ranged = fetch(url, auth=auth, headers={"Range": "bytes=0-99"})
        assert ranged.status in (401, 403, 404), f"{who} Range: {ranged.status}"

    again = fetch(url, auth=alice)
    assert (again.status, again.sha256) == (200, cold.sha256)


# --- loaders ----------------------------------------------------------------------------


def test_warm_archive_loads_and_runs_in_docker(
    passthrough_server: ServerFactory,
    fault_front: FaultFront,
    docker_host: str,
    layers: Layers,
    tmp_path: Path,
) -> None:
    marker = f"cache-marker-{secrets.token_hex(6)}"
    image = runnable_image(marker, extras=("links", "whiteout"), extra_layers=[layers.small])
    _, filename = push(fault_front.registry, image)
    server = passthrough_server({"REGISTRY_URL": fault_front.url, "CACHE_DIR": str(tmp_path / "c")})
    url = f"{server.url}/docker/{filename}"

    cold = fetch(url, dest=tmp_path / "cold.tar")
    assert cold.status == 200, cold.text
    warm = fetch(url, dest=tmp_path / "warm.tar")
    assert (warm.status, warm.sha256) == (200, cold.sha256)
    assert warm.headers["Content-Length"] == str(warm.size)
    check_archive(tmp_path / "warm.tar", image)
    repo_tag = warm.headers["X-Image-Reference"]
    run = docker_load_and_run(docker_host, tmp_path / "warm.tar", repo_tag, marker=marker)
    assert run.layers == image.diff_ids

    # The registry's gzip blobs, from the same cache.
    gz = fetch(f"{url}?layers=gzip", dest=tmp_path / "gzip.tar")
    assert gz.status == 200, gz.text
    assert gz.headers["Content-Length"] == str(gz.size)
    docker_load_and_run(docker_host, tmp_path / "gzip.tar", repo_tag, marker=marker)
    for layer in image.layers:
        assert fault_front.count("GET", layer.digest) == 1


def test_gzip_layers_have_an_exact_length_even_cold(
    passthrough_server: ServerFactory, fault_front: FaultFront, layers: Layers, tmp_path: Path
) -> None:
    image = build_image([layers.small, layers.mid])
    _, filename = push(fault_front.registry, image)
    server = passthrough_server({"REGISTRY_URL": fault_front.url, "CACHE_DIR": str(tmp_path / "c")})
    url = f"{server.url}/docker/{filename}?layers=gzip"
    cold = fetch(url, dest=tmp_path / "gzip.tar")
    assert cold.status == 200, cold.text
    assert cold.headers.get("Content-Length") == str(cold.size)
    with tarfile.open(tmp_path / "gzip.tar") as tar:
        manifest_file = tar.extractfile("manifest.json")
        assert manifest_file is not None
        (entry,) = json.load(manifest_file)
        sizes = [tar.getmember(name).size for name in entry["Layers"]]
    assert sizes == [layer.size for layer in image.layers]
    warm = fetch(url)
    assert (warm.size, warm.sha256) == (cold.size, cold.sha256)
    for layer in image.layers:
        assert fault_front.count("GET", layer.digest) == 1
