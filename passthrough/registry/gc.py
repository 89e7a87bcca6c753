"""Garbage collection of the hosted area: ``passthrough gc`` removes the blobs and
manifests that no tag of any hosted repository reaches (a dry run unless ``--delete``).

**Mark.** Per repository, from every tag record (and every manifest pushed within the
grace period, so that an untagged child about to be named by an index keeps its blobs):
the manifest's record lists its ``references`` (index → child manifests, image →
config and layers), and a manifest whose subject is reachable (a signature, an SBOM)
is reachable too. The union over all repositories is what the store must keep.

**Sweep**, hosted content only, whatever is older than the grace period:

1. referrer entries and manifest records that their repository's tags do not reach;
2. blob links (``_blobs``) their repository does not reach;
3. pinned manifests and blobs (``pins/…``, set by pushes) that nothing reachable
   needs: the bytes are deleted, then the pin.

Content without a pin was never pushed (the proxy or the tar export cached it): gc
never touches it, the cache's eviction owns it. A digest that was pushed *and* is
named by a cached manifest (a manifest the proxy or the tar export stored, or the
digest of one of their tag records) is one object for both: gc only unpins it, so that
it goes back to the cache and its least-recently-used eviction, instead of taking the
proxy's copy away. (A blob the proxy fetched whose manifest has already been evicted
cannot be told from a pushed one: deleting it costs one upstream fetch, never a wrong
answer.)

**Safety while pushes run.** A push holds the gc lock shared while it checks its
references and writes its pins and records
(:meth:`passthrough.registry.hosted.Hosted.put_manifest`, ``link_blob``); gc deletes in
batches, each under the lock held exclusive, after listing the records again and
marking afresh (records that are new, changed, or recent are read again), so a push is
either not begun or complete when gc decides. The lock
(:meth:`passthrough.store.flight.Flight.gc_lock`) is this host's ``hosted-gc``
``flock`` and, with ``REDIS_URL``, inside it a readers-writer lock in Redis shared by
every replica and by gc wherever it runs (the chart's CronJob pod): a push on any host
waits for gc's batch, gc for the pushes in progress everywhere. Its keys are leases
(``REDIS_LOCK_LEASE``), so a killed replica or gc holds the others up at most that long;
gc checks its lease before every delete and stops when it may have run out. Redis
unreachable: pushes go on with the host's lock alone, but gc stops with an error before
its first delete (or at the next one), since deleting then is exactly what the lock
prevents. Without ``REDIS_URL`` the lock is the ``flock`` alone: on an S3 store shared
by replicas on other hosts, pushes there are protected by the grace period alone (keep
it well above the time a push takes: the default is an hour).

**Killed half way.** Every delete is of something unreachable, decided under the lock,
so any prefix of the deletions leaves every tag pullable; records go before the bytes
they name, and bytes before their pin, so a later run finds and finishes what a killed
one left (a pin whose bytes are gone is just unpinned).

Upload sessions in progress are never touched; with ``--delete`` a session idle for a
day (:data:`UPLOAD_EXPIRY`) is expired, and printed as such.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from passthrough.oci.reference import DIGEST_RE
from passthrough.store import layout
from passthrough.store.base import ObjectInfo
from passthrough.store.content import ContentStore
from passthrough.store.flight import Held
from passthrough.store.layout import content_key
from passthrough.store.uploads import UploadState

#: An upload session idle this long is abandoned (Docker and containerd retry a failed
#: upload from the start).
UPLOAD_EXPIRY = 24 * 3600.0
#: Records whose object time is this close to the start of the run, or later, are read
#: again at every batch: S3's LastModified has whole seconds and another clock.
RECENT_SLACK = 300.0
#: Deletes per hold of the exclusive lock: pushes wait at most one batch.
BATCH = 200
#: The content a push pins, and so the only content gc may remove.
PINNED_KINDS = ("blobs", "manifests")

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """``90s``, ``15m``, ``1h``, ``2d``, ``0s`` (or sums such as ``1h30m``), in seconds."""
    value = text.strip()
    if not re.fullmatch(r"(?:\d+[smhd])+", value):
        raise ValueError(
            f"--grace {text[:40]!r} is not a duration: give one such as 90s, 15m, 1h, 2d or 0s"
        )
    return float(sum(int(n) * _UNITS[u] for n, u in re.findall(r"(\d+)([smhd])", value)))


def human_bytes(size: int) -> str:
    if size < 1024:
        return f"{size} bytes"
    value = float(size)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}"


# -- what is in the store -------------------------------------------------------------------


@dataclass
class Listing:
    """The hosted records and the pins, as listed (object infos, not yet read)."""

    #: repository → tag → record
    tags: dict[str, dict[str, ObjectInfo]] = field(default_factory=dict)
    #: repository → manifest digest → record
    manifests: dict[str, dict[str, ObjectInfo]] = field(default_factory=dict)
    #: repository → blob digest → link record
    blobs: dict[str, dict[str, ObjectInfo]] = field(default_factory=dict)
    #: repository → subject digest → referrer digest → entry
    referrers: dict[str, dict[str, dict[str, ObjectInfo]]] = field(default_factory=dict)
    #: (kind, digest) → pin
    pins: dict[tuple[str, str], ObjectInfo] = field(default_factory=dict)

    def repositories(self) -> set[str]:
        return set(self.tags) | set(self.manifests) | set(self.blobs) | set(self.referrers)


def list_store(store: ContentStore) -> Listing:
    """The hosted records and the pins, parsed by :mod:`passthrough.store.layout` (the
    module that builds them): a key it does not recognise is not gc's to touch."""
    listing = Listing()
    for info in store.backend.list(layout.HOSTED):
        parsed = layout.parse_hosted_key(info.key)
        if parsed is None:
            continue
        repository = parsed.repository
        if parsed.section == layout.TAG:
            listing.tags.setdefault(repository, {})[parsed.name] = info
        elif parsed.section == layout.REFERRER:
            assert parsed.subject is not None
            by_subject = listing.referrers.setdefault(repository, {})
            by_subject.setdefault(parsed.subject, {})[parsed.name] = info
        else:
            target = listing.manifests if parsed.section == layout.MANIFEST else listing.blobs
            target.setdefault(repository, {})[parsed.name] = info
    for info in store.backend.list(layout.PINS):
        pinned = layout.parse_pin_key(info.key)
        if pinned is not None and pinned[0] in PINNED_KINDS:
            listing.pins[pinned] = info
    return listing


class Records:
    """Reads records once, and again only when their listing changed or is recent (a
    record is small; a run over a large store should not read each one per batch)."""

    def __init__(self, store: ContentStore, fresh_after: float) -> None:
        self.backend = store.backend
        self.fresh_after = fresh_after
        self._known: dict[str, tuple[ObjectInfo, dict[str, Any] | None]] = {}

    def get(self, info: ObjectInfo) -> dict[str, Any] | None:
        known = self._known.get(info.key)
        if known is not None and known[0] == info and info.last_used < self.fresh_after:
            return known[1]
        data = self.backend.get_bytes(info.key)
        record: dict[str, Any] | None = None
        if data is not None:
            try:
                parsed = json.loads(data)
            except ValueError:
                parsed = None
            record = parsed if isinstance(parsed, dict) else None
        self._known[info.key] = (info, record)
        return record


# -- the plan -------------------------------------------------------------------------------

#: The order of the sweep: what names something goes before what it names.
REFERRER, MANIFEST_RECORD, BLOB_LINK, MANIFEST_CONTENT, BLOB_CONTENT = range(5)


@dataclass(frozen=True)
class Step:
    """One delete. Record steps remove ``key``; content steps delete the bytes (unless
    ``cached``), then the pin ``key``."""

    order: int
    kind: str  # "manifest" or "blob"
    digest: str
    key: str
    repository: str | None = None
    cached: bool = False

    @property
    def is_content(self) -> bool:
        return self.order in (MANIFEST_CONTENT, BLOB_CONTENT)


@dataclass
class Marks:
    """What each repository reaches (manifests, blobs), and the union."""

    manifests: dict[str, set[str]] = field(default_factory=dict)
    blobs: dict[str, set[str]] = field(default_factory=dict)

    def all_manifests(self) -> set[str]:
        return set().union(*self.manifests.values()) if self.manifests else set()

    def all_blobs(self) -> set[str]:
        return set().union(*self.blobs.values()) if self.blobs else set()


def _time_of(record: dict[str, Any] | None, name: str, fallback: float) -> float:
    value = record.get(name) if record else None
    return (
        float(value) if isinstance(value, int | float) and not isinstance(value, bool) else fallback
    )


class Collector:
    """One run of gc over one store."""

    def __init__(
        self,
        store: ContentStore,
        *,
        grace: float,
        out: Callable[[str], None],
        now: Callable[[], float] = time.time,
        on_delete: Callable[[str], None] | None = None,
    ) -> None:
        self.store = store
        self.backend = store.backend
        self.grace = grace
        self.out = out
        self.now = now
        self.started = now()
        self.records = Records(store, self.started - RECENT_SLACK)
        self._documents: dict[str, dict[str, Any] | None] = {}
        #: (manifests, blobs) the cache holds, once worked out (:meth:`cached`).
        self._cached: tuple[set[str], set[str]] | None = None
        #: Told the key of every object deleted, just after the delete (the tests stop
        #: a run there, as a kill would).
        self.on_delete = on_delete

    @property
    def cutoff(self) -> float:
        """What was written before this is old enough to go (the grace counts from the
        start of the run, so that later batches do not widen it)."""
        return self.started - self.grace

    # -- mark ------------------------------------------------------------------------------

    def mark(self, listing: Listing) -> Marks:
        marks = Marks()
        for repository in listing.repositories():
            manifests = listing.manifests.get(repository, {})
            referrers = listing.referrers.get(repository, {})
            stack: list[str] = []
            for info in listing.tags.get(repository, {}).values():
                record = self.records.get(info)
                target = record.get("digest") if record else None
                if isinstance(target, str) and DIGEST_RE.fullmatch(target):
                    stack.append(target)
            for digest, info in manifests.items():
                record = self.records.get(info)
                if _time_of(record, "pushed", info.last_used) >= self.cutoff:
                    stack.append(digest)  # young: a root, whatever names it later
            reached: set[str] = set()
            blobs: set[str] = set()
            while stack:
                digest = stack.pop()
                if digest in reached:
                    continue
                reached.add(digest)
                found = manifests.get(digest)
                record = self.records.get(found) if found is not None else None
                for reference in (record or {}).get("references") or ():
                    if not (isinstance(reference, list) and len(reference) == 2):
                        continue
                    kind, target = reference
                    if not (isinstance(target, str) and DIGEST_RE.fullmatch(target)):
                        continue
                    if kind == "manifests":
                        stack.append(target)
                    elif kind == "blobs":
                        blobs.add(target)
                # A referrer entry whose manifest record is gone is not followed: it is
                # swept as dangling.
                stack.extend(r for r in referrers.get(digest, {}) if r in manifests)
            for digest, info in listing.blobs.get(repository, {}).items():
                if digest in blobs:
                    continue
                # The record's own time, not the listing's: on disk that is the atime,
                # which any read of the record (a client's HEAD, a dry run) moves.
                record = self.records.get(info)
                if _time_of(record, "linked", info.last_used) >= self.cutoff:
                    blobs.add(digest)  # a blob just linked: its manifest is on its way
            marks.manifests[repository] = reached
            marks.blobs[repository] = blobs
        return marks

    # -- sweep plan ------------------------------------------------------------------------

    def plan(self, listing: Listing) -> list[Step]:
        """Every delete the listing calls for, in the order they must run."""
        marks = self.mark(listing)
        steps: list[Step] = []
        for repository, by_subject in listing.referrers.items():
            reached = marks.manifests.get(repository, set())
            for entries in by_subject.values():
                for digest, info in entries.items():
                    if digest not in reached:
                        steps.append(Step(REFERRER, "manifest", digest, info.key, repository))
        for repository, manifests in listing.manifests.items():
            reached = marks.manifests.get(repository, set())
            for digest, info in manifests.items():
                if digest not in reached:
                    steps.append(Step(MANIFEST_RECORD, "manifest", digest, info.key, repository))
        for repository, blobs in listing.blobs.items():
            reached = marks.blobs.get(repository, set())
            for digest, info in blobs.items():
                if digest not in reached:
                    steps.append(Step(BLOB_LINK, "blob", digest, info.key, repository))
        keep = {"manifests": marks.all_manifests(), "blobs": marks.all_blobs()}
        content: list[tuple[str, str, ObjectInfo]] = [
            (kind, digest, info)
            for (kind, digest), info in listing.pins.items()
            if digest not in keep[kind] and info.last_used < self.cutoff
        ]
        if content and self._cached is None:
            self._cached = self.cached(listing)
        cached = self._cached or (set(), set())
        for kind, digest, info in content:
            in_cache = digest in (cached[0] if kind == "manifests" else cached[1])
            order = MANIFEST_CONTENT if kind == "manifests" else BLOB_CONTENT
            steps.append(Step(order, kind[:-1], digest, info.key, None, in_cache))
        steps.sort(key=lambda s: (s.order, s.digest, s.repository or ""))
        return steps

    def cached(self, listing: Listing) -> tuple[set[str], set[str]]:
        """(manifests, blobs) the cache holds for itself: every manifest document in the
        store that no push pinned, every digest a proxy or export tag record names, and
        what they reference (children of an index, config and layers)."""
        stack: list[str] = []
        for info in self.backend.list(layout.TAGS):
            if layout.parse_tag_record_key(info.key) is None:
                continue
            record = self.records.get(info)
            digest = record.get("digest") if record else None
            if isinstance(digest, str) and DIGEST_RE.fullmatch(digest):
                stack.append(digest)
        for info in self.backend.list(layout.content_prefix("manifests")):
            content = layout.parse_content_key(info.key)
            if content is not None and content not in listing.pins:
                stack.append(content[1])
        manifests: set[str] = set()
        blobs: set[str] = set()
        while stack:
            digest = stack.pop()
            if digest in manifests or not DIGEST_RE.fullmatch(digest):
                continue
            manifests.add(digest)
            document = self._document(digest)
            if document is None:
                continue
            children = document.get("manifests")
            for child in children if isinstance(children, list) else ():
                if isinstance(child, dict) and isinstance(child.get("digest"), str):
                    stack.append(child["digest"])
            layers = document.get("layers")
            for entry in [document.get("config"), *(layers if isinstance(layers, list) else ())]:
                if isinstance(entry, dict) and isinstance(entry.get("digest"), str):
                    blobs.add(entry["digest"])
        return manifests, blobs

    def _document(self, digest: str) -> dict[str, Any] | None:
        """A manifest document by digest (immutable: read once per run)."""
        if digest not in self._documents:
            try:
                data = self.backend.get_bytes(content_key("manifests", digest))
                parsed = json.loads(data) if data is not None else None
            except ValueError:
                parsed = None
            self._documents[digest] = parsed if isinstance(parsed, dict) else None
        return self._documents[digest]

    # -- run -------------------------------------------------------------------------------

    def run(self, *, delete: bool) -> Summary:
        summary = Summary(delete=delete)
        if delete:
            self._sweep(summary)
        else:
            self._report(self.plan(list_store(self.store)), summary)
        self._uploads(summary, delete=delete)
        self.out(summary.line())
        return summary

    def _size(self, step: Step) -> int | None:
        return self.backend.size(content_key(step.kind + "s", step.digest))

    def _report(self, steps: list[Step], summary: Summary) -> None:
        """The dry run: one line per object, as the sweep would print it."""
        repositories: dict[tuple[str, str], set[str]] = {}
        for step in steps:
            if step.repository is not None:
                repositories.setdefault((step.kind, step.digest), set()).add(step.repository)
        for step in steps:
            if step.is_content:
                names = repositories.pop((step.kind, step.digest), set())
                self.out(summary.content(step, self._size(step), names, done=False))
        for (kind, digest), names in sorted(repositories.items()):
            self.out(summary.unlinked(kind, digest, names, done=False))

    def _sweep(self, summary: Summary) -> None:
        done: set[str] = set()
        repositories: dict[tuple[str, str], set[str]] = {}
        # A first plan without the lock: nothing to do is known without making pushes
        # wait, and what the cache holds (every cached manifest read) is worked out
        # here, once per run. Only the proxy adds to it meanwhile; a copy it makes
        # after this that gc deletes costs one upstream fetch, never a wrong answer.
        if not self.plan(list_store(self.store)):
            return
        while True:
            with self.store.flight.gc_lock(exclusive=True) as held:
                # Listed and marked again under the lock: a push completed since the last
                # batch is seen whole, and what it reaches stays.
                listing = list_store(self.store)
                steps = [s for s in self.plan(listing) if s.key not in done]
                if not steps:
                    break
                for step in steps[:BATCH]:
                    done.add(step.key)
                    if step.repository is not None:
                        self._delete(step.key, held)
                        repositories.setdefault((step.kind, step.digest), set()).add(
                            step.repository
                        )
                        continue
                    size = self._size(step)
                    if not step.cached:
                        # The bytes before the pin: a run killed in between leaves a pin
                        # that the next one finds and removes.
                        self._delete(content_key(step.kind + "s", step.digest), held)
                    self._delete(step.key, held)
                    names = repositories.pop((step.kind, step.digest), set())
                    self.out(summary.content(step, size, names, done=True))
        for (kind, digest), names in sorted(repositories.items()):
            self.out(summary.unlinked(kind, digest, names, done=True))

    def _delete(self, key: str, held: Held) -> None:
        # Only while the lock surely holds: a lease that may have run out lets pushes of
        # other replicas in, and what was decided unreachable may no longer be.
        held.check()
        self.backend.delete(key)
        if self.on_delete is not None:
            self.on_delete(key)

    def _uploads(self, summary: Summary, *, delete: bool) -> None:
        for state in self._sessions():
            idle = self.now() - state.updated
            if idle < UPLOAD_EXPIRY:
                summary.uploads_in_progress += 1
                continue
            if delete and not self._expire(state):
                summary.uploads_in_progress += 1
                continue
            summary.uploads_expired += 1
            verb = "expired" if delete else "would expire"
            self.out(
                f"{verb} upload {state.id} {human_bytes(state.size)} ({state.repository}), "
                f"idle {idle / 3600:.0f} h"
            )

    def _sessions(self) -> Iterable[UploadState]:
        if not self.store.has_uploads:
            return []  # a backend without upload sessions has none to leave alone
        return list(self.store.uploads.list())

    def _expire(self, state: UploadState) -> bool:
        uploads = self.store.uploads
        with uploads.session(state.id):
            current = uploads.get(state.id)
            if current is None or self.now() - current.updated < UPLOAD_EXPIRY:
                return False  # finished, or a chunk arrived meanwhile
            uploads.cancel(state.id)
        return True


@dataclass
class Summary:
    """Counts of a run, and how its lines read."""

    delete: bool
    manifests: int = 0
    blobs: int = 0
    bytes: int = 0
    to_cache: int = 0
    uploads_in_progress: int = 0
    uploads_expired: int = 0

    def _count(self, kind: str) -> None:
        if kind == "manifest":
            self.manifests += 1
        else:
            self.blobs += 1

    def content(self, step: Step, size: int | None, repositories: set[str], *, done: bool) -> str:
        where = f" ({', '.join(sorted(repositories))})" if repositories else ""
        if step.cached:
            self.to_cache += 1
            verb = "unpinned" if done else "would unpin"
            return (
                f"{verb} {step.kind} {step.digest} {human_bytes(size or 0)}{where}: "
                "also cached, left to the cache's eviction"
            )
        self._count(step.kind)
        self.bytes += size or 0
        verb = "removed" if done else "would remove"
        stored = human_bytes(size) if size is not None else "(bytes already gone)"
        return f"{verb} {step.kind} {step.digest} {stored}{where}"

    def unlinked(self, kind: str, digest: str, repositories: set[str], *, done: bool) -> str:
        """A record removed whose bytes stay: another repository reaches them, or they
        were never pinned (the cache's)."""
        self._count(kind)
        verb = "removed" if done else "would remove"
        return f"{verb} {kind} {digest} from {', '.join(sorted(repositories))} (bytes kept)"

    def line(self) -> str:
        counts = (
            f"{self.manifests} manifest{'s' if self.manifests != 1 else ''}, "
            f"{self.blobs} blob{'s' if self.blobs != 1 else ''}, {human_bytes(self.bytes)}"
        )
        extra = []
        if self.to_cache:
            extra.append(f"{self.to_cache} left to the cache's eviction")
        if self.uploads_expired:
            verb = "expired" if self.delete else "to expire"
            extra.append(f"{self.uploads_expired} upload{'s' * (self.uploads_expired != 1)} {verb}")
        extra.append(
            f"{self.uploads_in_progress} upload{'s' * (self.uploads_in_progress != 1)} "
            "in progress left alone"
        )
        if self.delete:
            return f"removed {counts}; " + "; ".join(extra)
        return f"dry run: would remove {counts}; " + "; ".join(extra) + " (--delete to act)"
