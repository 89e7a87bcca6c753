"""Reliability and hostile input through the real server: upstream faults survived,
slow and idle clients, limits, SSRF policy, disk full, and draining on SIGTERM."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
import requests

from tests.support.fronts import FaultFront
from tests.support.helpers import sha256_hex
from tests.support.images import (
    File,
    Image,
    big_layer,
    make_layer,
    push_image,
    runnable_image,
    tar_layer,
)
from tests.support.procs import BackgroundHTTPServer
from tests.support.registry import RegistryServer
from tests.support.server import PassthroughServer

BIG_LAYER_BYTES = 12 << 20
#: One name for the registry whatever front it is reached through, so RepoTags (and so
#: the archive's bytes) are the same.
NAME = "registry.test:5000"


@pytest.fixture(scope="module")
def big_image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    """Runnable, plus a 12 MiB incompressible layer: larger than any socket buffer, so a
    client that stops reading really stalls the server."""
    layer = big_layer(tmp_path_factory.mktemp("big") / "layer.gz", BIG_LAYER_BYTES, seed=7)
    return runnable_image("MARKER-reliability", extra_layers=[layer])


@pytest.fixture(scope="module")
def pushed(registry_anon: RegistryServer, big_image: Image) -> str:
    push_image(registry_anon.url, "rel/big", "v1", big_image)
    return "/docker/rel__big_v1.tar"


def big_digest(image: Image) -> str:
    return max(image.layers, key=lambda layer: layer.size).digest


def fetch(url: str, **kwargs: object) -> requests.Response:
    response = requests.get(url, timeout=120, **kwargs)  # type: ignore[arg-type]
    return response


@pytest.fixture(scope="module")
def baseline(registry_anon: RegistryServer, pushed: str) -> bytes:
    """The archive as a fault-free download gives it."""
    with PassthroughServer({"REGISTRY_URL": registry_anon.url, "REGISTRY_NAME": NAME}) as server:
        response = fetch(server.url + pushed)
        assert response.status_code == 200
        return response.content


# -- upstream faults -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["cut", "503", "429"])
def test_upstream_faults_end_in_a_complete_identical_archive(
    kind, fault_front: FaultFront, passthrough_server, big_image, pushed, baseline
):
    server = passthrough_server(
        {
            "REGISTRY_URL": fault_front.url,
            "REGISTRY_NAME": NAME,
            "UPSTREAM_RETRIES": "3",
            "UPSTREAM_RETRY_AFTER_MAX": "5",
        }
    )
    digest = big_digest(big_image)
    fault_front.inject(digest=digest, kind=kind, nth=1, retry_after=1, cut_after=3 << 20)
    started = time.monotonic()
    response = fetch(server.url + pushed)
    assert response.status_code == 200
    assert sha256_hex(response.content) == sha256_hex(baseline)
    assert fault_front.count("GET", digest) == 2, "one faulted request, one retry"
    if kind == "cut":
        # The retry resumed where the cut stopped instead of starting over.
        assert fault_front.range_requests >= 1
    if kind == "429":
        assert time.monotonic() - started >= 1.0, "Retry-After was honoured"
    assert server.leftover_temp_files() == []


def test_retries_exhausted_before_the_first_byte_give_a_clean_http_error(
    fault_front: FaultFront, passthrough_server, big_image, pushed
):
    server = passthrough_server({"REGISTRY_URL": fault_front.url, "UPSTREAM_RETRIES": "2"})
    # The config is fetched before the 200: failing it for good is an HTTP error.
    fault_front.inject(digest=big_image.config_digest, kind="503", times=10)
    response = fetch(server.url + pushed)
    assert response.status_code == 503
    assert response.text.count("\n") == 1 and "503" in response.text
    assert fault_front.count("GET", big_image.config_digest) == 3


def test_retries_exhausted_after_the_first_byte_abort_the_transfer(
    fault_front: FaultFront, passthrough_server, big_image, pushed
):
    server = passthrough_server({"REGISTRY_URL": fault_front.url, "UPSTREAM_RETRIES": "2"})
    fault_front.inject(digest=big_digest(big_image), kind="cut", times=10, cut_after=1 << 20)
    response = requests.get(server.url + pushed, stream=True, timeout=120)
    assert response.status_code == 200
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        for _ in response.iter_content(1 << 20):
            pass
    assert server.leftover_temp_files() == []


# -- clients ---------------------------------------------------------------------------


class StalledClient:
    """A raw socket that asks for a download, reads the headers, then stops reading."""

    def __init__(self, url: str, path: str) -> None:
        parts = urllib.parse.urlsplit(url)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.settimeout(30)
        self.sock.connect((parts.hostname, parts.port))
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(1024)
            if not chunk:
                break
            head += chunk
        self.status = int(head.split(b" ", 2)[1]) if head else 0

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def stalled() -> Iterator[list[StalledClient]]:
    clients: list[StalledClient] = []
    yield clients
    for client in clients:
        client.close()


def test_slow_clients_do_not_starve_others_and_the_cap_answers_503(
    registry_anon, passthrough_server, pushed, baseline, stalled
):
    server = passthrough_server(
        {"REGISTRY_URL": registry_anon.url, "REGISTRY_NAME": NAME}, workers=1, threads=16
    )
    for _ in range(12):
        stalled.append(StalledClient(server.url, pushed))
    assert all(client.status == 200 for client in stalled)
    assert requests.get(server.url + "/health", timeout=10).status_code == 200
    response = fetch(server.url + pushed)
    assert response.status_code == 200 and sha256_hex(response.content) == sha256_hex(baseline)

    capped = passthrough_server(
        {"REGISTRY_URL": registry_anon.url, "MAX_CONCURRENT_DOWNLOADS": "2"}, threads=8
    )
    stalled.extend(StalledClient(capped.url, pushed) for _ in range(2))
    refused = fetch(capped.url + pushed)
    assert refused.status_code == 503
    assert refused.headers["Retry-After"].isdigit()
    assert requests.get(capped.url + "/health", timeout=10).status_code == 200


def test_a_client_that_stops_reading_is_dropped(registry_anon, passthrough_server, pushed, stalled):
    server = passthrough_server(
        {
            "REGISTRY_URL": registry_anon.url,
            "CLIENT_IDLE_TIMEOUT": "2",
            "MAX_CONCURRENT_DOWNLOADS": "1",
        },
        threads=4,
    )
    stalled.append(StalledClient(server.url, pushed))
    assert stalled[0].status == 200
    assert fetch(server.url + pushed).status_code == 503, "the stalled download holds the slot"
    deadline = time.monotonic() + 60
    while (
        "outcome=client_gone" not in server.log_text()
        and "outcome=aborted" not in server.log_text()
    ):
        assert time.monotonic() < deadline, server.log_text()[-3000:]
        time.sleep(0.5)
    # Dropped: its slot is free again and nothing of it is left on disk.
    assert fetch(server.url + pushed).status_code == 200
    assert server.leftover_temp_files() == []


def test_sigterm_drains_an_in_flight_download(registry_anon, pushed, baseline):
    server = PassthroughServer(
        {"REGISTRY_URL": registry_anon.url, "REGISTRY_NAME": NAME, "GRACEFUL_TIMEOUT": "30"}
    )
    server.start()
    try:
        response = requests.get(server.url + pushed, stream=True, timeout=60)
        assert response.status_code == 200
        chunks = response.iter_content(64 << 10)
        received = [next(chunks)]
        os.kill(server.pid, signal.SIGTERM)
        received.extend(chunks)
        assert sha256_hex(b"".join(received)) == sha256_hex(baseline)
        process = server.process
        assert process is not None
        deadline = time.monotonic() + 30
        while process.poll() is None:
            assert time.monotonic() < deadline, "the server did not exit after draining"
            time.sleep(0.1)
        assert process.returncode == 0
    finally:
        server.stop()
        server.cleanup()


# -- hostile input ---------------------------------------------------------------------

FUZZ_ALPHABET = [
    *list("abcXYZ019_-.:@/%~+ "),
    "%00",
    "%0d%0a",
    "%2F",
    "%3A",
    "%40",
    "%FF",
    "é",
    "..",
    "__",
]


def random_path(rng: random.Random, registry_host: str) -> str:
    segment = "".join(rng.choice(FUZZ_ALPHABET) for _ in range(rng.randint(0, 40)))
    tail = rng.choice([".tar", "", ".tgz", "_v1.tar", ":v1.tar", "@sha256:" + "a" * 64 + ".tar"])
    prefix = rng.choice(
        [
            "/docker/",
            "/ref/",
            f"/registry/http/{registry_host}/docker/",
            f"/registry/{rng.choice(['http', 'https', 'ftp', 'HTTP', ''])}/{segment[:10]}/docker/",
            f"/registry-auth/http/{registry_host}/docker/",
            f"/registry/http/{registry_host}/ref/",
            "/describe/docker/",
            "/",
        ]
    )
    query = rng.choice(["", "?platform=" + segment[:12], "?format=" + segment[:5], "?layers=x"])
    path = prefix + segment + tail + query
    return urllib.parse.quote(path, safe="/%:@?=_-.~+")


def test_fuzzed_paths_get_4xx_never_5xx_or_a_dropped_connection(registry_anon, passthrough_server):
    server = passthrough_server({"REGISTRY_URL": registry_anon.url, "UPSTREAM_RETRIES": "0"})
    rng = random.Random(20261123)
    parts = urllib.parse.urlsplit(server.url)
    statuses: dict[int, int] = {}
    for _ in range(300):
        path = random_path(rng, registry_anon.host)
        with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        match = re.match(rb"HTTP/1\.[01] (\d{3}) ", answer)
        assert match, f"dropped connection for {path!r}"
        status = int(match.group(1))
        statuses[status] = statuses.get(status, 0) + 1
        assert status < 500, f"{status} for {path!r}: {answer[-300:]!r}"
        assert b"Traceback" not in answer
    assert sum(statuses.values()) == 300
    assert any(400 <= s < 500 for s in statuses)
    assert "Traceback" not in server.log_text()


# -- SSRF --------------------------------------------------------------------------------


class HostileRegistry(BaseHTTPRequestHandler):
    """A registry whose challenge realm, or config blob redirect, points where the
    operator's policy forbids (``self.server.owner`` says where)."""

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        owner = self.server.owner  # type: ignore[attr-defined]
        if owner["mode"] == "realm":
            self.send_response(401)
            self.send_header(
                "WWW-Authenticate", f'Bearer realm="{owner["target"]}/token",service="x"'
            )
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if "/manifests/" in self.path:
            body = owner["manifest"]
            self.send_response(200)
            self.send_header("Content-Type", "application/vnd.docker.distribution.manifest.v2+json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.send_response(307)
        self.send_header("Location", f"{owner['target']}/blob")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = do_GET


@pytest.fixture
def hostile() -> Iterator[tuple[BackgroundHTTPServer, dict[str, object]]]:
    config = b'{"rootfs":{"type":"layers","diff_ids":[]}}'
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "config": {
                "mediaType": "application/vnd.docker.container.image.v1+json",
                "size": len(config),
                "digest": "sha256:" + hashlib.sha256(config).hexdigest(),
            },
            "layers": [],
        }
    ).encode()
    owner: dict[str, object] = {"mode": "realm", "target": "", "manifest": manifest}
    server = BackgroundHTTPServer(HostileRegistry, owner, name="hostile").start()
    yield server, owner
    server.stop()


@pytest.mark.parametrize("mode", ["realm", "redirect"])
@pytest.mark.parametrize("target", ["http://169.254.169.254", "http://[fd00:ec2::254]"])
def test_metadata_addresses_are_refused_for_realm_and_redirect(
    mode, target, hostile, passthrough_server
):
    server_, owner = hostile
    owner.update(mode=mode, target=target)
    server = passthrough_server({"REGISTRY_URL": server_.url, "UPSTREAM_RETRIES": "0"})
    response = fetch(server.url + "/docker/team__x_v1.tar")
    assert response.status_code == 403, response.text
    assert "link-local or cloud metadata" in response.text


def test_metadata_address_is_refused_as_registry(passthrough_server, registry_anon):
    server = passthrough_server({"REGISTRY_URL": registry_anon.url})
    for host in ("169.254.169.254", "169.254.0.1%3A5000", "[fd00:ec2::254]"):
        response = fetch(f"{server.url}/registry/http/{host}/docker/team__x_v1.tar")
        assert response.status_code == 403, (host, response.text)


def test_allowlist_holds_for_registry_realm_and_redirect(
    hostile, passthrough_server, registry_anon, registry_basic, registry_token, redirect_front_anon
):
    server_, owner = hostile
    owner.update(mode="realm", target=registry_basic.url)  # realm on a host not listed
    allow = f"127.0.0.1:{server_.port} {registry_token.host} {redirect_front_anon.host}"
    server = passthrough_server({"REGISTRY_URL": registry_anon.url, "REGISTRY_ALLOWLIST": allow})
    # Registry not listed.
    refused = fetch(f"{server.url}/registry/http/127.0.0.1%3A1/docker/team__x_v1.tar")
    assert refused.status_code == 403 and "REGISTRY_ALLOWLIST" in refused.text
    # Realm not listed (the hostile registry points it at another port).
    realm = fetch(f"{server.url}/registry/http/{server_.address}/docker/team__x_v1.tar")
    assert realm.status_code == 403 and "REGISTRY_ALLOWLIST" in realm.text
    # Redirect target (the 127.0.0.2 blob host) not listed: the config redirect is refused.
    owner.update(mode="redirect", target=redirect_front_anon.blob_host.url)
    redirect = fetch(f"{server.url}/registry/http/{server_.address}/docker/team__x_v1.tar")
    assert redirect.status_code == 403 and "REGISTRY_ALLOWLIST" in redirect.text
    # The environment's registry is always allowed.
    assert fetch(f"{server.url}/docker/nothing__here_v1.tar").status_code == 404


# -- disk full -------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_disk_full_gives_a_clean_error_and_the_next_download_works(
    small_disk, registry_anon, passthrough_server, pushed, tmp_path
):
    small = runnable_image("MARKER-small")
    push_image(registry_anon.url, "rel/small", "v1", small)
    # Compresses to almost nothing, inflates past the 4 MiB disk: found out while spooling.
    zeros = runnable_image(
        "MARKER-zeros", extra_layers=[make_layer(tar_layer([File("zeros", b"\0" * (8 << 20))]))]
    )
    push_image(registry_anon.url, "rel/zeros", "v1", zeros)
    server = passthrough_server({"REGISTRY_URL": registry_anon.url, "TEMP_DIR": str(small_disk)})

    # Known too big before the first byte: 507, nothing sent.
    response = fetch(server.url + pushed)
    assert response.status_code == 507
    assert "disk" in response.text
    assert list(small_disk.iterdir()) == []
    # The server goes on serving.
    ok = fetch(server.url + "/docker/rel__small_v1.tar")
    assert ok.status_code == 200 and len(ok.content) > 100_000
    assert list(small_disk.iterdir()) == []

    # Found out after the 200: the transfer is aborted, never ended cleanly.
    spooled = requests.get(server.url + "/docker/rel__zeros_v1.tar", stream=True, timeout=60)
    assert spooled.status_code == 200
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        for _ in spooled.iter_content(1 << 20):
            pass
    assert "no space left" in server.log_text()
    again = fetch(server.url + "/docker/rel__small_v1.tar")
    assert again.status_code == 200 and again.content == ok.content
    assert list(small_disk.iterdir()) == []


def test_the_cap_is_max_transfers_not_the_thread_count(
    registry_anon, passthrough_server, pushed, stalled
):
    # The cap is the pod's MAX_TRANSFERS (issue 18), no longer derived from the threads:
    # gunicorn.conf.py sizes the threads from it. Set below them, it still refuses at once.
    server = passthrough_server(
        {"REGISTRY_URL": registry_anon.url, "MAX_TRANSFERS": "1"}, threads=3
    )
    stalled.append(StalledClient(server.url, pushed))
    assert stalled[0].status == 200
    assert fetch(server.url + pushed).status_code == 503
    assert requests.get(server.url + "/health", timeout=10).status_code == 200
