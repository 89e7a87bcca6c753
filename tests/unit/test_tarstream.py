"""The archive as segments (export/tarstream.py): with ``regions`` a layer on local disk
is one FileRegion (what the worker sends with sendfile), and the bytes it stands for
are exactly those of the plain stream, for the whole archive and for any range."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any, cast

import pytest

from passthrough.export.checksum import Archive, recorded
from passthrough.export.tarstream import (
    END_OF_ARCHIVE,
    BytesSegment,
    FileEntrySegment,
    FileRegion,
    Piece,
    Segment,
    produce_range,
)
from passthrough.store.base import LocalFile
from passthrough.store.content import ContentStore
from tests.support.checksums import OneArchive, Records

LAYER = os.urandom(200_000 + 17)


@pytest.fixture
def segments(tmp_path: Path) -> list[Segment]:
    path = tmp_path / "layer.tar"
    path.write_bytes(LAYER)
    handle = path.open("rb")

    def opener() -> LocalFile:
        return LocalFile(handle, len(LAYER))

    return [
        BytesSegment(b"metadata" * 100),
        FileEntrySegment("abc/layer.tar", opener, known_size=len(LAYER)),
        BytesSegment(END_OF_ARCHIVE),
    ]


def as_bytes(pieces: list[Piece]) -> bytes:
    out = b""
    for piece in pieces:
        out += b"".join(piece.chunks()) if isinstance(piece, FileRegion) else piece
    return out


def test_a_local_layer_is_one_region_standing_for_its_bytes(segments: list[Segment]) -> None:
    plain = b"".join(produce_range(segments))
    pieces = list(produce_range(segments, regions=True))
    regions = [p for p in pieces if isinstance(p, FileRegion)]
    assert len(regions) == 1 and len(regions[0]) == len(LAYER)
    assert as_bytes(pieces) == plain


@pytest.mark.parametrize("first, last", [(0, 10), (700, 900), (850, 150_000), (900, None)])
def test_any_range_of_regions_is_the_same_bytes(
    segments: list[Segment], first: int, last: int | None
) -> None:
    plain = b"".join(produce_range(segments, first, last))
    assert as_bytes(list(produce_range(segments, first, last, regions=True))) == plain


def test_the_download_that_hashes_gets_regions_as_bytes(segments: list[Segment]) -> None:
    records = Records()
    store = cast(ContentStore, records)
    archive = cast(Archive, OneArchive(f"sha256:{uuid.uuid4().hex} latest repo:tag"))
    hashed: list[Any] = list(recorded(store, archive, produce_range(segments, regions=True)))
    assert all(isinstance(piece, bytes) for piece in hashed)
    assert b"".join(hashed) == b"".join(produce_range(segments))
    assert records.writes == 1
    # Recorded now: the next download passes its region on untouched.
    again = list(recorded(store, archive, produce_range(segments, regions=True)))
    assert any(isinstance(piece, FileRegion) for piece in again)
