"""The inventory's records: one small JSON document per tag served (``pulls/<id>.json``,
:func:`passthrough.store.layout.pull_record_key`), in the store, so every replica reads
and adds to the same counts.

A record holds the names in clear (source, upstream, repository, tag: the tag records
of stale serving are hashed and cannot be listed), the digest last served, what the
image is (media type, platforms, compressed size, tar size, created) and how it is used
(``pulls``, ``last_pulled``). A *pull* is a manifest request by tag on /v2 (``GET`` or
``HEAD``: containerd resolves with a HEAD, docker with a GET) or a tar download from
its first byte, of a hosted or a cached image.

**Cost.** No write per blob read, and none per pull either: :class:`PullCounter`
gathers a tag's pulls in the process and writes them at most once per
PULL_COUNT_INTERVAL seconds (the first pull of a tag at once), under the tag's lock (on
this host; across replicas too with REDIS_URL), as a read of the record and a write.
A background thread writes what was gathered every PULL_COUNT_INTERVAL seconds, so a
count is at most that late; the rest is written when the process exits, and before it
answers an inventory listing. The image's details are read from the store only when the
digest moved (or, while the tar size is unknown, every 5 minutes at most).
"""

from __future__ import annotations

import atexit
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from passthrough.errors import PassthroughError
from passthrough.oci.manifest import INDEX_TYPES, index_platforms
from passthrough.oci.platforms import DEFAULT_PLATFORM
from passthrough.oci.reference import DIGEST_RE
from passthrough.registry.proxy import sniff_media_type
from passthrough.store import layout
from passthrough.store.content import ContentStore
from passthrough.store.layout import content_key

log = logging.getLogger(__name__)

HOSTED, CACHED = "hosted", "cached"
#: Seconds between two looks for a tag's still unknown tar size.
DETAILS_RETRY = 300.0


@dataclass(frozen=True)
class Served:
    """One tag served: what the record is of, and the digest it answered."""

    source: str
    #: The upstream registry's URL and name (None, None when hosted).
    upstream_url: str | None
    upstream_name: str | None
    repository: str
    tag: str
    digest: str

    @property
    def identity(self) -> str:
        return layout.pull_id(self.source, self.upstream_url, self.repository, self.tag)


def read_json(store: ContentStore, key: str) -> dict[str, Any] | None:
    """A small JSON record of the store, None when absent or unreadable."""
    try:
        data = store.backend.get_bytes(key)
        found = json.loads(data) if data is not None else None
    except (OSError, ValueError, PassthroughError):
        return None
    return found if isinstance(found, dict) else None


def image_details(store: ContentStore, digest: str) -> dict[str, Any]:
    """What the store knows of the image ``digest`` names: media type, platforms, the
    compressed size and the tar size (the sum of its layer tars, None unless every one
    is stored) of the default platform (or the first), and when it was created."""
    details: dict[str, Any] = {
        "media_type": None,
        "platforms": [],
        "compressed_size": None,
        "tar_size": None,
        "created": None,
    }
    document, media_type = _manifest(store, digest)
    if document is None:
        return details
    details["media_type"] = media_type
    if media_type in INDEX_TYPES or "manifests" in document:
        entries = index_platforms(document) if isinstance(document.get("manifests"), list) else []
        details["platforms"] = [str(platform) for platform, _ in entries]
        chosen = [e for p, e in entries if DEFAULT_PLATFORM.matches(p)] or [e for _, e in entries]
        child = chosen[0].get("digest") if chosen else None
        document = _manifest(store, child)[0] if isinstance(child, str) else None
        if document is None:
            return details
    details.update(_image_sizes(store, document, with_platform=not details["platforms"]))
    return details


def _manifest(store: ContentStore, digest: str) -> tuple[dict[str, Any] | None, str | None]:
    if not DIGEST_RE.fullmatch(digest) or not digest.startswith("sha256:"):
        return None, None
    body = store.get_document("manifests", digest)
    if body is None:
        return None, None
    try:
        document = json.loads(body)
    except ValueError:
        return None, None
    return (document, sniff_media_type(body)) if isinstance(document, dict) else (None, None)


def _image_sizes(
    store: ContentStore, manifest: dict[str, Any], *, with_platform: bool
) -> dict[str, Any]:
    """Compressed size, tar size, created (and the platform) of one image manifest."""
    found: dict[str, Any] = {}
    layers = [e for e in manifest.get("layers") or [] if isinstance(e, dict)]
    config = manifest.get("config")
    config = config if isinstance(config, dict) else {}
    sizes = [e.get("size") for e in [config, *layers]]
    if all(isinstance(s, int) for s in sizes):
        found["compressed_size"] = sum(s for s in sizes if isinstance(s, int))
    config_digest = config.get("digest")
    body = store.get_document("blobs", config_digest) if isinstance(config_digest, str) else None
    try:
        document = json.loads(body) if body is not None else None
    except ValueError:
        document = None
    if not isinstance(document, dict):
        return found
    created = document.get("created")
    found["created"] = created if isinstance(created, str) else None
    if with_platform and isinstance(document.get("os"), str):
        parts = [document.get("os"), document.get("architecture"), document.get("variant")]
        found["platforms"] = ["/".join(p for p in parts if isinstance(p, str) and p)]
    rootfs = document.get("rootfs") if isinstance(document.get("rootfs"), dict) else {}
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if isinstance(diff_ids, list) and all(isinstance(d, str) for d in diff_ids):
        tars = [_layer_tar_size(store, d) for d in diff_ids]
        found["tar_size"] = None if None in tars else sum(t for t in tars if t is not None)
    return found


def _layer_tar_size(store: ContentStore, diff_id: str) -> int | None:
    try:
        return store.backend.size(content_key("layers", diff_id))
    except ValueError:
        return None


class PullCounter:
    """A process's pulls, gathered per tag and written to the store at most once per
    ``interval`` seconds per tag (see the module's docstring). Thread-safe."""

    def __init__(
        self,
        store: ContentStore,
        interval: float,
        *,
        clock: Callable[[], float] = time.time,
        background: bool = True,
    ) -> None:
        self.store = store
        self.interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        #: A daemon thread that writes what is gathered every ``interval`` seconds, so a
        #: count is at most that late even when no further pull comes (started with the
        #: first pull: in the gunicorn worker, after the fork).
        self._background = background and interval > 0
        self._flusher: threading.Thread | None = None
        #: identity → (the latest serve, pulls not written yet, the latest pull's time)
        self._pending: dict[str, tuple[Served, int, float]] = {}
        self._written: dict[str, float] = {}
        #: Records written by this process (for the measured cost of counting).
        self.writes = 0
        atexit.register(self.flush)

    def record(self, served: Served) -> None:
        """Count one pull; written now when the tag's last write is old enough. Never
        raises: a pull is not refused because its count could not be written."""
        now = self._clock()
        identity = served.identity
        with self._lock:
            if self._background and self._flusher is None:
                self._flusher = threading.Thread(
                    target=self._flush_every_interval, name="pull-counts", daemon=True
                )
                self._flusher.start()
            _, count, _ = self._pending.get(identity, (served, 0, now))
            self._pending[identity] = (served, count + 1, now)
            due = now - self._written.get(identity, float("-inf")) >= self.interval
        if due:
            self._flush_one(identity)

    def _flush_every_interval(self) -> None:
        while True:
            time.sleep(self.interval)
            self.flush()

    def flush(self) -> None:
        """Write every pull gathered so far (before a listing, and at exit)."""
        with self._lock:
            identities = list(self._pending)
        for identity in identities:
            self._flush_one(identity)

    def _flush_one(self, identity: str) -> None:
        with self._lock:
            taken = self._pending.pop(identity, None)
            self._written[identity] = self._clock()
        if taken is None:
            return
        served, count, when = taken
        try:
            with self.store.flight.hold("pulls-" + identity):
                self._write(served, count, when)
        except (OSError, PassthroughError) as exc:
            log.warning("could not count pulls of %s:%s: %s", served.repository, served.tag, exc)
            with self._lock:  # kept for the next try
                _, later, latest = self._pending.get(identity, (served, 0, when))
                self._pending[identity] = (served, count + later, max(when, latest))

    def _write(self, served: Served, count: int, when: float) -> None:
        key = layout.pull_record_key(served.identity)
        record = read_json(self.store, key) or {}
        # The details are read from the store when the digest moved, and while the tar
        # size is unknown at most every DETAILS_RETRY seconds (a tar download stores the
        # layer tars; a /v2 pull never does).
        checked = float(record.get("details_checked") or 0)
        stale = record.get("digest") != served.digest or (
            record.get("tar_size") is None and when - checked >= DETAILS_RETRY
        )
        record.update(
            source=served.source,
            upstream=served.upstream_url,
            registry=served.upstream_name,
            repository=served.repository,
            tag=served.tag,
            digest=served.digest,
            pulls=int(record.get("pulls") or 0) + count,
            last_pulled=max(float(record.get("last_pulled") or 0), when),
        )
        if stale:
            record.update(image_details(self.store, served.digest), details_checked=when)
        self.store.backend.put_bytes(key, json.dumps(record).encode())
        self.writes += 1


def pull_records(store: ContentStore) -> list[dict[str, Any]]:
    """Every inventory record in the store (unreadable ones left out)."""
    found: list[dict[str, Any]] = []
    for info in store.backend.list(layout.PULLS):
        if layout.parse_pull_record_key(info.key) is None:
            continue
        record = read_json(store, info.key)
        if (
            record
            and isinstance(record.get("repository"), str)
            and isinstance(record.get("tag"), str)
        ):
            found.append(record)
    return found
