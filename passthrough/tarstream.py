"""Stage 6, stream: write a tar archive as a generator of byte chunks.

Headers are deterministic (mtime 0, uid/gid 0, no user names) so the same image always
gives the same bytes, and the archive's size is known once every entry's size is.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from pathlib import Path

BLOCK = 512
END_OF_ARCHIVE = b"\0" * (2 * BLOCK)
FILE_CHUNK = 1 << 20


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


def file_entry(name: str, path: Path, size: int) -> Iterator[bytes]:
    """Stream a file already on disk; its size must not have changed since it was verified."""
    yield header(name, size)
    sent = 0
    with path.open("rb") as source:
        while chunk := source.read(FILE_CHUNK):
            sent += len(chunk)
            if sent > size:
                break
            yield chunk
    if sent != size:
        raise OSError(f"{name}: the file changed size while being sent")
    yield padding(size)
