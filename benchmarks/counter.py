"""A counting TCP relay for the benchmarks: it stands between the proxies and the
upstream registry and counts the HTTP requests it relays, by method and path.

It parses only the request heads of the client-to-upstream direction (the benchmarks
pull, so requests carry no body, or a Content-Length one) and relays both directions as
raw bytes with 1 MiB buffers. It must not be what limits a pull: the tests' FaultFront
re-frames every answer through http.client in 64 KiB chunks, which costs a Python copy
per chunk; here the answer bytes only pass through recv_into and sendall, which release
the GIL, so eight concurrent pulls do not queue behind one interpreter.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
from collections import Counter

from tests.support.procs import LOOPBACK

BUFFER = 1 << 20
_HEAD_END = b"\r\n\r\n"
_BLOB = re.compile(r"^/v2/(?P<name>.+)/blobs/(?P<digest>sha256:[0-9a-f]{64})$")


class _Connection:
    """One client connection and its upstream connection, a thread per direction."""

    def __init__(self, owner: CountingFront, client: socket.socket) -> None:
        self.owner = owner
        self.client = client
        self.upstream = socket.create_connection(owner.upstream, timeout=None)
        for sock in (self.client, self.upstream):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def start(self) -> None:
        for target, name in ((self._requests, "requests"), (self._answers, "answers")):
            threading.Thread(target=target, name=f"counter-{name}", daemon=True).start()

    def close(self) -> None:
        for sock in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()
        self.owner.forget(self)

    def _requests(self) -> None:
        """Client to upstream: forward at once, and count each request head seen."""
        pending = b""
        body_left = 0  # bytes of a request body still to pass before the next head
        parsing = True
        try:
            while data := self.client.recv(BUFFER):
                self.upstream.sendall(data)
                if not parsing:
                    continue
                pending += data
                while pending:
                    if body_left:
                        skipped = min(body_left, len(pending))
                        pending = pending[skipped:]
                        body_left -= skipped
                        continue
                    end = pending.find(_HEAD_END)
                    if end < 0:
                        break
                    head, pending = pending[:end], pending[end + len(_HEAD_END) :]
                    body_left, parsing = self.owner.saw(head)
                    if not parsing:
                        pending = b""
                        break
        except OSError:
            pass
        finally:
            # Half-close: the upstream sees the client's end, the answer may still flow.
            with contextlib.suppress(OSError):
                self.upstream.shutdown(socket.SHUT_WR)

    def _answers(self) -> None:
        """Upstream to client: raw bytes, nothing parsed."""
        buffer = bytearray(BUFFER)
        view = memoryview(buffer)
        try:
            while count := self.upstream.recv_into(view):
                self.client.sendall(view[:count])
        except OSError:
            pass
        finally:
            self.close()


class CountingFront:
    """Listens on loopback, relays every connection to `upstream` (host, port).

    `counts` maps (method, path without query) to the requests seen; `blob_gets()`
    gives the GETs per blob digest."""

    def __init__(self, upstream_host: str, upstream_port: int, *, host: str = LOOPBACK) -> None:
        self.upstream = (upstream_host, upstream_port)
        self._listener = socket.create_server((host, 0), backlog=128)
        self.host_name = host
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._counts: Counter[tuple[str, str]] = Counter()
        self._live: set[_Connection] = set()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def host(self) -> str:
        return f"{self.host_name}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    # -- counting -----------------------------------------------------------------------

    def saw(self, head: bytes) -> tuple[int, bool]:
        """Count one request head; returns (body bytes to skip, keep parsing)."""
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3:
            return 0, False
        method, target = parts[0].upper(), parts[1].split("?", 1)[0]
        with self._lock:
            self._counts[(method, target)] += 1
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value.strip())
            elif name == "transfer-encoding":
                # A chunked request body: the heads after it cannot be found without
                # decoding it, and the benchmarks never send one. Stop counting there.
                return 0, False
        return length, True

    def reset(self) -> None:
        with self._lock:
            self._counts.clear()

    @property
    def counts(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return dict(self._counts)

    def blob_requests(self, method: str = "GET") -> dict[str, int]:
        """Requests per blob digest (over every repository name) with `method`."""
        found: Counter[str] = Counter()
        for (seen, path), count in self.counts.items():
            match = _BLOB.match(path)
            if seen == method and match:
                found[match["digest"]] += count
        return dict(found)

    # -- lifecycle ----------------------------------------------------------------------

    def forget(self, connection: _Connection) -> None:
        with self._lock:
            self._live.discard(connection)

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                connection = _Connection(self, client)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._live.add(connection)
            connection.start()

    def start(self) -> CountingFront:
        self._thread = threading.Thread(target=self._accept, name="counter-accept", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        if self._thread is not None:
            self._thread.join(5)
        with self._lock:
            live = list(self._live)
        for connection in live:
            connection.close()

    def __enter__(self) -> CountingFront:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
