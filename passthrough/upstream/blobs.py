"""A blob's bytes from a registry, in chunks, resumed with Range when a connection
breaks mid-blob (within the download's retries and deadline)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

import urllib3

from passthrough.errors import Cancelled, UpstreamInvalid, UpstreamTimeout, UpstreamUnreachable
from passthrough.oci.manifest import LayerDescriptor
from passthrough.upstream.client import RegistryClient

log = logging.getLogger(__name__)

READ_CHUNK = 1 << 20


def blob_chunks(
    client: RegistryClient, layer: LayerDescriptor, what: str, cancel: threading.Event | None
) -> Iterator[bytes]:
    """The blob's bytes from the registry, in chunks. A connection that breaks mid-blob is
    resumed with a Range request from where it stopped (with backoff, within the
    download's retries and deadline); stops when ``cancel`` is set."""
    offset = 0
    attempt = 0
    while True:
        try:
            with client.blob(layer.digest, offset=offset, what=what) as response:
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
                    raise UpstreamTimeout(f"{what}: the registry stopped sending") from None
                except (urllib3.exceptions.HTTPError, OSError):
                    raise UpstreamUnreachable(f"{what}: the connection broke mid-blob") from None
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
