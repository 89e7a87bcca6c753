"""Faults and bad input during pushes into the hosted area, against a real gunicorn.

- a worker killed with SIGKILL in the middle of a blob's PATCH, on the filesystem and
  on S3 (past the multipart upload's first part): no blob is visible that was not
  verified (HEAD 404, nothing under blobs/), and the client's retry, a new upload,
  succeeds and reads back byte for byte;
- the disk filling during an upload (CACHE_DIR on an 8 MiB tmpfs): a 507 that names the
  disk, nothing of the upload left in uploads/ or blobs/, and the area still takes
  pushes that fit;
- bad input, each a 4xx with the spec's code: a manifest referencing a missing blob, a
  digest that does not match, a truncated chunk (a body shorter than its
  Content-Length, sent over a raw socket, and a Content-Range that disagrees), a chunk
  after the session was closed, names that break the grammar, a 10 MB manifest.

S3 filling up is not exercised: SeaweedFS has no write that fails as "full". With a
1 MiB volume size limit and a single volume, the PUT (or UploadPart) that no longer fits
is answered 500 InternalError "please try again", the answer of any other internal
error, so nothing could name the full store from it; and its bucket quota
(``s3.bucket.quota.enforce`` in ``weed shell``) is applied by a periodic check that
turns the bucket read-only, not by refusing the write that crosses it.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.e2e.hosted import (
    OCI_MANIFEST,
    OCTET,
    Hosted,
    absolute,
    error_codes,
    error_message,
    hosted_server,
    image_manifest,
    push_blob,
)
from tests.support.fixtures_matrix import s3_env
from tests.support.helpers import digest as digest_of
from tests.support.helpers import wait_until
from tests.support.procs import LOOPBACK
from tests.support.seaweed import SeaweedS3

pytestmark = pytest.mark.rig


def blob_files(cache: Path, digest: str) -> list[Path]:
    """The store's files of a blob (blobs/sha256/<hex>-<size>)."""
    directory = cache / "blobs" / "sha256"
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.name.startswith(digest[7:]))


def upload_dirs(cache: Path) -> list[Path]:
    directory = cache / "uploads"
    return sorted(directory.iterdir()) if directory.is_dir() else []


def basic(hosted: Hosted, user: str = "alice") -> str:
    token = base64.b64encode(f"{user}:{hosted.users[user]}".encode()).decode()
    return f"Basic {token}"


def raw_request_head(hosted: Hosted, method: str, path: str, length: int) -> bytes:
    return (
        f"{method} {path} HTTP/1.1\r\n"
        f"Host: {hosted.host}\r\n"
        f"Authorization: {basic(hosted)}\r\n"
        f"Content-Type: {OCTET}\r\n"
        f"Content-Length: {length}\r\n"
        "Connection: close\r\n"
        "\r\n"
    ).encode()


def read_answer(sock: socket.socket) -> tuple[int, bytes]:
    """The status and body of the one answer on a Connection: close socket."""
    data = b""
    sock.settimeout(60)
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def worker_pids(master: int) -> list[int]:
    """The gunicorn master's children (its workers)."""
    path = Path(f"/proc/{master}/task/{master}/children")
    return [int(pid) for pid in path.read_text().split()]


# --- SIGKILL in the middle of a push ------------------------------------------------------


@dataclass
class OneWorker:
    """A hosted server with one gunicorn worker, on the filesystem or on S3."""

    hosted: Hosted
    store: str
    seaweed: SeaweedS3 | None = None
    bucket: str = ""
    prefix: str = ""

    def keys(self) -> list[str]:
        assert self.seaweed is not None
        listed = self.seaweed.client().list_objects_v2(Bucket=self.bucket, Prefix=self.prefix)
        return [str(o["Key"]) for o in listed.get("Contents", [])]

    def blob_stored(self, digest: str) -> bool:
        if self.store == "filesystem":
            assert self.hosted.cache is not None
            return bool(blob_files(self.hosted.cache, digest))
        return any(k.endswith(f"blobs/sha256/{digest[7:]}") for k in self.keys())

    def session_has_bytes(self, upload_id: str) -> bool:
        """Whether the worker has stored some of the chunk in flight."""
        if self.store == "filesystem":
            assert self.hosted.cache is not None
            data = self.hosted.cache / "uploads" / upload_id / "data"
            return data.exists() and data.stat().st_size > 0
        # On S3: the session's multipart upload holds a part (16 MiB each).
        assert self.seaweed is not None
        client = self.seaweed.client()
        uploads = client.list_multipart_uploads(Bucket=self.bucket, Prefix=self.prefix)
        for upload in uploads.get("Uploads", []):
            if upload_id in upload["Key"]:
                parts = client.list_parts(
                    Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                )
                if parts.get("Parts"):
                    return True
        return False


@pytest.fixture(params=["filesystem", "s3"])
def one_worker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OneWorker]:
    if request.param == "filesystem":
        with hosted_server(tmp_path / "one", workers=1) as hosted:
            yield OneWorker(hosted, "filesystem")
        return
    seaweed: SeaweedS3 = request.getfixturevalue("seaweed")
    seaweed.ensure_running()
    bucket = seaweed.create_bucket()
    env = s3_env(seaweed, bucket)
    try:
        with hosted_server(tmp_path / "one", workers=1, extra=env) as hosted:
            yield OneWorker(hosted, "s3", seaweed, bucket, env["S3_PREFIX"])
    finally:
        seaweed.ensure_running()
        seaweed.delete_bucket(bucket)


def test_a_worker_killed_mid_patch_leaves_no_blob_and_the_retry_succeeds(
    one_worker: OneWorker, tmp_path: Path
) -> None:
    hosted = one_worker.hosted
    http = hosted.session()
    name = f"team/killed-{secrets.token_hex(4)}"
    data = os.urandom(40 << 20)
    digest = digest_of(data)
    started = http.post(hosted.url(f"/v2/{name}/blobs/uploads/"), timeout=30)
    assert started.status_code == 202, started.text
    location = started.headers["Location"]
    upload_id = started.headers["Docker-Upload-UUID"]
    (before,) = worker_pids(hosted.server.pid)

    # The PATCH announces the whole blob, sends half of it and waits: the worker is
    # killed while it is storing the session's bytes (on S3, past its first part).
    sent = len(data) // 2
    sock = socket.create_connection((LOOPBACK, int(hosted.host.rpartition(":")[2])))
    try:
        sock.sendall(raw_request_head(hosted, "PATCH", location, len(data)))
        sock.sendall(data[:sent])
        wait_until(
            lambda: one_worker.session_has_bytes(upload_id),
            60,
            "the worker to store some of the chunk",
        )
        os.kill(before, signal.SIGKILL)
        with pytest.raises(OSError):
            # The peer is gone: the rest of the body cannot go anywhere, or the answer
            # is a reset; either way the client sees its PATCH fail.
            sock.sendall(data[sent:])
            sock.settimeout(30)
            if not sock.recv(1):
                raise ConnectionResetError("closed without an answer")
    finally:
        sock.close()

    # The master starts a new worker; the blob was never verified, so it is nowhere.
    wait_until(
        lambda: (
            [p for p in worker_pids(hosted.server.pid) if p != before]
            and requests.get(hosted.url("/health"), timeout=5).status_code == 200
        ),
        60,
        "a new worker",
    )
    head = http.head(hosted.url(f"/v2/{name}/blobs/{digest}"), timeout=30)
    assert head.status_code == 404
    assert not one_worker.blob_stored(digest)
    # The killed session holds at most what arrived, never more; it is not a blob.
    status = http.get(absolute(hosted.public_url, location), timeout=30)
    if status.status_code == 204:
        held = int(status.headers["Range"].split("-")[1]) + 1
        assert held <= sent

    # The client's retry: a new upload of the whole blob, in two chunks.
    retry = http.post(hosted.url(f"/v2/{name}/blobs/uploads/"), timeout=30)
    assert retry.status_code == 202
    where = absolute(hosted.public_url, retry.headers["Location"])
    half = len(data) // 2
    first = http.patch(
        where,
        data=data[:half],
        headers={"Content-Type": OCTET, "Content-Range": f"0-{half - 1}"},
        timeout=120,
    )
    assert first.status_code == 202, first.text
    where = absolute(hosted.public_url, first.headers["Location"])
    done = http.put(where, params={"digest": digest}, data=data[half:], timeout=120)
    assert done.status_code == 201, done.text
    got = http.get(hosted.url(f"/v2/{name}/blobs/{digest}"), timeout=120)
    assert got.status_code == 200 and got.content == data
    assert one_worker.blob_stored(digest)


# --- the disk filling up ------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs (mount needs root, which the rig has), unmounted after."""
    point = tmp_path / "small"
    point.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs", str(point)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    try:
        yield point
    finally:
        subprocess.run(["umount", str(point)], check=False, capture_output=True, timeout=60)


@pytest.fixture
def full_disk_server(tmp_path: Path, small_disk: Path) -> Iterator[Hosted]:
    with hosted_server(tmp_path / "server", cache=small_disk / "cache") as hosted:
        yield hosted


def assert_names_the_disk(response: requests.Response) -> None:
    assert response.status_code == 507, response.text
    message = error_message(response)
    assert "disk" in message and "space" in message, message


def test_a_full_disk_during_an_upload_is_a_507_and_leaves_nothing(
    full_disk_server: Hosted,
) -> None:
    hosted, cache = full_disk_server, full_disk_server.cache
    assert cache is not None
    http = hosted.session()
    name = f"team/full-{secrets.token_hex(4)}"
    too_big = os.urandom(12 << 20)
    digest = digest_of(too_big)

    # Monolithic: POST ?digest= with the whole blob.
    answer = http.post(
        hosted.url(f"/v2/{name}/blobs/uploads/"),
        params={"digest": digest},
        data=too_big,
        headers={"Content-Type": OCTET},
        timeout=120,
    )
    assert_names_the_disk(answer)
    assert upload_dirs(cache) == []
    assert blob_files(cache, digest) == []

    # A session: the PATCH that fills the disk leaves the session as it was (empty), and
    # the client's cancel removes it.
    started = http.post(hosted.url(f"/v2/{name}/blobs/uploads/"), timeout=30)
    assert started.status_code == 202
    location = absolute(hosted.public_url, started.headers["Location"])
    answer = http.patch(location, data=too_big, headers={"Content-Type": OCTET}, timeout=120)
    assert_names_the_disk(answer)
    status = http.get(location, timeout=30)
    assert status.status_code == 204 and status.headers["Range"] == "0-0"
    assert http.delete(location, timeout=30).status_code == 204
    assert upload_dirs(cache) == []
    assert blob_files(cache, digest) == []
    assert http.head(hosted.url(f"/v2/{name}/blobs/{digest}"), timeout=30).status_code == 404

    # What fits still goes in: the failed uploads took no space with them.
    small = os.urandom(2 << 20)
    push_blob(http, hosted.public_url, name, small)
    assert http.get(hosted.url(f"/v2/{name}/blobs/{digest_of(small)}"), timeout=60).content == small


# --- bad input ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hosted]:
    with hosted_server(tmp_path_factory.mktemp("faults")) as hosted:
        yield hosted


def repo() -> str:
    return f"team/bad-{secrets.token_hex(4)}"


def test_a_manifest_referencing_a_missing_blob(shared: Hosted) -> None:
    http, name = shared.session(), repo()
    config = push_blob(http, shared.public_url, name, b'{"architecture":"amd64","os":"linux"}')
    assert config
    body = image_manifest(b'{"architecture":"amd64","os":"linux"}', [b"never pushed"])
    answer = http.put(
        shared.url(f"/v2/{name}/manifests/1.0"),
        data=body,
        headers={"Content-Type": OCI_MANIFEST},
        timeout=30,
    )
    assert answer.status_code == 400 and error_codes(answer) == ["MANIFEST_BLOB_UNKNOWN"]
    assert digest_of(b"never pushed") in error_message(answer)
    assert http.get(shared.url(f"/v2/{name}/manifests/1.0"), timeout=30).status_code == 404


def test_a_digest_that_does_not_match(shared: Hosted) -> None:
    http, name = shared.session(), repo()
    data, claimed = os.urandom(4096), digest_of(b"something else")
    # Monolithic, and at the end of a session: neither commits anything.
    answer = http.post(
        shared.url(f"/v2/{name}/blobs/uploads/"), params={"digest": claimed}, data=data, timeout=30
    )
    assert answer.status_code == 400 and error_codes(answer) == ["DIGEST_INVALID"]
    started = http.post(shared.url(f"/v2/{name}/blobs/uploads/"), timeout=30)
    location = absolute(shared.public_url, started.headers["Location"])
    answer = http.put(location, params={"digest": claimed}, data=data, timeout=30)
    assert answer.status_code == 400 and error_codes(answer) == ["DIGEST_INVALID"]
    for digest in (claimed, digest_of(data)):
        assert http.head(shared.url(f"/v2/{name}/blobs/{digest}"), timeout=30).status_code == 404
        assert shared.cache is not None and blob_files(shared.cache, digest) == []
    # The session is gone with its failed commit.
    assert http.get(location, timeout=30).status_code == 404
    # A manifest whose content is not the digest it is pushed by.
    body = b'{"schemaVersion": 2}'
    answer = http.put(
        shared.url(f"/v2/{name}/manifests/{digest_of(b'other')}"),
        data=body,
        headers={"Content-Type": OCI_MANIFEST},
        timeout=30,
    )
    assert answer.status_code == 400 and error_codes(answer) == ["DIGEST_INVALID"]


def test_a_truncated_chunk(shared: Hosted) -> None:
    http, name = shared.session(), repo()
    started = http.post(shared.url(f"/v2/{name}/blobs/uploads/"), timeout=30)
    location = started.headers["Location"]
    # A body that ends before its Content-Length: the client half-closes after 1000 of
    # the 5000 bytes it announced.
    sock = socket.create_connection((LOOPBACK, int(shared.host.rpartition(":")[2])))
    try:
        sock.sendall(raw_request_head(shared, "PATCH", location, 5000))
        sock.sendall(os.urandom(1000))
        sock.shutdown(socket.SHUT_WR)
        status, body = read_answer(sock)
    finally:
        sock.close()
    assert status == 400, body
    assert [e["code"] for e in json.loads(body)["errors"]] == ["SIZE_INVALID"]
    # The truncated chunk never counts: the session holds nothing.
    held = http.get(absolute(shared.public_url, location), timeout=30)
    assert held.status_code == 204 and held.headers["Range"] == "0-0"
    # A Content-Range that promises more than the body holds: the spec's 416.
    answer = http.patch(
        absolute(shared.public_url, location),
        data=b"abc",
        headers={"Content-Type": OCTET, "Content-Range": "0-9"},
        timeout=30,
    )
    assert answer.status_code == 416 and error_codes(answer) == ["BLOB_UPLOAD_INVALID"]
    assert http.get(absolute(shared.public_url, location), timeout=30).headers["Range"] == "0-0"


def test_a_chunk_after_the_session_was_closed(shared: Hosted) -> None:
    http, name = shared.session(), repo()
    data = os.urandom(1024)
    started = http.post(shared.url(f"/v2/{name}/blobs/uploads/"), timeout=30)
    location = absolute(shared.public_url, started.headers["Location"])
    done = http.put(location, params={"digest": digest_of(data)}, data=data, timeout=30)
    assert done.status_code == 201
    late = http.patch(location, data=b"more", headers={"Content-Type": OCTET}, timeout=30)
    assert late.status_code == 404 and error_codes(late) == ["BLOB_UPLOAD_UNKNOWN"]
    again = http.put(location, params={"digest": digest_of(data)}, data=b"", timeout=30)
    assert again.status_code == 404 and error_codes(again) == ["BLOB_UPLOAD_UNKNOWN"]
    # A cancelled session is as closed.
    started = http.post(shared.url(f"/v2/{name}/blobs/uploads/"), timeout=30)
    location = absolute(shared.public_url, started.headers["Location"])
    assert http.delete(location, timeout=30).status_code == 204
    late = http.patch(location, data=b"more", headers={"Content-Type": OCTET}, timeout=30)
    assert late.status_code == 404 and error_codes(late) == ["BLOB_UPLOAD_UNKNOWN"]


@pytest.mark.parametrize(
    "name",
    ["team/App", "team/a..b", "team/-lead", "team//double", "team/trailing-", "team/" + "a" * 300],
)
def test_a_name_that_breaks_the_grammar(shared: Hosted, name: str) -> None:
    http = shared.session()
    answer = http.post(shared.url(f"/v2/{name}/blobs/uploads/"), timeout=30)
    assert answer.status_code == 400, answer.text
    assert error_codes(answer) == ["NAME_INVALID"]


def test_a_ten_megabyte_manifest(shared: Hosted) -> None:
    http, name = shared.session(), repo()
    body = b'{"schemaVersion": 2, "pad": "' + b"x" * (10 << 20) + b'"}'
    answer = http.put(
        shared.url(f"/v2/{name}/manifests/big"),
        data=body,
        headers={"Content-Type": OCI_MANIFEST},
        timeout=60,
    )
    assert answer.status_code == 413 and error_codes(answer) == ["SIZE_INVALID"]
    assert "KiB" in error_message(answer)
    assert http.get(shared.url(f"/v2/{name}/manifests/big"), timeout=30).status_code == 404
