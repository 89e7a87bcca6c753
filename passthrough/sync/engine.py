"""One sync run: the entries of a SYNC_FILE expanded into images (repository globs read
from the upstream's ``_catalog``, tags from its tag list), then each image's manifests,
configs and layer blobs brought into the store through the pull-through proxy's own
read path (:class:`~passthrough.registry.proxy.Proxy`): verified, fetched once per
blob across the replicas sharing REDIS_URL (:mod:`passthrough.store.readthrough`), and
skipped when the store has them. Each tag is then recorded as the /v2 proxy and the tar
routes record it, so both serve it while the upstream is down.

A dry run reads the tag lists and manifests (stored nowhere) and reports what a run
would fetch: no blob is asked for, nothing is written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from passthrough.errors import PassthroughError, StoreUnavailable, UpstreamInvalid
from passthrough.export.stale import remember_digests
from passthrough.observe import metrics
from passthrough.oci.manifest import (
    FOREIGN_LAYER_TYPES,
    INDEX_TYPES,
    descriptor,
    index_platforms,
    json_object,
    sha256_digest,
)
from passthrough.registry.proxy import MANIFEST_ACCEPT, Proxy, sniff_media_type
from passthrough.registry.routing import ProxyRoute, is_hosted, route_name
from passthrough.registry.upstream_rules import refused_by_rules, upstream_allowed
from passthrough.store.content import ContentStore
from passthrough.store.layout import hex_of
from passthrough.sync.spec import Entry, SyncFile
from passthrough.upstream.client import read_limited
from passthrough.upstream.target import AuthKind

#: The largest catalog or tag list page read.
MAX_LIST_BYTES = 4 << 20
PAGE = 1000


@dataclass(frozen=True)
class Planned:
    """One image to sync: a tag of a repository behind the route."""

    entry: Entry
    route: ProxyRoute
    tag: str

    @property
    def name(self) -> str:
        return f"{self.route.name}:{self.tag}"


@dataclass
class ImageResult:
    """What syncing one image did (or, dry, would do)."""

    image: str
    digest: str | None = None
    platforms: list[str] = field(default_factory=list)
    #: Blobs (configs and layers) the store lacked and now has, and their bytes; dry:
    #: those it lacks.
    blobs: int = 0
    bytes: int = 0
    #: Blobs the store already had.
    present: int = 0
    error: str | None = None
    seconds: float = 0.0

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Summary:
    images: int = 0
    blobs: int = 0
    bytes: int = 0
    present: int = 0
    #: What failed: an image (``name:tag``) or an entry, with the reason.
    failed: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: Called after each image: its result, how many are done, how many in all.
Progress = Callable[[ImageResult, int, int], None]


class Sync:
    """A run over one proxy (its store, token cache and outbound policy)."""

    def __init__(self, proxy: Proxy, *, dry_run: bool = False, concurrency: int = 4) -> None:
        self.proxy = proxy
        self.settings = proxy.settings
        self.store: ContentStore = proxy.store
        self.dry_run = dry_run
        self.concurrency = max(1, concurrency)

    # -- the run ------------------------------------------------------------------------------

    def run(self, sync_file: SyncFile, progress: Progress | None = None) -> Summary:
        began = time.monotonic()
        summary = Summary()
        planned = self.plan(sync_file, summary.failed)
        for done, image in enumerate(planned, 1):
            result = self.sync_image(image)
            if result.error is None:
                summary.images += 1
                summary.blobs += result.blobs
                summary.bytes += result.bytes
                summary.present += result.present
            else:
                summary.failed.append(f"{result.image}: {result.error}")
            if not self.dry_run:
                metrics.sync_image("failed" if result.error else "synced", result.bytes)
            if progress is not None:
                progress(result, done, len(planned))
        summary.seconds = round(time.monotonic() - began, 3)
        return summary

    # -- planning ---------------------------------------------------------------------------

    def plan(self, sync_file: SyncFile, failed: list[str]) -> list[Planned]:
        """Every image the file names, in order; an entry that cannot be expanded (its
        catalog or tag list unreadable, nothing matching) is a failure of its own."""
        found: dict[str, Planned] = {}
        for entry in sync_file.entries:
            try:
                images = list(self._expand(entry))
                if not images:
                    raise UpstreamInvalid("no repository or tag matches")
            except PassthroughError as exc:
                failed.append(f"{entry.label}: {exc.message}")
                continue
            for image in images:
                found.setdefault(image.name, image)
        return list(found.values())

    def _expand(self, entry: Entry) -> Iterator[Planned]:
        for repository in self._repositories(entry):
            route = self._route(entry, repository)
            tags = self._tag_list(route) if entry.needs_tag_list else []
            for tag in entry.select(tags):
                yield Planned(entry, route, tag)

    def _route(self, entry: Entry, repository: str) -> ProxyRoute:
        name = f"{entry.upstream}/{repository}" if entry.upstream else repository
        route = route_name(self.settings, name)
        if is_hosted(self.settings, route.name):
            raise UpstreamInvalid(f"{route.name} is a hosted repository: nothing to sync")
        self.proxy.check_route(route)
        # UPSTREAM_RULES bind sync as they bind pulls: a named repository they forbid fails.
        upstream_allowed(self.settings, route.upstream, route.repository)
        return route

    def _repositories(self, entry: Entry) -> list[str]:
        if not entry.repository_is_glob:
            return [entry.repository]
        # Any name will do for the catalog's route: it names the upstream.
        route = self._route(entry, "catalog")
        names = self._listing(route, "/v2/_catalog", "repositories", "catalog")
        # What UPSTREAM_RULES forbid is not this door's to hold: a glob passes over it.
        allowed = (n for n in names if not refused_by_rules(self.settings, route.upstream, n))
        return sorted(n for n in allowed if entry.matches_repository(n))

    def _tag_list(self, route: ProxyRoute) -> list[str]:
        return self._listing(route, f"/v2/{route.repository}/tags/list", "tags", "tag list")

    def _listing(self, route: ProxyRoute, path: str, key: str, thing: str) -> list[str]:
        """Every name of a paginated upstream listing (``n``/``last``, as the spec's
        tag list and catalog page)."""
        what = f"{thing} of {route.upstream.name}" + (
            f"/{route.repository}" if thing == "tag list" else ""
        )
        names: list[str] = []
        last: str | None = None
        with contextlib.closing(self.proxy.client(route, None)) as client:
            while True:
                query = f"{path}?n={PAGE}" + (f"&last={last}" if last else "")
                response = client.request("GET", query, stream=True, what=what)
                with response:
                    body = read_limited(response, MAX_LIST_BYTES, what, error=UpstreamInvalid)
                    more = 'rel="next"' in response.headers.get("Link", "")
                page = _names(body, key, what)
                names.extend(page)
                if not more or not page or page[-1] == last:
                    return names
                last = page[-1]

    # -- one image ----------------------------------------------------------------------------

    def sync_image(self, image: Planned) -> ImageResult:
        result = ImageResult(image.name)
        began = time.monotonic()
        try:
            digest, media_type, body = self._manifest(image.route, image.tag)
            result.digest = digest
            manifests = [digest]
            if media_type in INDEX_TYPES:
                for platform, digest_of in self._platforms(image, body):
                    result.platforms.append(platform)
                    _, _, child = self._manifest(image.route, digest_of)
                    self._blobs(image.route, child, result)
                    manifests.append(digest_of)
            else:
                self._blobs(image.route, body, result)
            if not self.dry_run:
                self._record(image, manifests)
        except PassthroughError as exc:
            result.error = exc.message
        except (OSError, ValueError) as exc:
            # The store failing (a full disk, S3 down), or a digest it cannot hold (only
            # sha256 is stored): this image fails, the run goes on.
            result.error = " ".join(str(exc).split()) or type(exc).__name__
        result.seconds = round(time.monotonic() - began, 3)
        return result

    def _platforms(self, image: Planned, body: bytes) -> list[tuple[str, str]]:
        wanted = image.entry.platforms
        chosen = []
        for platform, entry in index_platforms(json_object(body, f"the index of {image.name}")):
            if wanted is None or any(w == platform or w.matches(platform) for w in wanted):
                digest, _, _ = descriptor(entry, f"the {platform} entry of {image.name}")
                chosen.append((str(platform), digest))
        if not chosen:
            raise UpstreamInvalid(
                f"the index has none of the platforms {', '.join(map(str, wanted or ()))}"
            )
        return chosen

    def _manifest(self, route: ProxyRoute, reference: str) -> tuple[str, str, bytes]:
        """A manifest by tag or digest: through the proxy (stored, the tag recorded),
        or, dry, from the store or upstream without storing it."""
        if not self.dry_run:
            found = self.proxy.manifest(route, reference, None, want_body=True)
            assert found.body is not None  # want_body
            return found.digest, found.media_type, found.body
        stored = self.store.get_document("manifests", reference) if ":" in reference else None
        if stored is not None:
            return reference, sniff_media_type(stored), stored
        what = f"manifest {reference[:19]} of {route.upstream.name}/{route.repository}"
        with contextlib.closing(self.proxy.client(route, None)) as client:
            body, media_type, _ = client.get_manifest(reference, MANIFEST_ACCEPT, what)
        return sha256_digest(body), media_type or sniff_media_type(body), body

    def _blobs(self, route: ProxyRoute, body: bytes, result: ImageResult) -> None:
        """The config and every distributable layer of an image manifest, a few at once."""
        document = json_object(body, f"the manifest of {result.image}")
        wanted = [descriptor(document.get("config"), f"the config of {result.image}")]
        layers = document.get("layers")
        for position, layer in enumerate(layers if isinstance(layers, list) else [], 1):
            found = descriptor(layer, f"layer {position} of {result.image}")
            if found[2] not in FOREIGN_LAYER_TYPES:
                wanted.append(found)
        with ThreadPoolExecutor(self.concurrency, thread_name_prefix="sync") as pool:
            for fetched in pool.map(lambda d: self._blob(route, d[0], d[1]), wanted):
                if fetched is None:
                    result.present += 1
                else:
                    result.blobs += 1
                    result.bytes += fetched

    def _blob(self, route: ProxyRoute, digest: str, size: int) -> int | None:
        """The bytes brought in for one blob; None when the store had it. Brought in by
        this run or, the same moment, by another replica's fetch that this one waited
        for (the read-through does not say which): either way upstream sent it once."""
        if self.store.blob_size(digest) is not None:
            return None
        if self.dry_run:
            return size
        answer = self.proxy.blob(route, digest, None, want_body=True, allow_redirect=False)
        stream = answer.stream
        assert stream is not None  # want_body, no redirect
        try:
            if answer.size != size:
                raise UpstreamInvalid(
                    f"blob {digest[:19]} is {answer.size} bytes, its manifest says {size}"
                )
            if stream.source == "fetch":
                # Reading to the end waits for the fetch's verification (the last byte
                # is released only then): a bad blob raises here, nothing is committed.
                for _ in stream.chunks():
                    pass
                self._await_commit(digest)
        finally:
            stream.close()
        return size

    def _await_commit(self, digest: str) -> None:
        """Wait for the fetcher to let go of the blob's lock, which it holds until the
        blob is committed: a CLI run must not exit (and end the fetcher's thread) before."""
        with self.store.flight.hold(hex_of(digest), shared=False):
            pass
        if self.store.blob_size(digest) is None:
            raise StoreUnavailable(f"blob {digest[:19]} was fetched but could not be stored")

    def _record(self, image: Planned, manifests: list[str]) -> None:
        """The tar routes' records (the proxy wrote its own): the tag's digest, and each
        stored manifest's digest for pinned downloads, under the identity class the tar
        routes read them with (SERVE_STALE; the records' shape is theirs)."""
        route = image.route
        anonymous = self.proxy.target(route, None).auth is AuthKind.ANONYMOUS
        access = "anonymous" if anonymous else "environment"
        remember_digests(
            self.store, route.upstream.url, route.repository, access, manifests, tag=image.tag
        )


def _names(body: bytes, key: str, what: str) -> list[str]:
    document = json_object(body, f"the {what}")
    names = document.get(key)
    if names is None:
        return []
    if not isinstance(names, list):
        raise UpstreamInvalid(f"the {what} has no {key} list")
    return [n for n in names if isinstance(n, str)]
