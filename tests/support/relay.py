"""A TCP relay on a port held for the whole session, in front of whichever server a test
attaches to it.

dockerd reads its registry mirror (`--registry-mirror`) once, at daemon start, while the
passthrough server that must answer as that mirror belongs to one test (its CACHE_DIR, its
counting FaultFront upstream). The relay binds its port before the session's dockerd starts
and keeps it bound, so no other process can take it in between, and forwards each new
connection, byte for byte, to the server attached at that moment. With nothing attached it
closes connections at once, so a pull through the mirror fails fast instead of hanging.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from types import TracebackType

from tests.support.procs import LOOPBACK

__all__ = ["TcpRelay"]

CHUNK = 64 * 1024


def _pump(source: socket.socket, sink: socket.socket, rate: int | None = None) -> None:
    """Copy one direction until EOF, then pass the half-close on; with `rate`, at most
    that many bytes a second."""
    began, passed = time.monotonic(), 0
    try:
        while data := source.recv(CHUNK if rate is None else CHUNK // 4):
            sink.sendall(data)
            passed += len(data)
            ahead = passed / rate - (time.monotonic() - began) if rate else 0.0
            if ahead > 0:
                time.sleep(ahead)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


class TcpRelay:
    """Listens on 127.0.0.1:`port` (chosen by the kernel at construction) and forwards to
    the attached (host, port). `connections` counts the connections relayed so far. With
    `upload_rate`, what clients send passes at that many bytes a second (a slow link to
    the target: an S3 store whose uploads take seconds); answers pass at full speed."""

    def __init__(self, host: str = LOOPBACK, *, upload_rate: int | None = None) -> None:
        self.upload_rate = upload_rate
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((host, 0))
        self._listener.listen(64)
        self.host = host
        self.port: int = self._listener.getsockname()[1]
        self._target: tuple[str, int] | None = None
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.connections = 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> TcpRelay:
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="tcp-relay", daemon=True)
            self._thread.start()
        return self

    def attach(self, host: str, port: int) -> None:
        """Relay new connections to host:port; live ones are cut so that clients keeping
        a connection alive reconnect to the new target."""
        with self._lock:
            self._target = (host, port)
        self._close_open()

    def detach(self) -> None:
        with self._lock:
            self._target = None
        self._close_open()

    @contextlib.contextmanager
    def attached(self, host: str, port: int) -> Iterator[TcpRelay]:
        self.attach(host, port)
        try:
            yield self
        finally:
            self.detach()

    def stop(self) -> None:
        self._stopping.set()
        # Wake accept(): closing the socket alone does not interrupt it on Linux.
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._close_open()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def __enter__(self) -> TcpRelay:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<TcpRelay {self.address} -> {self._target}>"

    # -- private ---------------------------------------------------------------

    def _close_open(self) -> None:
        with self._lock:
            live = list(self._open)
            self._open.clear()
        for sock in live:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                target = self._target
            if target is None:
                client.close()
                continue
            try:
                upstream = socket.create_connection(target, timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self.connections += 1
                self._open.update((client, upstream))
            threading.Thread(target=self._relay, args=(client, upstream), daemon=True).start()

    def _relay(self, client: socket.socket, upstream: socket.socket) -> None:
        back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
        back.start()
        _pump(client, upstream, self.upload_rate)
        back.join()
        with self._lock:
            self._open.discard(client)
            self._open.discard(upstream)
        client.close()
        upstream.close()
