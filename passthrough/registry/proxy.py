"""The pull-through proxy: the read half of the OCI Distribution API, served from the
content store and read through from the upstream a name routes to.

- **manifests by tag** are revalidated upstream by HEAD on every request (free of
  Docker Hub's pull quota), or trusted for TAG_TTL seconds; when upstream is
  unreachable, times out or answers 429/5xx, a tag seen before (by GET, or by HEAD as
  containerd resolves tags, once its manifest is stored) is served from the store,
  marked stale (PROXY_SERVE_STALE);
- **a blob HEAD** of a blob not stored asks upstream, following a redirect to its
  storage for the size (:meth:`RegistryClient.blob_size`);
- **manifests by digest and blobs** are immutable: served from the store once there,
  else fetched once, verified and stored; blobs are streamed while they are fetched
  (:mod:`passthrough.store.readthrough`);
- **tags/list and referrers** are passed on, never cached;
- in **offline mode** (OFFLINE, OFFLINE_UPSTREAMS) the upstream is never contacted:
  what the store holds is served (a tag from its record, marked stale), anything else
  is MANIFEST_UNKNOWN/BLOB_UNKNOWN naming offline mode, tag lists and referrers 503.

In PROXY_MODE=authenticated every read is first confirmed upstream with the client's
own credentials (a HEAD), so nothing cached reaches a client that upstream would
refuse. Non-2xx answers are never cached.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from passthrough.config import Settings
from passthrough.errors import (
    OfflineMode,
    OfflineNotStored,
    UpstreamInvalid,
    UpstreamNotFound,
    UpstreamRateLimited,
    UpstreamTimeout,
    UpstreamUnavailable,
    UpstreamUnreachable,
)
from passthrough.oci.manifest import (
    ACCEPT,
    OCI_INDEX,
    OCI_MANIFEST,
    SCHEMA1_TYPES,
    sha256_digest,
)
from passthrough.oci.reference import DIGEST_RE
from passthrough.registry.pages import next_page_link, page
from passthrough.registry.routing import ProxyRoute, upstream_credentials
from passthrough.store.content import ContentStore
from passthrough.store.readthrough import BlobStream
from passthrough.upstream.auth import Credentials, TokenCache
from passthrough.upstream.blobs import open_blob
from passthrough.upstream.client import RegistryClient, RetryPolicy, Timeouts, read_limited
from passthrough.upstream.netguard import HostPolicy
from passthrough.upstream.offline import offline_reason
from passthrough.upstream.target import AuthKind, Target

#: Every manifest type we ask upstream for; artifacts are image manifests too.
MANIFEST_ACCEPT = ACCEPT + ", " + ", ".join(SCHEMA1_TYPES)
#: What makes a tag's revalidation fall back to the copy in the store.
STALE_ON = (UpstreamUnavailable, UpstreamUnreachable, UpstreamTimeout, UpstreamRateLimited)
MAX_LIST_BYTES = 4 << 20


@dataclass(frozen=True)
class Manifest:
    """A manifest as it will be answered."""

    digest: str
    media_type: str
    size: int
    #: None for a HEAD that did not need the body.
    body: bytes | None
    #: "store", "upstream" or "stale".
    source: str
    #: Why it is stale (the upstream's answer), for the Warning header.
    stale_reason: str | None = None


@dataclass
class BlobAnswer:
    """A blob as it will be answered: a stream, a redirect, or (HEAD) just its size."""

    size: int
    source: str
    stream: BlobStream | None = None
    redirect: str | None = None


@dataclass(frozen=True)
class Listing:
    """A JSON document passed on (tags/list, referrers) and the headers that go with it."""

    body: bytes
    media_type: str
    headers: dict[str, str] = field(default_factory=dict)


def sniff_media_type(body: bytes) -> str:
    """A stored manifest's media type, from its own ``mediaType`` or its shape."""
    try:
        document = json.loads(body)
    except ValueError:
        return OCI_MANIFEST
    if not isinstance(document, dict):
        return OCI_MANIFEST
    declared = document.get("mediaType")
    if isinstance(declared, str) and declared:
        return declared
    if document.get("schemaVersion") == 1:
        return SCHEMA1_TYPES[1] if "signatures" in document else SCHEMA1_TYPES[0]
    return OCI_INDEX if "manifests" in document else OCI_MANIFEST


class Proxy:
    """The read path of one process: settings, store, token cache and outbound policy."""

    def __init__(
        self, settings: Settings, store: ContentStore, tokens: TokenCache, policy: HostPolicy
    ) -> None:
        self.settings = settings
        self.store = store
        self.tokens = tokens
        self.policy = policy

    # -- upstream clients ----------------------------------------------------------------

    def check_route(self, route: ProxyRoute) -> None:
        """A host the client named must pass the outbound policy before anything else."""
        if route.via in ("host", "ns"):
            parts = urlsplit(route.upstream.url)
            self.policy.check_host(
                parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
            )

    def target(self, route: ProxyRoute, client_credentials: Credentials | None) -> Target:
        """The upstream identity: the client's own in PROXY_MODE=authenticated (or
        anonymous), else the service's (REGISTRY_AUTH_FILE, REGISTRY_USERNAME for
        REGISTRY_URL), else anonymous."""
        settings = self.settings
        endpoint = route.upstream
        is_environment = endpoint.url == settings.registry.url
        realm = settings.registry_auth_url if is_environment else None
        service = settings.registry_service if is_environment else None
        source = "environment" if is_environment else "request"

        def made(auth: AuthKind, **identity: Any) -> Target:
            return Target(
                endpoint, source, auth, realm_override=realm, service_override=service, **identity
            )

        if settings.uses_client_identity:
            if client_credentials is None:
                return made(AuthKind.ANONYMOUS)
            return made(
                AuthKind.CREDENTIALS, credentials=client_credentials, credentials_source="client"
            )
        if is_environment and settings.bearer_token:
            return made(AuthKind.STATIC_BEARER, bearer_token=settings.bearer_token)
        credentials = upstream_credentials(settings, endpoint)
        if credentials is not None:
            return made(
                AuthKind.CREDENTIALS, credentials=credentials, credentials_source="environment"
            )
        return made(AuthKind.ANONYMOUS)

    def client(
        self, route: ProxyRoute, credentials: Credentials | None, *, attempts: int | None = None
    ) -> RegistryClient:
        settings = self.settings
        retry = RetryPolicy(
            attempts=settings.upstream_retries if attempts is None else attempts,
            retry_after_max=settings.retry_after_max,
            deadline=time.monotonic() + settings.download_deadline,
        )
        return RegistryClient(
            self.target(route, credentials),
            route.repository,
            self.tokens,
            Timeouts(settings.connect_timeout, settings.read_timeout),
            pool_size=2,
            policy=self.policy,
            retry=retry,
        )

    def _what(self, route: ProxyRoute, thing: str) -> str:
        return f"{thing} of {route.upstream.name}/{route.repository}"

    # -- offline mode ------------------------------------------------------------------------

    def offline(self, route: ProxyRoute, what: str) -> str | None:
        """Why the route's upstream is never contacted (OFFLINE, OFFLINE_UPSTREAMS), or
        None. PROXY_MODE=authenticated confirms every read upstream: offline, nothing."""
        reason = offline_reason(self.settings, route.upstream)
        if reason is not None and self.settings.uses_client_identity:
            raise OfflineMode(
                f"offline mode ({reason}): {what} needs the registry to confirm the client's "
                "access (PROXY_MODE=authenticated)"
            )
        return reason

    def _offline_manifest(self, route: ProxyRoute, reference: str, offline: str) -> Manifest:
        """The store alone answers: by digest, or by the tag's record (marked stale)."""
        if DIGEST_RE.fullmatch(reference):
            found = self._stored({"digest": reference}, "store")
        else:
            key = ContentStore.tag_key("v2 " + route.upstream.url, route.repository, reference)
            found = self._stored(self.store.recall_tag(key), "stale", f"offline mode ({offline})")
        if found is None:
            what = self._what(route, f"manifest {reference}")
            raise OfflineNotStored(f"offline mode ({offline}): {what} is not in the store")
        return found

    # -- manifests -------------------------------------------------------------------------

    def manifest(
        self,
        route: ProxyRoute,
        reference: str,
        credentials: Credentials | None,
        *,
        want_body: bool,
    ) -> Manifest:
        offline = self.offline(route, f"manifest {reference}")
        if offline is not None:
            return self._offline_manifest(route, reference, offline)
        if DIGEST_RE.fullmatch(reference):
            return self._manifest_by_digest(route, reference, credentials, want_body=want_body)
        return self._manifest_by_tag(route, reference, credentials, want_body=want_body)

    def _manifest_by_digest(
        self, route: ProxyRoute, digest: str, credentials: Credentials | None, *, want_body: bool
    ) -> Manifest:
        what = self._what(route, f"manifest {digest[:19]}")
        with contextlib.closing(self.client(route, credentials)) as client:
            if self.settings.uses_client_identity:
                # Upstream decides whether this client may read it, every time.
                self._head_manifest(client, digest, what)
            body = (
                self.store.get_document("manifests", digest)
                if digest.startswith("sha256:")
                else None
            )
            if body is not None:
                return Manifest(digest, sniff_media_type(body), len(body), body, "store")
            if not want_body:
                found = self._head_manifest(client, digest, what)
                if found is not None:
                    return found
            body, media_type = self._get_manifest(client, digest, what)
            if sha256_digest(body) != digest:
                raise UpstreamInvalid(f"{what}: the content does not match its digest")
            self.store.put_document("manifests", digest, body)
            return Manifest(digest, media_type, len(body), body, "upstream")

    def _manifest_by_tag(
        self, route: ProxyRoute, tag: str, credentials: Credentials | None, *, want_body: bool
    ) -> Manifest:
        settings = self.settings
        what = self._what(route, f"manifest {tag}")
        # Its own records, apart from the tar routes' (which also note who may be served
        # stale): each side keeps what its own stale serving needs.
        key = ContentStore.tag_key("v2 " + route.upstream.url, route.repository, tag)
        record = self.store.recall_tag(key)
        shared = not settings.uses_client_identity
        if shared and record is not None and settings.tag_ttl > 0:
            seen = float(record.get("seen", 0))
            if time.time() - seen < settings.tag_ttl:
                cached = self._stored(record, "store")
                if cached is not None:
                    return cached
        # With a copy to fall back on, one try is enough before serving it.
        fallback = shared and settings.proxy_serve_stale and record is not None
        with contextlib.closing(
            self.client(route, credentials, attempts=0 if fallback else None)
        ) as client:
            try:
                head = self._head_manifest(client, tag, what)
            except STALE_ON as exc:
                stale = self._stored(record, "stale", exc.message) if fallback else None
                if stale is None:
                    raise
                return stale
            if head is not None:
                body = self.store.get_document("manifests", head.digest)
                if body is not None:
                    self._remember(key, record, head.digest, head.media_type)
                    return Manifest(
                        head.digest,
                        head.media_type or sniff_media_type(body),
                        len(body),
                        body,
                        "store",
                    )
                if not want_body:
                    # containerd (every Kubernetes node) resolves a tag by HEAD and then
                    # GETs the manifest by digest: the tag is recorded here, or nothing
                    # would let it be served stale once that digest is in the store.
                    self._remember(key, record, head.digest, head.media_type)
                    return head
            body, media_type = self._get_manifest(client, tag, what)
        digest = sha256_digest(body)
        # Had the tag moved between the HEAD and the GET, the GET's bytes are the answer.
        self.store.put_document("manifests", digest, body)
        self._remember(key, record, digest, media_type)
        return Manifest(digest, media_type, len(body), body, "upstream")

    def _stored(
        self, record: dict[str, str] | None, source: str, reason: str | None = None
    ) -> Manifest | None:
        if record is None:
            return None
        digest = record.get("digest", "")
        body = self.store.get_document("manifests", digest) if DIGEST_RE.fullmatch(digest) else None
        if body is None:
            return None
        media_type = record.get("media_type") or sniff_media_type(body)
        return Manifest(digest, media_type, len(body), body, source, reason)

    def _remember(
        self, key: str, record: dict[str, str] | None, digest: str, media_type: str
    ) -> None:
        """Keep the tag's digest for stale serving; rewritten only when it changed (or
        when TAG_TTL needs the time it was seen), so a warm pull writes nothing."""
        if record is not None and record.get("digest") == digest and not self.settings.tag_ttl:
            return
        self.store.remember_tag(
            key, {"digest": digest, "media_type": media_type, "seen": str(time.time())}
        )

    def _head_manifest(self, client: RegistryClient, reference: str, what: str) -> Manifest | None:
        head = client.head_manifest(reference, MANIFEST_ACCEPT, what)
        if not head.digest or head.size is None:
            return None
        return Manifest(head.digest, head.media_type, head.size, None, "upstream")

    def _get_manifest(self, client: RegistryClient, reference: str, what: str) -> tuple[bytes, str]:
        body, media_type, claimed = client.get_manifest(reference, MANIFEST_ACCEPT, what)
        # By tag nothing else vouches for the bytes: a body that does not hash to the
        # digest the registry named with it was damaged on the way, and would be
        # stored, remembered for the tag and served stale later.
        if claimed.startswith("sha256:") and DIGEST_RE.fullmatch(claimed):
            if sha256_digest(body) != claimed:
                raise UpstreamInvalid(f"{what}: the content does not match its digest")
        if not media_type or media_type in ("application/json", "text/plain"):
            media_type = sniff_media_type(body)
        return body, media_type

    # -- blobs -----------------------------------------------------------------------------

    def blob(
        self,
        route: ProxyRoute,
        digest: str,
        credentials: Credentials | None,
        *,
        want_body: bool,
        allow_redirect: bool,
    ) -> BlobAnswer:
        what = self._what(route, f"blob {digest[:19]}")
        offline = self.offline(route, what)
        if offline is not None and (
            not digest.startswith("sha256:") or self.store.blob_size(digest) is None
        ):
            raise OfflineNotStored(f"offline mode ({offline}): {what} is not in the store")
        if self.settings.uses_client_identity:
            with contextlib.closing(self.client(route, credentials)) as client:
                client.blob_exists(digest, what=what)  # 401/403/404 raised and passed on
        stored_size = self.store.blob_size(digest) if digest.startswith("sha256:") else None
        if stored_size is not None:
            if not want_body:
                return BlobAnswer(stored_size, "store")
            if allow_redirect and self.settings.s3_redirect:
                url = self.store.presigned_url("blobs", digest)
                if url is not None:
                    return BlobAnswer(stored_size, "redirect", redirect=url)
        if not want_body:
            if stored_size is None:
                with contextlib.closing(self.client(route, credentials)) as client:
                    size = client.blob_size(digest, what=what)
                return BlobAnswer(size, "upstream")
        if not digest.startswith("sha256:"):
            raise UpstreamNotFound(f"{what}: only sha256 blobs are served")

        def opener() -> tuple[int, Iterator[bytes]]:
            # The fetch outlives this request (others may read it): its own client,
            # closed when the bytes end.
            client = self.client(route, credentials)
            try:
                size, chunks = open_blob(client, digest, what)
            except BaseException:
                client.close()
                raise
            return size, _closing(chunks, client)

        stream = self.store.read_through(digest, opener)
        return BlobAnswer(stream.size, stream.source, stream=stream)

    # -- listings ---------------------------------------------------------------------------

    def tags(
        self, route: ProxyRoute, credentials: Credentials | None, query: dict[str, str]
    ) -> Listing:
        what = self._what(route, "tag list")
        if self.offline(route, what) is not None:
            raise OfflineMode(f"offline mode: {what} is only the registry's to give")
        params = {k: v for k, v in query.items() if k in ("n", "last")}
        path = f"/v2/{route.repository}/tags/list"
        if params:
            path += "?" + urlencode(params)
        with contextlib.closing(self.client(route, credentials)) as client:
            response = client.request("GET", path, stream=True, what=what)
            with response:
                body = read_limited(response, MAX_LIST_BYTES, what, error=UpstreamInvalid)
                link = response.headers.get("Link")
        try:
            document: Any = json.loads(body)
            tags = document.get("tags") if isinstance(document, dict) else None
        except ValueError:
            raise UpstreamInvalid(
                f"{what}: the registry answered something that is not JSON"
            ) from None
        own_path = f"/v2/{route.name}/tags/list"
        next_link = _next_link(link, own_path)
        # The spec's order is Go's sort.Strings (bytewise). Registries without
        # pagination (distribution 2.x) ignore n and last and answer every tag in no
        # order, so the page is cut here; on a page the upstream cut itself (in that
        # same order) sorting and cutting again change nothing.
        names = sorted(t for t in tags if isinstance(t, str)) if isinstance(tags, list) else []
        names, more = page(names, params.get("n"), params.get("last"))
        if more and names:
            next_link = next_page_link(own_path, params["n"], names[-1])
        elif "n" in params and int(params["n"]) == 0:
            next_link = None
        answer = json.dumps({"name": route.name, "tags": names}).encode()
        headers: dict[str, str] = {}
        if next_link:
            headers["Link"] = next_link
        return Listing(answer, "application/json", headers)

    def referrers(
        self,
        route: ProxyRoute,
        digest: str,
        credentials: Credentials | None,
        artifact_type: str | None,
    ) -> Listing:
        what = self._what(route, f"referrers of {digest[:19]}")
        if self.offline(route, what) is not None:
            raise OfflineMode(f"offline mode: {what} are only the registry's to give")
        path = f"/v2/{route.repository}/referrers/{digest}"
        if artifact_type:
            path += "?" + urlencode({"artifactType": artifact_type})
        filtered = False
        manifests: list[Any] = []
        with contextlib.closing(self.client(route, credentials)) as client:
            try:
                response = client.request(
                    "GET", path, headers={"Accept": OCI_INDEX}, stream=True, what=what
                )
            except UpstreamNotFound:
                # No referrers API upstream (distribution 2.x answers 404). Clients that
                # push to such a registry keep the referrers in the spec's fallback tag
                # (an index), and a client given our 200 would never look for that tag
                # itself: answer from it; no tag either, the spec's empty index (a
                # registry with the API never answers 404).
                response = None
                manifests = self._fallback_referrers(client, digest, what)
            if response is not None:
                with response:
                    body = read_limited(response, MAX_LIST_BYTES, what, error=UpstreamInvalid)
                    filtered = "artifactType" in response.headers.get("OCI-Filters-Applied", "")
                try:
                    document = json.loads(body)
                    manifests = list(document.get("manifests") or [])
                except (ValueError, AttributeError, TypeError):
                    raise UpstreamInvalid(
                        f"{what}: the registry answered an invalid index"
                    ) from None
        headers: dict[str, str] = {}
        if artifact_type:
            if not filtered:
                manifests = [
                    m
                    for m in manifests
                    if isinstance(m, dict) and m.get("artifactType") == artifact_type
                ]
            headers["OCI-Filters-Applied"] = "artifactType"
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}
        return Listing(json.dumps(index).encode(), OCI_INDEX, headers)

    def _fallback_referrers(self, client: RegistryClient, digest: str, what: str) -> list[Any]:
        """The descriptors of the referrers tag schema's index for `digest`, or none."""
        algorithm, _, encoded = digest.partition(":")
        tag = algorithm[:32] + "-" + re.sub(r"[^a-zA-Z0-9_.-]", "-", encoded[:64])
        try:
            body, _ = self._get_manifest(client, tag, what)
        except UpstreamNotFound:
            return []
        try:
            document = json.loads(body)
        except ValueError:
            return []  # not a valid index: the spec says assume no referrers
        found = document.get("manifests") if isinstance(document, dict) else None
        return [m for m in found if isinstance(m, dict)] if isinstance(found, list) else []


def _closing(chunks: Iterator[bytes], client: RegistryClient) -> Iterator[bytes]:
    try:
        yield from chunks
    finally:
        client.close()


def _next_link(link: str | None, path: str) -> str | None:
    """The upstream's ``Link: <…?n=&last=>; rel="next"`` rewritten to our own path."""
    if not link or 'rel="next"' not in link:
        return None
    start, end = link.find("<"), link.find(">")
    if start < 0 or end < start:
        return None
    query = dict(parse_qsl(urlsplit(link[start + 1 : end]).query))
    kept = {k: v for k, v in query.items() if k in ("n", "last")}
    if not kept:
        return None
    return f'<{path}?{urlencode(kept)}>; rel="next"'
