"""The S3 backend (STORE=s3): one bucket and key prefix, shared by every replica.

AWS S3 or any S3-compatible service (S3_ENDPOINT_URL: MinIO, SeaweedFS, Ceph RGW, GCS
in S3 mode). Credentials and region come from the standard AWS chain (environment,
shared files, instance roles, IRSA): passthrough never reads or logs them itself.

- A commit uploads a file that was verified on local disk first. Large files go up as
  a multipart upload, which S3 makes visible only when it is completed: a process killed
  mid-upload leaves no object, only an incomplete upload, which the lifecycle rule below
  aborts. The uploaded size is checked before the commit counts.
- Reads are ranged GETs streamed in order; a read at another offset starts a new GET.
- Objects are trusted once committed (their content was hashed before the upload, and
  S3 keeps its own checksums); a read that ends short aborts the transfer.
- Expiry: ``S3_LIFECYCLE_DAYS`` puts a lifecycle rule on the prefix at start-up
  (expire objects that many days after they were written, abort incomplete uploads
  after a day); ``CACHE_MAX_BYTES`` turns on the store's own size accounting (a listing
  at most once a minute per process, oldest written first). Either, both, or neither.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import boto3
import botocore.config
import botocore.exceptions
import urllib3
from boto3.s3.transfer import TransferConfig

from passthrough.config import ConfigError
from passthrough.errors import StoreUnavailable
from passthrough.store import layout
from passthrough.store.base import Backend, LayerFile, ObjectInfo

log = logging.getLogger(__name__)

MULTIPART_THRESHOLD = 32 << 20
MULTIPART_CHUNK = 16 << 20
LIFECYCLE_RULE_ID = "passthrough-expiry"
#: Seconds probe() waits for the bucket (connect and read each).
PROBE_TIMEOUT = 2.0

#: What botocore raises when S3 cannot be reached or answers wrongly.
S3_ERRORS = (
    botocore.exceptions.BotoCoreError,
    botocore.exceptions.ClientError,
    urllib3.exceptions.HTTPError,
    OSError,
)


class S3Backend(Backend):
    name = "s3"
    commit_uploads = True
    opens_locally = False

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        temp_dir: str | None = None,
        lifecycle_days: int = 0,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix
        self.endpoint_url = endpoint_url
        self.lifecycle_days = lifecycle_days
        self.region = region
        self.client = make_client(endpoint_url, region)
        #: For probe(): short timeouts and no retries (made on first use).
        self._probe_client: Any = None
        self.transfer = TransferConfig(
            multipart_threshold=MULTIPART_THRESHOLD,
            multipart_chunksize=MULTIPART_CHUNK,
            max_concurrency=4,
        )
        # Per-host working area: temporary files and the lock files of this pod's
        # workers. Named after the bucket and prefix, so two stores never share locks.
        identity = hashlib.sha256(f"{endpoint_url}\0{bucket}\0{prefix}".encode()).hexdigest()
        self.work_dir = Path(temp_dir or tempfile.gettempdir()) / f"passthrough-s3-{identity[:12]}"
        self.staging_dir().mkdir(parents=True, exist_ok=True)
        self.lock_dir().mkdir(parents=True, exist_ok=True)

    # -- naming and errors -------------------------------------------------------------

    def describe(self) -> str:
        where = self.endpoint_url or "AWS"
        return f"s3 store (bucket {self.bucket!r} at {where})"

    def staging_dir(self) -> Path:
        return self.work_dir / layout.STAGING_DIR

    def lock_dir(self) -> Path:
        return self.work_dir / layout.LOCK_DIR

    def full_key(self, key: str) -> str:
        """The bucket's key of a store key (under the prefix)."""
        return self.prefix + key

    def unavailable(self, exc: BaseException, doing: str) -> StoreUnavailable:
        """An S3 failure as the store's error, naming the store and what it was doing."""
        # botocore's messages name the operation, bucket and error code, never the
        # credentials; the exception's class says the rest.
        reason = error_code(exc) or type(exc).__name__
        return StoreUnavailable(f"the {self.describe()} failed while {doing}: {reason}")

    # -- reading -----------------------------------------------------------------------

    def size(self, key: str) -> int | None:
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self.full_key(key))
        except S3_ERRORS as exc:
            if is_missing(exc):
                return None
            raise self.unavailable(exc, "looking up an object") from None
        return int(head["ContentLength"])

    def open(self, key: str, digest: str | None) -> LayerFile | None:
        size = self.size(key)
        if size is None:
            return None
        return S3Object(self, self.full_key(key), size)

    def get_bytes(self, key: str) -> bytes | None:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self.full_key(key))
            data: bytes = response["Body"].read()
        except S3_ERRORS as exc:
            if is_missing(exc):
                return None
            raise self.unavailable(exc, "reading an object") from None
        return data

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.full_key(prefix)):
                for item in page.get("Contents", ()):
                    yield ObjectInfo(
                        item["Key"][len(self.prefix) :],
                        int(item["Size"]),
                        item["LastModified"].timestamp(),
                    )
        except S3_ERRORS as exc:
            raise self.unavailable(exc, "listing objects") from None

    def presigned_url(self, key: str, expires: int = 900) -> str | None:
        url: str = self.client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": self.full_key(key)},
            ExpiresIn=expires,
        )
        return url

    # -- writing -----------------------------------------------------------------------

    def commit_file(self, key: str, handle: BinaryIO, path: Path, size: int) -> None:
        full_key = self.full_key(key)
        try:
            # upload_file reads the file by path in parallel parts (multipart above
            # the threshold); the object appears only when the upload completes.
            self.client.upload_file(str(path), self.bucket, full_key, Config=self.transfer)
            head = self.client.head_object(Bucket=self.bucket, Key=full_key)
        except S3_ERRORS as exc:
            raise self.unavailable(exc, "storing an object") from None
        if int(head["ContentLength"]) != size:
            self.delete(key)
            raise StoreUnavailable(
                f"the {self.describe()} stored {head['ContentLength']} bytes of {size}"
            )

    def put_bytes(self, key: str, data: bytes) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.full_key(key), Body=data)
        except S3_ERRORS as exc:
            raise self.unavailable(exc, "storing an object") from None

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.full_key(key))
        except S3_ERRORS as exc:
            if not is_missing(exc):
                raise self.unavailable(exc, "deleting an object") from None

    # -- start-up ------------------------------------------------------------------------

    def check(self) -> None:
        """The bucket must exist and answer; a lifecycle rule is put when asked for."""
        where = self.endpoint_url or "AWS S3"
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except botocore.exceptions.ClientError as exc:
            code = error_code(exc)
            if code in ("404", "NoSuchBucket", "NotFound"):
                raise ConfigError(
                    f"S3_BUCKET: bucket {self.bucket!r} does not exist at {where}"
                ) from None
            if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise ConfigError(
                    f"S3_BUCKET: access to bucket {self.bucket!r} at {where} was refused "
                    f"({code}); check the AWS credentials"
                ) from None
            raise ConfigError(f"S3_BUCKET: bucket {self.bucket!r} at {where}: {code}") from None
        except S3_ERRORS as exc:
            raise ConfigError(
                f"S3_ENDPOINT_URL: cannot reach {where} ({type(exc).__name__})"
            ) from None
        if self.lifecycle_days:
            self._put_lifecycle_rule()

    def probe(self) -> None:
        """The local staging directory takes a file and the bucket answers a HEAD, within
        about PROBE_TIMEOUT (a readiness probe must not outwait its own timeout)."""
        super().probe()
        if self._probe_client is None:
            self._probe_client = make_client(self.endpoint_url, self.region, quick=True)
        try:
            self._probe_client.head_bucket(Bucket=self.bucket)
        except S3_ERRORS as exc:
            raise self.unavailable(exc, "answering HEAD bucket") from None

    def _put_lifecycle_rule(self) -> None:
        rule = {
            "ID": LIFECYCLE_RULE_ID + (f"-{self.prefix.strip('/')}" if self.prefix else ""),
            "Filter": {"Prefix": self.prefix},
            "Status": "Enabled",
            "Expiration": {"Days": self.lifecycle_days},
            "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1},
        }
        try:
            try:
                current = self.client.get_bucket_lifecycle_configuration(Bucket=self.bucket)
                rules = [r for r in current.get("Rules", []) if r.get("ID") != rule["ID"]]
            except botocore.exceptions.ClientError:
                rules = []  # none yet
            self.client.put_bucket_lifecycle_configuration(
                Bucket=self.bucket, LifecycleConfiguration={"Rules": [*rules, rule]}
            )
        except S3_ERRORS as exc:
            # Expiry is housekeeping: the store works without it, so say so and go on.
            log.warning(
                "S3_LIFECYCLE_DAYS: the %s did not accept a lifecycle rule (%s); objects "
                "will not expire by age",
                self.describe(),
                error_code(exc) or type(exc).__name__,
            )

    def close(self) -> None:
        self.client.close()
        if self._probe_client is not None:
            self._probe_client.close()


class S3Object(LayerFile):
    """A committed object read in order by one streaming ranged GET (a new one for a
    read elsewhere). A GET that fails or ends short raises :class:`StoreUnavailable`,
    which aborts the transfer it feeds: never a clean end to missing bytes."""

    def __init__(self, backend: S3Backend, key: str, size: int) -> None:
        self.backend = backend
        self.key = key
        self.size = size
        self.cache_hit = True
        self._body: Any = None
        self._position = -1

    def read_at(self, offset: int, length: int) -> bytes:
        length = max(0, min(length, self.size - offset))
        if not length:
            return b""
        try:
            if self._body is None or offset != self._position:
                self._close_body()
                response = self.backend.client.get_object(
                    Bucket=self.backend.bucket, Key=self.key, Range=f"bytes={offset}-"
                )
                self._body = response["Body"]
                self._position = offset
            data = bytearray()
            while len(data) < length:
                chunk = self._body.read(length - len(data))
                if not chunk:
                    break
                data += chunk
        except S3_ERRORS as exc:
            self._close_body()
            raise self.backend.unavailable(exc, "reading an object") from None
        if len(data) < length:
            self._close_body()
            raise StoreUnavailable(f"the {self.backend.describe()} ended an object early")
        self._position += len(data)
        return bytes(data)

    def _close_body(self) -> None:
        if self._body is not None:
            try:
                self._body.close()
            except S3_ERRORS:
                pass
            self._body = None
        self._position = -1

    def close(self) -> None:
        self._close_body()


def make_client(endpoint_url: str | None, region: str | None, *, quick: bool = False) -> Any:
    """A boto3 S3 client with timeouts and retries fit for a request path; ``quick``:
    for a health probe (PROBE_TIMEOUT, one attempt, one connection)."""
    options: dict[str, Any] = {
        "connect_timeout": 5,
        "read_timeout": 60,
        "retries": {"max_attempts": 3, "mode": "standard"},
        "max_pool_connections": 50,
    }
    if quick:
        options.update(
            connect_timeout=PROBE_TIMEOUT,
            read_timeout=PROBE_TIMEOUT,
            retries={"max_attempts": 1, "mode": "standard"},
            max_pool_connections=1,
        )
    if endpoint_url is not None:
        # S3-compatible services want path-style addressing, and many reject the
        # CRC32 trailers that current botocore sends by default.
        options["s3"] = {"addressing_style": "path"}
        options["request_checksum_calculation"] = "when_required"
        options["response_checksum_validation"] = "when_required"
    session = boto3.session.Session()
    return session.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=region,  # None: the AWS chain decides
        config=botocore.config.Config(**options),
    )


def error_code(exc: BaseException) -> str | None:
    """S3's error code of a ClientError (None for any other failure)."""
    if isinstance(exc, botocore.exceptions.ClientError):
        code = exc.response.get("Error", {}).get("Code")
        return str(code) if code else None
    return None


def is_missing(exc: BaseException) -> bool:
    """Whether S3 answered that the object (or key) is not there."""
    return error_code(exc) in ("404", "NoSuchKey", "NotFound")
