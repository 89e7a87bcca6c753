"""Stage 6, stream: write a tar archive as a generator of byte chunks.

Headers are deterministic (mtime 0, uid/gid 0, no user names) so the same image always
gives the same bytes, and the archive's size is known once every entry's size is.
"""

from __future__ import annotations

import os
import tarfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar, overload

BLOCK = 512
END_OF_ARCHIVE = b"\0" * (2 * BLOCK)
#: A layer is read this much at a time: small, as a slow router holds each chunk for
#: seconds (the same reasoning as store.readthrough.READ_CHUNK).
FILE_CHUNK = 64 << 10


def header(name: str, size: int, *, directory: bool = False) -> bytes:
    info = tarfile.TarInfo(name.rstrip("/") + "/" if directory else name)
    info.size = 0 if directory else size
    info.mode = 0o755 if directory else 0o644
    info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    # PAX only when a name does not fit ustar; ours always do (64 hex + /layer.tar).
    return info.tobuf(format=tarfile.PAX_FORMAT if len(name) > 99 else tarfile.USTAR_FORMAT)


def padding(size: int) -> bytes:
    return b"\0" * (-size % BLOCK)


def entry_size(name: str, size: int, *, directory: bool = False) -> int:
    """Bytes one entry takes in the archive: header, content, padding."""
    return len(header(name, size, directory=directory)) + (0 if directory else size + -size % BLOCK)


def bytes_entry(name: str, data: bytes) -> bytes:
    return header(name, len(data)) + data + padding(len(data))


def directory_entry(name: str) -> bytes:
    return header(name, 0, directory=True)


@dataclass(frozen=True)
class FileRegion:
    """``count`` bytes of an open local file from ``offset``: a piece of the archive a
    server may send with ``sendfile`` (no copy through Python), or read as chunks."""

    fileno: int
    offset: int
    count: int

    def __len__(self) -> int:
        return self.count

    def head(self, count: int) -> FileRegion:
        return FileRegion(self.fileno, self.offset, min(count, self.count))

    def chunks(self) -> Iterator[bytes]:
        done = 0
        while done < self.count:
            chunk = os.pread(self.fileno, min(FILE_CHUNK, self.count - done), self.offset + done)
            if not chunk:
                raise OSError("a stored layer ended early")
            done += len(chunk)
            yield chunk


#: What :func:`produce_range` yields with ``regions=True``.
Piece = bytes | FileRegion
#: A stream's item, for what passes either kind of stream on: bytes, or Pieces.
PieceT = TypeVar("PieceT", bytes, Piece)


# -- segments: the archive as a list of pieces with known or pending sizes ----------------


class Segment(ABC):
    """A contiguous piece of the archive. ``size`` is None while unknown (a layer still
    being fetched, cold); :meth:`produce` yields its bytes from ``offset`` on."""

    size: int | None

    @abstractmethod
    def produce(self, offset: int = 0) -> Iterator[bytes]: ...

    def pieces(self, offset: int = 0) -> Iterator[Piece]:
        """:meth:`produce`, with what can be sent from a local file as a FileRegion."""
        return self.produce(offset)


class BytesSegment(Segment):
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.size = len(data)

    def produce(self, offset: int = 0) -> Iterator[bytes]:
        if offset < len(self.data):
            yield self.data[offset:]


class DeferredSegment(Segment):
    """Bytes that can only be built once earlier segments were produced (the OCI
    manifest needs every layer's size); size unknown until then."""

    def __init__(self, build: Callable[[], bytes]) -> None:
        self.build = build
        self.size = None

    def produce(self, offset: int = 0) -> Iterator[bytes]:
        data = self.build()
        if offset < len(data):
            yield data[offset:]


class FileSource(Protocol):
    size: int

    def read_at(self, offset: int, length: int) -> bytes: ...

    def fileno(self) -> int | None:
        """The descriptor of a local file (None: no file to send from)."""
        ...


class FileEntrySegment(Segment):
    """A file entry (header, content, padding) whose content comes from ``opener`` —
    typically waiting for a layer fetch. ``known_size`` makes the entry's size (and so
    the archive's) known up front; the file must then have exactly that size."""

    def __init__(
        self, name: str, opener: Callable[[], FileSource], known_size: int | None = None
    ) -> None:
        self.name = name
        self.opener = opener
        self.known_size = known_size
        self.size = entry_size(name, known_size) if known_size is not None else None
        #: Which layer of the image this entry carries (set by the pipeline).
        self.layer_index = -1

    def produce(self, offset: int = 0) -> Iterator[bytes]:
        for piece in self._entry(offset, regions=False):
            assert isinstance(piece, bytes)
            yield piece

    def pieces(self, offset: int = 0) -> Iterator[Piece]:
        return self._entry(offset, regions=True)

    def _entry(self, offset: int, *, regions: bool) -> Iterator[Piece]:
        source = self.opener()
        if self.known_size is not None and source.size != self.known_size:
            raise OSError(f"{self.name}: expected {self.known_size} bytes, have {source.size}")
        head = header(self.name, source.size)
        if offset < len(head):
            yield head[offset:]
            offset = len(head)
        position = offset - len(head)
        fileno = source.fileno() if regions else None
        if fileno is not None and position < source.size:
            yield FileRegion(fileno, position, source.size - position)
            position = source.size
        while position < source.size:
            chunk = source.read_at(position, min(FILE_CHUNK, source.size - position))
            if not chunk:
                raise OSError(f"{self.name}: the file ended early")
            position += len(chunk)
            yield chunk
        pad = padding(source.size)
        skip = max(0, offset - len(head) - source.size)
        if skip < len(pad):
            yield pad[skip:]


def total_size(segments: list[Segment]) -> int | None:
    total = 0
    for segment in segments:
        if segment.size is None:
            return None
        total += segment.size
    return total


@overload
def produce_range(
    segments: list[Segment],
    start: int = 0,
    end: int | None = None,
    *,
    regions: Literal[False] = False,
) -> Iterator[bytes]: ...


@overload
def produce_range(
    segments: list[Segment], start: int = 0, end: int | None = None, *, regions: Literal[True]
) -> Iterator[Piece]: ...


def produce_range(
    segments: list[Segment], start: int = 0, end: int | None = None, *, regions: bool = False
) -> Iterator[Piece]:
    """Bytes ``start`` to ``end`` (inclusive; None: to the end) of the concatenation.
    Segments wholly outside the range are never produced (no layer is waited for).
    With ``regions``, a layer on local disk comes as one FileRegion, not as bytes."""
    position = 0
    for segment in segments:
        size = segment.size
        if size is not None and position + size <= start:
            position += size
            continue
        inner = max(0, start - position)
        for chunk in segment.pieces(inner) if regions else segment.produce(inner):
            chunk_start = position + inner
            inner += len(chunk)
            if end is not None and chunk_start + len(chunk) > end + 1:
                yield _head(chunk, end + 1 - chunk_start)
                return
            yield chunk
        position += inner if size is None else size
        if end is not None and position > end:
            return


def _head(piece: Piece, count: int) -> Piece:
    return piece[:count] if isinstance(piece, bytes) else piece.head(count)
