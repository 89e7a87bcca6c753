"""Small helpers that every tier shares: the digest of some bytes, as a registry names a
blob, and waiting for something that another thread or process will make true. One
copy here, so that a test module imports them instead of writing its own."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable


def sha256_hex(data: bytes) -> str:
    """The bare hex sha256 of `data` (a blob's file name under blobs/sha256/)."""
    return hashlib.sha256(data).hexdigest()


def digest(data: bytes) -> str:
    """The OCI digest of `data`: ``sha256:<hex>``."""
    return "sha256:" + sha256_hex(data)


def wait_until(condition: Callable[[], object], timeout: float, what: str) -> None:
    """Poll `condition` (truthy is done) every 50 ms; after `timeout` seconds fail,
    naming `what` was awaited."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.05)
