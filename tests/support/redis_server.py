"""Debian's redis-server for the rig: one process on a free loopback port, no config
file, no persistence (`--save '' --appendonly no`), its working dir a temp dir.

stop() and start() again keep the port; with no persistence the data does not survive
a restart, just as a real Redis without RDB/AOF would lose it.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from tests.support.procs import (
    LOOPBACK,
    ManagedProcess,
    RestartableService,
    StartupError,
    free_port,
)

REDIS_BINARY = "/usr/bin/redis-server"


def redis_binary() -> str:
    if Path(REDIS_BINARY).is_file():
        return REDIS_BINARY
    found = shutil.which("redis-server")
    if found is None:
        raise StartupError(f"{REDIS_BINARY} missing (Debian package redis-server)")
    return found


class RedisServer(RestartableService):
    """One redis-server. `url` is redis://127.0.0.1:PORT/0."""

    def __init__(self, *, host: str = LOOPBACK) -> None:
        if not host.startswith("127."):
            raise ValueError(f"the rig binds loopback only, not {host}")
        self.bind_host = host
        self.root = Path(tempfile.mkdtemp(prefix="rig-redis-"))
        self.port = 0
        self.process: ManagedProcess | None = None
        self.startup_seconds: list[float] = []
        self._closed = False

    @property
    def host(self) -> str:
        return f"{self.bind_host}:{self.port}"

    @property
    def url(self) -> str:
        return f"redis://{self.host}/0"

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError("redis-server not running")
        return self.process.pid

    def command(self) -> list[str]:
        return [
            redis_binary(),
            # No config file: everything on the command line.
            "--bind", self.bind_host,
            "--port", str(self.port),
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.root),
            "--daemonize", "no",
            "--logfile", "",
            "--loglevel", "warning",
            "--protected-mode", "yes",
        ]  # fmt: skip

    def start(self, timeout: float = 15.0) -> RedisServer:
        """Start on a free port the first time, on the same port after a stop()."""
        if self._closed:
            raise RuntimeError("redis-server was closed")
        if self.running:
            raise RuntimeError("redis-server already running")
        first = self.port == 0
        for attempt in range(3 if first else 1):
            if first:
                self.port = free_port(self.bind_host)
            started = time.monotonic()
            proc = ManagedProcess(
                self.command(), cwd=self.root, log_dir=self.root, name="redis-server"
            )
            proc.start()
            self.process = proc
            try:
                self._wait_ping(proc, timeout)
            except StartupError:
                proc.stop()
                if first and attempt < 2 and "Address already in use" in proc.log_text():
                    continue
                raise
            self.startup_seconds.append(time.monotonic() - started)
            return self
        raise AssertionError("unreachable")

    def _wait_ping(self, proc: ManagedProcess, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        delay = 0.01
        with self.client(socket_timeout=1.0) as client:
            while True:
                if proc.poll() is not None:
                    raise StartupError(
                        f"redis-server exited with {proc.returncode}\n"
                        f"--- log tail ---\n{proc.log_tail()}"
                    )
                try:
                    if client.ping():
                        return
                except redis.RedisError as exc:
                    last: Exception = exc
                if time.monotonic() >= deadline:
                    raise StartupError(
                        f"redis-server {self.host} no PONG after {timeout:g}s ({last})\n"
                        f"--- log tail ---\n{proc.log_tail()}"
                    )
                time.sleep(delay)
                delay = min(delay * 2, 0.1)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM the pid, SIGKILL after `timeout`; the port is kept for start()."""
        if self.process is not None:
            self.process.stop(timeout)

    def client(self, **kwargs: Any) -> redis.Redis:
        """A redis-py client of this server (kwargs go to redis.Redis.from_url)."""
        return redis.Redis.from_url(self.url, **kwargs)

    def log_text(self) -> str:
        return self.process.log_text() if self.process else ""

    def __repr__(self) -> str:
        pid = self.process.pid if self.process and self.running else None
        return f"<RedisServer {self.url} pid={pid}>"
