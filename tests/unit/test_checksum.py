"""Archive checksums recorded while a download streams (export/checksum.recorded): one
download per process hashes an archive, the others only pass its bytes on."""

from __future__ import annotations

import hashlib
import uuid
from typing import Any, cast

from passthrough.export.checksum import Archive, recorded
from passthrough.store.content import ContentStore
from tests.support.checksums import OneArchive, Records

CHUNKS = [b"a" * 1000, b"b" * 1000, b"c" * 7]


def stream(records: Records, identity: str) -> Any:
    store = cast(ContentStore, records)
    return recorded(store, cast(Archive, OneArchive(identity)), iter(list(CHUNKS)))


def test_concurrent_downloads_of_one_archive_hash_it_once() -> None:
    records = Records()
    identity = f"sha256:{uuid.uuid4().hex} latest repo:tag"
    first, second = stream(records, identity), stream(records, identity)
    assert next(first) == CHUNKS[0]
    # The second download starts while the first one hashes: it only passes bytes on.
    assert b"".join(second) == b"".join(CHUNKS)
    assert records.writes == 0
    assert next(first) == CHUNKS[1] and list(first) == CHUNKS[2:]
    assert records.writes == 1
    (record,) = records.records.values()
    assert record["sha256"] == hashlib.sha256(b"".join(CHUNKS)).hexdigest()
    assert record["size"] == sum(map(len, CHUNKS))


def test_a_download_cut_short_leaves_the_hashing_to_the_next() -> None:
    records = Records()
    identity = f"sha256:{uuid.uuid4().hex} latest repo:tag"
    cut = stream(records, identity)
    next(cut)
    cut.close()  # the client left: nothing recorded, and the claim is let go
    assert records.writes == 0
    assert b"".join(stream(records, identity)) == b"".join(CHUNKS)
    assert records.writes == 1
