"""Blob upload sessions on the S3 store: the session lives in the bucket, so it survives
a restart and any replica may serve any of its requests (no stickiness).

Layout, under the store's prefix:

- ``uploads/<id>/state.json``: the session (repository, size, times, the multipart
  upload's id, the parts it holds with their ETags and sizes, how many bytes are
  pending, under which generation, with their MD5). Rewritten whole by every append:
  a PUT is atomic, so a reader sees the state before or after, never half of one.
- ``uploads/<id>/pending.<generation>``: the tail that is not a part yet. S3 wants
  every part but the last to be at least 5 MiB, and a client may send any chunk size
  (we advertise no ``OCI-Chunk-Min-Length``), so small chunks collect here until they
  make a part. Each rewrite takes a new generation: the state names the one it means,
  and a process killed between writing the pending bytes and the state leaves the old
  generation intact.
- ``uploads/<id>/data``: the multipart upload (started with the first part), completed
  there at commit time; only then is the digest checked, and only a verified object is
  copied to its content key ``blobs/sha256/<hex>``.

An append reads the pending bytes, streams them with the incoming ones into parts of
:data:`PART_SIZE` (memory bounded by about two parts: the one filling and the one going
up), uploads each as it fills, leaves a tail under :data:`MIN_PART` as the new pending
object, and writes the state last. A worker killed in the middle leaves the state as
it was: parts it uploaded beyond the state's list are never named in the completion
(S3 drops unnamed parts) and are replaced by the next append of those part numbers;
the session goes on from the size it says.

Integrity: every part and pending object goes up with its Content-MD5, so S3 refuses
bytes that differ from the ones hashed here; pending bytes read back must match the MD5
in the state; the completion names every part by ETag. The sha256 is the one carried
along by this process when it saw every byte (:class:`~passthrough.store.uploads.Uploads`),
or the one the state records, written by the replica that appended the last bytes when
it had hashed them all (a docker push's PUT often lands on another replica than its
PATCH); else (chunks from several replicas, or a restart between them) the assembled
object is streamed back from S3 and hashed. The state is trusted as the store's other
objects are: what it records was hashed from the bytes that S3 then took, checked.

Failures: S3 errors become :class:`~passthrough.errors.StoreUnavailable` naming the
store, and "full" or quota answers :class:`~passthrough.errors.InsufficientStorage`.
An append that S3 failed discards the session (its parts are aborted, its objects
deleted): a full store keeps nothing of a push it could not take, and the client starts
the blob again. A client that goes away mid-chunk leaves the session as it was.

Expiry: S3_LIFECYCLE_DAYS's rule aborts incomplete multipart uploads a day after they
began (:mod:`passthrough.store.s3`), whatever the session's later activity: a session
older than that answers BLOB_UPLOAD_UNKNOWN and the client starts the blob again.
Without REDIS_URL, ``session()`` serialises requests on one host only; clients send a
session's requests one after another, and were two to overlap on two replicas, the
ETags in the completion and the digest check still keep a wrong blob from appearing.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from passthrough.errors import (
    DigestMismatch,
    InsufficientStorage,
    PassthroughError,
    StoreUnavailable,
    TooLarge,
    UploadUnknown,
)
from passthrough.oci.manifest import sha256_digest
from passthrough.store import layout
from passthrough.store.flight import Flight
from passthrough.store.layout import content_key
from passthrough.store.s3 import S3_ERRORS, S3Backend, error_code, is_missing
from passthrough.store.uploads import (
    READ_CHUNK,
    Uploads,
    UploadState,
    check_offset,
    new_upload_id,
)

log = logging.getLogger(__name__)

#: S3's smallest part but the last.
MIN_PART = 5 << 20
#: The parts an append cuts (the same as the backend's multipart uploads).
PART_SIZE = 16 << 20
#: S3's most parts in one multipart upload.
MAX_PARTS = 10_000
#: What S3 and its look-alikes answer when a bucket is full or over quota.
FULL_CODES = frozenset(
    {
        "EntityTooLarge",
        "QuotaExceeded",
        "InsufficientStorage",
        "StorageFull",
        "XMinioStorageFull",
        "XMinioAdminBucketQuotaExceeded",
    }
)


@dataclass(frozen=True)
class Part:
    number: int
    etag: str
    size: int


@dataclass(frozen=True)
class Session:
    """What ``state.json`` holds."""

    id: str
    repository: str
    size: int
    started: float
    updated: float
    #: The multipart upload's id, once the first part went up.
    multipart: str | None = None
    parts: tuple[Part, ...] = ()
    #: Bytes after the last part, in ``pending.<generation>``.
    pending: int = 0
    generation: int = 0
    #: The pending bytes' MD5 (base64), checked when they are read back: they go up
    #: again as a part, and the hash carried along must still be theirs.
    pending_md5: str = ""
    #: The digest of all ``size`` bytes, when the process that appended the last of
    #: them had hashed every one: a commit on another replica needs no read-back then.
    sha256: str = ""

    def public(self) -> UploadState:
        return UploadState(self.id, self.repository, self.size, self.started, self.updated)

    def to_json(self) -> bytes:
        document = asdict(self)
        document["parts"] = [asdict(part) for part in self.parts]
        return json.dumps(document).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Session | None:
        try:
            document = json.loads(data)
            parts = tuple(Part(**part) for part in document.pop("parts"))
            session = cls(parts=parts, **document)
        except (ValueError, TypeError, KeyError, AttributeError):
            return None
        if sum(part.size for part in session.parts) + session.pending != session.size:
            return None
        return session


@dataclass
class _Cutter:
    """The bytes of one append on their way into parts."""

    parts: list[Part]
    multipart: str | None
    buffer: bytearray = field(default_factory=bytearray)


def _md5(data: bytes | bytearray) -> str:
    return base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()


class S3Uploads(Uploads):
    """Upload sessions in an S3 bucket, one multipart upload each."""

    #: Any chunk size works: small chunks wait in the pending object.
    min_chunk = 0

    def __init__(self, backend: S3Backend, flight: Flight) -> None:
        super().__init__(backend, flight)
        self.s3 = backend

    # -- keys and errors -----------------------------------------------------------------

    def _dir(self, upload_id: str) -> str:
        return layout.upload_prefix(self.check_id(upload_id))

    def _state_key(self, upload_id: str) -> str:
        return layout.upload_state_key(self.check_id(upload_id))

    def _pending_key(self, upload_id: str, generation: int) -> str:
        return layout.upload_pending_key(self.check_id(upload_id), generation)

    def _data_key(self, upload_id: str) -> str:
        return layout.upload_data_key(self.check_id(upload_id))

    def _failure(self, exc: BaseException, doing: str) -> PassthroughError:
        code = error_code(exc)
        status = _status_of(exc)
        if code in FULL_CODES or status == 507:
            return InsufficientStorage(
                f"the {self.s3.describe()} has no room for the upload ({code or status}) "
                f"while {doing}"
            )
        return self.s3.unavailable(exc, doing)

    def _gone(self, upload_id: str) -> UploadUnknown:
        return UploadUnknown(
            "the session's multipart upload is gone from the "
            f"{self.s3.describe()} (S3 aborts incomplete uploads a day after they began); "
            "start the blob's upload again"
        )

    # -- state -----------------------------------------------------------------------------

    def _load(self, upload_id: str) -> Session | None:
        data = self.s3.get_bytes(self._state_key(upload_id))
        if data is None:
            return None
        session = Session.from_json(data)
        if session is None or session.id != upload_id:
            log.warning(
                "upload session %s: unreadable state in the %s", upload_id, self.s3.describe()
            )
            return None
        return session

    def _save(self, session: Session) -> None:
        try:
            self.s3.client.put_object(
                Bucket=self.s3.bucket,
                Key=self.s3.full_key(self._state_key(session.id)),
                Body=session.to_json(),
                ContentType="application/json",
            )
        except S3_ERRORS as exc:
            raise self._failure(exc, "storing an upload session's state") from None

    def _read_pending(self, session: Session) -> bytearray:
        if not session.pending:
            return bytearray()
        data = self.s3.get_bytes(self._pending_key(session.id, session.generation))
        if data is None or len(data) != session.pending or _md5(data) != session.pending_md5:
            raise StoreUnavailable(
                f"the {self.s3.describe()} does not hold the pending bytes of upload "
                f"session {session.id} as they were stored"
            )
        return bytearray(data)

    # -- parts ------------------------------------------------------------------------------

    def _start_multipart(self, upload_id: str) -> str:
        try:
            answer = self.s3.client.create_multipart_upload(
                Bucket=self.s3.bucket, Key=self.s3.full_key(self._data_key(upload_id))
            )
        except S3_ERRORS as exc:
            raise self._failure(exc, "starting a multipart upload") from None
        multipart: str = answer["UploadId"]
        return multipart

    def _put_part(self, upload_id: str, cutter: _Cutter, data: bytes) -> None:
        number = len(cutter.parts) + 1
        if number > MAX_PARTS:
            raise TooLarge(
                f"the upload is over what one S3 multipart upload holds ({MAX_PARTS} parts)"
            )
        if cutter.multipart is None:
            cutter.multipart = self._start_multipart(upload_id)
        try:
            answer = self.s3.client.upload_part(
                Bucket=self.s3.bucket,
                Key=self.s3.full_key(self._data_key(upload_id)),
                UploadId=cutter.multipart,
                PartNumber=number,
                Body=data,
                ContentMD5=_md5(data),
            )
        except S3_ERRORS as exc:
            if error_code(exc) == "NoSuchUpload":
                raise self._gone(upload_id) from None
            raise self._failure(exc, f"storing part {number} of an upload") from None
        cutter.parts.append(Part(number, str(answer["ETag"]), len(data)))

    # -- the interface ----------------------------------------------------------------------

    def create(self, repository: str) -> UploadState:
        now = time.time()
        session = Session(new_upload_id(), repository, 0, now, now)
        self._save(session)
        return session.public()

    def get(self, upload_id: str) -> UploadState | None:
        session = self._load(self.check_id(upload_id))
        return None if session is None else session.public()

    def append(self, upload_id: str, offset: int, chunks: Iterator[bytes]) -> UploadState:
        session = self._load(self.check_id(upload_id))
        if session is None:
            raise UploadUnknown("no such upload session")
        check_offset(session.public(), offset)
        hasher = self._hash_continue(upload_id, offset)
        cutter = _Cutter(list(session.parts), session.multipart, self._read_pending(session))
        size = offset
        # A client that goes away mid-chunk raises out of the loop before the state is
        # written: the session is as it was (the parts cut meanwhile are never named).
        try:
            for chunk in chunks:
                if hasher is not None:
                    hasher.update(chunk)
                size += len(chunk)
                cutter.buffer += chunk
                while len(cutter.buffer) >= PART_SIZE:
                    with memoryview(cutter.buffer) as view:
                        part = bytes(view[:PART_SIZE])
                    del cutter.buffer[:PART_SIZE]
                    self._put_part(upload_id, cutter, part)
            if len(cutter.buffer) >= MIN_PART:
                self._put_part(upload_id, cutter, bytes(cutter.buffer))
                cutter.buffer.clear()
            if hasher is not None:
                recorded = "sha256:" + hasher.copy().hexdigest()
            else:
                recorded = session.sha256 if size == offset else ""
            updated = self._store_tail(session, cutter, size, recorded)
        except (StoreUnavailable, InsufficientStorage) as exc:
            # S3 failed (or is full) mid-append: keep nothing of this session.
            if self._discard_quietly(upload_id, session):
                raise type(exc)(exc.message + "; the upload session was discarded") from None
            raise
        except UploadUnknown:
            self._discard_quietly(upload_id, session)
            raise
        self._hash_keep(upload_id, size, hasher)
        return updated.public()

    def _store_tail(self, session: Session, cutter: _Cutter, size: int, recorded: str) -> Session:
        """Write the new pending bytes (a new generation when they changed), then the
        state, then drop the old generation."""
        generation, digest = session.generation, session.pending_md5
        tail = bytes(cutter.buffer)
        changed = len(cutter.parts) != len(session.parts) or len(tail) != session.pending
        if changed:
            digest = _md5(tail) if tail else ""
        if changed and tail:
            generation += 1
            try:
                self.s3.client.put_object(
                    Bucket=self.s3.bucket,
                    Key=self.s3.full_key(self._pending_key(session.id, generation)),
                    Body=tail,
                    ContentMD5=digest,
                )
            except S3_ERRORS as exc:
                raise self._failure(exc, "storing an upload's pending bytes") from None
        updated = Session(
            session.id,
            session.repository,
            size,
            session.started,
            time.time(),
            cutter.multipart,
            tuple(cutter.parts),
            len(tail),
            generation,
            digest,
            recorded,
        )
        self._save(updated)
        if changed and session.pending:
            # Housekeeping: a leftover is removed with the session anyway.
            with contextlib.suppress(StoreUnavailable):
                self.s3.delete(self._pending_key(session.id, session.generation))
        return updated

    def commit(self, upload_id: str, digest: str) -> int:
        session = self._load(self.check_id(upload_id))
        if session is None:
            raise UploadUnknown("no such upload session")
        target = content_key("blobs", digest)
        try:
            actual = self._hash_take(upload_id, session.size) or session.sha256 or None
            if not session.parts:
                self._commit_small(session, digest, actual, target)
            else:
                self._commit_multipart(session, digest, actual, target)
        finally:
            self._discard_quietly(upload_id, session)
        return session.size

    def _commit_small(self, session: Session, digest: str, actual: str | None, target: str) -> None:
        """No part yet: the pending bytes are the blob, checked here, then put."""
        data = bytes(self._read_pending(session))
        if actual is None:
            actual = sha256_digest(data)
        _check_digest(actual, digest)
        try:
            self.s3.client.put_object(
                Bucket=self.s3.bucket,
                Key=self.s3.full_key(target),
                Body=data,
                ContentMD5=_md5(data),
            )
        except S3_ERRORS as exc:
            raise self._failure(exc, "storing an uploaded blob") from None

    def _commit_multipart(
        self, session: Session, digest: str, actual: str | None, target: str
    ) -> None:
        """Complete the multipart upload under the session, check the digest there, and
        only then copy the object to its content key."""
        data_key = self._data_key(session.id)
        # A commit killed after the completion left the object: go on from there.
        if self.s3.size(data_key) != session.size:
            self._complete(session)
        stored = self.s3.size(data_key)
        if stored != session.size:
            raise StoreUnavailable(
                f"the {self.s3.describe()} assembled {stored} bytes of {session.size}"
            )
        if actual is None:
            actual = self._read_back_digest(data_key)
        _check_digest(actual, digest)
        if self.s3.size(target) == session.size:
            return  # the blob is there already (the same content: it has this digest)
        try:
            self.s3.client.copy(
                {"Bucket": self.s3.bucket, "Key": self.s3.full_key(data_key)},
                self.s3.bucket,
                self.s3.full_key(target),
                Config=self.s3.transfer,
            )
        except S3_ERRORS as exc:
            raise self._failure(exc, "copying an uploaded blob into place") from None
        copied = self.s3.size(target)
        if copied != session.size:
            self.s3.delete(target)
            raise StoreUnavailable(
                f"the {self.s3.describe()} copied {copied} bytes of {session.size}"
            )

    def _complete(self, session: Session) -> None:
        """The last part (the pending bytes), then the completion, naming every part."""
        cutter = _Cutter(list(session.parts), session.multipart)
        if session.pending:
            self._put_part(session.id, cutter, bytes(self._read_pending(session)))
        try:
            self.s3.client.complete_multipart_upload(
                Bucket=self.s3.bucket,
                Key=self.s3.full_key(self._data_key(session.id)),
                UploadId=cutter.multipart,
                MultipartUpload={
                    "Parts": [{"PartNumber": p.number, "ETag": p.etag} for p in cutter.parts]
                },
            )
        except S3_ERRORS as exc:
            if error_code(exc) == "NoSuchUpload":
                raise self._gone(session.id) from None
            raise self._failure(exc, "completing a multipart upload") from None

    def _read_back_digest(self, key: str) -> str:
        """The sha256 of a stored object, streamed back from S3."""
        hasher = hashlib.sha256()
        try:
            body = self.s3.client.get_object(Bucket=self.s3.bucket, Key=self.s3.full_key(key))[
                "Body"
            ]
            try:
                while chunk := body.read(4 * READ_CHUNK):
                    hasher.update(chunk)
            finally:
                body.close()
        except S3_ERRORS as exc:
            raise self._failure(exc, "reading an uploaded blob back") from None
        return "sha256:" + hasher.hexdigest()

    def cancel(self, upload_id: str) -> None:
        self._discard(self.check_id(upload_id), self._load(upload_id))

    def _discard_quietly(self, upload_id: str, session: Session | None) -> bool:
        """Whether the session is gone; a failure is logged, not raised."""
        try:
            self._discard(upload_id, session)
        except (StoreUnavailable, InsufficientStorage) as exc:
            # What is left is found again by list() (the state goes last), and S3's
            # lifecycle rule aborts the parts.
            log.warning("upload session %s not removed: %s", upload_id, exc.message)
            return False
        return True

    def _discard(self, upload_id: str, session: Session | None) -> None:
        """Abort the session's multipart uploads (any a killed worker started and never
        recorded too), delete its objects, the state last."""
        with self._hashes_lock:
            self._hashes.pop(upload_id, None)
        directory = self.s3.full_key(self._dir(upload_id))
        multiparts = {session.multipart} if session and session.multipart else set()
        try:
            paginator = self.s3.client.get_paginator("list_multipart_uploads")
            for page in paginator.paginate(Bucket=self.s3.bucket, Prefix=directory):
                multiparts.update(upload["UploadId"] for upload in page.get("Uploads", ()))
            for multipart in multiparts:
                try:
                    self.s3.client.abort_multipart_upload(
                        Bucket=self.s3.bucket,
                        Key=self.s3.full_key(self._data_key(upload_id)),
                        UploadId=multipart,
                    )
                except S3_ERRORS as exc:
                    if error_code(exc) != "NoSuchUpload" and not is_missing(exc):
                        raise
        except S3_ERRORS as exc:
            raise self._failure(exc, "aborting an upload session") from None
        state = self._state_key(upload_id)
        for item in list(self.s3.list(self._dir(upload_id))):
            if item.key != state:
                self.s3.delete(item.key)
        self.s3.delete(state)

    def list(self) -> Iterator[UploadState]:
        for item in self.s3.list(layout.UPLOADS):
            parsed = layout.parse_upload_key(item.key)
            if parsed is not None and parsed[1] == layout.UPLOAD_STATE:
                state = self.get(parsed[0])
                if state is not None:
                    yield state


def _check_digest(actual: str, digest: str) -> None:
    if actual != digest:
        raise DigestMismatch(f"the uploaded content is {actual}, not the digest given {digest}")


def _status_of(exc: BaseException) -> int | None:
    response: Any = getattr(exc, "response", None)
    if isinstance(response, dict):
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return int(status) if status else None
    return None
