"""The content store: verified blobs, layer tars and manifests by digest, on disk or in
S3, shared by the tar export, the /v2 proxy and the hosted area.

:func:`open_store` builds the one the settings ask for: the filesystem backend on
CACHE_DIR (STORE=filesystem, the default; load_settings gives it a default directory),
the S3 backend with STORE=s3, or None with STORE=off (no store: each download spools
its layers into anonymous temporary files).
"""

from __future__ import annotations

import hashlib

from passthrough.config import Settings
from passthrough.config.parse import writable_directory
from passthrough.store.base import Backend
from passthrough.store.content import ContentStore
from passthrough.store.flight import Flight, RedisLease


def open_backend(settings: Settings) -> Backend | None:
    if settings.store == "s3":
        from passthrough.store.s3 import S3Backend

        assert settings.s3_bucket is not None  # load_settings requires it
        return S3Backend(
            settings.s3_bucket,
            settings.s3_prefix,
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            temp_dir=settings.temp_dir,
            lifecycle_days=settings.s3_lifecycle_days,
        )
    if settings.store == "filesystem" and settings.cache_dir:
        from passthrough.store.filesystem import FilesystemBackend

        return FilesystemBackend(settings.cache_dir)
    return None


def open_store(settings: Settings) -> ContentStore | None:
    """The process's store (one per gunicorn worker: clients are made after the fork)."""
    backend = open_backend(settings)
    if backend is None:
        return None
    lease = None
    if settings.redis_url:
        # One namespace per store, so installations that share a Redis never share locks.
        where = f"{backend.describe()}\0{settings.s3_prefix}"
        namespace = "passthrough:" + hashlib.sha256(where.encode()).hexdigest()[:16]
        lease = RedisLease(
            settings.redis_url,
            lease_seconds=settings.redis_lock_lease,
            namespace=namespace,
            max_wait=settings.download_deadline,
        )
    # Listing a bucket costs requests: the size check runs at most once a minute there.
    interval = 60.0 if backend.name == "s3" else 0.0
    return ContentStore(
        backend,
        settings.cache_max_bytes,
        Flight(backend.lock_dir(), lease),
        evict_interval=interval,
    )


def check_store(settings: Settings) -> None:
    """At start-up: raise :class:`~passthrough.config.ConfigError` (one line naming the
    variable and the endpoint) when the configured store cannot be used."""
    if settings.store == "filesystem" and settings.cache_dir:
        # The default directory is not checked when it is read: made (or refused) here.
        writable_directory("CACHE_DIR", settings.cache_dir)
    backend = open_backend(settings)
    if backend is None:
        return
    try:
        backend.check()
    finally:
        backend.close()
