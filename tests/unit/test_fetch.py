"""Decompression and verification of layer blobs, with bounded memory."""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
import zlib

import pytest
import zstandard

from passthrough.errors import UpstreamInvalid
from passthrough.store.verify import (
    OUTPUT_CHUNK,
    HashingSink,
    HashingSource,
    decompressed_chunks,
    sniff_compression,
)


def layer_tar(size: int = 300_000) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        info = tarfile.TarInfo("data.bin")
        payload = bytes(range(256)) * (size // 256)
        info.size = len(payload)
        archive.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


def chunked(data: bytes, size: int = 7777):
    return iter([data[i : i + size] for i in range(0, len(data), size)])


def inflate(blob: bytes) -> bytes:
    return b"".join(decompressed_chunks(HashingSource(chunked(blob))))


def test_gzip_zstd_and_plain_round_trip():
    tar = layer_tar()
    assert inflate(gzip.compress(tar)) == tar
    assert inflate(zstandard.ZstdCompressor().compress(tar)) == tar
    assert inflate(tar) == tar


def test_multi_member_gzip_and_multi_frame_zstd():
    tar = layer_tar()
    half = len(tar) // 2
    assert inflate(gzip.compress(tar[:half]) + gzip.compress(tar[half:])) == tar
    compressor = zstandard.ZstdCompressor()
    assert inflate(compressor.compress(tar[:half]) + compressor.compress(tar[half:])) == tar


def test_compression_is_sniffed_not_trusted():
    assert sniff_compression(b"\x1f\x8b\x08\x00") == "gzip"
    assert sniff_compression(b"\x28\xb5\x2f\xfd") == "zstd"
    assert sniff_compression(b"ustar") == "none"


def test_output_is_bounded_for_highly_compressible_input():
    bomb = zlib.compressobj(9, zlib.DEFLATED, 31)
    data = bomb.compress(b"\0" * (64 << 20)) + bomb.flush()
    assert len(data) < 200_000
    sizes = [len(c) for c in decompressed_chunks(HashingSource(iter([data])))]
    assert sum(sizes) == 64 << 20
    assert max(sizes) <= OUTPUT_CHUNK


def test_corrupt_and_truncated_streams_are_upstream_errors():
    good = gzip.compress(layer_tar())
    with pytest.raises(UpstreamInvalid):
        inflate(good[:10] + b"garbage" * 100)
    with pytest.raises(UpstreamInvalid):
        inflate(good[: len(good) // 2])
    frame = zstandard.ZstdCompressor(write_checksum=True).compress(layer_tar())
    with pytest.raises(UpstreamInvalid):
        inflate(frame[:20] + b"\xff" * 200 + frame[220:])
    # A zstd stream cut short inflates to less than the tar; the diff_id check in
    # fetch_layer is what rejects it (see test_app).
    assert inflate(frame[: len(frame) // 2]) != layer_tar()


def test_hashing_source_hashes_everything_it_passes():
    data = layer_tar()
    source = HashingSource(chunked(data))
    assert source.peek(4) == data[:4]
    assert source.read() == data
    assert source.count == len(data)
    assert source.hexdigest() == hashlib.sha256(data).hexdigest()


def test_a_sink_thread_hashes_and_keeps_everything_it_passes():
    data = layer_tar()
    kept = io.BytesIO()
    source = HashingSource(chunked(data), sink=HashingSink(kept))
    assert source.read() == data
    assert source.hexdigest() == hashlib.sha256(data).hexdigest()
    assert kept.getvalue() == data
