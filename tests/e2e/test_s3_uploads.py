"""Blob upload sessions on the S3 store (passthrough.store.s3_uploads) against SeaweedFS:
chunks of any size, the 416 for a chunk out of order, the digest check before anything
is visible, sessions shared by separate processes ("replicas"), SIGKILL in the middle of
an append or a commit, cancel, list, and a store that fills or fails.

The replicas are tests/support/upload_worker.py processes, each with its own temp and
lock directory, on one bucket and prefix.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import botocore.awsrequest
import pytest

from passthrough.errors import (
    DigestMismatch,
    InsufficientStorage,
    StoreUnavailable,
    UploadInvalid,
    UploadUnknown,
)
from passthrough.store.content import open_uploads
from passthrough.store.flight import Flight
from passthrough.store.layout import content_key
from passthrough.store.s3 import S3Backend
from passthrough.store.s3_uploads import MIN_PART, PART_SIZE, S3Uploads, Session
from tests.support.helpers import digest as digest_of
from tests.support.seaweed import SeaweedS3
from tests.support.server import REPO_ROOT
from tests.support.upload_worker import CountingUploads, chunked, payload

KiB, MiB = 1 << 10, 1 << 20


class Store:
    """One bucket and prefix, with this process's S3Uploads on it and ways to look."""

    def __init__(self, seaweed: SeaweedS3, bucket: str, tmp: Path) -> None:
        self.seaweed = seaweed
        self.bucket = bucket
        self.prefix = f"up-{uuid.uuid4().hex[:8]}/"
        self.tmp = tmp
        self.backend = S3Backend(
            bucket,
            self.prefix,
            endpoint_url=seaweed.endpoint_url,
            region=seaweed.region,
            temp_dir=str(tmp / "here"),
        )
        self.uploads = self.instance()

    def instance(self) -> CountingUploads:
        """Another S3Uploads on the same backend: no hash carried over."""
        return CountingUploads(self.backend, Flight(self.backend.lock_dir()))

    def keys(self, under: str = "") -> list[str]:
        return sorted(item.key for item in self.backend.list(under))

    def multiparts(self) -> list[str]:
        answer = self.seaweed.client().list_multipart_uploads(
            Bucket=self.bucket, Prefix=self.prefix
        )
        return [upload["Key"] for upload in answer.get("Uploads", [])]

    def blob(self, digest: str) -> bytes | None:
        return self.backend.get_bytes(content_key("blobs", digest))

    def state(self, upload_id: str) -> dict[str, Any]:
        data = self.backend.get_bytes(f"uploads/{upload_id}/state.json")
        assert data is not None
        document: dict[str, Any] = json.loads(data)
        return document

    def assert_clean(self) -> None:
        """No session object and no multipart upload left under the prefix."""
        assert self.keys("uploads/") == []
        assert self.multiparts() == []


@pytest.fixture
def store(
    seaweed: SeaweedS3, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Store]:
    # The AWS chain reads them, as in a pod.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweed.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweed.secret_key)
    CountingUploads.read_backs = 0
    made = Store(seaweed, s3_bucket, tmp_path)
    yield made
    made.backend.close()


def append(uploads: S3Uploads, upload_id: str, offset: int, data: bytes, piece: int = 64 * KiB):
    """One PATCH: the body arrives in pieces, as from the WSGI stream."""
    with uploads.session(upload_id):
        return uploads.append(upload_id, offset, chunked(data, piece))


def commit(uploads: S3Uploads, upload_id: str, digest: str) -> int:
    with uploads.session(upload_id):
        return uploads.commit(upload_id, digest)


# --- chunk sizes ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size", [0, 1, 100 * KiB, MIN_PART - 1, MIN_PART, 17 * MiB], ids=lambda s: f"{s}B"
)
def test_one_chunk_of_any_size_becomes_the_blob(store: Store, size: int) -> None:
    uploads = open_uploads(store.backend, Flight(store.backend.lock_dir()))
    assert isinstance(uploads, S3Uploads) and uploads.min_chunk == 0
    data = payload(size, size)
    state = uploads.create("hosted/app")
    assert append(uploads, state.id, 0, data).size == size
    assert commit(uploads, state.id, digest_of(data)) == size
    assert store.blob(digest_of(data)) == data
    assert uploads.get(state.id) is None
    store.assert_clean()


def test_chunks_of_every_size_in_one_session(store: Store) -> None:
    """1 B, 100 KiB, 5 MiB − 1, 5 MiB, 17 MiB, then one 40 MiB stream: every part S3 got
    is between 5 and 16 MiB (SeaweedFS refuses a completion with a smaller one), the tail
    waits in the pending object, and the carried hash spares the read-back."""
    uploads = store.uploads
    sizes = [1, 100 * KiB, MIN_PART - 1, MIN_PART, 17 * MiB, 40 * MiB]
    state = uploads.create("hosted/app")
    whole = b""
    for index, size in enumerate(sizes):
        data = payload(100 + index, size)
        answered = append(uploads, state.id, len(whole), data)
        whole += data
        assert answered.size == len(whole) == uploads.get(state.id).size  # type: ignore[union-attr]
        recorded = store.state(state.id)
        assert all(MIN_PART <= part["size"] <= PART_SIZE for part in recorded["parts"])
        assert recorded["pending"] < MIN_PART
        assert sum(p["size"] for p in recorded["parts"]) + recorded["pending"] == len(whole)
    # One pending generation at a time: the older ones are removed as the state moves on.
    assert [k for k in store.keys("uploads/") if "/pending." in k] == (
        [f"uploads/{state.id}/pending.{recorded['generation']}"] if recorded["pending"] else []
    )
    assert commit(uploads, state.id, digest_of(whole)) == len(whole)
    assert CountingUploads.read_backs == 0
    assert store.blob(digest_of(whole)) == whole
    store.assert_clean()


def test_a_chunk_out_of_order_is_416_with_the_range(store: Store) -> None:
    uploads = store.uploads
    state = uploads.create("hosted/app")
    with pytest.raises(UploadInvalid) as empty:
        append(uploads, state.id, 5, b"x")
    assert empty.value.status == 416 and empty.value.headers["Range"] == "0-0"
    append(uploads, state.id, 0, b"0123456789")
    for offset in (0, 9, 11):
        with pytest.raises(UploadInvalid) as refused:
            append(uploads, state.id, offset, b"x")
        assert refused.value.status == 416
        assert refused.value.headers == {"Range": "0-9", "Docker-Upload-UUID": state.id}
    assert uploads.get(state.id).size == 10  # type: ignore[union-attr]
    append(uploads, state.id, 10, b"ab")
    assert commit(uploads, state.id, digest_of(b"0123456789ab")) == 12


@pytest.mark.parametrize("size", [3 * MiB, 21 * MiB], ids=["pending-only", "multipart"])
def test_a_wrong_digest_leaves_nothing(store: Store, size: int) -> None:
    uploads = store.uploads
    data = payload(7, size)
    state = uploads.create("hosted/app")
    append(uploads, state.id, 0, data)
    wrong = digest_of(data + b"!")
    with pytest.raises(DigestMismatch) as refused:
        commit(uploads, state.id, wrong)
    assert digest_of(data) in refused.value.message and wrong in refused.value.message
    assert store.keys("blobs/") == []
    assert uploads.get(state.id) is None
    store.assert_clean()
    with pytest.raises(UploadUnknown):
        commit(uploads, state.id, digest_of(data))


# --- the carried hash and the read-back ------------------------------------------------------


@pytest.mark.parametrize("size", [2 * MiB, 18 * MiB], ids=["pending-only", "multipart"])
def test_another_instance_commits_with_the_digest_the_state_records(
    store: Store, size: int
) -> None:
    """The instance that appended every byte records their digest in the state: a commit
    elsewhere (another replica, or after a restart) needs no read-back."""
    data = payload(11, size)
    state = store.uploads.create("hosted/app")
    append(store.uploads, state.id, 0, data[: size // 2])
    append(store.uploads, state.id, size // 2, data[size // 2 :])
    assert store.state(state.id)["sha256"] == digest_of(data)
    assert commit(store.instance(), state.id, digest_of(data)) == size
    assert store.blob(digest_of(data)) == data
    assert CountingUploads.read_backs == 0


@pytest.mark.parametrize("size", [2 * MiB, 18 * MiB], ids=["pending-only", "multipart"])
def test_chunks_from_two_instances_are_read_back(store: Store, size: int) -> None:
    """The second instance did not see the first half: no digest is recorded, and the
    commit hashes what S3 holds (streamed back from the assembled object; the bytes in
    hand when there is no part)."""
    data = payload(13, size)
    state = store.uploads.create("hosted/app")
    append(store.uploads, state.id, 0, data[: size // 2])
    append(store.instance(), state.id, size // 2, data[size // 2 :])
    assert store.state(state.id)["sha256"] == ""
    assert commit(store.instance(), state.id, digest_of(data)) == size
    assert store.blob(digest_of(data)) == data
    assert CountingUploads.read_backs == (1 if size > MIN_PART else 0)
    store.assert_clean()


def test_the_read_back_catches_an_object_changed_in_the_bucket(store: Store) -> None:
    """What the digest is checked against is what S3 holds: here the object a killed
    commit had assembled is altered before the retry."""
    data = payload(12, 17 * MiB)
    state = store.uploads.create("hosted/app")
    append(store.uploads, state.id, 0, data[:MiB])
    append(store.instance(), state.id, MiB, data[MiB:])
    session = Session.from_json(json.dumps(store.state(state.id)).encode())
    assert session is not None
    store.uploads._complete(session)  # what a commit killed after the completion did
    store.backend.put_bytes(f"uploads/{state.id}/data", bytes(len(data)))  # same size, zeros
    with pytest.raises(DigestMismatch):
        commit(store.instance(), state.id, digest_of(data))
    assert CountingUploads.read_backs == 1
    assert store.keys("blobs/") == []
    store.assert_clean()


def test_pending_bytes_changed_in_the_bucket_are_refused(store: Store) -> None:
    """The pending tail goes up again as a part: bytes that are not the ones stored (their
    MD5 is in the state) stop the commit, whatever hash was carried along."""
    data = payload(14, 17 * MiB)
    state = store.uploads.create("hosted/app")
    append(store.uploads, state.id, 0, data)
    recorded = store.state(state.id)
    pending_key = f"uploads/{state.id}/pending.{recorded['generation']}"
    store.backend.put_bytes(pending_key, bytes(recorded["pending"]))  # same length, zeros
    with pytest.raises(StoreUnavailable) as refused:
        commit(store.uploads, state.id, digest_of(data))
    assert store.backend.describe() in refused.value.message
    assert "pending bytes" in refused.value.message
    assert store.keys("blobs/") == []
    store.assert_clean()


# --- replicas: separate processes on one bucket ----------------------------------------------


class Replica:
    """An upload_worker process: one request line in, one answer line out."""

    def __init__(self, store: Store, name: str) -> None:
        workdir = store.tmp / name
        workdir.mkdir()
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO_ROOT),
            "AWS_ACCESS_KEY_ID": store.seaweed.access_key,
            "AWS_SECRET_ACCESS_KEY": store.seaweed.secret_key,
        }
        args = [store.bucket, store.prefix, store.seaweed.endpoint_url, store.seaweed.region]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.support.upload_worker", *args, str(workdir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=REPO_ROOT,
            env=env,
            text=True,
        )

    def send(self, **request: Any) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()

    def answer(self, timeout: float = 120.0) -> dict[str, Any] | None:
        """The next answer, or None when the process ended without one."""
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        assert ready, "the replica did not answer"
        line = self.process.stdout.readline()
        if not line:
            return None
        document: dict[str, Any] = json.loads(line)
        return document

    def ask(self, **request: Any) -> dict[str, Any]:
        self.send(**request)
        answer = self.answer()
        assert answer is not None and "error" not in answer, answer
        return answer

    def sigkill(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)
        assert self.process.wait(timeout=30) == -signal.SIGKILL

    def close(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


@pytest.fixture
def replicas(store: Store) -> Iterator[tuple[Replica, Replica]]:
    pair = (Replica(store, "replica-a"), Replica(store, "replica-b"))
    yield pair
    for replica in pair:
        replica.close()


def test_two_replicas_take_turns_on_one_session(
    store: Store, replicas: tuple[Replica, Replica]
) -> None:
    """No stickiness: each chunk goes to whichever replica, and the one that commits
    reads the bytes back, since it did not see them all."""
    a, b = replicas
    upload_id = a.ask(op="create", repository="hosted/app")["id"]
    turns = [(a, 7 * MiB), (b, MIN_PART - 1), (a, 1), (b, 20 * MiB), (a, 300 * KiB)]
    whole = b""
    for seed, (replica, size) in enumerate(turns):
        answer = replica.ask(op="append", id=upload_id, offset=len(whole), seed=seed, size=size)
        whole += payload(seed, size)
        assert answer["size"] == len(whole)
    assert b.ask(op="get", id=upload_id)["size"] == len(whole)
    assert a.ask(op="commit", id=upload_id, digest=digest_of(whole)) == {
        "size": len(whole),
        "read_backs": 1,
    }
    assert store.blob(digest_of(whole)) == whole
    store.assert_clean()


@pytest.mark.parametrize("first_size", [3 * MiB, 10 * MiB], ids=["pending", "one-part"])
def test_a_replica_killed_mid_append_leaves_no_blob_and_the_session_goes_on(
    store: Store, replicas: tuple[Replica, Replica], first_size: int
) -> None:
    """SIGKILL while a 50 MiB chunk streams in, after two of its parts went to S3: the
    session still says where it was, another replica takes the chunk again from there,
    and the parts the dead one cut (and the tail it never stored) matter nowhere. After
    a first chunk under 5 MiB, the dead one had started the multipart upload itself and
    never recorded it: it is aborted with the session all the same."""
    a, b = replicas
    upload_id = a.ask(op="create", repository="hosted/app")["id"]
    first = payload(1, first_size)
    a.ask(op="append", id=upload_id, offset=0, seed=1, size=len(first))
    a.send(
        op="append", id=upload_id, offset=len(first), seed=2, size=50 * MiB, stall_after=40 * MiB
    )
    assert a.answer() == {"stalled": True, "read_backs": 0}
    a.sigkill()
    assert store.keys("blobs/") == []
    assert len(store.multiparts()) == 1
    assert b.ask(op="get", id=upload_id)["size"] == len(first)
    b.ask(op="append", id=upload_id, offset=len(first), seed=2, size=50 * MiB)
    whole = first + payload(2, 50 * MiB)
    assert b.ask(op="commit", id=upload_id, digest=digest_of(whole))["size"] == len(whole)
    assert store.blob(digest_of(whole)) == whole
    store.assert_clean()


@pytest.mark.parametrize("after", ["UploadPart", "CompleteMultipartUpload", "CopyObject"])
def test_a_replica_killed_mid_commit_leaves_nothing_unverified_and_the_retry_succeeds(
    store: Store, replicas: tuple[Replica, Replica], after: str
) -> None:
    """SIGKILL right after the commit's last part, its completion, or its copy: the blob
    is visible only once verified (after the copy, which follows the check), and the
    client's retry of the PUT, on another replica, commits it."""
    a, b = replicas
    whole = payload(3, 18 * MiB)  # a 16 MiB part and a 2 MiB tail the commit uploads
    upload_id = a.ask(op="create", repository="hosted/app")["id"]
    a.ask(op="append", id=upload_id, offset=0, seed=3, size=len(whole))
    a.send(op="commit", id=upload_id, digest=digest_of(whole), kill_after=after)
    assert a.answer() is None
    assert a.process.wait(timeout=30) == -signal.SIGKILL
    assert store.blob(digest_of(whole)) == (whole if after == "CopyObject" else None)
    assert b.ask(op="commit", id=upload_id, digest=digest_of(whole))["size"] == len(whole)
    assert store.blob(digest_of(whole)) == whole
    store.assert_clean()


# --- cancel and list -------------------------------------------------------------------------


def test_cancel_aborts_the_parts_and_removes_the_session(store: Store) -> None:
    uploads = store.uploads
    state = uploads.create("hosted/app")
    append(uploads, state.id, 0, payload(4, 19 * MiB))
    assert store.multiparts() and store.keys("uploads/")
    with uploads.session(state.id):
        uploads.cancel(state.id)
    assert uploads.get(state.id) is None
    store.assert_clean()
    with pytest.raises(UploadUnknown):
        append(uploads, state.id, 19 * MiB, b"x")
    with pytest.raises(UploadUnknown):
        commit(uploads, state.id, digest_of(b""))


def test_list_gives_every_session_with_its_size_and_times(store: Store) -> None:
    uploads = store.uploads
    states = [uploads.create(f"hosted/app{n}") for n in range(3)]
    append(uploads, states[1].id, 0, b"12345")
    listed = {state.id: state for state in uploads.list()}
    assert set(listed) == {state.id for state in states}
    assert listed[states[1].id].size == 5 and listed[states[0].id].size == 0
    assert listed[states[1].id].repository == "hosted/app1"
    assert listed[states[1].id].updated >= listed[states[1].id].started
    uploads.cancel(states[0].id)
    assert {state.id for state in uploads.list()} == {states[1].id, states[2].id}


# --- when S3 fills or fails ------------------------------------------------------------------


class _Body:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self.data


def test_a_quota_answer_is_507_naming_the_store_and_leaves_nothing(store: Store) -> None:
    """S3 answering QuotaExceeded to a part (as AWS, MinIO or Ceph do over a quota): the
    client gets a 507 that names the S3 store, and the session is gone with its parts."""
    uploads = store.uploads
    state = uploads.create("hosted/app")
    append(uploads, state.id, 0, payload(5, 3 * MiB))

    def quota(request: botocore.awsrequest.AWSPreparedRequest, **_: Any) -> Any:
        body = b"<Error><Code>QuotaExceeded</Code><Message>bucket quota</Message></Error>"
        return botocore.awsrequest.AWSResponse(request.url, 403, {}, _Body(body))

    store.backend.client.meta.events.register("before-send.s3.UploadPart", quota)
    with pytest.raises(InsufficientStorage) as full:
        append(uploads, state.id, 3 * MiB, payload(6, 20 * MiB))
    assert full.value.status == 507
    assert store.backend.describe() in full.value.message and "QuotaExceeded" in full.value.message
    assert "discarded" in full.value.message
    store.backend.client.meta.events.unregister("before-send.s3.UploadPart", quota)
    assert uploads.get(state.id) is None
    assert store.keys() == []
    store.assert_clean()


@pytest.mark.rig
def test_a_store_that_fills_mid_upload_answers_naming_it_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SeaweedFS with room for about one part: the append that overflows it fails with
    an error naming the S3 store (SeaweedFS says InternalError, not a quota code), the
    session is discarded, and no object or multipart upload is left behind."""
    with SeaweedS3(volume_size_limit_mb=4, max_volumes=2) as small:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", small.access_key)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", small.secret_key)
        store = Store(small, small.create_bucket(), tmp_path)
        uploads = store.uploads
        state = uploads.create("hosted/app")
        with pytest.raises(StoreUnavailable) as failed:
            append(uploads, state.id, 0, payload(8, 40 * MiB))
        assert failed.value.status == 503
        assert store.backend.describe() in failed.value.message
        assert "discarded" in failed.value.message
        assert uploads.get(state.id) is None
        assert store.keys() == []
        store.assert_clean()
        store.backend.close()


def test_a_session_whose_parts_s3_aborted_is_unknown(store: Store) -> None:
    """The lifecycle rule aborts incomplete multipart uploads a day after they began:
    the session then says so (404 BLOB_UPLOAD_UNKNOWN) and is removed."""
    uploads = store.uploads
    state = uploads.create("hosted/app")
    append(uploads, state.id, 0, payload(9, 17 * MiB))
    multipart = store.state(state.id)["multipart"]
    store.seaweed.client().abort_multipart_upload(
        Bucket=store.bucket, Key=f"{store.prefix}uploads/{state.id}/data", UploadId=multipart
    )
    with pytest.raises(UploadUnknown) as gone:
        append(uploads, state.id, 17 * MiB, payload(10, 17 * MiB))
    assert gone.value.status == 404 and "a day" in gone.value.message
    assert uploads.get(state.id) is None
    store.assert_clean()


def test_s3_down_is_503_naming_the_store_and_the_session_survives(store: Store) -> None:
    uploads = store.uploads
    state = uploads.create("hosted/app")
    append(uploads, state.id, 0, b"abc")
    store.seaweed.stop()
    try:
        with pytest.raises(StoreUnavailable) as down:
            append(uploads, state.id, 3, b"def")
        assert down.value.status == 503 and store.backend.describe() in down.value.message
        assert store.seaweed.secret_key not in down.value.message
    finally:
        store.seaweed.start()
    # The state was never touched: the session goes on where it was.
    append(uploads, state.id, 3, b"def")
    assert commit(uploads, state.id, digest_of(b"abcdef")) == 6
