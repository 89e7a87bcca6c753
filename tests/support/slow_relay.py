"""A TCP relay on loopback that passes what its clients send at a set rate: a slow link
to a service (SeaweedFS's S3 gateway: a store whose uploads take seconds). What the
service answers is passed at full speed. Requests are relayed byte for byte, so signed
requests (S3's SigV4 signs the Host header, the relay's address) stay valid.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from types import TracebackType

LOOPBACK = "127.0.0.1"
CHUNK = 16 << 10


class ThrottledRelay:
    """Relays loopback connections to ``target``; client bytes at ``upload_rate`` B/s."""

    def __init__(self, target: tuple[str, int], upload_rate: int) -> None:
        self.target = target
        self.upload_rate = upload_rate
        self._listener = socket.create_server((LOOPBACK, 0))
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        threading.Thread(target=self._accept, name="relay-accept", daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, throttled: bool) -> None:
        began, passed = time.monotonic(), 0
        try:
            while chunk := source.recv(CHUNK):
                sink.sendall(chunk)
                passed += len(chunk)
                if throttled:
                    ahead = passed / self.upload_rate - (time.monotonic() - began)
                    if ahead > 0:
                        time.sleep(ahead)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)

    def stop(self) -> None:
        self._stopped.set()
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                sock.close()
            self._sockets.clear()

    def __enter__(self) -> ThrottledRelay:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
