"""Blob upload sessions of the hosted area, kept in the store so that they survive a
restart and, on a shared store, work from any replica: a session's state and bytes are
never in one process's memory only.

An upload is a sequence of appends at the session's current size (a chunk that does
not start there is refused, the spec's 416), then a commit that names the digest: the
bytes are hashed (a hash carried along by this process when it saw every append, else the
digest an append recorded for exactly the bytes stored, else a pass over them), and only
when they match do they become the blob, through the backend's commit (a rename on
disk): nothing unverified is ever visible.

Implementations: :class:`FilesystemUploads` (``uploads/<id>/`` in CACHE_DIR) and the S3
one in :mod:`passthrough.store.s3_uploads` (a multipart upload per session), which
imports this module: :func:`passthrough.store.content.open_uploads` picks one, so that
no import goes both ways.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from passthrough.errors import (
    DigestMismatch,
    UploadInvalid,
    UploadUnknown,
    disk_full,
    is_disk_full,
)
from passthrough.store import layout
from passthrough.store.base import Backend, replace_file
from passthrough.store.flight import Flight
from passthrough.store.layout import UPLOAD_ID_RE, content_key

READ_CHUNK = 1 << 20


@dataclass(frozen=True)
class UploadState:
    """One session: its repository, how many bytes it holds, when it began."""

    id: str
    repository: str
    size: int
    started: float
    #: When the last chunk arrived (gc leaves sessions in progress alone).
    updated: float


class Uploads(ABC):
    """Upload sessions over one backend."""

    #: The smallest chunk a client may send (OCI-Chunk-Min-Length), 0 for any.
    min_chunk: int = 0

    def __init__(self, backend: Backend, flight: Flight) -> None:
        self.backend = backend
        self.flight = flight
        #: Hashes this process carried along: id → (size hashed, hasher).
        self._hashes: dict[str, tuple[int, hashlib._Hash]] = {}
        self._hashes_lock = threading.Lock()

    @staticmethod
    def check_id(upload_id: str) -> str:
        if not UPLOAD_ID_RE.fullmatch(upload_id):
            raise UploadUnknown("no such upload session")
        return upload_id

    @contextlib.contextmanager
    def session(self, upload_id: str) -> Iterator[None]:
        """One request at a time per session (a flock, and the Redis lease across
        replicas)."""
        with self.flight.hold(layout.upload_lock(self.check_id(upload_id))):
            yield

    # -- the hash carried along ---------------------------------------------------------

    def _hash_continue(self, upload_id: str, offset: int) -> hashlib._Hash | None:
        with self._hashes_lock:
            known = self._hashes.pop(upload_id, None)
        if known is None:
            return hashlib.sha256() if offset == 0 else None
        size, hasher = known
        return hasher if size == offset else None

    def _hash_keep(self, upload_id: str, size: int, hasher: hashlib._Hash | None) -> None:
        if hasher is None:
            return
        with self._hashes_lock:
            if len(self._hashes) > 1000:
                self._hashes.clear()
            self._hashes[upload_id] = (size, hasher)

    def _hash_take(self, upload_id: str, size: int) -> str | None:
        with self._hashes_lock:
            known = self._hashes.pop(upload_id, None)
        if known is None or known[0] != size:
            return None
        return "sha256:" + known[1].hexdigest()

    # -- what each backend does -----------------------------------------------------------

    @abstractmethod
    def create(self, repository: str) -> UploadState: ...

    @abstractmethod
    def get(self, upload_id: str) -> UploadState | None: ...

    @abstractmethod
    def append(self, upload_id: str, offset: int, chunks: Iterator[bytes]) -> UploadState:
        """Add bytes at ``offset``, which must be the session's size (else 416)."""

    @abstractmethod
    def commit(self, upload_id: str, digest: str) -> int:
        """Verify the session's bytes against ``digest`` and make them that blob;
        returns the size. The session is gone afterwards, whatever the outcome."""

    @abstractmethod
    def cancel(self, upload_id: str) -> None: ...

    @abstractmethod
    def list(self) -> Iterator[UploadState]: ...


def new_upload_id() -> str:
    return secrets.token_hex(16)


def check_offset(state: UploadState, offset: int) -> None:
    """A chunk must start at the session's end (else the spec's 416)."""
    if offset != state.size:
        end = max(state.size - 1, 0)
        raise UploadInvalid(
            f"the chunk starts at byte {offset}, the session holds {state.size}",
            status=416,
            headers={"Range": f"0-{end}", "Docker-Upload-UUID": state.id},
        )


class FilesystemUploads(Uploads):
    """``uploads/<id>/state.json`` and ``uploads/<id>/data`` beside the store's other
    directories (the same filesystem: the commit is a rename)."""

    def __init__(self, backend: Backend, flight: Flight, root: Path) -> None:
        super().__init__(backend, flight)
        self.store_root = root
        self.root = root / layout.UPLOADS
        self.root.mkdir(parents=True, exist_ok=True)

    def _dir(self, upload_id: str) -> Path:
        return self.store_root / layout.upload_prefix(self.check_id(upload_id))

    def _state(self, upload_id: str) -> Path:
        return self.store_root / layout.upload_state_key(self.check_id(upload_id))

    def _data(self, upload_id: str) -> Path:
        return self.store_root / layout.upload_data_key(self.check_id(upload_id))

    def _write_state(self, state: UploadState, hashed: str | None = None) -> None:
        """``hashed``: the digest of the session's first ``state.size`` bytes, when the
        append that wrote them saw them all."""
        document: dict[str, object] = dict(asdict(state))
        if hashed is not None:
            document["hashed"] = {"size": state.size, "digest": hashed}
        replace_file(self._state(state.id), json.dumps(document).encode())

    def _recorded_digest(self, upload_id: str, size: int) -> str | None:
        """The digest an append recorded, if it covers exactly ``size`` bytes: a client
        whose closing PUT reaches another worker than its PATCH (a keep-alive pool picks
        any idle connection) is then not made to wait for a pass over the whole blob."""
        try:
            document = json.loads(self._state(upload_id).read_text())
            hashed = document.get("hashed")
            if isinstance(hashed, dict) and hashed.get("size") == size:
                digest = hashed.get("digest")
                return digest if isinstance(digest, str) else None
        except (OSError, ValueError, AttributeError):
            pass
        return None

    def create(self, repository: str) -> UploadState:
        upload_id = new_upload_id()
        now = time.time()
        state = UploadState(upload_id, repository, 0, now, now)
        try:
            directory = self._dir(upload_id)
            directory.mkdir()
            self._data(upload_id).touch()
            self._write_state(state)
        except OSError as exc:
            shutil.rmtree(self._dir(upload_id), ignore_errors=True)
            raise disk_full() if is_disk_full(exc) else exc from None
        return state

    def get(self, upload_id: str) -> UploadState | None:
        try:
            document = json.loads(self._state(upload_id).read_text())
            document.pop("hashed", None)
            state = UploadState(**document)
            state = UploadState(
                state.id,
                state.repository,
                self._data(upload_id).stat().st_size,
                state.started,
                state.updated,
            )
        except (OSError, ValueError, TypeError, AttributeError):
            return None
        return state

    def append(self, upload_id: str, offset: int, chunks: Iterator[bytes]) -> UploadState:
        state = self.get(upload_id)
        if state is None:
            raise UploadUnknown("no such upload session")
        check_offset(state, offset)
        hasher = self._hash_continue(upload_id, offset)
        path = self._data(upload_id)
        size = offset
        try:
            with path.open("r+b") as handle:
                handle.seek(offset)
                try:
                    for chunk in chunks:
                        handle.write(chunk)
                        if hasher is not None:
                            hasher.update(chunk)
                        size += len(chunk)
                except BaseException:
                    # A chunk that did not arrive whole leaves the session as it was.
                    handle.truncate(offset)
                    raise
                handle.truncate(size)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.truncate(path, offset)
            raise disk_full() if is_disk_full(exc) else exc from None
        updated = UploadState(state.id, state.repository, size, state.started, time.time())
        # hexdigest() leaves the hasher as it was: the next append goes on with it.
        self._write_state(updated, None if hasher is None else "sha256:" + hasher.hexdigest())
        self._hash_keep(upload_id, size, hasher)
        return updated

    def commit(self, upload_id: str, digest: str) -> int:
        state = self.get(upload_id)
        if state is None:
            raise UploadUnknown("no such upload session")
        path = self._data(upload_id)
        try:
            actual = self._hash_take(upload_id, state.size)
            if actual is None:
                actual = self._recorded_digest(upload_id, state.size)
            with path.open("rb") as handle:
                if actual is None:
                    hasher = hashlib.sha256()
                    while chunk := handle.read(4 * READ_CHUNK):
                        hasher.update(chunk)
                    actual = "sha256:" + hasher.hexdigest()
                if actual != digest:
                    raise DigestMismatch(
                        f"the uploaded content is {actual}, not the digest given {digest}"
                    )
                self.backend.commit_file(content_key("blobs", digest), handle, path, state.size)
        finally:
            self.cancel(upload_id)
        return state.size

    def cancel(self, upload_id: str) -> None:
        with self._hashes_lock:
            self._hashes.pop(upload_id, None)
        shutil.rmtree(self._dir(upload_id), ignore_errors=True)

    def list(self) -> Iterator[UploadState]:
        for entry in sorted(self.root.iterdir()) if self.root.is_dir() else []:
            if UPLOAD_ID_RE.fullmatch(entry.name):
                state = self.get(entry.name)
                if state is not None:
                    yield state
