"""The probe server: ``/health``, ``/ready`` and ``/metrics`` on HEALTH_BIND, in a process
of its own. gunicorn's master binds the port once it listens (gunicorn.conf.py's
``when_ready``, so a port in use stops start-up), hands the socket to this process and
closes its own copy; this process exits when the master is gone.

Why a process of its own: a worker holding hundreds of transfers has hundreds of
threads taking turns at its interpreter lock, and a probe served there waits for a turn
at each step (accept, read, route, write). When a fleet arrives at once that took up to
3.5 s (docs/benchmarks.md, "A fleet at once"), failing a kubelet's 1 s liveness probe on
a pod that was only busy. Here nothing else runs: a probe costs milliseconds whatever
the workers do.

What the answers mean: ``/health`` is 200 while the pod's server is up. The master
watches its workers (one whose main loop stops for gunicorn's ``timeout`` is killed and
replaced), and this process ends with the master, so the probe fails once nothing is
left to serve. ``/ready`` and ``/metrics`` are the app's own views (one Flask app, made
here as in a worker): the store, the upstreams, the pod's transfer slots and every
worker's metric samples. Anything else is 404.

Connections are bounded: each has :data:`REQUEST_TIMEOUT` seconds for its request and
answer, and beyond :data:`MAX_CONNECTIONS` at once a new one is closed unanswered, so
stalled probe connections cost a few threads, never the process.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

log = logging.getLogger(__name__)

#: The only paths the probe port answers.
PROBE_PATHS = frozenset({"/health", "/ready", "/metrics"})
#: Seconds a probe connection has for its request and its answer.
REQUEST_TIMEOUT = 10.0
#: Probe connections served at once; more are closed unanswered.
MAX_CONNECTIONS = 64
#: How often the process checks that gunicorn's master is still its parent.
PARENT_POLL = 0.5

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def only_probes(app: WsgiApp) -> WsgiApp:
    """``app`` on PROBE_PATHS; 404 with a one-line reason on any other path."""

    def probes(scope: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if scope.get("PATH_INFO") in PROBE_PATHS:
            return app(scope, start_response)
        body = b"this port answers only /health, /ready and /metrics\n"
        start_response(
            "404 Not Found",
            [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))],
        )
        return [body]

    return probes


class _Handler(WSGIRequestHandler):
    """wsgiref's handler with a deadline, TLS when the main port has it, and no line on
    stderr per probe (a kubelet asks every few seconds)."""

    timeout = REQUEST_TIMEOUT
    server: ProbeServer

    def setup(self) -> None:
        self.request.settimeout(self.timeout)
        if self.server.tls is not None:
            self.request = self.server.tls.wrap_socket(self.request, server_side=True)
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:
        return None


class ProbeServer(ThreadingMixIn, WSGIServer):
    """A thread per probe connection, at most MAX_CONNECTIONS of them, on a listening
    socket made by someone else (gunicorn's master)."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, listener: socket.socket, app: WsgiApp, tls: ssl.SSLContext | None) -> None:
        self.address_family = listener.family
        super().__init__(listener.getsockname()[:2], _Handler, bind_and_activate=False)
        self.socket.close()  # the one the base made: the master's is already listening
        self.socket = listener
        self.server_address = listener.getsockname()
        # What HTTPServer.server_bind would set (without its reverse DNS lookup).
        self.server_name, self.server_port = "probes", int(self.server_address[1])
        self.setup_environ()
        self.set_app(app)
        self.tls = tls
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A probe connection that stalled, left or failed its TLS handshake: dropped,
        # quietly (socketserver would print a traceback).
        log.debug("a probe connection failed: %s", sys.exc_info()[1])


def tls_context(certfile: str | None, keyfile: str | None) -> ssl.SSLContext | None:
    """The main port's certificate for the probe port too (what gunicorn serves)."""
    if not certfile:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certfile, keyfile or None)
    return context


def watch_parent(parent: int, poll: float = PARENT_POLL) -> None:
    """Exit once ``parent`` (gunicorn's master) is no longer this process's parent: it
    died, even by SIGKILL, and nothing is left to serve."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fd", type=int, required=True, help="the listening socket")
    parser.add_argument("--parent", type=int, required=True, help="gunicorn master's pid")
    parser.add_argument("--certfile")
    parser.add_argument("--keyfile")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    watch_parent(args.parent)
    listener = socket.socket(fileno=args.fd)
    from passthrough import create_app

    app = create_app()
    # /ready's first answer runs its checks inline: run them now, before a probe asks.
    threading.Thread(target=lambda: app.test_client().get("/ready"), daemon=True).start()
    server = ProbeServer(listener, only_probes(app), tls_context(args.certfile, args.keyfile))
    log.info("probes answered on %s by pid %d", server.server_address[:2], os.getpid())
    server.serve_forever(poll_interval=PARENT_POLL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
