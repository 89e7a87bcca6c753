"""A blob's bytes from a registry, in chunks, resumed with Range when a connection
breaks mid-blob (within the download's retries and deadline)."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Any

import urllib3

from passthrough.errors import Cancelled, UpstreamInvalid, UpstreamTimeout, UpstreamUnreachable
from passthrough.oci.manifest import LayerDescriptor
from passthrough.upstream.client import RegistryClient
from passthrough.upstream.failures import where

log = logging.getLogger(__name__)

READ_CHUNK = 1 << 20


def open_blob(client: RegistryClient, digest: str, what: str) -> tuple[int, Iterator[bytes]]:
    """A blob by digest alone (the /v2 proxy has no descriptor): the GET is sent now, so
    that its errors (404, 401, 429…) are raised here, before any byte; returns the size
    its Content-Length announces and the bytes, resumed with Range as
    :func:`blob_chunks` does."""
    opened = client.blob(digest, what=what)
    response = opened.__enter__()
    length = response.headers.get("Content-Length", "")
    if not length.isdigit():
        opened.__exit__(None, None, None)
        raise UpstreamInvalid(f"{what}: the registry sent the blob without a Content-Length")
    size = int(length)
    layer = LayerDescriptor(0, digest, size, "", "none", digest)
    return size, blob_chunks(client, layer, what, None, first=(opened, response))


def blob_chunks(
    client: RegistryClient,
    layer: LayerDescriptor,
    what: str,
    cancel: threading.Event | None,
    *,
    first: tuple[contextlib.AbstractContextManager[Any], Any] | None = None,
) -> Iterator[bytes]:
    """The blob's bytes from the registry, in chunks. A connection that breaks mid-blob is
    resumed with a Range request from where it stopped (with backoff, within the
    download's retries and deadline); stops when ``cancel`` is set. ``first`` is a
    response already opened for the whole blob (with its context manager)."""
    offset = 0
    attempt = 0
    while True:
        try:
            opened: contextlib.AbstractContextManager[Any]
            if first is not None:
                opened = _entered(*first)
                first = None
            else:
                opened = client.blob(layer.digest, offset=offset, what=what)
            with opened as response:
                skip = _resume_skip(response, offset, what)
                raw: Any = response.raw
                try:
                    for chunk in raw.stream(READ_CHUNK, decode_content=False):
                        if cancel is not None and cancel.is_set():
                            raise Cancelled("the download was cancelled")
                        client.retry.check_deadline(what)
                        if skip:
                            dropped = min(skip, len(chunk))
                            chunk = chunk[dropped:]
                            skip -= dropped
                            if not chunk:
                                continue
                        offset += len(chunk)
                        yield chunk
                except urllib3.exceptions.ReadTimeoutError:
                    raise UpstreamTimeout(
                        f"{what}: {where(response.url)} stopped sending (read timeout)"
                    ) from None
                except (urllib3.exceptions.HTTPError, OSError):
                    raise UpstreamUnreachable(
                        f"{what}: the connection to {where(response.url)} broke mid-blob"
                    ) from None
            if offset < layer.size and response.headers.get("Content-Length") is None:
                raise UpstreamUnreachable(f"{what}: the blob ended early")
            return
        except (UpstreamUnreachable, UpstreamTimeout) as exc:
            if offset >= layer.size or not client.retry.wait(attempt):
                raise
            attempt += 1
            log.info(
                "%s: %s; resuming at byte %d (attempt %d)", what, exc.message, offset, attempt + 1
            )


@contextlib.contextmanager
def _entered(opened: contextlib.AbstractContextManager[Any], response: Any) -> Iterator[Any]:
    """A context manager already entered (by :func:`open_blob`), exited at the end."""
    try:
        yield response
    finally:
        opened.__exit__(None, None, None)


def _resume_skip(response: Any, offset: int, what: str) -> int:
    """Bytes to drop from a resumed response: none when the registry honoured the Range
    (206 from ``offset``), ``offset`` when it sent the whole blob again (200)."""
    if not offset:
        return 0
    if response.status_code == 206:
        content_range = response.headers.get("Content-Range", "")
        if not content_range.startswith(f"bytes {offset}-"):
            raise UpstreamInvalid(f"{what}: the registry answered a different range")
        return 0
    return offset
