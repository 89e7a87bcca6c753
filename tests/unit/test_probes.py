"""The probe server (passthrough/probes.py) on a loopback socket, in this process: only
the probe paths, a stalled connection never holds up the next probe, and beyond
MAX_CONNECTIONS a connection is closed unanswered."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest
import requests

from passthrough import probes
from tests.support.procs import LOOPBACK


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [f"ok {environ['PATH_INFO']}\n".encode()]


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[probes.ProbeServer]:
    monkeypatch.setattr(probes, "MAX_CONNECTIONS", 4)
    monkeypatch.setattr(probes._Handler, "timeout", 1.0)
    listener = socket.create_server((LOOPBACK, 0))
    served = probes.ProbeServer(listener, probes.only_probes(app), tls=None)
    thread = threading.Thread(target=served.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield served
    finally:
        served.shutdown()
        served.server_close()
        thread.join(5)


def url(server: probes.ProbeServer, path: str) -> str:
    return f"http://{LOOPBACK}:{server.server_port}{path}"


def test_only_the_probe_paths_are_answered(server: probes.ProbeServer) -> None:
    for path in sorted(probes.PROBE_PATHS):
        answer = requests.get(url(server, path), timeout=5)
        assert answer.status_code == 200 and answer.text == f"ok {path}\n"
    other = requests.get(url(server, "/v2/"), timeout=5)
    assert other.status_code == 404 and "only /health, /ready and /metrics" in other.text


def test_stalled_connections_are_dropped_and_never_hold_up_a_probe(
    server: probes.ProbeServer,
) -> None:
    stalled = [socket.create_connection((LOOPBACK, server.server_port)) for _ in range(3)]
    stalled[0].sendall(b"GET /health HTTP/1.1\r\nHost: x")  # and never the rest
    started = time.monotonic()
    assert requests.get(url(server, "/health"), timeout=5).status_code == 200
    assert time.monotonic() - started < 0.5
    for sock in stalled:  # each dropped after the handler's timeout, with no answer
        sock.settimeout(5)
        assert sock.recv(100) == b""
        sock.close()


def test_beyond_max_connections_a_connection_is_closed_unanswered(
    server: probes.ProbeServer,
) -> None:
    held = [socket.create_connection((LOOPBACK, server.server_port)) for _ in range(4)]
    time.sleep(0.2)  # every one of them accepted and holding a slot
    extra = socket.create_connection((LOOPBACK, server.server_port))
    extra.settimeout(0.5)  # closed at once, long before the handlers' timeout
    assert extra.recv(100) == b""
    for sock in [*held, extra]:
        sock.close()
    time.sleep(1.2)  # the held ones timed out: their slots are free again
    assert requests.get(url(server, "/health"), timeout=5).status_code == 200
