"""The filesystem upload sessions' recorded digest: a closing PUT that reaches another
worker process than the PATCH that sent the bytes (a second FilesystemUploads over the
same directory, with none of the first's in-memory hashes) commits on the digest the
append recorded instead of a pass over the stored bytes, and falls back to that pass
whenever the record does not cover exactly the bytes stored."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from passthrough.errors import DigestMismatch
from passthrough.store.filesystem import FilesystemBackend
from passthrough.store.flight import Flight
from passthrough.store.layout import content_key
from passthrough.store.uploads import FilesystemUploads
from tests.support.helpers import digest


def worker(root: Path) -> FilesystemUploads:
    """What one gunicorn worker holds: its own backend, lock and in-memory hashes."""
    backend = FilesystemBackend(root)
    return FilesystemUploads(backend, Flight(root / "locks"), root)


class CountingUploads(FilesystemUploads):
    """A fresh worker (no hash in memory) that counts its commits falling back to a pass
    over the stored bytes: those for which no record covers exactly the bytes stored."""

    def __init__(self, root: Path) -> None:
        super().__init__(FilesystemBackend(root), Flight(root / "locks"), root)
        self.hash_passes = 0

    def _recorded_digest(self, upload_id: str, size: int) -> str | None:
        found = super()._recorded_digest(upload_id, size)
        if found is None:
            self.hash_passes += 1
        return found


def blob_path(root: Path, data: bytes) -> Path:
    """Where the filesystem store keeps a committed blob (``<hex>-<size>``)."""
    return root / "blobs/sha256" / f"{digest(data).split(':')[1]}-{len(data)}"


def stored(root: Path, data: bytes) -> bytes:
    assert FilesystemBackend(root).size(content_key("blobs", digest(data))) == len(data)
    return blob_path(root, data).read_bytes()


def state_document(root: Path, upload_id: str) -> dict[str, object]:
    document: dict[str, object] = json.loads(
        (root / "uploads" / upload_id / "state.json").read_text()
    )
    return document


def test_commit_in_another_worker_uses_the_recorded_digest(tmp_path: Path) -> None:
    data = b"layer bytes " * 5000
    first = worker(tmp_path)
    session = first.create("team/app")
    first.append(session.id, 0, iter([data[:7000], data[7000:]]))
    assert state_document(tmp_path, session.id)["hashed"] == {
        "size": len(data),
        "digest": digest(data),
    }

    second = CountingUploads(tmp_path)
    assert second.get(session.id) is not None  # the record does not upset the state
    assert second.commit(session.id, digest(data)) == len(data)
    assert second.hash_passes == 0
    assert stored(tmp_path, data) == data
    assert second.get(session.id) is None


def test_the_record_follows_every_append_the_hash_saw(tmp_path: Path) -> None:
    data = b"0123456789" * 1000
    uploads = worker(tmp_path)
    session = uploads.create("team/app")
    uploads.append(session.id, 0, iter([data[:4000]]))
    uploads.append(session.id, 4000, iter([data[4000:]]))
    assert state_document(tmp_path, session.id)["hashed"] == {
        "size": len(data),
        "digest": digest(data),
    }
    other = CountingUploads(tmp_path)
    assert other.commit(session.id, digest(data)) == len(data)
    assert other.hash_passes == 0


def test_an_append_without_the_hash_drops_the_record(tmp_path: Path) -> None:
    """A chunk appended by a worker that did not see the earlier ones cannot extend the
    digest: the commit hashes the stored bytes, and still verifies them."""
    data = b"abcdefgh" * 2000
    first = worker(tmp_path)
    session = first.create("team/app")
    first.append(session.id, 0, iter([data[:5000]]))
    second = worker(tmp_path)
    second.append(session.id, 5000, iter([data[5000:]]))
    assert "hashed" not in state_document(tmp_path, session.id)

    third = CountingUploads(tmp_path)
    assert third.commit(session.id, digest(data)) == len(data)
    assert third.hash_passes == 1
    assert stored(tmp_path, data) == data


def test_a_record_of_other_bytes_is_not_trusted_by_size(tmp_path: Path) -> None:
    """The record names the size it covers: bytes added behind its back (here, straight
    into the data file) send the commit back to a pass, which finds the truth."""
    data = b"payload" * 1000
    first = worker(tmp_path)
    session = first.create("team/app")
    first.append(session.id, 0, iter([data]))
    with (tmp_path / "uploads" / session.id / "data").open("ab") as handle:
        handle.write(b"extra")

    second = CountingUploads(tmp_path)
    with pytest.raises(DigestMismatch):
        second.commit(session.id, digest(data))
    assert second.hash_passes == 1
    assert FilesystemBackend(tmp_path).size(content_key("blobs", digest(data))) is None


def test_a_wrong_digest_is_refused_on_the_record_too(tmp_path: Path) -> None:
    data = b"the real bytes" * 100
    first = worker(tmp_path)
    session = first.create("team/app")
    first.append(session.id, 0, iter([data]))
    second = CountingUploads(tmp_path)
    with pytest.raises(DigestMismatch):
        second.commit(session.id, digest(b"other bytes"))
    assert second.hash_passes == 0
    assert second.get(session.id) is None


def test_a_damaged_state_file_is_no_session(tmp_path: Path) -> None:
    uploads = worker(tmp_path)
    session = uploads.create("team/app")
    (tmp_path / "uploads" / session.id / "state.json").write_text("[1, 2]")
    assert uploads.get(session.id) is None
