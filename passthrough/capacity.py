"""What the pod takes on at once, a property of the pod rather than of any one route: a
pod-wide cap on concurrent transfers (tar downloads and /v2 blob bodies; each holds a
thread for its whole life, and routers read slowly), answered with 503 at once past it,
never a queue; and the free-space check before a download starts. Below the wings, so
:mod:`passthrough.services` makes the one :class:`TransferSlots` of the process and any
wing may share it.

The slots are shared by every gunicorn worker of one master through one small file the
master makes before it forks (:func:`create_slot_file`; its path reaches the workers in
:data:`SLOTS_FILE_ENV`): slot *i* is byte *i* of that file, held by an OFD byte-range
lock (``F_OFD_SETLK``) on a descriptor of its own. Such a lock belongs to the open file
description, so threads of one process exclude each other, and the kernel releases it
when the descriptor closes, also when its worker is SIGKILLed: a dead worker's slots
come back at once, with no bookkeeping in the master. The same file holds, far past the
slot bytes, the pod's UPSTREAM_MAX_RATE buckets (:mod:`passthrough.upstream.rate`)."""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import random
import struct
import tempfile
import threading
from collections.abc import Callable, Iterator
from functools import partial

from passthrough.errors import InsufficientStorage, TooBusy

RETRY_AFTER_SECONDS = 5
#: Threads of a worker beyond MAX_TRANSFERS: for quick requests while every slot is held.
TRANSFER_RESERVE = 32
#: Where the master's slot file is named for its workers (set by gunicorn.conf.py only).
SLOTS_FILE_ENV = "PASSTHROUGH_TRANSFER_SLOTS"
#: ``struct flock`` on Linux (x86-64, arm64): type, whence, start, len, pid (+ padding).
_FLOCK = "hhqqi4x"


def create_slot_file() -> str:
    """A fresh, empty slot file, private to this user: in /dev/shm (memory, pod-local,
    never the store's volume) where it exists, else the temp directory."""
    parent = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None  # noqa: S108
    fd, path = tempfile.mkstemp(prefix="passthrough-transfers-", dir=parent)
    os.close(fd)
    return path


def threads_per_worker(configured: int, max_transfers: int) -> int:
    """GUNICORN_THREADS, or (0) enough for one worker to hold every slot of the pod: the
    kernel may hand any one worker most of the connections, and a transfer that found a
    slot must never wait for a thread."""
    return configured or max_transfers + TRANSFER_RESERVE


def lock_request(kind: int, start: int, length: int = 1) -> bytes:
    """The ``struct flock`` of an OFD lock of ``length`` bytes at ``start``."""
    return struct.pack(_FLOCK, kind, os.SEEK_SET, start, length, 0)


class Transfer:
    """One slot held: :meth:`release` (idempotent) gives it back."""

    __slots__ = ("_fd", "_lock", "_on_release")

    def __init__(self, fd: int, on_release: Callable[[], None] | None = None) -> None:
        self._fd: int | None = fd
        self._lock = threading.Lock()
        self._on_release = on_release

    def release(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # the kernel drops the OFD lock with the description
            if self._on_release is not None:
                self._on_release()

    @property
    def held(self) -> bool:
        return self._fd is not None


class TransferSlots:
    """``capacity`` slots for the whole pod (see the module's docstring). Never blocks:
    with every slot taken, :meth:`acquire` raises :class:`TooBusy` (503, Retry-After)."""

    def __init__(self, capacity: int, path: str | None = None) -> None:
        self.capacity = max(1, capacity)
        self._path = path
        self._made_lock = threading.Lock()
        #: Where this process's next scan starts: past the slot it took last, so its
        #: transfers fill a run of bytes and an acquire costs one or two fcntl calls,
        #: not a probe through the pod's taken slots (each call lets go of the GIL, and
        #: under load each costs a wait for it: seconds at 500 transfers).
        self._cursor = random.randrange(self.capacity)  # noqa: S311 - spreading, not secrecy
        #: Slots this process gave back: most likely still free, tried first.
        self._freed: list[int] = []
        self._hint_lock = threading.Lock()

    @classmethod
    def for_pod(cls, capacity: int) -> TransferSlots:
        """The master's file when gunicorn.conf.py made one; else (a process of its own:
        tests, the Flask dev server) a private file made on first use."""
        return cls(capacity, os.environ.get(SLOTS_FILE_ENV) or None)

    @property
    def path(self) -> str:
        if self._path is None:
            with self._made_lock:
                if self._path is None:
                    made = create_slot_file()
                    atexit.register(_remove_quietly, made)
                    self._path = made
        return self._path

    def acquire(self) -> Transfer:
        """A free slot, or TooBusy at once: the slots this process gave back first, then
        a scan from its cursor (see ``_cursor``)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        for index in self._candidates():
            try:
                fcntl.fcntl(fd, fcntl.F_OFD_SETLK, lock_request(fcntl.F_WRLCK, index))
            except (BlockingIOError, PermissionError):
                continue
            with self._hint_lock:
                self._cursor = (index + 1) % self.capacity
            return Transfer(fd, partial(self._give_back, index))
        os.close(fd)
        raise TooBusy(
            f"this server is already sending {self.capacity} transfers; retry shortly",
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        )

    def _candidates(self) -> Iterator[int]:
        with self._hint_lock:
            freed, self._freed = self._freed[-4:], self._freed[:-4]
            start = self._cursor
        yield from reversed(freed)
        for step in range(self.capacity):
            yield (start + step) % self.capacity

    def _give_back(self, index: int) -> None:
        with self._hint_lock:
            if len(self._freed) < self.capacity:
                self._freed.append(index)

    def in_use(self) -> int:
        """How many slots are held now, by any process of the pod: counted in
        /proc/locks (one read), else by asking each byte (F_OFD_GETLK)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return 0
        try:
            counted = count_proc_locks(os.fstat(fd), self.capacity)
            return counted if counted is not None else self._scan_in_use(fd)
        finally:
            os.close(fd)

    def _scan_in_use(self, fd: int) -> int:
        held = 0
        for index in range(self.capacity):
            answer = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, lock_request(fcntl.F_RDLCK, index))
            held += struct.unpack(_FLOCK, answer)[0] != fcntl.F_UNLCK
        return held


def count_proc_locks(stat: os.stat_result, capacity: int, table: str = "/proc/locks") -> int | None:
    """The OFD locks on the slot bytes of the file ``stat`` describes, from the kernel's
    table of locks (``1: OFDLCK ADVISORY WRITE -1 00:1a:1234 5 5``; a waiter's line is
    ``1: -> ...``, and acquire never waits); None when the table cannot be read."""
    inode = f"{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}:{stat.st_ino}"
    try:
        with open(table, "rb") as locks:
            text = locks.read().decode("ascii", "replace")
    except OSError:
        return None
    held = 0
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 8 and fields[1] == "OFDLCK" and fields[5] == inode:
            with contextlib.suppress(ValueError):
                held += int(fields[6]) < capacity
    return held


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def remove_slot_file(path: str) -> None:
    """The master's exit: the file goes (a worker still holding a slot keeps its inode)."""
    _remove_quietly(path)


def free_bytes(directory: str | None) -> int:
    stats = os.statvfs(directory or tempfile.gettempdir())
    return stats.f_bavail * stats.f_frsize


def check_free_space(directory: str | None, needed: int) -> None:
    """507 before the first byte when the disk obviously cannot hold the layers (their
    compressed size is a lower bound of what will be written)."""
    if needed and free_bytes(directory) < needed:
        raise InsufficientStorage(
            f"not enough free disk space for this image's layers ({needed >> 20} MiB needed)"
        )
