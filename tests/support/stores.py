"""Stores for tests that drive the content store or a backend directly (no server):
a filesystem store in a directory, and the backend factories the backend contract
suite (tests/support/store_contract.py) runs against."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from passthrough.store.base import Backend
from passthrough.store.content import ContentStore
from passthrough.store.filesystem import FilesystemBackend
from passthrough.store.flight import Flight


def filesystem_store(root: Path, max_bytes: int = 0) -> ContentStore:
    """A content store on a directory, as ``open_store`` makes it for CACHE_DIR."""
    backend = FilesystemBackend(root)
    return ContentStore(backend, max_bytes, Flight(backend.lock_dir()))


def stored_bytes(store: ContentStore) -> int:
    """What the store's content entries take (what eviction counts)."""
    return sum(size for _, size, _ in store.entries())


@dataclass
class BackendKit:
    """One backend under test, and what the suite needs to know of it."""

    backend: Backend
    #: Between two writes whose "last used" order a test relies on: S3 keeps
    #: LastModified to the second, a directory to the nanosecond.
    tick: Callable[[], None]
    #: Whether clients may be sent to a presigned URL (S3) or not (a directory).
    presigns: bool


def filesystem_kit(root: Path) -> BackendKit:
    return BackendKit(FilesystemBackend(root), lambda: time.sleep(0.01), presigns=False)


def s3_kit(endpoint_url: str, region: str, bucket: str, prefix: str, temp: Path) -> BackendKit:
    """An S3 backend on a bucket (credentials from the AWS chain: the caller sets them)."""
    from passthrough.store.s3 import S3Backend

    backend = S3Backend(
        bucket, prefix, endpoint_url=endpoint_url, region=region, temp_dir=os.fspath(temp)
    )
    return BackendKit(backend, lambda: time.sleep(1.1), presigns=True)
