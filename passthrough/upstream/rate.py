"""UPSTREAM_MAX_RATE: what reading from upstream registries may cost a thin link, per
second, for the whole pod and optionally per upstream alias. Only bytes read from an
upstream are counted and slowed (blob bodies, manifests, tokens, listings); a cache hit
never reaches this module.

Every gunicorn worker of a pod shares one budget: each bucket is a *virtual clock* (the
generic cell rate algorithm), 8 bytes of the pod's shared file in /dev/shm (the transfer
slot file of :mod:`passthrough.capacity`, made by the master before it forks; the
buckets sit far past its slot bytes). Taking ``n`` bytes moves the clock on by
``n / rate`` under an OFD lock of those 8 bytes, and the reader sleeps until the clock,
less a small burst allowance, has caught up with the present. Concurrent fetches,
whichever worker runs them, queue on the same clock, so their sum stays at the cap.
The clock is CLOCK_MONOTONIC, which every process of the host shares.

A body is read in pieces of about a tenth of a second's worth, so a slow cap delays each
piece a little rather than a whole chunk a lot.
"""

from __future__ import annotations

import fcntl
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from passthrough.capacity import lock_request

#: Where the first bucket sits in the shared file: past any slot byte (one per transfer).
BUCKETS_OFFSET = 1 << 24
_BUCKET = struct.Struct("d")
#: How far a bucket's clock may run ahead of the present before a reader waits: a
#: read that follows an idle spell goes at once.
BURST_SECONDS = 0.1
#: How much of a second's budget one read may take.
PIECE_SECONDS = 0.1
MIN_PIECE = 16 << 10


class SharedBuckets:
    """The pod's virtual clocks, bucket ``i`` at ``BUCKETS_OFFSET + 8 i`` of ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None
        self._pid = 0
        self._opened = threading.Lock()
        #: An OFD lock does not exclude threads sharing the descriptor: this does.
        self._in_process = threading.Lock()

    def _descriptor(self) -> int:
        # One descriptor per process (reopened after a fork): its OFD lock excludes the
        # other workers, and the caller's thread lock this process's other threads.
        with self._opened:
            if self._fd is None or self._pid != os.getpid():
                self._fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
                self._pid = os.getpid()
            return self._fd

    def reserve(self, index: int, seconds: float) -> float:
        """Move bucket ``index``'s clock on by ``seconds``; the time to wait before the
        reserved bytes may be read (0 when the bucket had time to spare)."""
        fd = self._descriptor()
        offset = BUCKETS_OFFSET + index * _BUCKET.size
        with self._in_process:
            return self._advance(fd, offset, seconds)

    @staticmethod
    def _advance(fd: int, offset: int, seconds: float) -> float:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLKW, lock_request(fcntl.F_WRLCK, offset, _BUCKET.size))
        try:
            stored = os.pread(fd, _BUCKET.size, offset)
            clock = _BUCKET.unpack(stored)[0] if len(stored) == _BUCKET.size else 0.0
            now = time.monotonic()
            clock = max(clock, now) + seconds
            os.pwrite(fd, _BUCKET.pack(clock), offset)
        finally:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, lock_request(fcntl.F_UNLCK, offset, _BUCKET.size))
        return max(0.0, clock - BURST_SECONDS - now)


@dataclass(frozen=True)
class Throttle:
    """The caps one upstream's reads obey: (bucket, bytes per second) pairs."""

    buckets: SharedBuckets
    caps: tuple[tuple[int, int], ...]
    sleep: Callable[[float], None] = time.sleep

    @property
    def piece(self) -> int:
        """The most one read may ask for: a tenth of a second at the slowest cap."""
        slowest = min(rate for _, rate in self.caps)
        return max(MIN_PIECE, int(slowest * PIECE_SECONDS))

    def take(self, size: int) -> None:
        """Account ``size`` bytes just read; sleep as long as the slowest cap asks."""
        if size <= 0:
            return
        waits = [self.buckets.reserve(index, size / rate) for index, rate in self.caps]
        pause = max(waits)
        if pause > 0:
            self.sleep(pause)

    def wrap(self, raw: Any) -> None:
        """Throttle the body of a urllib3 response: its ``read`` and ``read_chunked``
        (what ``stream`` and requests' ``iter_content`` call, with or without chunked
        encoding), each read cut to :attr:`piece` and accounted."""
        read, read_chunked = raw.read, raw.read_chunked
        piece = self.piece

        def throttled(amt: int | None = None, *args: Any, **kwargs: Any) -> bytes:
            if amt is None:  # the whole rest, as urllib3 means it, piece by piece
                return b"".join(iter(lambda: throttled(piece, *args, **kwargs), b""))
            data: bytes = read(min(amt, piece), *args, **kwargs)
            self.take(len(data))
            return data

        def throttled_chunks(amt: int | None = None, *args: Any, **kwargs: Any) -> Iterator[bytes]:
            for data in read_chunked(piece if amt is None or amt > piece else amt, *args, **kwargs):
                self.take(len(data))
                yield data

        raw.read, raw.read_chunked = throttled, throttled_chunks


class UpstreamRates:
    """UPSTREAM_MAX_RATE for one process: bucket 0 is the pod's, bucket ``i`` the i-th
    alias cap; :meth:`for_upstream` says which apply to a registry URL."""

    def __init__(self, path: str, pod: int, per_url: Sequence[tuple[str, int]]) -> None:
        self.buckets = SharedBuckets(path)
        self.pod = pod
        self.per_url = tuple((url.rstrip("/"), rate) for url, rate in per_url)

    def for_upstream(self, url: str) -> Throttle | None:
        caps = [(0, self.pod)] if self.pod else []
        caps += [
            (index, rate)
            for index, (alias_url, rate) in enumerate(self.per_url, start=1)
            if alias_url == url.rstrip("/")
        ]
        return Throttle(self.buckets, tuple(caps)) if caps else None
