"""Child processes of the test rig: free loopback ports, readiness polling and a
Popen wrapper that always stops what it started, by pid, even if a test crashes."""

from __future__ import annotations

import abc
import atexit
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Container, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Self

LOOPBACK = "127.0.0.1"

# Processes still running; stopped at interpreter exit so a crashed session leaves none.
_LIVE: set[ManagedProcess] = set()
_LIVE_LOCK = threading.Lock()

_PR_SET_PDEATHSIG = 1


class StartupError(RuntimeError):
    """A rig component did not come up; the message carries its log tail."""


def free_port(host: str = LOOPBACK) -> int:
    """A port that is free on `host` right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _check_alive(process: ManagedProcess | None, what: str) -> None:
    if process is not None and process.poll() is not None:
        raise StartupError(
            f"{process.name} exited with code {process.returncode} while waiting for {what}\n"
            f"--- log tail ---\n{process.log_tail()}"
        )


def _timeout_error(process: ManagedProcess | None, what: str, timeout: float) -> StartupError:
    tail = f"\n--- log tail of {process.name} ---\n{process.log_tail()}" if process else ""
    return StartupError(f"{what} not ready after {timeout:g}s{tail}")


def wait_for_port(
    host: str, port: int, timeout: float = 30.0, *, process: ManagedProcess | None = None
) -> None:
    """Return once a TCP connect to host:port succeeds; fail early if `process` dies."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        _check_alive(process, f"{host}:{port}")
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            pass
        if time.monotonic() >= deadline:
            raise _timeout_error(process, f"{host}:{port}", timeout)
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def http_status(url: str, timeout: float = 2.0, *, context: ssl.SSLContext | None = None) -> int:
    """Status of a GET, without following redirects or using any proxy; an https URL is
    verified with `context` (default: the system's trust store)."""
    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({}), _NoRedirect()]
    if context is not None:
        handlers.append(urllib.request.HTTPSHandler(context=context))
    opener = urllib.request.build_opener(*handlers)
    try:
        with opener.open(url, timeout=timeout) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as exc:
        return exc.code


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def wait_for_http(
    url: str,
    timeout: float = 30.0,
    *,
    ok: Container[int] | Callable[[int], bool] = (200,),
    process: ManagedProcess | None = None,
    context: ssl.SSLContext | None = None,
) -> int:
    """Poll `url` with GET until its status is accepted by `ok`; return that status.

    Fails early, with the log tail, when `process` exits.
    """
    accept: Callable[[int], bool] = ok if callable(ok) else ok.__contains__
    deadline = time.monotonic() + timeout
    delay = 0.01
    last: str = "no answer"
    while True:
        _check_alive(process, url)
        try:
            status = http_status(url, timeout=2.0, context=context)
            if accept(status):
                return status
            last = f"status {status}"
        except OSError as exc:
            last = str(exc)
        if time.monotonic() >= deadline:
            raise _timeout_error(process, f"{url} ({last})", timeout)
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def _die_with_parent() -> None:
    # Linux only: the child gets SIGTERM if the test runner is SIGKILLed, which atexit
    # cannot cover. Best effort: a failure here must not stop the child from starting.
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class ManagedProcess:
    """One child process with its output in a log file, stopped by pid.

    The child runs in its own session (process group = its pid), so a SIGKILL fallback
    also reaches helpers it spawned, such as gunicorn's workers.
    """

    def __init__(
        self,
        args: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        log_dir: Path | None = None,
        name: str | None = None,
    ) -> None:
        self.args = [str(a) for a in args]
        self.env = dict(os.environ if env is None else env)
        self.cwd = cwd
        self.name = name or Path(self.args[0]).name
        self._own_log_dir = log_dir is None
        self.log_dir = log_dir or Path(tempfile.mkdtemp(prefix=f"rig-{self.name}-"))
        self.log_path = self.log_dir / f"{self.name}.log"
        self._popen: subprocess.Popen[bytes] | None = None

    def start(self) -> ManagedProcess:
        if self._popen is not None:
            raise RuntimeError(f"{self.name} already started")
        exe = self.args[0]
        if os.sep not in exe and shutil.which(exe, path=self.env.get("PATH")) is None:
            raise StartupError(f"{exe} is not installed (not on PATH)")
        in_main = threading.current_thread() is threading.main_thread()
        with open(self.log_path, "ab") as log:
            self._popen = subprocess.Popen(
                self.args,
                env=self.env,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                # PDEATHSIG fires when the creating *thread* ends, so only from the main one.
                preexec_fn=_die_with_parent if in_main else None,
            )
        with _LIVE_LOCK:
            _LIVE.add(self)
        return self

    @property
    def pid(self) -> int:
        if self._popen is None:
            raise RuntimeError(f"{self.name} not started")
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        return None if self._popen is None else self._popen.returncode

    def poll(self) -> int | None:
        return None if self._popen is None else self._popen.poll()

    @property
    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the pid, wait up to `timeout`, then SIGKILL its process group."""
        popen = self._popen
        if popen is None:
            return None
        if popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(popen.pid, signal.SIGTERM)
            try:
                popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(popen.pid, signal.SIGKILL)
                popen.wait(10)
        # Children that outlived a clean exit of the leader (none expected) go too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(popen.pid, signal.SIGKILL)
        with _LIVE_LOCK:
            _LIVE.discard(self)
        return popen.returncode

    def cleanup(self) -> None:
        """Stop, then remove the log directory if this object created it."""
        self.stop()
        if self._own_log_dir:
            shutil.rmtree(self.log_dir, ignore_errors=True)

    def __enter__(self) -> ManagedProcess:
        return self if self._popen is not None else self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        pid = self._popen.pid if self._popen else None
        return f"<ManagedProcess {self.name} pid={pid} rc={self.returncode}>"


class _TrackingServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(
        self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], owner: Any
    ) -> None:
        self.owner = owner
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(address, handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = super().get_request()
        with self._open_lock:
            self._open.add(sock)
        return sock, addr

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def close_open_connections(self) -> None:
        # Keep-alive clients would otherwise pin handler threads on a blocking read.
        with self._open_lock:
            socks = list(self._open)
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class BackgroundHTTPServer:
    """A threaded http.server on a loopback address, serving from a daemon thread.

    Binding port 0 lets the kernel choose, so there is no race for the port. Handlers
    reach the object that owns the server as `self.server.owner`.
    """

    def __init__(
        self,
        handler: type[BaseHTTPRequestHandler],
        owner: Any,
        *,
        host: str = LOOPBACK,
        port: int = 0,
        name: str = "http",
    ) -> None:
        if not host.startswith("127."):
            raise ValueError(f"the rig binds loopback only, not {host}")
        self.name = name
        self._server = _TrackingServer((host, port), handler, owner)
        self.host: str = host
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"rig-{name}",
            daemon=True,
        )
        self._started = False
        self._stopped = False
        self.scheme = "http"

    def serve_tls(self, context: ssl.SSLContext) -> None:
        """HTTPS from now on (before :meth:`start`): each connection's handshake happens
        as it is accepted; one that fails is dropped."""
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self.scheme = "https"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.address}"

    def start(self) -> BackgroundHTTPServer:
        self._thread.start()
        self._started = True
        return self

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self._started:
            self._server.shutdown()
        self._server.close_open_connections()
        self._server.server_close()
        self._thread.join(5)


@atexit.register
def _stop_all() -> None:
    with _LIVE_LOCK:
        live = list(_LIVE)
    for proc in live:
        with contextlib.suppress(Exception):
            proc.stop(timeout=5.0)


class RestartableService(abc.ABC):
    """A rig service that a test may stop, kill (as a crash would) and start again on
    the same ports and data; `close()` stops it and removes its files. Subclasses set
    `root`, `process` and `_closed`, and give `start()` and `stop()`."""

    root: Path
    process: ManagedProcess | None
    _closed: bool

    @abc.abstractmethod
    def start(self, timeout: float = 60.0) -> Self: ...

    @abc.abstractmethod
    def stop(self, timeout: float = 5.0) -> None: ...

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.running

    def kill(self) -> None:
        """SIGKILL the pid at once; ports and data are kept."""
        if self.process is not None and self.process.running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGKILL)
        self.stop()

    def restart(self, timeout: float | None = None) -> Self:
        self.stop()
        return self.start() if timeout is None else self.start(timeout)

    def ensure_running(self) -> Self:
        """Start again if a test left it stopped."""
        return self if self.running else self.start()

    def close(self) -> None:
        """Stop and remove the data."""
        self.stop()
        self._closed = True
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
