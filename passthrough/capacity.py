"""What one worker takes on at once, a property of the pod rather than of any one route:
a cap on concurrent downloads (each holds a thread for its whole life, and routers read
slowly), so /health and /metrics always find a free thread; and the free-space check
before a download starts. Below the wings, so :mod:`passthrough.services` makes the one
:class:`DownloadSlots` of the process and any wing may share it."""

from __future__ import annotations

import os
import tempfile
import threading

from passthrough.errors import InsufficientStorage, TooBusy

#: Threads kept free for /health, /metrics and quick errors.
RESERVED_THREADS = 2
RETRY_AFTER_SECONDS = 5


class DownloadSlots:
    """A non-blocking counting semaphore: over the cap, answer 503 at once."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self._in_use = 0
        self._lock = threading.Lock()

    @property
    def in_use(self) -> int:
        return self._in_use

    def acquire(self) -> None:
        with self._lock:
            if self._in_use >= self.capacity:
                raise TooBusy(
                    f"this server is already sending {self.capacity} downloads; retry shortly",
                    headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
                )
            self._in_use += 1

    def release(self) -> None:
        with self._lock:
            self._in_use = max(0, self._in_use - 1)

    def fit_to_threads(self, threads: int, configured: int) -> None:
        """Cap below the worker's thread count (called from gunicorn's post_worker_init);
        an explicit MAX_CONCURRENT_DOWNLOADS is honoured but never exceeds it."""
        ceiling = max(1, threads - RESERVED_THREADS)
        self.capacity = min(configured, ceiling) if configured else ceiling


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
