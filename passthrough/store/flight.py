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

The hosted area's **gc lock** (:meth:`Flight.gc_lock`) is a readers-writer lock: pushes
are readers, ``passthrough gc`` the writer. On one host it is a ``flock`` (shared or
exclusive); with Redis, inside the ``flock``, also one across replicas
(:class:`RedisLease` ``read_lock`` / ``write_lock``, the protocol argued there). Redis
trouble never stops a push (it goes on with the host's lock alone, as without Redis),
but it stops gc: deleting while a push on another host may be checking its references
is what the lock exists to prevent, so gc raises
:class:`~passthrough.errors.StoreUnavailable` instead.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

from passthrough.errors import StoreUnavailable
from passthrough.store.layout import GC_LOCK, lock_file_name

log = logging.getLogger(__name__)

#: How long Redis is left alone after it failed.
REDIS_COOLDOWN = 30.0
#: How long a push waits for gc's batch, and gc for the pushes inside the lock, before
#: giving up: both hold it for seconds (a push's records, one batch of deletes).
RW_MAX_WAIT = 300.0
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
        fd = os.open(self.lock_dir / lock_file_name(name), os.O_CREAT | os.O_RDWR, 0o600)
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
        Redis lease: the host's half of :meth:`gc_lock`."""
        path = self.lock_dir / lock_file_name(name)
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    @contextlib.contextmanager
    def gc_lock(self, *, exclusive: bool) -> Iterator[Held]:
        """The hosted area's readers-writer lock: pushes hold it shared while they check
        and write their records, ``passthrough gc`` exclusive while it deletes. This
        host's ``flock``, and with Redis the cross-replica lock inside it (taken in the
        same order by everyone, so the two never deadlock).

        Exclusive, it yields a :class:`Held` whose ``check()`` gc calls before every
        delete: it raises once the Redis lease may have run out (Redis lost, or this
        process stalled past it), when pushes elsewhere may be in again."""
        with self.host_lock(GC_LOCK, exclusive=exclusive):
            if self.lease is None:
                yield Held()
            elif exclusive:
                with self.lease.write_lock("gc") as held:
                    yield held
            else:
                with self.lease.read_lock("gc"):
                    yield Held()

    @contextlib.contextmanager
    def _flock(self, name: str) -> Iterator[None]:
        path = self.lock_dir / lock_file_name(name)
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


class Held:
    """A lock being held; ``check()`` raises when it may no longer be (a lease that is
    no longer renewed). Without a lease (a ``flock``, a reader) it always holds."""

    def check(self) -> None:
        return None


class _WriterHeld(Held):
    """The writer's lease: renewed by a thread; lost when a renewal fails or has not
    succeeded for two thirds of the lease (the key may be about to expire, and a push
    then gets in)."""

    def __init__(self, lease: RedisLease, key: str) -> None:
        self.lease = lease
        self.key = key
        self.renewed = time.monotonic()  # a bound below the server's own time of the SET
        self.lost: str | None = None

    def check(self) -> None:
        if self.lost is None and time.monotonic() - self.renewed > self.lease.lease_ms / 1500:
            self.lost = "its lease was not renewed in time"
        if self.lost is not None:
            raise StoreUnavailable(
                f"gc lost its lock in redis at {self.lease.where} ({self.lost}): "
                "stopped deleting; run it again"
            )


class RedisLease:
    """A lease in Redis, one key per name under ``namespace``; and the readers-writer
    lock across replicas (:meth:`read_lock`, :meth:`write_lock`).

    **The readers-writer protocol**, on plain ``SET``/``EXISTS``/``SCAN``/``DEL`` (Lua
    only for the compare-and-renew and compare-and-delete of the writer's key):

    - the writer takes ``<ns>:<name>:writer`` with ``SET NX PX lease`` (waiting while
      another writer has it), then waits until ``SCAN MATCH <ns>:<name>:reader:*``
      finds no key;
    - a reader sets its own ``<ns>:<name>:reader:<token>`` with ``SET PX lease``, then
      asks whether the writer's key ``EXISTS``: if not, it is in; if so, it deletes its
      key, waits and tries again.

    Why no reader and writer are ever in at once: Redis executes commands one at a
    time, so they are linearizable (one instance, or a primary: a failover to a replica
    that missed the last writes can break this, as it can any lock in Redis). Say
    reader R is in and writer W too. R is in, so R's EXISTS ran before W's SET (the
    writer's key exists from that SET until W leaves), and R's own SET before its
    EXISTS: R's key existed before W's SET, hence before every SCAN of W began, and it
    exists until R leaves. SCAN returns every key present for the whole of the
    iteration, so the SCAN after which W went in (one that found no reader key) cannot
    have run wholly while R was in: it ended after R's DEL, i.e. after R was out, and W
    went in after that. A reader that backs off only makes the writer SCAN once more.

    Both keys are leases, renewed while held: a replica or a gc killed inside never
    blocks the others beyond the lease. The price of leases: a holder stalled longer
    than the lease (a paused process, a partition) may be in while its key is gone.
    The writer checks its lease before every delete (:class:`_WriterHeld`); a push's
    records take milliseconds, far below the lease, and the grace period still covers
    what is younger than it.
    """

    def __init__(
        self,
        url: str,
        *,
        lease_seconds: float,
        namespace: str,
        max_wait: float = 3600.0,
        poll: float = 0.05,
        rw_max_wait: float = RW_MAX_WAIT,
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
        self.rw_max_wait = rw_max_wait
        self._down_until = 0.0

    def _usable(self) -> bool:
        return time.monotonic() >= self._down_until

    def _failed(self, exc: BaseException, doing: str = "fetching") -> None:
        if self._usable():
            log.warning(
                "redis at %s failed (%s); %s without the cross-replica lock for %ds",
                self.where,
                type(exc).__name__,
                doing,
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
        try:
            with self._renewing(key, token, "fetching"):
                yield
        finally:
            try:
                self.client.eval(_RELEASE, 1, key, token)
            except self._redis_errors as exc:
                self._failed(exc)  # the lease runs out by itself

    def _acquire(self, key: str, token: str) -> bool:
        """Wait for the lease; False when it could not be had within ``max_wait`` (the
        holder keeps renewing: a very slow fetch), and the caller goes on without."""
        if self._poll(
            lambda: bool(self.client.set(key, token, nx=True, px=self.lease_ms)), self.max_wait
        ):
            return True
        log.warning("waited %.0fs for the lock of %s; fetching anyway", self.max_wait, key)
        return False

    def _poll(self, done: Callable[[], bool], timeout: float) -> bool:
        """Ask ``done`` again, less and less often (up to twice a second), until it says
        True, or False once ``timeout`` seconds have passed."""
        deadline = time.monotonic() + timeout
        delay = self.poll
        while not done():
            if time.monotonic() >= deadline:
                return False
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)
        return True

    def _renew(
        self,
        key: str,
        token: str,
        stop: threading.Event,
        doing: str = "fetching",
        held: _WriterHeld | None = None,
    ) -> None:
        interval = self.lease_ms / 3000
        while not stop.wait(interval):
            started = time.monotonic()
            try:
                if not self.client.eval(_RENEW, 1, key, token, self.lease_ms):
                    # Lost (expired while Redis was unreachable): nothing to renew.
                    if held is not None:
                        held.lost = "its lease expired"
                    return
            except self._redis_errors as exc:
                if held is not None:
                    held.lost = f"{type(exc).__name__} renewing its lease"
                else:
                    self._failed(exc, doing)
                return
            if held is not None:
                held.renewed = started

    def _renewing(
        self, key: str, token: str, doing: str, held: _WriterHeld | None = None
    ) -> contextlib.ExitStack:
        """Renew ``key`` from a thread until the returned stack is closed."""
        stop = threading.Event()
        renewer = threading.Thread(
            target=self._renew,
            args=(key, token, stop, doing, held),
            name="lease-renew",
            daemon=True,
        )
        renewer.start()
        stack = contextlib.ExitStack()
        stack.callback(renewer.join)
        stack.callback(stop.set)
        return stack

    # -- the readers-writer lock -----------------------------------------------------------

    @contextlib.contextmanager
    def read_lock(self, name: str) -> Iterator[None]:
        """Held by a push: waits while a writer (gc) holds ``name``; goes on without the
        lock when Redis fails (one warning, then Redis is left alone for a while)."""
        if not self._usable():
            yield
            return
        token = secrets.token_hex(16)
        key = f"{self.namespace}:{name}:reader:{token}"
        try:
            entered = self._enter_reader(key, token, f"{self.namespace}:{name}:writer")
        except self._redis_errors as exc:
            self._failed(exc, "pushing")
            entered = False
        if not entered:
            yield
            return
        try:
            with self._renewing(key, token, "pushing"):
                yield
        finally:
            try:
                self.client.delete(key)  # the token makes the key this reader's alone
            except self._redis_errors as exc:
                self._failed(exc, "pushing")  # the lease runs out by itself

    def _enter_reader(self, key: str, token: str, writer: str) -> bool:
        def entered() -> bool:
            # First our key, then the look at the writer's: the order the proof needs.
            self.client.set(key, token, px=self.lease_ms)
            if not self.client.exists(writer):
                return True
            self.client.delete(key)
            return False

        if not self._poll(entered, self.rw_max_wait):
            raise StoreUnavailable(
                f"garbage collection held the push lock for over {self.rw_max_wait:.0f}s: "
                "push again later"
            )
        return True

    @contextlib.contextmanager
    def write_lock(self, name: str) -> Iterator[Held]:
        """Held by gc: waits for the writer's key, then until no reader holds ``name``.
        Redis failing raises :class:`~passthrough.errors.StoreUnavailable` (naming its
        host and port only): gc must not delete without the lock."""
        token = secrets.token_hex(16)
        key = f"{self.namespace}:{name}:writer"
        held = _WriterHeld(self, key)
        with contextlib.ExitStack() as stack:
            try:
                self._take_writer(key, token)
                stack.callback(self._release_writer, key, token)
                stack.enter_context(self._renewing(key, token, "deleting", held))
                self._wait_for_readers(f"{self.namespace}:{name}:reader:*")
            except self._redis_errors as exc:
                raise self._writer_error(exc) from None
            held.check()
            yield held

    def _take_writer(self, key: str, token: str) -> None:
        if not self._poll(
            lambda: bool(self.client.set(key, token, nx=True, px=self.lease_ms)), self.rw_max_wait
        ):
            raise StoreUnavailable(
                f"another gc has held its lock in redis at {self.where} for over "
                f"{self.rw_max_wait:.0f}s"
            )

    def _wait_for_readers(self, pattern: str) -> None:
        def no_reader() -> bool:
            return not any(True for _ in self.client.scan_iter(match=pattern, count=1000))

        if not self._poll(no_reader, self.rw_max_wait):
            raise StoreUnavailable(
                f"pushes held the gc lock in redis at {self.where} for over {self.rw_max_wait:.0f}s"
            )

    def _release_writer(self, key: str, token: str) -> None:
        try:
            self.client.eval(_RELEASE, 1, key, token)
        except self._redis_errors:
            pass  # the lease runs out by itself; gc is done (or already failing)

    def _writer_error(self, exc: BaseException) -> StoreUnavailable:
        return StoreUnavailable(
            f"redis at {self.where} failed ({type(exc).__name__}): gc does not delete "
            "without its cross-replica lock"
        )
