"""The hosted area: repositories pushed into passthrough (HOSTED_REPOSITORIES), the
push and content-management half of the OCI Distribution API over the content store.

Blobs and manifests live in the store by digest beside the cached ones, so a blob
pushed and a blob pulled from upstream are stored once. What belongs to which
repository is a set of small records in the same store (so every replica sharing an S3
bucket sees the same repositories)::

    hosted/<repository>/_blobs/<hex>.json                    the blob is in the repository
    hosted/<repository>/_manifests/<hex>.json                a manifest of the repository
    hosted/<repository>/_tags/<tag>.json                     the tag's digest
    hosted/<repository>/_referrers/<subject-hex>/<hex>.json  a manifest whose subject it is

Those keys are built (and parsed, for gc) in :mod:`passthrough.store.layout` only.
Every blob and manifest a push commits is pinned:
the cache's size limit never evicts it; ``passthrough gc`` removes what no tag reaches.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from passthrough.config import Settings
from passthrough.errors import (
    BlobUnknown,
    DigestMismatch,
    ManifestBlobUnknown,
    ManifestInvalid,
    ManifestUnknown,
    NameUnknown,
    PassthroughError,
    SizeInvalid,
    UploadUnknown,
    disk_full,
    is_disk_full,
)
from passthrough.oci.manifest import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    FOREIGN_LAYER_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
    sha256_digest,
)
from passthrough.oci.reference import DIGEST_RE, TAG_RE
from passthrough.registry.proxy import Manifest
from passthrough.store import layout
from passthrough.store.base import LayerFile
from passthrough.store.content import ContentStore
from passthrough.store.flight import Held
from passthrough.store.layout import (
    content_key,
    hosted_blob_key,
    hosted_manifest_key,
    hosted_referrer_key,
    hosted_tag_key,
)
from passthrough.store.uploads import UploadState

PUSHABLE_TYPES = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST)
INDEX_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST)


@dataclass(frozen=True)
class Pushed:
    """What a manifest PUT did."""

    digest: str
    subject: str | None


def check_digest(digest: str) -> str:
    """A sha256 digest (the only algorithm the store keeps), else DIGEST_INVALID."""
    if not DIGEST_RE.fullmatch(digest) or not digest.startswith("sha256:"):
        raise DigestMismatch(f"unsupported or malformed digest {digest[:80]!r}: sha256 only")
    return digest


def sha256_descriptor(
    entry: Any, what: str, error: type[PassthroughError] = ManifestInvalid
) -> tuple[str, int]:
    """The digest and size of a descriptor the store can keep (sha256), else ``error``
    naming ``what``."""
    if not isinstance(entry, dict):
        raise error(f"{what} is not a descriptor")
    digest, size = entry.get("digest"), entry.get("size")
    if not isinstance(digest, str) or not DIGEST_RE.fullmatch(digest):
        raise error(f"{what} has no valid digest")
    if not digest.startswith("sha256:"):
        raise error(f"{what}: only sha256 digests are supported")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise error(f"{what} has no valid size")
    return digest, size


class Hosted:
    """The hosted repositories of one store."""

    def __init__(self, settings: Settings, store: ContentStore) -> None:
        self.settings = settings
        self.store = store
        self.backend = store.backend

    # -- records ---------------------------------------------------------------------------

    def _get(self, key: str) -> dict[str, Any] | None:
        data = self.backend.get_bytes(key)
        if data is None:
            return None
        try:
            record = json.loads(data)
        except ValueError:
            return None
        return record if isinstance(record, dict) else None

    def _put(self, key: str, record: dict[str, Any]) -> None:
        try:
            self.backend.put_bytes(key, json.dumps(record).encode())
        except OSError as exc:
            raise disk_full() if is_disk_full(exc) else exc from None

    # -- blobs -----------------------------------------------------------------------------

    def blob_size(self, repository: str, digest: str) -> int | None:
        """The size of a blob of the repository, None unless it is linked and stored."""
        check_digest(digest)
        if self._get(hosted_blob_key(repository, digest)) is None:
            return None
        return self.store.blob_size(digest)

    def open_blob(self, repository: str, digest: str) -> LayerFile:
        if self.blob_size(repository, digest) is None:
            raise BlobUnknown(f"blob {digest[:19]}… is not in {repository}")
        found = self.store.open_blob(digest)
        if found is None:
            raise BlobUnknown(f"blob {digest[:19]}… is not in {repository}")
        return found

    def _pushing(self) -> contextlib.AbstractContextManager[Held]:
        """Held (shared) while a push checks what it needs and writes its records, so
        that ``passthrough gc`` (exclusive, :mod:`passthrough.registry.gc`) sees a push
        either not begun or complete, never half done: this host's lock, and with
        ``REDIS_URL`` the replicas' too (:meth:`~passthrough.store.flight.Flight.gc_lock`)."""
        return self.store.flight.gc_lock(exclusive=False)

    def link_blob(self, repository: str, digest: str, size: int) -> None:
        with self._pushing():
            self.store.pin("blobs", digest)
            # gc may have removed an old, unreachable copy of this digest between the
            # commit and the lock: the push must fail then, not link nothing.
            if self.store.blob_size(digest) is None:
                raise BlobUnknown(
                    f"blob {digest[:19]}… was removed by garbage collection while it was "
                    "committed: push it again"
                )
            self._put(
                hosted_blob_key(repository, digest),
                {"digest": digest, "size": size, "linked": time.time()},
            )

    def delete_blob(self, repository: str, digest: str) -> None:
        if self.blob_size(repository, digest) is None:
            raise BlobUnknown(f"blob {digest[:19]}… is not in {repository}")
        self.backend.delete(hosted_blob_key(repository, digest))

    def mount(self, repository: str, source: str, digest: str) -> int | None:
        """Link a blob of ``source`` into ``repository`` (the caller checked it may read
        ``source``); None when ``source`` does not hold it."""
        size = self.blob_size(source, check_digest(digest))
        if size is None:
            return None
        self.link_blob(repository, digest, size)
        return size

    # -- uploads ---------------------------------------------------------------------------

    def start_upload(self, repository: str) -> UploadState:
        return self.store.uploads.create(repository)

    def upload(self, repository: str, upload_id: str) -> UploadState:
        state = self.store.uploads.get(self.store.uploads.check_id(upload_id))
        if state is None or state.repository != repository:
            raise UploadUnknown("no such upload session for this repository")
        return state

    def append(
        self,
        repository: str,
        upload_id: str,
        chunks: Iterator[bytes],
        *,
        start: int | None,
        length: int | None,
    ) -> UploadState:
        """A PATCH: at ``start`` (Content-Range) or at the session's end (streamed)."""
        uploads = self.store.uploads
        with uploads.session(upload_id):
            state = self.upload(repository, upload_id)
            offset = state.size if start is None else start
            counted = _counted(chunks, length)
            return uploads.append(upload_id, offset, counted)

    def finish(
        self,
        repository: str,
        upload_id: str,
        digest: str,
        chunks: Iterator[bytes] | None,
        *,
        start: int | None,
        length: int | None,
    ) -> int:
        """The closing PUT: an optional last chunk, then verify and commit."""
        check_digest(digest)
        uploads = self.store.uploads
        with uploads.session(upload_id):
            state = self.upload(repository, upload_id)
            if chunks is not None and (length or 0) > 0:
                offset = state.size if start is None else start
                uploads.append(upload_id, offset, _counted(chunks, length))
            size = uploads.commit(upload_id, digest)
        self.link_blob(repository, digest, size)
        return size

    def monolithic(
        self, repository: str, digest: str, chunks: Iterator[bytes], length: int | None
    ) -> int:
        """``POST ?digest=``: the whole blob in one request."""
        check_digest(digest)
        state = self.start_upload(repository)
        try:
            return self.finish(repository, state.id, digest, chunks, start=0, length=length)
        except BaseException:
            # No client knows this session's id, so none could resume or cancel it: a
            # failed body (a full disk, a short one) must not leave its bytes behind.
            self.store.uploads.cancel(state.id)
            raise

    def cancel(self, repository: str, upload_id: str) -> None:
        uploads = self.store.uploads
        with uploads.session(upload_id):
            self.upload(repository, upload_id)
            uploads.cancel(upload_id)

    # -- manifests -------------------------------------------------------------------------

    def put_manifest(
        self, repository: str, reference: str, body: bytes, content_type: str
    ) -> Pushed:
        limit = self.settings.hosted_manifest_max_bytes
        if len(body) > limit:
            raise SizeInvalid(f"the manifest is larger than {limit >> 10} KiB", status=413)
        digest = sha256_digest(body)
        if DIGEST_RE.fullmatch(reference):
            if reference != digest:
                raise DigestMismatch(f"the manifest's content is {digest}, not {reference}")
        elif not TAG_RE.fullmatch(reference):
            raise ManifestInvalid(f"invalid tag {reference[:80]!r}")
        try:
            document = json.loads(body)
        except ValueError:
            raise ManifestInvalid("the manifest is not JSON") from None
        if not isinstance(document, dict):
            raise ManifestInvalid("the manifest is not a JSON object")
        media_type = self._media_type(document, content_type)
        references, subject = self._references(document, media_type)
        # Checked and written under the push lock: gc never deletes between the check
        # of a reference and the record that makes it reachable.
        with self._pushing():
            for kind, ref_digest, size in references:
                self._check_reference(repository, kind, ref_digest, size)
            try:
                self.backend.put_bytes(content_key("manifests", digest), body)
            except OSError as exc:
                raise disk_full() if is_disk_full(exc) else exc from None
            self.store.pin("manifests", digest)
            for kind, ref_digest, _ in references:
                if kind == "blobs":
                    self.store.pin("blobs", ref_digest)
            artifact_type = document.get("artifactType")
            if not isinstance(artifact_type, str):
                config = document.get("config")
                artifact_type = config.get("mediaType") if isinstance(config, dict) else None
            annotations = document.get("annotations")
            record = {
                "digest": digest,
                "media_type": media_type,
                "size": len(body),
                "subject": subject,
                "artifact_type": artifact_type if isinstance(artifact_type, str) else None,
                "annotations": annotations if isinstance(annotations, dict) else None,
                "references": [[k, d] for k, d, _ in references],
                "pushed": time.time(),
            }
            self._put(hosted_manifest_key(repository, digest), record)
            if subject is not None:
                self._put(
                    hosted_referrer_key(repository, subject, digest),
                    self._descriptor(record),
                )
            if not DIGEST_RE.fullmatch(reference):
                self._write_tag(repository, reference, digest, media_type)
            return Pushed(digest, subject)

    def _write_tag(self, repository: str, tag: str, digest: str, media_type: str) -> None:
        self._put(
            hosted_tag_key(repository, tag),
            {"digest": digest, "media_type": media_type, "updated": time.time()},
        )

    def has_manifest(self, repository: str, digest: str) -> bool:
        """Whether the repository holds the manifest (its record and its bytes)."""
        if self._get(hosted_manifest_key(repository, check_digest(digest))) is None:
            return False
        return self.backend.size(content_key("manifests", digest)) is not None

    def tag(self, repository: str, tag: str, digest: str) -> bool:
        """Point ``tag`` at a manifest the repository holds; False when it already did
        (nothing written)."""
        if not TAG_RE.fullmatch(tag):
            raise ManifestInvalid(f"invalid tag {tag[:80]!r}")
        current = self._get(hosted_tag_key(repository, tag))
        if current is not None and current.get("digest") == digest:
            return False
        with self._pushing():
            record = self._get(hosted_manifest_key(repository, check_digest(digest)))
            if record is None:
                raise ManifestUnknown(f"manifest {digest} is not in {repository}")
            self._write_tag(repository, tag, digest, str(record["media_type"]))
        return True

    @staticmethod
    def _media_type(document: dict[str, Any], content_type: str) -> str:
        declared = document.get("mediaType")
        header = content_type.split(";")[0].strip()
        if isinstance(declared, str) and declared:
            if header and header in PUSHABLE_TYPES and header != declared:
                raise ManifestInvalid(
                    f"the Content-Type {header} is not the manifest's mediaType {declared}"
                )
            media_type = declared
        elif header in PUSHABLE_TYPES:
            media_type = header
        elif "manifests" in document:
            media_type = OCI_INDEX
        else:
            media_type = OCI_MANIFEST
        if document.get("schemaVersion") != 2 or media_type not in PUSHABLE_TYPES:
            raise ManifestInvalid(
                f"unsupported manifest (schemaVersion {document.get('schemaVersion')!r}, "
                f"media type {str(media_type)[:80]!r}); push OCI or Docker v2 manifests"
            )
        return media_type

    def _references(
        self, document: dict[str, Any], media_type: str
    ) -> tuple[list[tuple[str, str, int | None]], str | None]:
        """(kind, digest, size) of everything the manifest points at, and its subject."""
        found: list[tuple[str, str, int | None]] = []

        if media_type in INDEX_TYPES:
            children = document.get("manifests")
            if not isinstance(children, list):
                raise ManifestInvalid("the index has no manifests list")
            for position, child in enumerate(children, start=1):
                digest, size = sha256_descriptor(child, f"manifest {position} of the index")
                found.append(("manifests", digest, size))
        else:
            digest, size = sha256_descriptor(document.get("config"), "the config")
            found.append(("blobs", digest, size))
            layers = document.get("layers")
            if not isinstance(layers, list):
                raise ManifestInvalid("the manifest has no layers list")
            for position, layer in enumerate(layers, start=1):
                digest, size = sha256_descriptor(layer, f"layer {position}")
                if layer.get("mediaType") in FOREIGN_LAYER_TYPES and layer.get("urls"):
                    continue  # foreign layers live elsewhere, by design
                found.append(("blobs", digest, size))
        subject = None
        if "subject" in document:
            subject, _ = sha256_descriptor(document["subject"], "the subject")
        return found, subject

    def _check_reference(self, repository: str, kind: str, digest: str, size: int | None) -> None:
        if kind == "blobs":
            stored = self.blob_size(repository, digest)
            if stored is None:
                raise ManifestBlobUnknown(f"blob {digest} is not in {repository}: push it first")
        else:
            record = self._get(hosted_manifest_key(repository, digest))
            stored = record.get("size") if record else None
            if record is None:
                raise ManifestBlobUnknown(
                    f"manifest {digest} is not in {repository}: push it first"
                )
        if size is not None and stored != size:
            raise ManifestInvalid(f"{digest} is {stored} bytes, the manifest says {size}")

    def _resolve(self, repository: str, reference: str) -> dict[str, Any]:
        if DIGEST_RE.fullmatch(reference):
            digest = check_digest(reference)
        else:
            tag = self._get(hosted_tag_key(repository, reference))
            if tag is None:
                raise ManifestUnknown(f"{repository}:{reference} is not a tag of this registry")
            digest = str(tag.get("digest"))
        record = self._get(hosted_manifest_key(repository, digest))
        if record is None:
            raise ManifestUnknown(f"manifest {reference[:80]} is not in {repository}")
        return record

    def manifest(self, repository: str, reference: str) -> Manifest:
        record = self._resolve(repository, reference)
        digest = str(record["digest"])
        body = self.store.get_document("manifests", digest)
        if body is None:
            raise ManifestUnknown(f"manifest {digest} of {repository} is missing from the store")
        return Manifest(digest, str(record["media_type"]), len(body), body, "hosted")

    def delete_manifest(self, repository: str, reference: str) -> None:
        """By tag: the tag goes. By digest: the manifest leaves the repository, with every
        tag pointing at it and its referrer entry (the bytes wait for gc)."""
        if not DIGEST_RE.fullmatch(reference):
            key = hosted_tag_key(repository, reference)
            if self._get(key) is None:
                raise ManifestUnknown(f"{repository}:{reference} is not a tag of this registry")
            self.backend.delete(key)
            return
        record = self._resolve(repository, reference)
        digest = str(record["digest"])
        for tag, tag_digest in self._tag_records(repository):
            if tag_digest == digest:
                self.backend.delete(hosted_tag_key(repository, tag))
        subject = record.get("subject")
        if isinstance(subject, str) and DIGEST_RE.fullmatch(subject):
            self.backend.delete(hosted_referrer_key(repository, subject, digest))
        self.backend.delete(hosted_manifest_key(repository, digest))

    # -- listings --------------------------------------------------------------------------

    def _tag_records(self, repository: str) -> Iterator[tuple[str, str]]:
        for info in self.backend.list(layout.hosted_prefix(repository, layout.TAG)):
            parsed = layout.parse_hosted_key(info.key)
            if parsed is None or parsed.repository != repository:
                continue
            record = self._get(info.key)
            if record is not None:
                yield parsed.name, str(record.get("digest"))

    def tags(self, repository: str) -> list[str]:
        found = sorted(tag for tag, _ in self._tag_records(repository))
        if not found and not self.exists(repository):
            raise NameUnknown(f"repository {repository} is not known to this registry")
        return found

    def exists(self, repository: str) -> bool:
        return any(
            parsed.repository == repository
            for parsed in self._holdings(layout.hosted_prefix(repository))
        )

    def repositories(self) -> list[str]:
        """Every hosted repository that holds something, sorted."""
        return sorted({parsed.repository for parsed in self._holdings(layout.HOSTED)})

    def _holdings(self, prefix: str) -> Iterator[layout.HostedKey]:
        """The tag, manifest and blob records under ``prefix`` (a referrer entry alone
        does not make a repository)."""
        for info in self.backend.list(prefix):
            parsed = layout.parse_hosted_key(info.key)
            if parsed is not None and parsed.section != layout.REFERRER:
                yield parsed

    def referrers(
        self, repository: str, digest: str, artifact_type: str | None
    ) -> list[dict[str, Any]]:
        check_digest(digest)
        found: list[dict[str, Any]] = []
        for info in self.backend.list(layout.hosted_referrers_prefix(repository, digest)):
            entry = self._get(info.key)
            if entry is None:
                continue
            if artifact_type and entry.get("artifactType") != artifact_type:
                continue
            found.append(entry)
        return sorted(found, key=lambda e: str(e.get("digest")))

    @staticmethod
    def _descriptor(record: dict[str, Any]) -> dict[str, Any]:
        descriptor: dict[str, Any] = {
            "mediaType": record["media_type"],
            "digest": record["digest"],
            "size": record["size"],
        }
        if record.get("artifact_type"):
            descriptor["artifactType"] = record["artifact_type"]
        if record.get("annotations"):
            descriptor["annotations"] = record["annotations"]
        return descriptor


def _counted(chunks: Iterator[bytes], length: int | None) -> Iterator[bytes]:
    """The request body, refused when it is not the length it declared (a truncated
    chunk never counts as data)."""
    received = 0
    for chunk in chunks:
        received += len(chunk)
        if length is not None and received > length:
            raise SizeInvalid("the body is longer than its Content-Length")
        yield chunk
    if length is not None and received != length:
        raise SizeInvalid(f"the body ended after {received} of {length} bytes")
