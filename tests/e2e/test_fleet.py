"""A fleet at once (issue 18), through real gunicorn with passthrough's worker: the pod's
transfer slots are shared by its workers (over MAX_TRANSFERS: 503 with Retry-After at
once, on the tar route and /v2 blobs alike), the probe port answers while every slot is
held and whatever the workers do (its server is a process of its own, gone with the
master), stalled connections are dropped after their deadline and counted, and a
SIGKILLed worker's slots come back."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.support.procs import LOOPBACK, free_port
from tests.support.registry import RegistryServer, push_image, registry_session
from tests.support.server import PassthroughServer

#: MAX_TRANSFERS of the capped server: small, so slow readers can fill it.
CAP = 6
#: Larger than any socket buffer on loopback (the server's send buffer grows to 4 MiB):
#: a client that stops reading really holds its transfer.
LAYER_BYTES = 12 << 20
REPOSITORY = "fleet/app"


@dataclass(frozen=True)
class Pushed:
    tar: str
    blob: str


@pytest.fixture(scope="module")
def pushed(registry_anon: RegistryServer) -> Pushed:
    layer = os.urandom(LAYER_BYTES)
    with registry_session(registry_anon) as session:
        image = push_image(session, REPOSITORY, "v1", [layer])
    return Pushed(f"/ref/{REPOSITORY}:v1.tar", f"/v2/{REPOSITORY}/blobs/{image.layer_digests[0]}")


@dataclass
class Fleet:
    """A passthrough with two workers and its probe port (HEALTH_BIND) on loopback."""

    server: PassthroughServer
    health_port: int

    def probe(self, path: str) -> tuple[int, float]:
        started = time.monotonic()
        answer = requests.get(f"http://{LOOPBACK}:{self.health_port}{path}", timeout=10)
        return answer.status_code, time.monotonic() - started

    def metric(self, name: str, labels: str = "") -> float:
        # The main port renders at once (the probe port's is a snapshot up to 1 s old).
        text = requests.get(f"{self.server.url}/metrics", timeout=10).text
        found = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
        return float(found[1]) if found else 0.0

    def children(self) -> list[int]:
        children = Path(f"/proc/{self.server.pid}/task/{self.server.pid}/children")
        return [int(pid) for pid in children.read_text().split()]

    def probe_server_pid(self) -> int:
        """The master's child that is not a gunicorn worker: the probe server."""
        for pid in self.children():
            if b"passthrough.probes" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
        raise AssertionError("no probe server among the master's children")

    def worker_pids(self) -> list[int]:
        return [pid for pid in self.children() if pid != self.probe_server_pid()]


def start_fleet(tmp: Path, env: dict[str, str], threads: int) -> Fleet:
    health_port = free_port()
    bind = f"{LOOPBACK}:{health_port}"
    server = PassthroughServer(
        {**env, "CACHE_DIR": str(tmp / "cache"), "HEALTH_BIND": bind},
        workers=2, threads=threads, tmp_root=tmp,
    )  # fmt: skip
    server.start()
    return Fleet(server, health_port)


@pytest.fixture(scope="module")
def fleet(
    registry_anon: RegistryServer, pushed: Pushed, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fleet]:
    env = {"REGISTRY_URL": registry_anon.url, "MAX_TRANSFERS": str(CAP)}
    fleet = start_fleet(tmp_path_factory.mktemp("fleet"), env, threads=CAP + 8)
    try:
        # Warm: the blob in the store, the tar's layers too.
        for path in (pushed.blob, pushed.tar):
            assert requests.get(fleet.server.url + path, timeout=120).status_code == 200
        yield fleet
    finally:
        fleet.server.stop()


class SlowReader:
    """A GET whose client reads the status line and then stops reading: the server holds
    the transfer (and its slot) until the reader closes."""

    def __init__(self, port: int, path: str) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 10)
        self.sock.settimeout(30)
        self.sock.connect((LOOPBACK, port))
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: fleet\r\n\r\n".encode())
        self.status = int(self.sock.recv(64).split()[1])

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def readers() -> Iterator[list[SlowReader]]:
    held: list[SlowReader] = []
    yield held
    for reader in held:
        reader.close()


def fill(fleet: Fleet, pushed: Pushed, readers: list[SlowReader]) -> None:
    """Every slot held: half by tar downloads, half by /v2 blob bodies."""
    wait_for(lambda: fleet.metric("passthrough_transfers_in_use") == 0, "the last test's gone")
    for index in range(CAP):
        path = pushed.tar if index % 2 else pushed.blob
        readers.append(SlowReader(fleet.server.port, path))
    assert [r.status for r in readers] == [200] * CAP
    wait_for(lambda: fleet.metric("passthrough_transfers_in_use") == CAP, "every slot held")


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout:g} s: {what}"
        time.sleep(0.2)


def refused_at_once(url: str) -> requests.Response:
    started = time.monotonic()
    answer = requests.get(url, timeout=10)
    assert time.monotonic() - started < 1.0, "over the cap is answered at once"
    assert answer.status_code == 503
    assert answer.headers["Retry-After"].isdigit()
    return answer


def test_over_the_pods_cap_both_routes_answer_503_at_once(
    fleet: Fleet, pushed: Pushed, readers: list[SlowReader]
) -> None:
    fill(fleet, pushed, readers)
    tar = refused_at_once(fleet.server.url + pushed.tar)
    assert tar.text.count("\n") == 1 and f"{CAP} transfers" in tar.text
    blob = refused_at_once(fleet.server.url + pushed.blob)
    assert json.loads(blob.text)["errors"][0]["code"] == "UNAVAILABLE"
    # A HEAD sends no body: it takes no slot.
    assert requests.head(fleet.server.url + pushed.blob, timeout=10).status_code == 200
    assert fleet.metric("passthrough_transfers_refused_total", '{kind="tar"}') >= 1
    assert fleet.metric("passthrough_transfers_refused_total", '{kind="v2"}') >= 1
    # One transfer ends: its slot is free again, for either route.
    readers.pop().close()
    wait_for(
        lambda: requests.get(fleet.server.url + pushed.blob, timeout=60).status_code == 200,
        "a freed slot serves a new transfer",
    )


def test_probes_answer_while_every_slot_is_held(
    fleet: Fleet, pushed: Pushed, readers: list[SlowReader]
) -> None:
    fill(fleet, pushed, readers)
    for _ in range(5):
        status, seconds = fleet.probe("/health")
        assert status == 200 and seconds < 1.0
        for path in ("/ready", "/metrics"):
            status, seconds = fleet.probe(path)
            assert status == 200 and seconds < 2.0
    # The main port answers /health too; the probe port answers nothing else.
    assert requests.get(fleet.server.url + "/health", timeout=5).status_code == 200
    other = requests.get(f"http://{LOOPBACK}:{fleet.health_port}{pushed.tar}", timeout=5)
    assert other.status_code == 404


def test_the_probe_server_answers_whatever_the_workers_do_and_ends_with_the_master(
    registry_anon: RegistryServer, tmp_path: Path
) -> None:
    fleet = start_fleet(tmp_path, {"REGISTRY_URL": registry_anon.url}, threads=8)
    try:
        probe_pid = fleet.probe_server_pid()
        workers = fleet.worker_pids()
        assert len(workers) == 2
        # Every worker stopped (the extreme of busy): the probe port still answers.
        for pid in workers:
            os.kill(pid, signal.SIGSTOP)
        try:
            for path, limit in (("/health", 1.0), ("/ready", 2.0), ("/metrics", 2.0)):
                status, seconds = fleet.probe(path)
                assert status == 200 and seconds < limit, (path, status, seconds)
        finally:
            for pid in workers:
                os.kill(pid, signal.SIGCONT)
        # The master killed outright: nothing left to serve, and the probes say so.
        os.kill(fleet.server.pid, signal.SIGKILL)
        wait_for(lambda: not Path(f"/proc/{probe_pid}").exists()
                 or b"Z" in Path(f"/proc/{probe_pid}/stat").read_bytes().split(b" ")[2],
                 "the probe server gone with the master", timeout=10)  # fmt: skip
        with pytest.raises(requests.ConnectionError):
            fleet.probe("/health")
    finally:
        fleet.server.stop()


def socket_owners(fleet: Fleet, readers: list[SlowReader]) -> dict[int, int]:
    """How many of the readers' connections each worker holds (from /proc)."""
    ports = {r.sock.getsockname()[1] for r in readers}
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = (int(f.rsplit(":", 1)[1], 16) for f in fields[1:3])
        if local == fleet.server.port and remote in ports:
            inodes.add(f"socket:[{fields[9]}]")
    owners = {}
    for pid in fleet.worker_pids():
        fds = Path(f"/proc/{pid}/fd")
        owners[pid] = sum(1 for fd in fds.iterdir() if os.readlink(fd) in inodes)
    return owners


def test_a_sigkilled_workers_slots_come_back(
    fleet: Fleet, pushed: Pushed, readers: list[SlowReader]
) -> None:
    fill(fleet, pushed, readers)
    owners = socket_owners(fleet, readers)
    victim = max(owners, key=lambda pid: owners[pid])
    assert owners[victim] > 0
    os.kill(victim, signal.SIGKILL)
    left = CAP - owners[victim]
    wait_for(lambda: fleet.metric("passthrough_transfers_in_use") == left, "slots released")
    # The master forks a new worker; the freed slots serve new transfers.
    for _ in range(owners[victim]):
        readers.append(SlowReader(fleet.server.port, pushed.blob))
        assert readers[-1].status == 200
    refused_at_once(fleet.server.url + pushed.tar)


# -- stalled connections ----------------------------------------------------------------


def stall(port: int, kind: str, path: str) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 10)
    sock.connect((LOOPBACK, port))
    if kind == "headers":
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: fleet\r\nX-Slow: ")
    elif kind == "body":
        sock.sendall(
            f"PUT /v2/{REPOSITORY}/blobs/uploads/x?digest=sha256:00 HTTP/1.1\r\n"
            "Host: fleet\r\nContent-Length: 100000\r\n\r\nx".encode()
        )
    elif kind == "send":
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: fleet\r\n\r\n".encode())
    return sock


#: 200 stalled connections: silent, a partial head, a partial body, a response unread.
STALLS = {"idle": 70, "headers": 70, "body": 40, "send": 20}


def test_stalled_connections_are_dropped_counted_and_probes_answer(
    registry_anon: RegistryServer, pushed: Pushed, tmp_path: Path
) -> None:
    env = {
        "REGISTRY_URL": registry_anon.url,
        "HEADER_TIMEOUT": "3",
        "BODY_TIMEOUT": "3",
        "SEND_TIMEOUT": "4",
    }
    fleet = start_fleet(tmp_path, env, threads=64)
    try:
        assert requests.get(fleet.server.url + pushed.blob, timeout=120).status_code == 200
        port = fleet.server.port
        socks = [stall(port, kind, pushed.blob) for kind, n in STALLS.items() for _ in range(n)]
        try:
            expected = {f'{{phase="{kind}"}}': n for kind, n in STALLS.items()}

            def all_dropped() -> bool:
                status, seconds = fleet.probe("/health")
                assert status == 200 and seconds < 1.0, f"/health took {seconds:.2f} s"
                return all(
                    fleet.metric("passthrough_connections_dropped_total", labels) >= n
                    for labels, n in expected.items()
                )

            wait_for(all_dropped, "every stalled connection dropped and counted", 60)
        finally:
            for sock in socks:
                sock.close()
        # Quietly: a count, not a traceback per connection.
        log = fleet.server.log_text()
        assert "Traceback" not in log and "Socket error" not in log
    finally:
        fleet.server.stop()
