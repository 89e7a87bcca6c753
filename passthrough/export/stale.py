"""What the tar routes may answer from the store without the registry's word: stale
serving (SERVE_STALE, on by default) and offline mode (OFFLINE, OFFLINE_UPSTREAMS).

Every download that resolved a tag or digest upstream, for an anonymous or environment
identity, leaves a record in the store (:meth:`ContentStore.remember_tag`, the keys of
:mod:`passthrough.store.layout`): the tag's digest and the identity class that read it,
and the same for the digest itself. On disk and on S3 alike, so they outlive a restart.
Then, for the same identity class only:

- a **pinned digest** whose documents are in the store is served without contacting
  the registry at all (content by digest never changes);
- a **tag** gets one quick try upstream (SERVE_STALE_TIMEOUT, no retries); when the
  registry is unreachable, times out or answers 429/5xx, the recorded digest is served
  with ``Warning: 110`` naming why. A tag that moved is followed once the registry
  answers again;
- in **offline mode** the registry is never contacted: what is recorded and stored is
  served (a tag with ``Warning: 110``), anything else is a 404 naming offline mode.

Client-supplied credentials (``/registry-auth/``, client Basic) are never answered from
the store without the registry's confirmation: that is what would tell a revoked or
mistyped password from a good one.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from passthrough.errors import (
    OfflineMode,
    OfflineNotStored,
    UpstreamRateLimited,
    UpstreamTimeout,
    UpstreamUnavailable,
    UpstreamUnreachable,
)
from passthrough.export.request import Selection
from passthrough.export.resolve import resolve_image
from passthrough.oci.manifest import ResolvedImage
from passthrough.oci.platforms import Platform
from passthrough.oci.reference import DIGEST_RE
from passthrough.services import Services
from passthrough.store.content import ContentStore
from passthrough.upstream.client import RegistryClient, Timeouts

log = logging.getLogger(__name__)

#: What makes a download fall back to the store: the registry is unreachable, too slow,
#: rate-limiting or failing (as /v2's PROXY_SERVE_STALE).
STALE_ON = (UpstreamUnavailable, UpstreamUnreachable, UpstreamTimeout, UpstreamRateLimited)


def stale_warning(reason: str) -> str:
    """The ``Warning`` header of an answer the upstream did not confirm (RFC 9111's 110)."""
    text = " ".join((reason or "upstream unavailable").split())[:200].replace('"', "'")
    return f'110 passthrough "Response is stale: {text}"'


def may_serve_stored(access_class: str, record: Mapping[str, str] | None) -> bool:
    """Whether this identity class may be answered from ``record`` without the registry:
    never client credentials; otherwise only the class that read it upstream."""
    if access_class == "client" or record is None:
        return False
    return record.get("access") == access_class and bool(
        DIGEST_RE.fullmatch(record.get("digest", ""))
    )


def record_key(selection: Selection, name: str | None = None) -> str:
    """The record of a tag or digest (``name``; default: the request's) of this registry
    and repository. Tags cannot hold ``:``, so a digest never names a tag's record."""
    reference = selection.reference
    return ContentStore.tag_key(
        selection.target.registry.url, reference.repository, name or reference.reference
    )


@dataclass
class Resolved:
    """The resolved image, and why it was not confirmed upstream (None: it was, or it is
    content by digest, which needs no confirmation)."""

    image: ResolvedImage
    stale_reason: str | None = None


@contextlib.contextmanager
def quick(client: RegistryClient, seconds: float) -> Iterator[None]:
    """One try and short timeouts while a stored copy waits: the client gets its own
    timeouts and retries back for the layers."""
    timeouts, attempts = client.timeouts, client.retry.attempts
    client.timeouts = Timeouts(min(timeouts.connect, seconds), min(timeouts.read, seconds))
    client.retry.attempts = 0
    try:
        yield
    finally:
        client.timeouts, client.retry.attempts = timeouts, attempts


def resolve_download(
    services: Services,
    selection: Selection,
    client: RegistryClient,
    platform: Platform,
) -> Resolved:
    """Resolve through the registry, or from the store as this module's rules allow."""
    store, settings, offline = services.store, services.settings, selection.offline
    if store is None:
        if offline is not None:
            raise OfflineMode(f"offline mode ({offline}) needs a content store: nothing is stored")
        return Resolved(resolve_image(client, selection.reference, platform))
    record = store.recall_tag(record_key(selection))
    usable = may_serve_stored(selection.access_class, record)
    if offline is not None:
        return _offline(selection, client, platform, store, offline, record if usable else None)
    # SERVE_STALE=false: every answer is confirmed upstream (records are still kept).
    usable = usable and settings.serve_stale
    reference = selection.reference
    if reference.digest and usable:
        with contextlib.suppress(UpstreamUnavailable):  # a document is missing: ask upstream
            image = resolve_image(
                client, reference, platform, store, offline_digest=reference.digest
            )
            return Resolved(image)
    if not usable or reference.digest:
        resolved = Resolved(resolve_image(client, reference, platform, store))
    else:
        assert record is not None
        resolved = _tag_with_fallback(services, selection, client, platform, record["digest"])
    if resolved.stale_reason is None:
        remember(store, selection, record, resolved.image)
    return resolved


def _tag_with_fallback(
    services: Services,
    selection: Selection,
    client: RegistryClient,
    platform: Platform,
    digest: str,
) -> Resolved:
    store = services.store
    assert store is not None
    try:
        with quick(client, services.settings.serve_stale_timeout):
            return Resolved(resolve_image(client, selection.reference, platform, store))
    except STALE_ON as exc:
        log.warning(
            "registry unavailable (%s); serving the stored %s of %s",
            exc.message,
            digest[:19],
            selection.reference,
        )
        image = resolve_image(client, selection.reference, platform, store, offline_digest=digest)
        return Resolved(image, exc.message)


def _offline(
    selection: Selection,
    client: RegistryClient,
    platform: Platform,
    store: ContentStore,
    offline: str,
    record: Mapping[str, str] | None,
) -> Resolved:
    reference = selection.reference
    if selection.access_class == "client":
        raise OfflineMode(
            f"offline mode ({offline}): client credentials cannot be confirmed by the registry"
        )
    missing = OfflineNotStored(
        f"offline mode ({offline}): {selection.repo_tag} is not in the store "
        "and the registry is never contacted"
    )
    if record is None:
        raise missing
    try:
        image = resolve_image(client, reference, platform, store, offline_digest=record["digest"])
    except UpstreamUnavailable:  # a document of the image is not stored
        raise missing from None
    return Resolved(image, None if reference.digest else f"offline mode ({offline})")


def remember(
    store: ContentStore,
    selection: Selection,
    record: Mapping[str, str] | None,
    image: ResolvedImage,
) -> None:
    """Record what this identity class just read upstream: the tag's digest, and the
    image's digests (index and platform manifest) for pinned downloads. Written only
    when the request's own record changed, so a warm download writes nothing."""
    access = selection.access_class
    if access == "client":
        return
    reference = selection.reference
    top = image.index_digest or image.manifest_digest
    own = reference.digest or top
    if record is not None and record.get("digest") == own and record.get("access") == access:
        return
    try:
        remember_digests(
            store,
            selection.target.registry.url,
            reference.repository,
            access,
            [top, image.manifest_digest],
            tag=None if reference.digest else reference.reference,
        )
    except OSError as exc:
        log.warning("could not record %s for stale serving: %s", reference, exc)


def remember_digests(
    store: ContentStore,
    registry_url: str,
    repository: str,
    access: str,
    digests: Sequence[str],
    *,
    tag: str | None,
) -> None:
    """The records the tar routes read: each digest (index, then platform manifests) for
    pinned downloads, and ``tag`` pointing at the first, as read by ``access``
    (anonymous or environment). Also what ``passthrough sync`` writes."""
    seen = str(time.time())
    for digest in dict.fromkeys(digests):
        entry = {"digest": digest, "access": access, "seen": seen}
        store.remember_tag(ContentStore.tag_key(registry_url, repository, digest), entry)
    if tag is not None:
        entry = {"digest": digests[0], "access": access, "seen": seen}
        store.remember_tag(ContentStore.tag_key(registry_url, repository, tag), entry)
