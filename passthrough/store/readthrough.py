"""Read-through of one blob: streamed to every client while it is fetched once, written
to the store's staging area and verified (the tee of the /v2 proxy).

One *fetch* per digest on a host, whatever the number of clients, workers or threads:

- the first reader takes the digest's lock without waiting (:meth:`Flight.try_hold`)
  and starts a fetcher thread; the fetch belongs to nobody's request, so a client that
  leaves (or a slow one) never stops or slows it for the others;
- the fetcher writes the blob into a *growing file* in the staging directory and
  describes it in a small state file (``flight-<hex>.json``: token, part name, size,
  state), replaced atomically at each step;
- every reader, the one that started the fetch included, reads the growing file from
  its own offset as it grows, in its own thread, and does not wait for the end;
- the last byte of a blob is released to a reader only once the fetcher has verified
  the whole blob's size and digest (state ``verified`` with the reader's token): a
  fetch that fails, or a blob whose digest turns out wrong, aborts every transfer
  before its end, and nothing is committed. Readers of a range that stops short of the
  end get those bytes unverified, as from any registry (the client checks the digest
  of what it assembles);
- with Redis, the fetcher also holds the cross-replica lease: another replica's
  readers wait for the commit and then read the store.

A fetcher that dies leaves its lock free; readers notice (the lock can be taken) and
abort. Parts of dead processes are removed as every part is (pid in the name).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from passthrough.errors import (
    FetchFailed,
    PassthroughError,
    StoreUnavailable,
    TransferAborted,
    UpstreamError,
    UpstreamInvalid,
    disk_full,
    is_disk_full,
)
from passthrough.store import layout
from passthrough.store.base import Backend, LayerFile, replace_file
from passthrough.store.flight import Flight
from passthrough.store.layout import content_key, hex_of

log = logging.getLogger(__name__)

#: Opens the blob upstream: its size (from the response's headers) and its bytes.
#: Raises a :class:`PassthroughError` (404, 401, 429…) before the first byte.
BlobOpener = Callable[[], tuple[int, Iterator[bytes]]]

#: What a client's stream reads at once: each chunk stays alive while a slow client
#: takes it (seconds at WAN speed), so at 500 clients 1 MiB chunks cost about 0.7 MiB
#: more per client than 64 KiB, for no measurable CPU (docs/benchmarks.md, "A fleet at once").
READ_CHUNK = 64 << 10
#: How long a finished fetch's state file stays for readers still behind it.
STATE_LINGER = 600.0
STATE_STALE = 24 * 3600.0


@dataclass
class _Fetch:
    """A fetch run by this process, for the readers of this process."""

    token: str
    ready: threading.Event
    error: PassthroughError | None = None


class BlobStream:
    """A blob for one reader: its size, where it comes from, and its bytes by range."""

    def __init__(
        self,
        size: int,
        *,
        stored: LayerFile | None = None,
        tail: Callable[[int, int], Iterator[bytes]] | None = None,
    ) -> None:
        self.size = size
        self._stored = stored
        self._tail = tail
        #: "store" (a hit, or committed meanwhile) or "fetch" (read from the growing file).
        self.source = "store" if stored is not None else "fetch"

    def chunks(self, start: int = 0, end: int | None = None) -> Generator[bytes, None, None]:
        """Bytes ``start`` to ``end`` (exclusive). Raises :class:`TransferAborted` when
        the fetch fails, before the last byte of the blob."""
        stop = self.size if end is None else min(end, self.size)
        if self._stored is not None:
            stored = self._stored
            offset = start
            while offset < stop:
                chunk = stored.read_at(offset, min(READ_CHUNK, stop - offset))
                if not chunk:
                    raise TransferAborted("the stored blob ended early")
                offset += len(chunk)
                yield chunk
            return
        assert self._tail is not None
        yield from self._tail(start, stop)

    def close(self) -> None:
        if self._stored is not None:
            self._stored.close()


class ReadThrough:
    """The read-through of one store (one per
    :class:`~passthrough.store.content.ContentStore`, which hands it its backend, lock,
    commit and counters: it never imports the content store)."""

    def __init__(
        self,
        backend: Backend,
        flight: Flight,
        *,
        commit: Callable[[tuple[Path, BinaryIO], str, str, int], None],
        count: Callable[..., None],
        evict: Callable[[], object],
    ) -> None:
        self.backend = backend
        self.flight = flight
        self._commit = commit
        self._count = count
        self._evict = evict
        self._remove_stale_states()

    # -- files -------------------------------------------------------------------------

    def _state_path(self, hex_digest: str) -> Path:
        return self.backend.staging_dir() / layout.flight_state_name(hex_digest)

    def _read_state(self, hex_digest: str) -> dict[str, Any] | None:
        try:
            state = json.loads(self._state_path(hex_digest).read_bytes())
        except (OSError, ValueError):
            return None
        return state if isinstance(state, dict) else None

    def _write_state(self, hex_digest: str, state: dict[str, Any]) -> None:
        replace_file(self._state_path(hex_digest), json.dumps(state).encode())

    def _remove_stale_states(self) -> None:
        now = time.time()
        for path in self.backend.staging_dir().glob(layout.FLIGHT_STATE_GLOB):
            with contextlib.suppress(OSError):
                if now - path.stat().st_mtime > STATE_STALE:
                    path.unlink()

    # -- the reader's side ---------------------------------------------------------------

    def open(self, digest: str, opener: BlobOpener, *, poll: float | None = None) -> BlobStream:
        """The blob from the store, or read through: the fetch started here when nobody
        runs it, followed otherwise. Errors before the first byte (the upstream's 404,
        401, 429…) are raised here, so the client gets them as a status."""
        key = content_key("blobs", digest)
        hex_digest = hex_of(digest)
        backend = self.backend
        interval = poll if poll is not None else (0.2 if backend.name == "s3" else 0.02)
        began = time.time()
        while True:
            stored = backend.open(key, digest)
            if stored is not None:
                self._count(hits=1)
                return BlobStream(stored.size, stored=stored)
            hold = self.flight.try_hold(hex_digest)
            if hold is not None:
                # Look again, holding the lock: a fetch may have committed and let go
                # between the look above and try_hold. Fetching again would replace
                # its state while its readers still wait for its last byte.
                stored = backend.open(key, digest)
                if stored is not None:
                    hold.close()
                    self._count(hits=1)
                    return BlobStream(stored.size, stored=stored)
                # This reader starts the fetch; its errors before the first byte are
                # this reader's answer (others read them from the state file).
                mine = self._start_fetch(digest, hex_digest, opener, hold)
                mine.ready.wait()
                if mine.error is not None:
                    raise mine.error
            state = self._read_state(hex_digest)
            if state is not None:
                stream = self._follow(digest, hex_digest, state, began)
                if stream is not None:
                    return stream
            time.sleep(interval)

    def _follow(
        self, digest: str, hex_digest: str, state: dict[str, Any], began: float
    ) -> BlobStream | None:
        """A stream over the growing file the state describes; None to look again."""
        phase = state.get("state")
        if phase == "failed":
            if float(state.get("time", 0)) >= began:
                raise FetchFailed(
                    int(state.get("status", 502)),
                    str(state.get("kind", "upstream_error")),
                    str(state.get("message", "the upstream fetch failed")),
                )
            return None  # an old failure: someone may be trying again
        size = state.get("size")
        if phase not in ("streaming", "verified", "committed") or not isinstance(size, int):
            return None
        try:
            handle = (self.backend.staging_dir() / str(state["part"])).open("rb")
        except (OSError, KeyError):
            return None  # committed (renamed or uploaded) meanwhile: the store has it
        token = str(state.get("token"))
        return BlobStream(size, tail=self._tailer(digest, hex_digest, handle, size, token))

    def _tailer(
        self, digest: str, hex_digest: str, handle: Any, size: int, token: str
    ) -> Callable[[int, int], Iterator[bytes]]:
        def tail(start: int, stop: int) -> Iterator[bytes]:
            try:
                yield from self._tail(digest, hex_digest, handle, size, token, start, stop)
            finally:
                handle.close()

        return tail

    def _tail(
        self,
        digest: str,
        hex_digest: str,
        handle: Any,
        size: int,
        token: str,
        start: int,
        stop: int,
    ) -> Iterator[bytes]:
        fd = handle.fileno()
        offset = start
        idle = 0.001
        idle_since: float | None = None
        while offset < stop:
            wanted = min(READ_CHUNK, stop - offset)
            chunk = os.pread(fd, wanted, offset)
            if chunk:
                idle = 0.001
                idle_since = None
                if offset + len(chunk) == size:
                    # The blob's last byte: only once the fetcher proved the digest.
                    self._await_verified(digest, hex_digest, token)
                offset += len(chunk)
                yield chunk
                continue
            if idle_since is None:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since > 0.25:
                self._check_alive(hex_digest, token)
                idle_since = time.monotonic()
            time.sleep(idle)
            idle = min(idle * 2, 0.02)

    def _check_alive(self, hex_digest: str, token: str) -> None:
        """Abort when the fetch this reader follows failed or its process died."""
        state = self._read_state(hex_digest)
        if state is None or state.get("token") != token:
            raise TransferAborted("the upstream fetch of this blob was replaced")
        if state.get("state") == "failed":
            raise TransferAborted(f"the upstream fetch failed: {state.get('message', '')}")
        if state.get("state") == "streaming" and not self.flight.is_held(hex_digest):
            # The fetcher may have verified, committed and let go between the read of the
            # state and the lock test: look again before calling it dead.
            again = self._read_state(hex_digest)
            if again is None:
                if self.backend.size(content_key("blobs", f"sha256:{hex_digest}")):
                    return  # committed, and its state already removed
            elif again.get("token") == token and again.get("state") in ("verified", "committed"):
                return
            raise TransferAborted("the process fetching this blob is gone")

    def _await_verified(self, digest: str, hex_digest: str, token: str) -> None:
        delay = 0.002
        while True:
            state = self._read_state(hex_digest)
            if state is None or state.get("token") != token:
                # The state lingers for STATE_LINGER after a success and is kept after a
                # failure: gone means it succeeded and the store holds the blob.
                if state is None and self.backend.size(content_key("blobs", digest)):
                    return
                raise TransferAborted("the upstream fetch of this blob was replaced")
            phase = state.get("state")
            if phase in ("verified", "committed"):
                return
            if phase == "failed":
                raise TransferAborted(f"the upstream fetch failed: {state.get('message', '')}")
            if not self.flight.is_held(hex_digest):
                # Not held may also mean done: the fetcher verifies, commits and lets go
                # between our read of the state and the lock test. Look once more.
                again = self._read_state(hex_digest)
                if again is not None and again.get("token") == token:
                    if again.get("state") in ("verified", "committed"):
                        return
                elif again is None and self.backend.size(content_key("blobs", digest)):
                    return
                raise TransferAborted("the process fetching this blob is gone")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    # -- the fetcher's side --------------------------------------------------------------

    def _start_fetch(
        self,
        digest: str,
        hex_digest: str,
        opener: BlobOpener,
        hold: contextlib.ExitStack,
    ) -> _Fetch:
        token = secrets.token_hex(8)
        part = layout.part_name(f"grow-{hex_digest}", token)
        fetch = _Fetch(token, threading.Event())
        # Written before the thread starts, so no reader mistakes an older state for it.
        self._write_state(
            hex_digest,
            {
                "token": token,
                "part": part,
                "state": "starting",
                "pid": os.getpid(),
                "time": time.time(),
            },
        )
        thread = threading.Thread(
            target=self._fetch,
            args=(digest, hex_digest, opener, hold, fetch, part),
            name=f"fetch-{hex_digest[:12]}",
            daemon=True,
        )
        thread.start()
        return fetch

    def _fetch(
        self,
        digest: str,
        hex_digest: str,
        opener: BlobOpener,
        hold: contextlib.ExitStack,
        fetch: _Fetch,
        part: str,
    ) -> None:
        key = content_key("blobs", digest)
        path = self.backend.staging_dir() / part
        state: dict[str, Any] = {"token": fetch.token, "part": part, "pid": os.getpid()}
        handle = None
        # The lock is held until the outcome is written: a reader that takes it after
        # a failure must never have its own state overwritten by this one.
        with hold:
            try:
                self.flight.hold_lease(hex_digest, hold)
                if self.backend.size(key) is not None:
                    # Committed by another replica while we waited for its lease.
                    self._write_state(
                        hex_digest,
                        {**state, "state": "committed", "size": 0, "time": time.time()},
                    )
                    return
                try:
                    handle = path.open("x+b", buffering=0)
                except OSError as exc:
                    raise disk_full() if is_disk_full(exc) else exc from None
                size, chunks = opener()
                self._write_state(
                    hex_digest, {**state, "state": "streaming", "size": size, "time": time.time()}
                )
                fetch.ready.set()
                self._count(misses=1)
                self._copy(digest, chunks, handle, size)
                self._write_state(
                    hex_digest, {**state, "state": "verified", "size": size, "time": time.time()}
                )
                self._commit((path, handle), "blobs", digest, size)
                self._write_state(
                    hex_digest, {**state, "state": "committed", "size": size, "time": time.time()}
                )
                self._linger(hex_digest, fetch.token)
            except BaseException as exc:  # noqa: BLE001 - recorded for every reader
                error = exc if isinstance(exc, PassthroughError) else _unexpected(exc)
                fetch.error = error
                log.warning("fetch of blob %s failed: %s", digest[:19], error.message)
                # The part goes first: once a reader sees the failure, nothing is left.
                with contextlib.suppress(OSError):
                    path.unlink()
                with contextlib.suppress(OSError):
                    self._write_state(
                        hex_digest,
                        {
                            **state,
                            "state": "failed",
                            "status": error.status,
                            "kind": error.kind,
                            "message": error.message,
                            "time": time.time(),
                        },
                    )
            finally:
                fetch.ready.set()
                if handle is not None:
                    handle.close()
        self._evict()

    @staticmethod
    def _copy(digest: str, chunks: Iterator[bytes], handle: Any, size: int) -> None:
        """Write the upstream's bytes to the growing file, hashing them; raise unless
        the size and digest match."""
        hasher = hashlib.sha256()
        written = 0
        try:
            for chunk in chunks:
                written += len(chunk)
                if written > size:
                    raise UpstreamInvalid(f"blob {digest[:19]}: more bytes than its Content-Length")
                hasher.update(chunk)
                handle.write(chunk)
        except OSError as exc:
            raise disk_full() if is_disk_full(exc) else exc from None
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
        if written != size:
            raise UpstreamInvalid(f"blob {digest[:19]}: got {written} of {size} bytes")
        if "sha256:" + hasher.hexdigest() != digest:
            raise UpstreamInvalid(f"blob {digest[:19]}: content does not match its digest")

    def _linger(self, hex_digest: str, token: str) -> None:
        """Remove a successful fetch's state once slow readers had time to finish."""

        def remove() -> None:
            state = self._read_state(hex_digest)
            if state is not None and state.get("token") == token:
                with contextlib.suppress(OSError):
                    self._state_path(hex_digest).unlink()

        timer = threading.Timer(STATE_LINGER, remove)
        timer.daemon = True
        timer.start()


def _unexpected(exc: BaseException) -> PassthroughError:
    if isinstance(exc, OSError):
        return StoreUnavailable(f"the store failed while writing a blob ({exc.strerror or exc})")
    log.error("unexpected error in a blob fetch", exc_info=exc)
    return UpstreamError(f"the blob fetch failed ({type(exc).__name__})")
