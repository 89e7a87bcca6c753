"""An upstream that goes away: a TCP front on a fixed loopback port before a rig
registry, whose `mode` a test switches between a working upstream and each way a WAN
link or registry fails.

- "pass": every connection relayed, byte for byte, to the registry;
- "503", "429": every request answered with that status (429 with Retry-After) and the
  registry's JSON error, then the connection closed;
- "drop": every connection accepted and closed at once, before any answer;
- "hang": every connection accepted and never answered (until the mode changes);
- "refuse": the port closed: connections are refused (it is bound again, the same
  port, when the mode changes back).

`connections` counts the connections accepted since the last `reset()`: with "drop" a
test proves that nothing was asked of the upstream at all.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Literal, Self

import requests

from tests.support.procs import LOOPBACK
from tests.support.relay import _pump

Mode = Literal["pass", "503", "429", "drop", "hang", "refuse"]
MODES: tuple[Mode, ...] = ("pass", "503", "429", "drop", "hang", "refuse")

_REASONS = {"503": "Service Unavailable", "429": "Too Many Requests"}


class OutageFront:
    """Listens on 127.0.0.1:`port` and serves connections according to `mode`."""

    def __init__(self, target_host: str, target_port: int, host: str = LOOPBACK) -> None:
        self.target = (target_host, target_port)
        self.host = host
        self.mode: Mode = "pass"
        self.connections = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._calm = threading.Event()  # set whenever the mode is not "hang"
        self._calm.set()
        self._listener: socket.socket | None = self._bind(0)
        self.port: int = self._listener.getsockname()[1]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _bind(self, port: int) -> socket.socket:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Connections accepted before a "refuse" still hold the port: the listener of
        # the mode after it shares it with them.
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        listener.bind((self.host, port))
        listener.listen(64)
        listener.settimeout(0.1)
        return listener

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> Self:
        self._thread = threading.Thread(target=self._serve, name="outage-front", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._calm.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            if self._listener is not None:
                self._listener.close()
                self._listener = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def set_mode(self, mode: Mode) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}")
        with self._lock:
            self.mode = mode
            if mode == "refuse" and self._listener is not None:
                self._listener.close()
                self._listener = None
            elif mode != "refuse" and self._listener is None:
                self._listener = self._bind(self.port)
        if mode == "hang":
            self._calm.clear()
        else:
            self._calm.set()

    @contextlib.contextmanager
    def outage(self, mode: Mode) -> Iterator[Self]:
        """`mode` for the block, "pass" again after it."""
        self.set_mode(mode)
        try:
            yield self
        finally:
            self.set_mode("pass")

    def reset(self) -> None:
        with self._lock:
            self.connections = 0

    # -- serving -------------------------------------------------------------------------

    def _serve(self) -> None:
        while not self._stopping.is_set():
            with self._lock:
                listener = self._listener
            if listener is None:
                time.sleep(0.05)
                continue
            try:
                client, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            with self._lock:
                self.connections += 1
                mode = self.mode
            threading.Thread(
                target=self._handle, args=(client, mode), name="outage-conn", daemon=True
            ).start()

    def _handle(self, client: socket.socket, mode: Mode) -> None:
        client.settimeout(None)
        try:
            if mode == "pass":
                self._relay(client)
            elif mode in _REASONS:
                self._answer(client, mode)
            elif mode == "hang":
                self._calm.wait()
        except OSError:
            pass
        finally:
            if mode != "pass":
                client.close()

    def _relay(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=10)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)

        def close_both() -> None:
            one = threading.Thread(target=_pump, args=(client, upstream), daemon=True)
            one.start()
            _pump(upstream, client)
            one.join()
            client.close()
            upstream.close()

        threading.Thread(target=close_both, name="outage-relay", daemon=True).start()

    @staticmethod
    def _answer(client: socket.socket, status: str) -> None:
        request = b""
        while b"\r\n\r\n" not in request and len(request) < 65536:
            data = client.recv(4096)
            if not data:
                return
            request += data
        code = "TOOMANYREQUESTS" if status == "429" else "UNAVAILABLE"
        body = b'{"errors":[{"code":"%s","message":"outage front"}]}' % code.encode()
        head = [
            f"HTTP/1.1 {status} {_REASONS[status]}",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
            "Connection: close",
        ]
        if status == "429":
            head.append("Retry-After: 7")
        sent = "\r\n".join(head).encode() + b"\r\n\r\n"
        if not request.startswith(b"HEAD "):
            sent += body
        client.sendall(sent)


def first_byte(
    url: str, *, auth: tuple[str, str] | None = None, timeout: float = 60.0
) -> tuple[requests.Response, float, bytes]:
    """GET `url`: the response, the seconds until its first body byte (or its end, for an
    empty body) and the whole body."""
    with requests.Session() as session:
        session.trust_env = False
        started = time.monotonic()
        response = session.get(url, auth=auth, stream=True, timeout=timeout)
        chunks = response.iter_content(1 << 16)
        first = next(chunks, b"")
        seconds = time.monotonic() - started
        body = first + b"".join(chunks)
        response.close()
    return response, seconds, body
