"""passthrough's gunicorn worker without a server (tests/e2e/test_fleet.py runs it for
real): the gthread internals it overrides are still there, and its socket reader holds
the head to a total deadline and a body to its idle timeout. A socketpair and a thread
stand in for the client; no process is started."""

from __future__ import annotations

import inspect
import socket
import threading
import time

import gunicorn
import pytest
from gunicorn.http.errors import NoMoreData
from gunicorn.http.unreader import SocketUnreader
from gunicorn.workers import gthread

from passthrough.errors import ClientStalled
from passthrough.web.worker import Conn, DeadlineReader, Deadlines, Stalled


def test_the_gthread_internals_it_overrides_are_there() -> None:
    """setup.cfg pins gunicorn to 27.0.x for these; a new release must pass this first."""
    assert gunicorn.__version__.startswith("27.0.")
    for name in (
        "accept", "enqueue_req", "handle", "handle_request", "finish_request",
        "murder_pending", "murder_keepalived", "on_pending_socket_readable", "init_process",
    ):  # fmt: skip
        assert callable(getattr(gthread.ThreadWorker, name)), name
    assert list(inspect.signature(gthread.TConn.__init__).parameters) == [
        "self", "cfg", "sock", "client", "server"
    ]  # fmt: skip
    assert list(inspect.signature(gthread.TConn.close).parameters) == ["self", "graceful"]
    assert list(inspect.signature(SocketUnreader.chunk).parameters) == ["self", "size_hint"]


def test_a_stall_is_quiet_for_gunicorn_and_a_timeout_for_the_app() -> None:
    stalled = Stalled("body")
    assert isinstance(stalled, NoMoreData)  # gunicorn: a client gone, a debug line
    assert isinstance(stalled, ClientStalled) and isinstance(stalled, TimeoutError)
    assert stalled.phase == "body" and "body" in str(stalled)


def bare_conn(limits: Deadlines) -> Conn:
    """A Conn's deadline state without a worker or a socket of gunicorn's."""
    conn = Conn.__new__(Conn)
    conn.limits = limits
    conn.phase = "headers"
    conn.head_deadline = time.monotonic() + limits.header
    conn.dropped = None
    conn.body_received = 0
    conn.body_waited = 0.0
    return conn


@pytest.fixture
def pair():
    server, client = socket.socketpair()
    yield server, client
    server.close()
    client.close()


def test_a_head_trickled_byte_by_byte_hits_its_total_deadline(pair) -> None:
    server, client = pair
    conn = bare_conn(Deadlines(header=0.6, body_idle=5, body_min_rate=0, send=5))
    reader = DeadlineReader(server, conn)
    stop = threading.Event()

    def trickle() -> None:
        while not stop.wait(0.1):
            client.sendall(b"x")

    thread = threading.Thread(target=trickle)
    thread.start()
    started = time.monotonic()
    try:
        with pytest.raises(Stalled):
            while True:
                reader.chunk()
    finally:
        stop.set()
        thread.join()
    # Each recv got a byte well within any per-recv timeout: only a total stops it.
    assert 0.5 < time.monotonic() - started < 1.5
    assert conn.dropped == "headers"


def test_a_body_idle_past_its_timeout_is_dropped_and_sends_get_their_own(pair) -> None:
    server, client = pair
    conn = bare_conn(Deadlines(header=5, body_idle=0.3, body_min_rate=0, send=7))
    conn.phase = "body"
    reader = DeadlineReader(server, conn)
    client.sendall(b"part of a body")
    assert reader.chunk(1024) == b"part of a body"
    assert server.gettimeout() == 7, "the response's writes have SEND_TIMEOUT"
    started = time.monotonic()
    with pytest.raises(Stalled):
        reader.chunk(1024)
    assert 0.25 < time.monotonic() - started < 1.5
    assert conn.dropped == "body" and conn.body_received == len(b"part of a body")


def test_the_minimum_body_rate_counts_only_time_spent_waiting_for_the_client() -> None:
    conn = bare_conn(Deadlines(header=5, body_idle=5, body_min_rate=1000, send=5))
    conn.body_waited, conn.body_received = 9.0, 0
    assert not conn.body_too_slow(), "within the grace"
    conn.body_waited, conn.body_received = 20.0, 9_000
    assert conn.body_too_slow()
    conn.body_received = 11_000
    assert not conn.body_too_slow()
