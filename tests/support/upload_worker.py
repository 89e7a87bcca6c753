"""A stand-in replica for the S3 upload-session tests: a separate process with its own
S3Backend (own temp and lock directory, as a separate pod has) on the bucket and prefix
it is given, driven by JSON lines on stdin, answering one JSON line each on stdout.

    python -m tests.support.upload_worker BUCKET PREFIX ENDPOINT REGION WORKDIR

Requests: ``{"op": "create", "repository": ...}``, ``{"op": "append", "id", "offset",
"seed", "size", "chunk"}`` (the bytes are :func:`payload`'s), ``{"op": "commit", "id",
"digest"}``, ``{"op": "get", "id"}``. Faults for the kill tests: append with
``"stall_after": n`` sends n bytes, answers ``{"stalled": true}`` and waits forever
(inside the append, for a SIGKILL); commit with ``"kill_after": "<S3 operation>"``
SIGKILLs itself right after that call returned. Every answer says how many digests
this process read back from S3 (``read_backs``), so a test knows which path it took.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

from passthrough.errors import PassthroughError
from passthrough.store.flight import Flight
from passthrough.store.s3 import S3Backend
from passthrough.store.s3_uploads import S3Uploads


def payload(seed: int, size: int) -> bytes:
    """The bytes a test and a worker agree on without sending them."""
    return random.Random(seed).randbytes(size)


def chunked(data: bytes, chunk: int) -> Iterator[bytes]:
    for start in range(0, len(data), chunk):
        yield data[start : start + chunk]


class CountingUploads(S3Uploads):
    read_backs = 0

    def _read_back_digest(self, key: str) -> str:
        type(self).read_backs += 1
        return super()._read_back_digest(key)


def _stalling(chunks: Iterator[bytes], after: int) -> Iterator[bytes]:
    sent = 0
    for chunk in chunks:
        if sent >= after:
            _answer({"stalled": True})
            threading.Event().wait()  # until SIGKILL
        yield chunk
        sent += len(chunk)


def _answer(document: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps({**document, "read_backs": CountingUploads.read_backs}) + "\n")
    sys.stdout.flush()


def main(argv: list[str]) -> None:
    bucket, prefix, endpoint, region, workdir = argv
    backend = S3Backend(bucket, prefix, endpoint_url=endpoint, region=region, temp_dir=workdir)
    uploads = CountingUploads(backend, Flight(backend.lock_dir()))
    for line in sys.stdin:
        request = json.loads(line)
        op = request["op"]
        try:
            if op == "create":
                _answer({"id": uploads.create(request["repository"]).id})
            elif op == "get":
                state = uploads.get(request["id"])
                _answer({"size": None if state is None else state.size})
            elif op == "append":
                data = payload(request["seed"], request["size"])
                chunks = chunked(data, request.get("chunk", 1 << 20))
                if "stall_after" in request:
                    chunks = _stalling(chunks, request["stall_after"])
                with uploads.session(request["id"]):
                    state = uploads.append(request["id"], request["offset"], chunks)
                _answer({"size": state.size})
            elif op == "commit":
                if "kill_after" in request:
                    backend.client.meta.events.register(
                        f"after-call.s3.{request['kill_after']}",
                        lambda **_: os.kill(os.getpid(), signal.SIGKILL),
                    )
                with uploads.session(request["id"]):
                    size = uploads.commit(request["id"], request["digest"])
                _answer({"size": size})
            else:
                _answer({"error": f"unknown op {op}"})
        except PassthroughError as exc:
            _answer({"error": type(exc).__name__, "status": exc.status, "message": exc.message})


if __name__ == "__main__":
    main(sys.argv[1:])
