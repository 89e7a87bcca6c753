"""What the door holds: the repositories and tags of the hosted area and of the cache,
the store's usage, and the admin's actions on them (evict a cached image). Read by the
``/api/v1`` routes (:mod:`passthrough.web.api`) and ``passthrough ls``.

- **hosted** repositories and tags come from the hosted area's records
  (:mod:`passthrough.registry.hosted`); their pulls from the inventory's records;
- **cached** ones from the inventory's records (:mod:`passthrough.registry.pulls`),
  written when a tag is served: a tag cached before this version, and not served since,
  is not listed (its stale-serving record is hashed and cannot be named);
- names are as ``docker pull <door>/<name>`` spells them: hosted as pushed, cached by
  the /v2 routing (the default upstream's ``library/nginx``, an alias's
  ``lab/team/app``, any other host's ``ghcr.io/org/app``).

Evicting a cached image removes its records (the inventory's and stale serving's) and
the content only it uses: its manifests, config, blobs and layer tars, unless a pin
(the hosted area) or another listed image still needs them. The next pull fetches it
again. gc is not needed for that: gc reclaims the hosted area only.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from passthrough.config import Settings
from passthrough.errors import NameUnknown, TagUnknown
from passthrough.oci.reference import DIGEST_RE
from passthrough.registry.hosted import Hosted
from passthrough.registry.pulls import (
    CACHED,
    HOSTED,
    PullCounter,
    image_details,
    pull_records,
    read_json,
)
from passthrough.registry.routing import check_name, is_hosted
from passthrough.store import layout
from passthrough.store.content import ContentStore
from passthrough.store.layout import content_key


def iso(when: Any) -> str | None:
    """A POSIX time as ``2026-12-07T19:00:00Z``; None stays None."""
    if not isinstance(when, int | float) or isinstance(when, bool) or when <= 0:
        return None
    moment = datetime.datetime.fromtimestamp(float(when), datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class TagEntry:
    """One tag as the inventory shows it."""

    tag: str
    digest: str
    details: dict[str, Any]
    pushed: float | None = None
    last_pulled: float | None = None
    pulls: int = 0

    def document(self) -> dict[str, Any]:
        return {
            "tag": self.tag,
            "digest": self.digest,
            "media_type": self.details.get("media_type"),
            "platforms": list(self.details.get("platforms") or []),
            "compressed_size": self.details.get("compressed_size"),
            "tar_size": self.details.get("tar_size"),
            "created": self.details.get("created"),
            "pushed": iso(self.pushed),
            "last_pulled": iso(self.last_pulled),
            "pulls": self.pulls,
        }


@dataclass
class RepositoryEntry:
    """One repository: hosted, or cached from one upstream."""

    name: str
    source: str
    #: The upstream registry's name (``docker.io``) and URL, and the repository there.
    upstream: str | None = None
    upstream_url: str | None = None
    repository: str = ""
    tags: list[TagEntry] = field(default_factory=list)

    @property
    def size(self) -> int:
        """The compressed size of its distinct images (as far as the store knows)."""
        sizes = {t.digest: t.details.get("compressed_size") or 0 for t in self.tags}
        return sum(sizes.values())

    def summary(self) -> dict[str, Any]:
        pulled = [t.last_pulled for t in self.tags if t.last_pulled]
        return {
            "name": self.name,
            "source": self.source,
            "upstream": self.upstream,
            "tags": len(self.tags),
            "size": self.size,
            "last_pulled": iso(max(pulled)) if pulled else None,
            "pulls": sum(t.pulls for t in self.tags),
        }

    def head(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "upstream": self.upstream}


def v2_name(settings: Settings, upstream_url: str, registry: str, repository: str) -> str:
    """A cached repository's name as the door's /v2 routing spells it."""
    if upstream_url == settings.registry.url:
        return repository
    for alias, endpoint in settings.upstreams:
        if endpoint.url == upstream_url:
            return f"{alias}/{repository}"
    return f"{registry}/{repository}"


class Inventory:
    """The listings and actions over one store (see the module's docstring)."""

    def __init__(
        self, settings: Settings, store: ContentStore, counter: PullCounter | None = None
    ) -> None:
        self.settings = settings
        self.store = store
        self.hosted_area = Hosted(settings, store)
        self.counter = counter
        self._details: dict[str, dict[str, Any]] = {}

    def _image(self, digest: str) -> dict[str, Any]:
        if digest not in self._details:
            self._details[digest] = image_details(self.store, digest)
        return self._details[digest]

    def _records(self) -> list[dict[str, Any]]:
        if self.counter is not None:
            self.counter.flush()  # this process's own pulls first
        return pull_records(self.store)

    # -- listings --------------------------------------------------------------------------

    def repositories(self, source: str | None = None) -> list[RepositoryEntry]:
        """Every repository of ``source`` (None: both), sorted by name."""
        records = self._records()
        found: dict[tuple[str, str], RepositoryEntry] = {}
        if source in (None, HOSTED):
            for entry in self._hosted(records):
                found[(entry.name, HOSTED)] = entry
        if source in (None, CACHED):
            for entry in self._cached(records):
                found[(entry.name, CACHED)] = entry
        return [found[key] for key in sorted(found)]

    def repository(self, name: str, source: str | None = None) -> RepositoryEntry:
        """One repository by its name (a hosted name is never proxied); only its own
        records are read beyond the listing of the inventory's."""
        records = self._records()
        hosted = bool(self.settings.hosted_repositories) and is_hosted(self.settings, name)
        if hosted and source in (None, HOSTED) and self.hosted_area.exists(name):
            return self._hosted_entry(name, _hosted_pulls(records))
        if not hosted and source in (None, CACHED):
            for entry in self._cached(records):
                if entry.name == name:
                    return entry
        raise NameUnknown(f"repository {name[:200]} is not known to this door")

    def _hosted(self, records: list[dict[str, Any]]) -> Iterable[RepositoryEntry]:
        pulls = _hosted_pulls(records)
        for name in self.hosted_area.repositories():
            yield self._hosted_entry(name, pulls)

    def _hosted_entry(
        self, name: str, pulls: dict[tuple[str, str], dict[str, Any]]
    ) -> RepositoryEntry:
        entry = RepositoryEntry(name, HOSTED, repository=name)
        for tag, record in self._hosted_tags(name):
            digest = str(record.get("digest") or "")
            if not DIGEST_RE.fullmatch(digest):
                continue
            manifest = read_json(self.store, layout.hosted_manifest_key(name, digest)) or {}
            pulled = pulls.get((name, tag), {})
            entry.tags.append(
                TagEntry(
                    tag,
                    digest,
                    self._image(digest),
                    pushed=manifest.get("pushed"),
                    last_pulled=pulled.get("last_pulled"),
                    pulls=int(pulled.get("pulls") or 0),
                )
            )
        return entry

    def _hosted_tags(self, name: str) -> Iterable[tuple[str, dict[str, Any]]]:
        """(tag, record) of each tag of the hosted repository ``name``, by tag."""
        found = []
        for info in self.store.backend.list(layout.hosted_prefix(name, layout.TAG)):
            parsed = layout.parse_hosted_key(info.key)
            if parsed is not None and parsed.repository == name:
                found.append((parsed.name, read_json(self.store, info.key) or {}))
        return sorted(found, key=lambda item: item[0])

    def _cached(self, records: list[dict[str, Any]]) -> Iterable[RepositoryEntry]:
        found: dict[str, RepositoryEntry] = {}
        for record in records:
            url, registry = record.get("upstream"), record.get("registry")
            if record.get("source") != CACHED or not isinstance(url, str):
                continue
            repository, digest = str(record["repository"]), str(record.get("digest") or "")
            name = v2_name(self.settings, url, str(registry or url), repository)
            entry = found.setdefault(
                name, RepositoryEntry(name, CACHED, str(registry or url), url, repository)
            )
            details = {k: record.get(k) for k in _DETAILS}
            if details["tar_size"] is None and DIGEST_RE.fullmatch(digest):
                # The layer tars of a tar download are stored after its count.
                details = self._image(digest)
            entry.tags.append(
                TagEntry(
                    str(record["tag"]),
                    digest,
                    details,
                    last_pulled=record.get("last_pulled"),
                    pulls=int(record.get("pulls") or 0),
                )
            )
        for entry in found.values():
            entry.tags.sort(key=lambda t: t.tag)
        return found.values()

    # -- usage -----------------------------------------------------------------------------

    def usage(self) -> dict[str, Any]:
        """The store's bytes and objects, by source (what the hosted area links, and
        the rest), pinned, and the evictions so far."""
        hosted_keys: set[str] = set()
        for info in self.store.backend.list(layout.HOSTED):
            parsed = layout.parse_hosted_key(info.key)
            if parsed is not None and parsed.section in (layout.BLOB, layout.MANIFEST):
                kind = "blobs" if parsed.section == layout.BLOB else "manifests"
                hosted_keys.add(content_key(kind, parsed.name))
        pinned = self.store.pinned()
        totals = {name: {"bytes": 0, "objects": 0} for name in (HOSTED, CACHED, "pinned")}
        for _, size, key in self.store.entries():
            for name in (HOSTED if key in hosted_keys else CACHED, "pinned"):
                if name == "pinned" and key not in pinned:
                    continue
                totals[name]["bytes"] += size
                totals[name]["objects"] += 1
        bytes_ = totals[HOSTED]["bytes"] + totals[CACHED]["bytes"]
        return {
            "backend": self.store.backend.name,
            "bytes": bytes_,
            "objects": totals[HOSTED]["objects"] + totals[CACHED]["objects"],
            "cap": self.store.max_bytes or None,
            "sources": {HOSTED: totals[HOSTED], CACHED: totals[CACHED]},
            "pinned": totals["pinned"],
            "evictions": self.store.evictions(),
        }

    # -- actions ---------------------------------------------------------------------------

    def delete_hosted_tag(self, name: str, tag: str) -> None:
        """Remove a hosted tag (the bytes wait for gc)."""
        if not is_hosted(self.settings, check_name(name)):
            raise NameUnknown(f"{name[:200]} is not a hosted repository")
        if tag not in self.hosted_area.tags(name):
            raise TagUnknown(f"{name[:200]} has no tag {tag[:128]}")
        self.hosted_area.delete_manifest(name, tag)
        self._forget(layout.pull_id(HOSTED, None, name, tag))

    def _forget(self, identity: str) -> None:
        self.store.backend.delete(layout.pull_record_key(identity))

    def evict(self, name: str, tag: str | None, digest: str | None) -> dict[str, Any]:
        """Evict the cached tag (or every tag at ``digest``) of ``name``; see the
        module's docstring for what goes. Returns what was removed."""
        entry = self.repository(name, CACHED)
        chosen = [t for t in entry.tags if t.tag == tag or (digest and t.digest == digest)]
        if not chosen:
            raise TagUnknown(f"{name[:200]} has no cached tag {str(tag or digest)[:128]}")
        assert entry.upstream_url is not None
        for item in chosen:
            self._forget(layout.pull_id(CACHED, entry.upstream_url, entry.repository, item.tag))
            for prefix in ("v2 " + entry.upstream_url, entry.upstream_url):
                stale = layout.tag_id(prefix, entry.repository, item.tag)
                self.store.backend.delete(layout.tag_record_key(stale))
        keep = set(self.store.pinned())
        for record in pull_records(self.store):
            if isinstance(record.get("digest"), str):
                keep |= image_content(self.store, record["digest"])
        removed, freed = 0, 0
        for digest_of_tag in {t.digest for t in chosen}:
            for key in sorted(image_content(self.store, digest_of_tag) - keep):
                size = self.store.backend.size(key)
                if size is None:
                    continue
                self.store.backend.delete(key)
                removed, freed = removed + 1, freed + size
        return {
            "evicted": [f"{name}:{t.tag}" for t in chosen],
            "objects": removed,
            "bytes": freed,
        }


def _hosted_pulls(records: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """The inventory's records of hosted tags, by (repository, tag)."""
    return {(r["repository"], r["tag"]): r for r in records if r.get("source") == HOSTED}


_DETAILS = ("media_type", "platforms", "compressed_size", "tar_size", "created")


def image_content(store: ContentStore, digest: str) -> set[str]:
    """The content keys an image uses: its manifests (an index's children too), config,
    blobs and layer tars (by the config's diff_ids)."""
    found: set[str] = set()
    pending = [digest]
    while pending:
        current = pending.pop()
        if not DIGEST_RE.fullmatch(current) or not current.startswith("sha256:"):
            continue
        key = content_key("manifests", current)
        if key in found:
            continue
        found.add(key)
        document = read_json(store, key)
        if document is None:
            continue
        children = document.get("manifests")
        for child in children if isinstance(children, list) else []:
            if isinstance(child, dict) and isinstance(child.get("digest"), str):
                pending.append(child["digest"])
        found |= _image_blobs(store, document)
    return found


def _image_blobs(store: ContentStore, manifest: dict[str, Any]) -> set[str]:
    found: set[str] = set()
    layers = manifest.get("layers")
    entries = [manifest.get("config"), *(layers if isinstance(layers, list) else [])]
    for entry in entries:
        blob = entry.get("digest") if isinstance(entry, dict) else None
        if isinstance(blob, str) and blob.startswith("sha256:") and DIGEST_RE.fullmatch(blob):
            found.add(content_key("blobs", blob))
    config = manifest.get("config")
    config_digest = config.get("digest") if isinstance(config, dict) else None
    if isinstance(config_digest, str) and config_digest.startswith("sha256:"):
        document = read_json(store, content_key("blobs", config_digest)) or {}
        rootfs = document.get("rootfs") if isinstance(document.get("rootfs"), dict) else {}
        for diff_id in (rootfs or {}).get("diff_ids") or []:
            if isinstance(diff_id, str) and diff_id.startswith("sha256:"):
                if DIGEST_RE.fullmatch(diff_id):
                    found.add(content_key("layers", diff_id))
    return found
