"""Every name in the store, built and parsed in this one module (as CNCF distribution's
``registry/storage/paths.go``): the keys of a backend's objects, and the local files of
its staging and lock directories. Garbage collection is only correct while what it
parses is what the hosted area builds, so both go through here.

The keys, under a backend's root (a directory, or a bucket and prefix)::

    blobs/sha256/<hex>                           content: registry blobs and configs
    layers/sha256/<diff-id hex>                  content: verified uncompressed layer tars
    manifests/sha256/<hex>                       content: manifests by digest
    tags/<tag id>.json                           the last digest seen of an upstream tag,
                                                 or a digest read upstream, and who read
                                                 it (stale serving, offline mode); the id
                                                 hashes registry, repository and tag or
                                                 digest (:func:`tag_id`)
    checksums/<archive id>.json                  sha256 and md5 of one tar archive as the
                                                 tar routes send it; the id hashes what
                                                 decides its bytes (the manifest digest
                                                 among them: a moved tag gets a new one)
    pins/<kind>/sha256/<hex>                     a content entry kept from eviction
    pulls/<pull id>.json                         the inventory's record of one tag served
                                                 (names, digest, pulls, last pulled); the
                                                 id hashes source, upstream, repository
                                                 and tag (:func:`pull_id`)
    counters/evictions.json                      entries evicted, over every replica
    hosted/<repository>/_blobs/<hex>.json        the blob is in the hosted repository
    hosted/<repository>/_manifests/<hex>.json    a manifest of the repository
    hosted/<repository>/_tags/<tag>.json         the tag's digest
    hosted/<repository>/_referrers/<subject hex>/<hex>.json
                                                 a manifest whose subject it is
    imports/layers/<diff-id hex>.json            the blob ``passthrough import`` made of
                                                 a docker save layer (so that importing it
                                                 again compresses nothing)
    uploads/<id>/state.json                      an upload session of the hosted area
    uploads/<id>/data                            its bytes (on S3: the multipart upload)
    uploads/<id>/pending.<generation>            on S3: the bytes that are no part yet
    sync/runs/<run id>.json                      a sync run's report (``passthrough sync``,
                                                 ``POST /api/v1/sync``), for every replica

Components starting with ``_`` cannot be part of a repository name, so a hosted
record never collides with a nested repository: the first such component is the
section. The filesystem backend stores ``blobs`` and ``layers`` as
``<hex>-<size>`` (:mod:`passthrough.store.filesystem`); the key stays as above.

Local files of one host (never keys; the backend's ``staging_dir`` and ``lock_dir``)::

    tmp/<name>.<pid>.<random>.part               a file being written; the pid tells
                                                 the part of a dead writer
    tmp/flight-<hex>.json                        the state of a read-through fetch
    locks/<name>.lock                            a lock: a digest's hex, ``evict``,
                                                 ``upload-<id>``, ``hosted-gc``

Only sha256 digests are stored; every builder refuses anything else, so no request
ever names a path.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from dataclasses import dataclass

#: The kinds of content, each under ``<kind>/sha256/``.
KINDS = ("blobs", "layers", "manifests")
TAGS = "tags/"
CHECKSUMS = "checksums/"
PINS = "pins/"
PULLS = "pulls/"
EVICTIONS_KEY = "counters/evictions.json"
HOSTED = "hosted/"
UPLOADS = "uploads/"
IMPORTS = "imports/"
SYNC_RUNS = "sync/runs/"

#: The sections of a hosted repository's records, by the kind of record they hold.
TAG, MANIFEST, BLOB, REFERRER = "_tags", "_manifests", "_blobs", "_referrers"
SECTIONS = (TAG, MANIFEST, BLOB, REFERRER)

UPLOAD_ID_RE = re.compile(r"^[0-9a-f]{32}$")
UPLOAD_STATE = "state.json"
UPLOAD_DATA = "data"

#: The local directories of a backend (under its root, or its per-host work directory).
STAGING_DIR, LOCK_DIR = "tmp", "locks"
PART_SUFFIX = ".part"
FLIGHT_STATE_GLOB = "flight-*.json*"
#: The hosted area's gc lock, held shared by pushes and exclusive by gc (this host's
#: lock file, and the Redis keys' infix: :meth:`passthrough.store.flight.Flight.gc_lock`).
GC_LOCK = "hosted-gc"
EVICT_LOCK = "evict"
#: One sync run at a time on a host (the API's background runs).
SYNC_LOCK = "sync"
_RUN_ID_RE = re.compile(r"^[0-9]{8}T[0-9]{6}\.[0-9]{6}Z-[0-9a-f]{8}$")

_HEX_RE = re.compile(r"^[0-9a-f]{64}$")
_JSON = ".json"


# -- digests ---------------------------------------------------------------------------------


def hex_of(digest: str) -> str:
    """The hex part of a sha256 digest; anything else is refused (ValueError)."""
    algorithm, _, value = digest.partition(":")
    if algorithm != "sha256" or not _HEX_RE.fullmatch(value):
        raise ValueError("only sha256 digests are stored")
    return value


def digest_of_hex(value: str) -> str | None:
    """``sha256:<value>`` when ``value`` is a sha256 hex, else None."""
    return "sha256:" + value if _HEX_RE.fullmatch(value) else None


def _digest_of_json(name: str) -> str | None:
    """The digest a ``<hex>.json`` name stands for."""
    return digest_of_hex(name[: -len(_JSON)]) if name.endswith(_JSON) else None


# -- content ---------------------------------------------------------------------------------


def content_key(kind: str, digest: str) -> str:
    """``<kind>/sha256/<hex>``."""
    value = hex_of(digest)
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}")
    return f"{kind}/sha256/{value}"


def parse_content_key(key: str) -> tuple[str, str] | None:
    """(kind, digest) of a content key, None for any other key."""
    parts = key.split("/")
    if len(parts) != 3 or parts[0] not in KINDS or parts[1] != "sha256":
        return None
    digest = digest_of_hex(parts[2])
    return None if digest is None else (parts[0], digest)


def content_prefix(kind: str) -> str:
    """``<kind>/sha256/``: what every key of one kind of content starts with."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}")
    return f"{kind}/sha256/"


# -- records of the cache: tags and pins -------------------------------------------------------


def tag_id(registry: str, repository: str, tag: str) -> str:
    """The name of an upstream tag's record: a hash, so any registry and tag fits."""
    return hashlib.sha256(f"{registry}\0{repository}\0{tag}".encode()).hexdigest()


def _record_key(section: str, identity: str) -> str:
    """``<section><id>.json``: a record named by a hash (tags/, pulls/)."""
    if not _HEX_RE.fullmatch(identity):
        raise ValueError(f"a record of {section} is named by a sha256 hex")
    return f"{section}{identity}{_JSON}"


def _parse_record_key(section: str, key: str) -> str | None:
    """The id of a ``<section><id>.json`` key, None for any other key."""
    if not key.startswith(section) or not key.endswith(_JSON):
        return None
    identity = key[len(section) : -len(_JSON)]
    return identity if _HEX_RE.fullmatch(identity) else None


def tag_record_key(identity: str) -> str:
    """``tags/<tag id>.json``."""
    return _record_key(TAGS, identity)


def parse_tag_record_key(key: str) -> str | None:
    """The tag id of a tag record's key."""
    return _parse_record_key(TAGS, key)


def pull_id(source: str, upstream: str | None, repository: str, tag: str) -> str:
    """The name of the inventory's record of one tag: ``source`` hosted or cached,
    ``upstream`` the registry's URL (None when hosted)."""
    return tag_id(f"{source} {upstream or ''}", repository, tag)


def pull_record_key(identity: str) -> str:
    """``pulls/<pull id>.json``."""
    return _record_key(PULLS, identity)


def parse_pull_record_key(key: str) -> str | None:
    """The pull id of a pull record's key."""
    return _parse_record_key(PULLS, key)


def import_layer_key(diff_id: str) -> str:
    """``imports/layers/<diff-id hex>.json``: the blob an import compressed a plain
    layer tar into."""
    return f"{IMPORTS}layers/{hex_of(diff_id)}{_JSON}"


def checksum_record_key(identity: str) -> str:
    """``checksums/<archive id>.json``: the digests of one archive's bytes."""
    if not _HEX_RE.fullmatch(identity):
        raise ValueError("a checksum record is named by a sha256 hex")
    return f"{CHECKSUMS}{identity}{_JSON}"


def pin_key(kind: str, digest: str) -> str:
    """``pins/<kind>/sha256/<hex>``: the pin of one content entry."""
    return PINS + content_key(kind, digest)


def parse_pin_key(key: str) -> tuple[str, str] | None:
    """(kind, digest) of the entry a pin keeps."""
    return parse_content_key(key[len(PINS) :]) if key.startswith(PINS) else None


def sync_run_key(run_id: str) -> str:
    """``sync/runs/<run id>.json``; the id is ``<UTC time>-<random hex>``, so the keys
    sort by start time."""
    if not _RUN_ID_RE.fullmatch(run_id):
        raise ValueError("not a sync run's id")
    return f"{SYNC_RUNS}{run_id}{_JSON}"


# -- the hosted area ---------------------------------------------------------------------------


@dataclass(frozen=True)
class HostedKey:
    """What one hosted record's key names."""

    repository: str
    #: TAG, MANIFEST, BLOB or REFERRER.
    section: str
    #: The tag (TAG), else the digest of the manifest or blob.
    name: str
    #: The subject's digest (REFERRER only).
    subject: str | None = None


def hosted_prefix(repository: str, section: str | None = None) -> str:
    """``hosted/<repository>/`` (``…/<section>/`` with a section): what a listing of
    the repository's records starts with. Nested repositories list under it too."""
    if section is not None and section not in SECTIONS:
        raise ValueError(f"unknown section {section!r}")
    return f"{HOSTED}{repository}/" + (f"{section}/" if section else "")


def hosted_tag_key(repository: str, tag: str) -> str:
    return f"{hosted_prefix(repository, TAG)}{tag}{_JSON}"


def hosted_manifest_key(repository: str, digest: str) -> str:
    return f"{hosted_prefix(repository, MANIFEST)}{hex_of(digest)}{_JSON}"


def hosted_blob_key(repository: str, digest: str) -> str:
    return f"{hosted_prefix(repository, BLOB)}{hex_of(digest)}{_JSON}"


def hosted_referrers_prefix(repository: str, subject: str) -> str:
    """What the keys of every referrer of ``subject`` start with."""
    return f"{hosted_prefix(repository, REFERRER)}{hex_of(subject)}/"


def hosted_referrer_key(repository: str, subject: str, digest: str) -> str:
    return f"{hosted_referrers_prefix(repository, subject)}{hex_of(digest)}{_JSON}"


def hosted_key(record: HostedKey) -> str:
    """The key of a record (the inverse of :func:`parse_hosted_key`)."""
    if record.section == TAG:
        return hosted_tag_key(record.repository, record.name)
    if record.section == REFERRER:
        assert record.subject is not None, "a referrer names its subject"
        return hosted_referrer_key(record.repository, record.subject, record.name)
    if record.section == MANIFEST:
        return hosted_manifest_key(record.repository, record.name)
    return hosted_blob_key(record.repository, record.name)


def parse_hosted_key(key: str) -> HostedKey | None:
    """What ``hosted/<repository>/_<section>/…`` names; None for anything that is not
    a well-formed record (another file, a section unknown, a name that is no digest)."""
    parts = key.split("/")
    if len(parts) < 4 or parts[0] != HOSTED[:-1]:
        return None
    for index in range(2, len(parts) - 1):
        if parts[index].startswith("_"):
            repository = "/".join(parts[1:index])
            return _parse_section(repository, parts[index], parts[index + 1 :])
    return None


def _parse_section(repository: str, section: str, rest: list[str]) -> HostedKey | None:
    if section == TAG and len(rest) == 1:
        tag = rest[0][: -len(_JSON)] if rest[0].endswith(_JSON) else ""
        return HostedKey(repository, TAG, tag) if tag else None
    if section == REFERRER and len(rest) == 2:
        subject, digest = digest_of_hex(rest[0]), _digest_of_json(rest[1])
        if subject is None or digest is None:
            return None
        return HostedKey(repository, REFERRER, digest, subject)
    if section in (MANIFEST, BLOB) and len(rest) == 1:
        digest = _digest_of_json(rest[0])
        return None if digest is None else HostedKey(repository, section, digest)
    return None


# -- upload sessions ---------------------------------------------------------------------------


def upload_prefix(upload_id: str) -> str:
    """``uploads/<id>/``: every object of one session starts with it."""
    if not UPLOAD_ID_RE.fullmatch(upload_id):
        raise ValueError("not an upload session's id")
    return f"{UPLOADS}{upload_id}/"


def upload_state_key(upload_id: str) -> str:
    return upload_prefix(upload_id) + UPLOAD_STATE


def upload_data_key(upload_id: str) -> str:
    return upload_prefix(upload_id) + UPLOAD_DATA


def upload_pending_key(upload_id: str, generation: int) -> str:
    return upload_prefix(upload_id) + f"pending.{generation}"


def parse_upload_key(key: str) -> tuple[str, str] | None:
    """(session id, the object's name in the session) of an upload's key."""
    if not key.startswith(UPLOADS):
        return None
    upload_id, slash, name = key[len(UPLOADS) :].partition("/")
    if not slash or not name or "/" in name or not UPLOAD_ID_RE.fullmatch(upload_id):
        return None
    return upload_id, name


def upload_lock(upload_id: str) -> str:
    """The lock one session's requests take in turn."""
    return f"upload-{upload_id}"


# -- local files: staging and locks ---------------------------------------------------------------


def part_name(name: str, token: str | None = None) -> str:
    """``<name>.<pid>.<token>.part``: a staging file of this process (token: random
    unless given)."""
    return f"{name}.{os.getpid()}.{token or secrets.token_hex(6)}{PART_SUFFIX}"


def ready_name(kind: str, digest: str) -> str:
    """A verified part's second name while it is uploaded: a part of this process
    (removed with the others once the process is gone), found by :func:`ready_glob`."""
    return part_name(f"ready-{kind}-{hex_of(digest)}")


def ready_glob(kind: str, digest: str) -> str:
    return f"ready-{kind}-{hex_of(digest)}.*{PART_SUFFIX}"


def part_pid(file_name: str) -> int | None:
    """The pid of the process that writes a part, from its name."""
    if not file_name.endswith(PART_SUFFIX):
        return None
    fields = file_name.split(".")
    return int(fields[-3]) if len(fields) >= 4 and fields[-3].isdigit() else None


def flight_state_name(digest_hex: str) -> str:
    """The state file of a read-through fetch of one blob."""
    return f"flight-{digest_hex}.json"


def lock_file_name(name: str) -> str:
    return f"{name}.lock"
