"""The read-through of a blob (the /v2 proxy's tee) on a real filesystem store: one
fetch for every reader, readers stream before the end, the last byte only once the
digest is proven, and nothing unverified committed."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from passthrough.errors import (
    FetchFailed,
    TransferAborted,
    UpstreamInvalid,
    UpstreamNotFound,
    UpstreamUnreachable,
)
from passthrough.store.content import ContentStore
from passthrough.store.readthrough import BlobStream
from tests.support.helpers import digest as digest_of
from tests.support.stores import filesystem_store

CHUNK = 64 * 1024


class Upstream:
    """An opener whose bytes come out at a pace the test controls."""

    def __init__(self, data: bytes, *, sent: bytes | None = None, pause: float = 0.0,
                 break_at: int | None = None, gate: threading.Event | None = None) -> None:
        self.data = data
        self.sent = data if sent is None else sent
        self.pause = pause
        self.break_at = break_at
        self.gate = gate
        self.opened = 0
        self.lock = threading.Lock()

    def __call__(self) -> tuple[int, Iterator[bytes]]:
        with self.lock:
            self.opened += 1
        return len(self.data), self._chunks()

    def _chunks(self) -> Iterator[bytes]:
        for offset in range(0, len(self.sent), CHUNK):
            if self.break_at is not None and offset >= self.break_at:
                raise UpstreamUnreachable("the connection broke mid-blob")
            if self.gate is not None and offset >= len(self.sent) // 2:
                self.gate.wait(10)
            time.sleep(self.pause)
            yield self.sent[offset : offset + CHUNK]


def read_all(stream: BlobStream, start: int = 0, end: int | None = None) -> bytes:
    try:
        return b"".join(stream.chunks(start, end))
    finally:
        stream.close()


@pytest.fixture
def store(tmp_path: Path) -> ContentStore:
    return filesystem_store(tmp_path / "cache", 0)


def test_a_miss_is_fetched_once_and_committed(store: ContentStore) -> None:
    data = os.urandom(CHUNK * 10 + 7)
    upstream = Upstream(data)
    stream = store.read_through(digest_of(data), upstream)
    assert stream.source == "fetch" and stream.size == len(data)
    assert read_all(stream) == data
    deadline = time.monotonic() + 5
    while store.blob_size(digest_of(data)) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert store.blob_size(digest_of(data)) == len(data)
    again = store.read_through(digest_of(data), upstream)
    assert again.source == "store" and read_all(again) == data
    assert upstream.opened == 1


def test_concurrent_readers_share_one_fetch_and_stream_before_the_end(
    store: ContentStore,
) -> None:
    data = os.urandom(CHUNK * 40)
    gate = threading.Event()
    upstream = Upstream(data, gate=gate)
    results: dict[int, bytes] = {}
    first_bytes = threading.Barrier(9, timeout=10)

    def reader(number: int) -> None:
        stream = store.read_through(digest_of(data), upstream)
        chunks = stream.chunks()
        head = next(chunks)
        # Every reader has bytes while the fetch is held at half way: nobody waits
        # for the end.
        first_bytes.wait()
        results[number] = head + b"".join(chunks)
        stream.close()

    threads = [threading.Thread(target=reader, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    first_bytes.wait()
    gate.set()
    for thread in threads:
        thread.join(20)
    assert upstream.opened == 1
    assert all(results[n] == data for n in range(8))


def test_a_wrong_digest_aborts_before_the_last_byte_and_commits_nothing(
    store: ContentStore,
) -> None:
    data = os.urandom(CHUNK * 5)
    corrupt = bytearray(data)
    corrupt[CHUNK * 2] ^= 0xFF
    # Paced, so that the reader is streaming when the digest turns out wrong.
    stream = store.read_through(digest_of(data), Upstream(data, sent=bytes(corrupt), pause=0.01))
    received = bytearray()
    with pytest.raises(TransferAborted):
        for chunk in stream.chunks():
            received += chunk
    stream.close()
    assert len(received) < len(data)
    assert store.blob_size(digest_of(data)) is None
    # The next reader starts a new, good fetch.
    assert read_all(store.read_through(digest_of(data), Upstream(data))) == data


def test_a_fast_bad_fetch_is_an_error_status_or_an_abort(store: ContentStore) -> None:
    """Whether the reader met the failure before or after its first byte, it fails
    visibly: an error status (UpstreamInvalid, 502; or FetchFailed passing the fetch's 502
    on, when a slow reader found the fetch already failed) or an aborted transfer."""
    data = os.urandom(CHUNK * 2)
    with pytest.raises(
        (UpstreamInvalid, FetchFailed, TransferAborted), match="does not match its digest"
    ) as caught:
        read_all(store.read_through(digest_of(data), Upstream(data, sent=b"x" * len(data))))
    assert caught.value.status == 502
    assert store.blob_size(digest_of(data)) is None


def test_an_upstream_error_before_the_first_byte_is_raised_to_the_reader(
    store: ContentStore,
) -> None:
    def missing() -> tuple[int, Iterator[bytes]]:
        raise UpstreamNotFound("blob: not found on the registry")

    with pytest.raises(UpstreamNotFound):
        store.read_through(digest_of(b"nothing"), missing)
    assert store.blob_size(digest_of(b"nothing")) is None


def test_a_break_mid_blob_aborts_every_reader_and_leaves_nothing(
    store: ContentStore, tmp_path: Path
) -> None:
    data = os.urandom(CHUNK * 8)
    with pytest.raises((TransferAborted, UpstreamUnreachable)):
        read_all(store.read_through(digest_of(data), Upstream(data, break_at=CHUNK * 4)))
    assert store.blob_size(digest_of(data)) is None
    staging = store.backend.staging_dir()
    assert [p.name for p in staging.glob("*.part")] == []
    assert read_all(store.read_through(digest_of(data), Upstream(data))) == data


def test_a_reader_that_leaves_does_not_stop_the_fetch(store: ContentStore) -> None:
    data = os.urandom(CHUNK * 20)
    upstream = Upstream(data, pause=0.005)
    stream = store.read_through(digest_of(data), upstream)
    chunks = stream.chunks()
    next(chunks)
    chunks.close()  # the client went away after one chunk
    stream.close()
    deadline = time.monotonic() + 10
    while store.blob_size(digest_of(data)) is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert store.blob_size(digest_of(data)) == len(data)
    assert upstream.opened == 1


def test_a_range_of_a_miss_comes_from_the_growing_file(store: ContentStore) -> None:
    data = os.urandom(CHUNK * 6)
    upstream = Upstream(data, pause=0.002)
    stream = store.read_through(digest_of(data), upstream)
    assert read_all(stream, CHUNK * 3 + 5, CHUNK * 3 + 105) == data[CHUNK * 3 + 5 : CHUNK * 3 + 105]
    tail = store.read_through(digest_of(data), upstream)
    assert read_all(tail, len(data) - 10) == data[-10:]
    assert upstream.opened == 1


class _FinishesWhileAsked:
    """A lock that is let go just as a reader asks: the fetcher verified and committed
    between the reader's read of the state ("streaming") and its lock test."""

    def __init__(self, finish: Callable[[], None]) -> None:
        self.finish = finish

    def is_held(self, name: str) -> bool:
        self.finish()
        return False


@pytest.mark.parametrize("then", ["verified", "committed", "gone"])
def test_a_fetch_that_ends_while_a_reader_checks_the_lock_is_not_an_abort(
    store: ContentStore, then: str
) -> None:
    data = os.urandom(CHUNK * 3)
    digest = digest_of(data)
    hex_digest = digest.removeprefix("sha256:")
    through = store._read_through
    token = "t0ken"
    part = through.backend.staging_dir() / f"grow-{hex_digest}.test.part"
    part.write_bytes(data)
    streaming = {"token": token, "part": part.name, "state": "streaming", "size": len(data)}
    through._write_state(hex_digest, streaming)

    def finish() -> None:
        if then == "gone":
            # Committed, and its state already removed: the store has the blob.
            store.put_document("blobs", digest, data)
            through._state_path(hex_digest).unlink()
        else:
            through._write_state(hex_digest, {**streaming, "state": then})

    through.flight = _FinishesWhileAsked(finish)  # type: ignore[assignment]
    # Neither the reader waiting for the last byte nor an idle one may abort.
    through._await_verified(digest, hex_digest, token)
    through._write_state(hex_digest, streaming)
    through._check_alive(hex_digest, token)


def test_a_fetcher_that_died_still_aborts_its_readers(store: ContentStore) -> None:
    data = os.urandom(CHUNK)
    digest = digest_of(data)
    hex_digest = digest.removeprefix("sha256:")
    through = store._read_through
    streaming = {"token": "t0ken", "part": "none.part", "state": "streaming", "size": len(data)}
    through._write_state(hex_digest, streaming)
    through.flight = _FinishesWhileAsked(lambda: None)  # type: ignore[assignment]
    with pytest.raises(TransferAborted, match="is gone"):
        through._await_verified(digest, hex_digest, "t0ken")
    with pytest.raises(TransferAborted, match="is gone"):
        through._check_alive(hex_digest, "t0ken")


def test_a_reader_that_missed_a_commit_reads_the_store_not_a_second_fetch(
    store: ContentStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader looks at the store, the fetch commits and lets go of its lock, then the
    reader takes the lock: it must look again, not start a fetch whose state would
    replace the first one's while that one's readers wait for their last byte (500
    cold /v2 clients: a hundred were cut short)."""
    data = os.urandom(CHUNK * 4)
    digest = digest_of(data)
    upstream = Upstream(data)
    first = store.read_through(digest, upstream)
    reading = first.chunks()
    head = next(reading)  # this reader follows the growing file
    deadline = time.monotonic() + 5
    while store.blob_size(digest) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    backend = store._read_through.backend
    real_open = backend.open
    looks: list[str] = []

    def looked_before_the_commit(key: str, want: str | None) -> object:
        looks.append(key)
        return None if len(looks) == 1 else real_open(key, want)

    monkeypatch.setattr(backend, "open", looked_before_the_commit)
    late = store.read_through(digest, upstream)
    assert late.source == "store" and read_all(late) == data
    assert upstream.opened == 1
    assert head + b"".join(reading) == data
    first.close()
