"""Verify a layer while it is written: hash the compressed bytes (the descriptor's digest
and size), decompress, hash the tar (the config's diff_id). Nothing reaches the store's
final names unless this pass proved it.

Memory stays bounded whatever the layer size: input is read in chunks and every
decompressor is driven with a cap on its output (a small zstd or gzip chunk can expand
enormously). Compression is sniffed from the bytes, as docker does, because registries
in the wild mislabel media types.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import types
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, cast

import zstandard

from passthrough.errors import (
    UnsupportedImage,
    UpstreamInvalid,
)
from passthrough.observe import telemetry
from passthrough.oci.manifest import LayerDescriptor, layer_what

_gzip_backend: types.ModuleType
try:  # isal inflates gzip about twice as fast as zlib; use it whenever it is there.
    from isal import isal_zlib as _gzip_backend
except ImportError:  # pragma: no cover - isal is a dependency; zlib is the fallback
    _gzip_backend = zlib

log = logging.getLogger(__name__)

READ_CHUNK = 1 << 20
#: Cap on what one decompression step may produce (and so on a queued chunk's size).
OUTPUT_CHUNK = 1 << 20

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class HashingSink:
    """Hashes (and optionally writes) chunks on a thread of its own, so that hashing and
    disk writes run beside decompression instead of after it: on a big layer the
    inflate, the two sha256 passes and the writes otherwise add up on one core.
    hashlib, file writes and isal all release the GIL. The queue is short, so memory
    stays bounded (a few chunks) whatever the layer size."""

    def __init__(self, out: BinaryIO | None = None, depth: int = 4) -> None:
        self.hash = hashlib.sha256()
        self._out = out
        #: None marks the end.
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="hash-sink", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            chunk = self._queue.get()
            if chunk is None:
                return
            if self._error is not None:
                continue  # drain so the producer never blocks on a full queue
            try:
                self.hash.update(chunk)
                if self._out is not None:
                    self._out.write(chunk)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the producer
                self._error = exc

    def put(self, chunk: bytes) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(chunk)

    def finish(self) -> str:
        """Wait for every chunk; the hex digest, or the writer's error raised."""
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self.hash.hexdigest()

    def abort(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()


class HashingSource:
    """A file-like view over a chunk iterator that hashes and counts what passes (inline,
    or on a :class:`HashingSink` thread)."""

    def __init__(
        self, chunks: Iterator[bytes], algorithm: str = "sha256", sink: HashingSink | None = None
    ) -> None:
        self._chunks = chunks
        self._buffer = b""
        self.hash = hashlib.new(algorithm)
        self.sink = sink
        self.count = 0

    def hexdigest(self) -> str:
        return self.sink.finish() if self.sink is not None else self.hash.hexdigest()

    def _pull(self) -> bool:
        for chunk in self._chunks:
            if chunk:
                if self.sink is not None:
                    self.sink.put(chunk)
                else:
                    self.hash.update(chunk)
                self.count += len(chunk)
                self._buffer += chunk
                return True
        return False

    def peek(self, size: int) -> bytes:
        while len(self._buffer) < size and self._pull():
            pass
        return self._buffer[:size]

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            while self._pull():
                pass
            data, self._buffer = self._buffer, b""
            return data
        if not self._buffer:
            self._pull()
        data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data


def sniff_compression(prefix: bytes) -> str:
    if prefix.startswith(GZIP_MAGIC):
        return "gzip"
    if prefix.startswith(ZSTD_MAGIC):
        return "zstd"
    return "none"


def _inflate_gzip(source: HashingSource) -> Iterator[bytes]:
    """gzip, including multi-member streams (concatenated gzip is valid and seen)."""
    decoder: Any = _gzip_backend.decompressobj(31)
    pending = b""
    while True:
        data = pending or source.read(READ_CHUNK)
        pending = b""
        if not data:
            break
        out = decoder.decompress(data, OUTPUT_CHUNK)
        if out:
            yield out
        while decoder.unconsumed_tail:
            out = decoder.decompress(decoder.unconsumed_tail, OUTPUT_CHUNK)
            if out:
                yield out
        if decoder.eof:
            pending = decoder.unused_data
            if not pending and not source.peek(1):
                return
            if pending.lstrip(b"\0") == b"" and not source.peek(1):
                return  # trailing zero padding after the last member
            decoder = _gzip_backend.decompressobj(31)
    if not decoder.eof:
        raise UpstreamInvalid("the gzip stream ends early")


def _inflate_zstd(source: HashingSource) -> Iterator[bytes]:
    reader = zstandard.ZstdDecompressor().stream_reader(
        cast(BinaryIO, source), read_size=READ_CHUNK, read_across_frames=True, closefd=False
    )
    try:
        while True:
            out = reader.read(OUTPUT_CHUNK)
            if not out:
                return
            yield out
    except zstandard.ZstdError:
        raise UpstreamInvalid("the zstd stream is corrupt") from None


def decompressed_chunks(source: HashingSource) -> Iterator[bytes]:
    """The layer tar's bytes, whatever the blob's compression."""
    kind = sniff_compression(source.peek(4))
    if kind == "gzip":
        try:
            yield from _inflate_gzip(source)
        except (zlib.error, _gzip_backend.error):
            raise UpstreamInvalid("the gzip stream is corrupt") from None
    elif kind == "zstd":
        yield from _inflate_zstd(source)
    else:
        while chunk := source.read(READ_CHUNK):
            yield chunk


@dataclass(frozen=True)
class Verified:
    """What a verified pass over a blob proved."""

    blob_size: int
    tar_size: int
    diff_id: str


def fetch_and_verify(
    chunks: Iterator[bytes],
    layer: LayerDescriptor,
    *,
    blob_out: BinaryIO | None = None,
    tar_out: BinaryIO | None = None,
) -> Verified:
    """One pass over a blob's bytes: hash and optionally keep them (``blob_out``),
    decompress, hash and optionally keep the tar (``tar_out``). Raises
    :class:`UpstreamInvalid` unless the digest, size and diff_id all match."""
    what = layer_what(layer)
    if not layer.digest.startswith("sha256:") or not layer.diff_id.startswith("sha256:"):
        raise UnsupportedImage(f"{what}: only sha256 layer digests are supported")
    # Three threads per layer: this one reads and inflates; one hashes (and keeps) the
    # compressed bytes; one hashes (and keeps) the tar.
    blob_sink = HashingSink(blob_out)
    tar_sink = HashingSink(tar_out)
    try:
        source = HashingSource(chunks, sink=blob_sink)
        size = 0
        for chunk in decompressed_chunks(source):
            tar_sink.put(chunk)
            size += len(chunk)
        # Drain anything after the compressed stream's end, so the digest covers it all.
        while source.read(READ_CHUNK):
            pass
        verify_blob(source, layer, what)
        diff_id = "sha256:" + tar_sink.finish()
    finally:
        blob_sink.abort()
        tar_sink.abort()
    if diff_id != layer.diff_id:
        raise UpstreamInvalid(f"{what}: the uncompressed layer does not match the config's diff_id")
    telemetry.set_attributes({"oci.layer.decompressed_size": size})
    return Verified(source.count, size, diff_id)


def verify_blob(source: HashingSource, layer: LayerDescriptor, what: str) -> None:
    if source.count != layer.size:
        raise UpstreamInvalid(f"{what}: got {source.count} bytes, the manifest says {layer.size}")
    if "sha256:" + source.hexdigest() != layer.digest:
        raise UpstreamInvalid(f"{what}: content does not match its digest {layer.digest}")
