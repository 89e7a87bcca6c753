"""The store backend contract (:class:`passthrough.store.base.Backend`), written once and
run against every backend, as CNCF distribution's storage driver test suite is: on the
filesystem in the fast tier (tests/unit/test_store_contract.py), on S3 (SeaweedFS) in
the full tier (tests/e2e/test_store_contract_s3.py).

A module that star-imports this one provides a ``kit`` fixture
(:class:`tests.support.stores.BackendKit`, parametrized by backend factory) and gets
every test below. What the content store builds on a backend (verified documents,
pins, eviction, tag records, upload sessions) is checked here too, since each of those
is written once for every backend.
"""

from __future__ import annotations

import hashlib
import threading

import pytest
import requests

from passthrough.errors import DigestMismatch
from passthrough.store import layout
from passthrough.store.content import ContentStore, open_uploads
from passthrough.store.flight import Flight
from tests.support.stores import BackendKit

__all__ = [
    "test_a_file_staged_but_not_committed_is_never_visible",
    "test_a_missing_key_is_none_everywhere",
    "test_an_upload_with_a_wrong_digest_is_never_committed",
    "test_commit_makes_a_staged_file_visible_whole_and_reads_by_range",
    "test_documents_are_verified_and_a_wrong_digest_is_never_committed",
    "test_eviction_takes_the_oldest_first_never_a_pinned_entry",
    "test_listing_is_by_key_prefix",
    "test_presigned_urls_where_the_backend_has_them",
    "test_put_replaces_atomically",
    "test_small_objects_put_get_list_delete",
    "test_tag_records_round_trip",
    "test_the_backend_answers_its_probe",
]

DATA = b"contract " * 1000


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def store_on(kit: BackendKit, max_bytes: int = 0) -> ContentStore:
    return ContentStore(kit.backend, max_bytes, Flight(kit.backend.lock_dir()))


def test_a_missing_key_is_none_everywhere(kit: BackendKit) -> None:
    backend = kit.backend
    key = layout.content_key("blobs", digest(b"never stored"))
    assert backend.size(key) is None
    assert backend.open(key, digest(b"never stored")) is None
    assert backend.get_bytes(key) is None
    assert backend.get_bytes("tags/none.json") is None
    assert list(backend.list(layout.HOSTED)) == []
    backend.delete(key)  # no error: already gone
    backend.delete("tags/none.json")


def test_small_objects_put_get_list_delete(kit: BackendKit) -> None:
    backend = kit.backend
    key = layout.hosted_tag_key("team/app", "v1")
    backend.put_bytes(key, b'{"digest": "x"}')
    assert backend.get_bytes(key) == b'{"digest": "x"}'
    assert backend.size(key) == len(b'{"digest": "x"}')
    [info] = backend.list(layout.hosted_prefix("team/app"))
    assert (info.key, info.size) == (key, len(b'{"digest": "x"}'))
    assert info.last_used > 0
    backend.delete(key)
    assert backend.get_bytes(key) is None and backend.size(key) is None
    assert list(backend.list(layout.hosted_prefix("team/app"))) == []
    backend.delete(key)


def test_put_replaces_atomically(kit: BackendKit) -> None:
    """A reader sees the old object or the new one, never a part of either."""
    backend = kit.backend
    key = layout.upload_state_key("0" * 32)
    versions = [bytes([65 + n]) * (50_000 + n) for n in range(4)]
    backend.put_bytes(key, versions[0])
    seen: list[bytes | None] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            seen.append(backend.get_bytes(key))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for version in versions[1:] * 3:
            backend.put_bytes(key, version)
    finally:
        done.set()
        reader.join(60)
    assert seen and all(data in versions for data in seen)
    assert backend.get_bytes(key) == versions[-1]


def test_listing_is_by_key_prefix(kit: BackendKit) -> None:
    backend = kit.backend
    store = store_on(kit)
    keys = {
        layout.hosted_manifest_key("team/app", digest(b"m")),
        layout.hosted_blob_key("team/app/nested", digest(b"b")),
        layout.hosted_referrer_key("team/other", digest(b"s"), digest(b"r")),
        layout.tag_record_key(layout.tag_id("r", "team/app", "v1")),
    }
    for key in keys:
        backend.put_bytes(key, b"{}")
    store.put_document("blobs", digest(b"blob"), b"blob")
    store.put_document("manifests", digest(b"manifest"), b"manifest")
    store.pin("manifests", digest(b"manifest"))

    def listed(prefix: str) -> set[str]:
        return {info.key for info in backend.list(prefix)}

    assert listed(layout.HOSTED) == {k for k in keys if k.startswith(layout.HOSTED)}
    assert listed(layout.hosted_prefix("team/app")) == {
        layout.hosted_manifest_key("team/app", digest(b"m")),
        layout.hosted_blob_key("team/app/nested", digest(b"b")),
    }
    assert listed(layout.TAGS) == {k for k in keys if k.startswith(layout.TAGS)}
    assert listed(layout.content_prefix("blobs")) == {layout.content_key("blobs", digest(b"blob"))}
    assert listed(layout.content_prefix("layers")) == set()
    assert listed(layout.PINS) == {layout.pin_key("manifests", digest(b"manifest"))}
    # Content keys list as keys, whatever the backend's own names (sizes on disk).
    [info] = backend.list(layout.content_prefix("manifests"))
    assert layout.parse_content_key(info.key) == ("manifests", digest(b"manifest"))
    assert info.size == len(b"manifest")


def test_commit_makes_a_staged_file_visible_whole_and_reads_by_range(kit: BackendKit) -> None:
    backend = kit.backend
    key = layout.content_key("blobs", digest(DATA))
    path = backend.staging_dir() / layout.part_name("contract")
    with path.open("w+b") as handle:
        handle.write(DATA)
        handle.flush()
        backend.commit_file(key, handle, path, len(DATA))
        handle.seek(0)
        assert handle.read() == DATA  # still readable by the committer
    assert backend.size(key) == len(DATA)
    found = backend.open(key, digest(DATA))
    assert found is not None
    try:
        assert found.size == len(DATA)
        assert found.read_at(0, 9) == DATA[:9]
        assert found.read_at(4000, 1000) == DATA[4000:5000]  # forwards, a new offset
        assert found.read_at(10, 5) == DATA[10:15]  # backwards
        assert found.read_at(len(DATA) - 3, 100) == DATA[-3:]  # past the end: cut
        assert found.read_at(len(DATA), 10) == b""
    finally:
        found.close()
    assert backend.get_bytes(key) == DATA


def test_a_file_staged_but_not_committed_is_never_visible(kit: BackendKit) -> None:
    backend = kit.backend
    key = layout.content_key("blobs", digest(DATA))
    path = backend.staging_dir() / layout.part_name("contract")
    path.write_bytes(DATA[:100])  # a writer killed half way
    try:
        assert backend.size(key) is None and backend.open(key, None) is None
        assert list(backend.list(layout.content_prefix("blobs"))) == []
    finally:
        path.unlink()


def test_documents_are_verified_and_a_wrong_digest_is_never_committed(kit: BackendKit) -> None:
    store = store_on(kit)
    wrong = "sha256:" + "0" * 64
    store.put_document("blobs", wrong, b"not matching")
    assert store.get_document("blobs", wrong) is None
    assert kit.backend.size(layout.content_key("blobs", wrong)) is None
    assert list(kit.backend.staging_dir().iterdir()) == []
    store.put_document("manifests", digest(b"{}"), b"{}")
    assert store.get_document("manifests", digest(b"{}")) == b"{}"
    # Bytes that do not match their key (written behind the store's back) are removed
    # on reading, and counted as corrupt.
    kit.backend.put_bytes(layout.content_key("manifests", digest(b"[]")), b"tampered")
    assert store.get_document("manifests", digest(b"[]")) is None
    assert kit.backend.size(layout.content_key("manifests", digest(b"[]"))) is None
    assert store.stats.corrupt == 1


def test_eviction_takes_the_oldest_first_never_a_pinned_entry(kit: BackendKit) -> None:
    store = store_on(kit, max_bytes=3000)
    names = []
    for index in range(4):
        data = bytes([index]) * 1000
        store.put_document("blobs", digest(data), data)
        names.append(digest(data))
        kit.tick()
    store.pin("blobs", names[0])
    assert store.pinned() == {layout.content_key("blobs", names[0])}
    assert store.evict_if_needed() == 2
    assert store.get_document("blobs", names[0]) is not None  # oldest, but pinned
    assert store.get_document("blobs", names[1]) is None
    assert store.get_document("blobs", names[2]) is None
    assert store.get_document("blobs", names[3]) is not None
    assert sum(size for _, size, _ in store.entries()) == 2000
    store.unpin("blobs", names[0])
    assert store.pinned() == set()


def test_tag_records_round_trip(kit: BackendKit) -> None:
    store = store_on(kit)
    key = store.tag_key("https://registry", "team/app", "v1")
    assert store.recall_tag(key) is None
    store.remember_tag(key, {"digest": digest(b"m"), "media_type": "x"})
    assert store.recall_tag(key) == {"digest": digest(b"m"), "media_type": "x"}
    kit.backend.put_bytes(layout.tag_record_key(key), b"not json")
    assert store.recall_tag(key) is None


def test_an_upload_with_a_wrong_digest_is_never_committed(kit: BackendKit) -> None:
    uploads = open_uploads(kit.backend, Flight(kit.backend.lock_dir()))
    state = uploads.create("team/app")
    uploads.append(state.id, 0, iter([DATA[:5000], DATA[5000:]]))
    with pytest.raises(DigestMismatch):
        uploads.commit(state.id, digest(b"something else"))
    assert kit.backend.size(layout.content_key("blobs", digest(b"something else"))) is None
    assert kit.backend.size(layout.content_key("blobs", digest(DATA))) is None
    assert uploads.get(state.id) is None and list(uploads.list()) == []
    state = uploads.create("team/app")
    uploads.append(state.id, 0, iter([DATA]))
    assert [s.id for s in uploads.list()] == [state.id]
    assert uploads.commit(state.id, digest(DATA)) == len(DATA)
    assert kit.backend.get_bytes(layout.content_key("blobs", digest(DATA))) == DATA
    assert list(kit.backend.list(layout.UPLOADS)) == []


def test_presigned_urls_where_the_backend_has_them(kit: BackendKit) -> None:
    store = store_on(kit)
    store.put_document("blobs", digest(DATA), DATA)
    url = store.presigned_url("blobs", digest(DATA))
    if not kit.presigns:
        assert url is None
        return
    assert url is not None
    with requests.Session() as session:
        session.trust_env = False
        answer = session.get(url, timeout=10)
    assert answer.status_code == 200 and answer.content == DATA


def test_the_backend_answers_its_probe(kit: BackendKit) -> None:
    kit.backend.probe()
    assert list(kit.backend.staging_dir().iterdir()) == []
