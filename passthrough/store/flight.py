"""Single-flight: one upstream fetch per digest, whatever the concurrency.

Two levels, held one inside the other:

- on one host, ``flock`` on a per-digest lock file serialises the threads and the
  gunicorn worker processes (the kernel drops the lock when a process dies);
- across replicas, with ``REDIS_URL``, a Redis lease: ``SET key token NX PX lease``,
  renewed by the holder while it works and released by compare-and-delete. A replica
  killed while holding it stops renewing, so the others wait at most the lease.

Redis trouble never stops a download: the lease is skipped (one fetch per replica, as
without Redis) and Redis is left alone for a while before it is tried again. Without
Redis, concurrent misses of one blob cost one upstream GET per replica.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

#: How long Redis is left alone after it failed.
REDIS_COOLDOWN = 30.0
#: Compare-and-delete / compare-and-extend: only the holder's token may touch the key.
_RELEASE = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
)
_RENEW = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then "
    "return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
)


class Flight:
    """The lock of one store: ``hold(name)`` is held by one fetcher at a time, across
    the threads and processes of this host and, with Redis, across replicas."""

    def __init__(self, lock_dir: Path, lease: RedisLease | None = None) -> None:
        self.lock_dir = lock_dir
        self.lease = lease
        lock_dir.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def hold(self, name: str, *, shared: bool = True) -> Iterator[None]:
        """Hold ``name``'s lock; ``shared=False`` keeps it to this host (housekeeping
        such as eviction needs no cross-replica lease)."""
        with self._flock(name):
            if self.lease is None or not shared:
                yield
            else:
                with self.lease.hold(name):
                    yield

    def try_hold(self, name: str) -> contextlib.ExitStack | None:
        """This host's lock of ``name`` if nobody holds it, else None, without waiting:
        the read-through's leader election. The cross-replica lease is taken later, by
        the holder (:meth:`hold_lease`), so that a reader never blocks on it."""
        fd = os.open(self.lock_dir / f"{name}.lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        stack = contextlib.ExitStack()
        stack.callback(os.close, fd)
        stack.callback(fcntl.flock, fd, fcntl.LOCK_UN)
        return stack

    def hold_lease(self, name: str, stack: contextlib.ExitStack) -> None:
        """Add the cross-replica lease (with Redis) to a hold from :meth:`try_hold`."""
        if self.lease is not None:
            stack.enter_context(self.lease.hold(name))

    def is_held(self, name: str) -> bool:
        """Whether some thread or process of this host holds ``name``'s lock."""
        stack = self.try_hold(name)
        if stack is None:
            return True
        stack.close()
        return False

    @contextlib.contextmanager
    def host_lock(self, name: str, *, exclusive: bool) -> Iterator[None]:
        """A readers-writer lock of this host (``flock`` shared or exclusive), never a
        Redis lease: the hosted area's pushes hold ``hosted-gc`` shared while they check
        and write their records, ``passthrough gc`` exclusive while it deletes."""
        path = self.lock_dir / f"{name}.lock"
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    @contextlib.contextmanager
    def _flock(self, name: str) -> Iterator[None]:
        path = self.lock_dir / f"{name}.lock"
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


class RedisLease:
    """A lease in Redis, one key per name under ``namespace``."""

    def __init__(
        self,
        url: str,
        *,
        lease_seconds: float,
        namespace: str,
        max_wait: float = 3600.0,
        poll: float = 0.05,
    ) -> None:
        import redis

        self._redis_errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        self.client = redis.Redis.from_url(
            url, socket_timeout=5, socket_connect_timeout=2, health_check_interval=30
        )
        # Where Redis is, for log lines: host and port only, never the password.
        parts = urlsplit(url)
        self.where = f"{parts.hostname or parts.path}:{parts.port or 6379}"
        self.lease_ms = int(lease_seconds * 1000)
        self.namespace = namespace
        self.max_wait = max_wait
        self.poll = poll
        self._down_until = 0.0

    def _usable(self) -> bool:
        return time.monotonic() >= self._down_until

    def _failed(self, exc: BaseException) -> None:
        if self._usable():
            log.warning(
                "redis at %s failed (%s); fetching without the cross-replica lock for %ds",
                self.where,
                type(exc).__name__,
                REDIS_COOLDOWN,
            )
        self._down_until = time.monotonic() + REDIS_COOLDOWN

    @contextlib.contextmanager
    def hold(self, name: str) -> Iterator[None]:
        if not self._usable():
            yield
            return
        key = f"{self.namespace}:lock:{name}"
        token = secrets.token_hex(16)
        try:
            acquired = self._acquire(key, token)
        except self._redis_errors as exc:
            self._failed(exc)
            acquired = False
        if not acquired:
            yield
            return
        stop = threading.Event()
        renewer = threading.Thread(
            target=self._renew, args=(key, token, stop), name="lease-renew", daemon=True
        )
        renewer.start()
        try:
            yield
        finally:
            stop.set()
            renewer.join()
            try:
                self.client.eval(_RELEASE, 1, key, token)
            except self._redis_errors as exc:
                self._failed(exc)  # the lease runs out by itself

    def _acquire(self, key: str, token: str) -> bool:
        """Wait for the lease; False when it could not be had within ``max_wait`` (the
        holder keeps renewing: a very slow fetch), and the caller goes on without."""
        deadline = time.monotonic() + self.max_wait
        delay = self.poll
        while True:
            if self.client.set(key, token, nx=True, px=self.lease_ms):
                return True
            if time.monotonic() >= deadline:
                log.warning("waited %.0fs for the lock of %s; fetching anyway", self.max_wait, key)
                return False
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    def _renew(self, key: str, token: str, stop: threading.Event) -> None:
        interval = self.lease_ms / 3000
        while not stop.wait(interval):
            try:
                if not self.client.eval(_RENEW, 1, key, token, self.lease_ms):
                    return  # lost (expired while Redis was unreachable): nothing to renew
            except self._redis_errors as exc:
                self._failed(exc)
                return
