"""passthrough's gunicorn worker: gthread's ThreadWorker, made to hold a fleet of slow
clients (gunicorn.conf.py's ``worker_class``).

What it changes, and why:

- **Closing never blocks the event loop.** gthread closes a finished connection on its
  main thread with ``util.close_graceful``: shut the write side, then wait up to 2 s
  for the peer's FIN. A slow reader still has its socket buffer to read, so every
  download that ended stopped accepts, keep-alive dispatch and completions for up to
  2 s (first byte p99 18.8 s at 500 clients). Here the half-closed socket waits in the
  poller (:meth:`PassthroughWorker.linger`).
- **Deadlines, as totals.** A new connection waits for its first byte in the poller,
  not in a thread; its request head must be whole within HEADER_TIMEOUT of the accept
  (of the previous response on a kept-alive one; what arrived by then is read even when
  this worker's threads come to it later); a body must not go BODY_TIMEOUT
  without a byte, nor average under BODY_MIN_RATE once past :data:`BODY_GRACE` seconds
  of waiting; each write of a response must be taken by the client within
  SEND_TIMEOUT. A connection past one is closed without a traceback and counted in
  ``passthrough_connections_dropped_total{phase=idle|headers|body|send}``.

- **Stored layers leave by ``sendfile``.** The app finds ``environ[SEND_REGION]``
  (:class:`RegionSender`): a tar download hands it each layer on local disk as one
  :class:`~passthrough.export.tarstream.FileRegion`, sent by the kernel from the page
  cache instead of being copied through Python 64 KiB at a time (not over TLS, where
  the bytes must pass through the TLS layer).

The probe port (HEALTH_BIND) is not served here but by a process of its own
(:mod:`passthrough.probes`): a worker's threads would delay a probe by seconds.

It overrides internals of gunicorn 27.0 (TConn, ``accept``, ``handle``,
``handle_request``, ``murder_pending``, ``pending_conns``), hence the pin in setup.cfg;
tests/e2e/test_fleet.py exercises each override on a real gunicorn.
"""

from __future__ import annotations

import errno
import selectors
import socket
import time
from collections import deque
from dataclasses import dataclass
from functools import partial
from typing import Any

from gunicorn import util
from gunicorn.http import wsgi as gunicorn_wsgi
from gunicorn.http.errors import NoMoreData
from gunicorn.http.unreader import SocketUnreader
from gunicorn.workers import gthread

from passthrough.config import load_server_settings
from passthrough.errors import ClientStalled
from passthrough.export.tarstream import FileRegion
from passthrough.observe import metrics

#: How long a closed connection may take to send its FIN (gthread's close_graceful).
LINGER_SECONDS = 2.0
#: At most this much of a closing connection's leftover request is read and dropped.
LINGER_DRAIN = 64 << 10
#: Seconds of waiting for a body before BODY_MIN_RATE applies.
BODY_GRACE = 10.0


@dataclass(frozen=True)
class Deadlines:
    """The server settings this worker enforces (see the module's docstring)."""

    header: float
    body_idle: float
    body_min_rate: int
    send: float


class Stalled(NoMoreData, ClientStalled):  # type: ignore[misc]
    """Raised from a socket read past its deadline. gunicorn takes a NoMoreData for a
    client that left (a debug line, no traceback); a view reading a body sees a
    ClientStalled (408)."""

    def __init__(self, phase: str) -> None:
        ClientStalled.__init__(self, phase)
        self.buf = None

    def __str__(self) -> str:
        return f"the client stalled ({self.phase})"


class DeadlineReader(SocketUnreader):  # type: ignore[misc]
    """The parser's socket reader, each recv bounded by the connection's phase: the head
    by what is left of its total deadline, a body by the idle timeout and the rate."""

    def __init__(self, sock: socket.socket, conn: Conn) -> None:
        super().__init__(sock)
        self.conn = conn

    def chunk(self, size_hint: int | None = None) -> bytes:
        conn = self.conn
        if conn.phase == "drain":  # gthread's own bounded drain after the response
            drained: bytes = super().chunk(size_hint)
            return drained
        if conn.phase == "headers":
            # Past the deadline only what the client already sent is read (a timeout of
            # 0 does not wait): a head that came in time but waited for this server's
            # threads (a fleet arriving at once, on a busy machine) is served, not reset.
            self.sock.settimeout(max(0.0, conn.head_deadline - time.monotonic()))
        else:
            self.sock.settimeout(conn.limits.body_idle)
        started = time.monotonic()
        try:
            data: bytes = super().chunk(size_hint)
        except (TimeoutError, BlockingIOError):
            raise conn.stalled(conn.phase) from None
        finally:
            if conn.phase == "body":
                self.sock.settimeout(conn.limits.send)  # the response's writes next
        if conn.phase == "body":
            conn.body_waited += time.monotonic() - started
            conn.body_received += len(data)
            if conn.body_too_slow():
                raise conn.stalled("body")
        return data


class Conn(gthread.TConn):  # type: ignore[misc]
    """A connection with its deadlines and a close that lingers in the worker's poller
    instead of blocking."""

    def __init__(
        self, worker: PassthroughWorker, sock: socket.socket, client: Any, server: Any
    ) -> None:
        super().__init__(worker.cfg, sock, client, server)
        self.worker = worker
        self.limits = worker.limits
        self.phase = "headers"
        self.head_deadline = time.monotonic() + self.limits.header
        self.body_received = 0
        self.body_waited = 0.0
        #: The phase it stalled in, once it has: it is then closed, never reused.
        self.dropped: str | None = None
        self.drained = 0

    def init(self) -> None:
        fresh = not self.initialized
        super().init()
        if fresh and self.parser is not None and not self.is_http2:
            reader = DeadlineReader(self.sock, self)
            reader.buf = self.parser.unreader.buf  # anything a preface check gave back
            self.parser.unreader = reader

    def next_request(self) -> None:
        """A kept-alive connection's next head: a new total deadline from now."""
        self.phase = "headers"
        self.head_deadline = time.monotonic() + self.limits.header

    def start_body(self) -> None:
        self.phase = "body"
        self.body_received = 0
        self.body_waited = 0.0

    def body_too_slow(self) -> bool:
        rate, waited = self.limits.body_min_rate, self.body_waited - BODY_GRACE
        return bool(rate) and waited > 0 and self.body_received < rate * waited

    def stalled(self, phase: str) -> Stalled:
        self.dropped = self.dropped or phase
        return Stalled(phase)

    def close(self, graceful: bool = False) -> None:
        if graceful and self.dropped is None:
            self.worker.linger(self)
        else:
            util.close(self.sock)


#: The WSGI environ key of :func:`send_region` for this response (absent: send bytes).
SEND_REGION = "passthrough.send_region"


class _Descriptor:
    """What socket.sendfile needs of a file: its descriptor (the region's file stays
    open, and owned, by the download)."""

    def __init__(self, fileno: int) -> None:
        self._fileno = fileno

    def fileno(self) -> int:
        return self._fileno


def send_region(response: Any, region: FileRegion) -> None:
    """Send ``region`` as the next bytes of gunicorn's ``response`` with sendfile, as its
    ``write`` would have sent them (headers first, chunk framing when chunked, the
    count kept); a client that stops taking them times out at SEND_TIMEOUT."""
    response.send_headers()
    sock = response.sock
    if response.chunked:
        sock.sendall(b"%X\r\n" % region.count)
    sock.sendfile(_Descriptor(region.fileno), region.offset, region.count)
    if response.chunked:
        sock.sendall(b"\r\n")
    response.sent += region.count


class RegionSender:
    """WSGI middleware: each response gets ``environ[SEND_REGION]``, :func:`send_region`
    bound to its gunicorn Response (the object whose method ``start_response`` is)."""

    def __init__(self, app: Any, *, tls: bool) -> None:
        self.app = app
        self.tls = tls

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        response = getattr(start_response, "__self__", None)
        if not self.tls and isinstance(response, gunicorn_wsgi.Response):
            environ[SEND_REGION] = partial(send_region, response)
        return self.app(environ, start_response)


class PassthroughWorker(gthread.ThreadWorker):  # type: ignore[misc]
    """gthread with the changes of the module's docstring."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        server = load_server_settings()
        self.limits = Deadlines(
            server.header_timeout, server.body_timeout, server.body_min_rate, server.send_timeout
        )
        self.lingering: deque[Conn] = deque()

    # -- accepting: the first byte is awaited in the poller ---------------------------------

    def load_wsgi(self) -> None:
        super().load_wsgi()
        app: Any = getattr(self, "wsgi")  # noqa: B009 - gunicorn's untyped attribute
        self.wsgi = RegionSender(app, tls=bool(self.cfg.is_ssl))

    def accept(self, listener: socket.socket) -> None:
        try:
            client, address = listener.accept()
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                return
            raise
        self.nr_conns += 1
        conn = Conn(self, client, address, listener.getsockname())
        # Every pending connection has the same timeout from its accept, so the deque
        # stays sorted, as murder_pending needs.
        conn.timeout = conn.head_deadline
        self.pending_conns.append(conn)
        self.poller.register(
            client, selectors.EVENT_READ, partial(self.on_pending_socket_readable, conn)
        )

    def murder_pending(self) -> None:
        """Connections that sent nothing within HEADER_TIMEOUT: closed and counted."""
        before = len(self.pending_conns)
        super().murder_pending()
        for _ in range(before - len(self.pending_conns)):
            metrics.connection_dropped("idle")

    # -- serving ------------------------------------------------------------------------------

    def handle(self, conn: Conn) -> Any:
        if conn.initialized:
            conn.next_request()
        result = super().handle(conn)
        if conn.dropped is not None:
            metrics.connection_dropped(conn.dropped)
            self.log.debug("dropped a connection that stalled (%s)", conn.dropped)
            return False
        return result

    def handle_request(self, req: Any, conn: Conn) -> bool:
        conn.start_body()
        conn.sock.settimeout(self.limits.send)
        try:
            return bool(super().handle_request(req, conn))
        except TimeoutError:
            # A write the client did not take within SEND_TIMEOUT (or a body read past
            # its deadline that escaped the app): drop it, quietly.
            conn.dropped = conn.dropped or "send"
            return False
        finally:
            conn.phase = "drain"

    # -- closing without blocking the loop -------------------------------------------------

    def linger(self, conn: Conn) -> None:
        """Half-close and wait in the poller (at most LINGER_SECONDS) for the peer's FIN,
        so the last bytes are not cut by a reset; gthread did this blocking."""
        sock = conn.sock
        try:
            sock.shutdown(socket.SHUT_WR)
            sock.setblocking(False)
            self.poller.register(sock, selectors.EVENT_READ, partial(self._drain, conn))
        except (OSError, ValueError):
            util.close(sock)
            return
        conn.timeout = time.monotonic() + LINGER_SECONDS
        self.lingering.append(conn)

    def _drain(self, conn: Conn, sock: socket.socket) -> None:
        try:
            data = sock.recv(LINGER_DRAIN)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        conn.drained += len(data)
        if data and conn.drained < LINGER_DRAIN:
            return
        self._close_lingering(conn)

    def _close_lingering(self, conn: Conn) -> None:
        if conn.sock.fileno() < 0:
            return
        try:
            self.poller.unregister(conn.sock)
        except (KeyError, ValueError, OSError):
            pass
        util.close(conn.sock)

    def murder_keepalived(self, force: bool = False) -> None:
        super().murder_keepalived(force)
        now = time.monotonic()
        while self.lingering and (force or self.lingering[0].timeout <= now):
            self._close_lingering(self.lingering.popleft())
