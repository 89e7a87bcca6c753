"""The exceptions passthrough raises, and what each one means to a client.

One root, :class:`PassthroughError`. Like distribution's errcode descriptors, each class
ties together what a client is told: the HTTP ``status``, the OCI Distribution spec's
error ``code`` on /v2 (``DIGEST_INVALID``, ``DENIED``…) and a ``default_message``; a
``code`` of None leaves it to the status (:func:`code_for_status`), and for a 404 to the
route (which ``*_UNKNOWN``). Messages are one line and safe to show (never a credential,
a token or an upstream body). :mod:`passthrough.web.errors` turns the tree into
responses in one place, from these attributes alone.
"""

from __future__ import annotations

import errno
from typing import Any


class PassthroughError(Exception):
    """Root of every error passthrough answers with an HTTP status."""

    status: int = 500
    #: A short, stable name for logs, metrics and traces (``error.type``).
    kind: str = "internal"
    #: The OCI Distribution error code on /v2; None: :func:`code_for_status` decides.
    code: str | None = None
    #: The message when the raiser has nothing to add.
    default_message: str = "internal error; see the server log"

    def __init__(
        self, message: str | None = None, *, headers: dict[str, str] | None = None
    ) -> None:
        message = self.default_message if message is None else message
        super().__init__(message)
        self.message = message
        self.headers: dict[str, str] = dict(headers or {})


def code_for_status(status: int) -> str:
    """The spec's code for an error whose class names none, by its status (a 404's
    ``*_UNKNOWN`` depends on the route: the caller knows it)."""
    if status == 401:
        return "UNAUTHORIZED"
    if status == 403:
        return "DENIED"
    if status == 429:
        return "TOOMANYREQUESTS"
    if status >= 500:
        return "UNAVAILABLE" if status in (502, 503, 504) else "UNKNOWN"
    return "UNSUPPORTED"


def code_for_kind(kind: str) -> str | None:
    """The ``code`` of the class whose ``kind`` this is (None when none or no class has
    it): for an error that crossed a process boundary as its kind."""
    pending: list[type[PassthroughError]] = [PassthroughError]
    while pending:
        cls = pending.pop()
        if cls.__dict__.get("kind") == kind and cls.code is not None:
            return cls.code
        pending.extend(cls.__subclasses__())
    return None


# -- the client's request --------------------------------------------------------------


class BadRequest(PassthroughError):
    """The filename, reference or query cannot be used (400)."""

    status = 400
    kind = "bad_request"
    code = "UNSUPPORTED"
    default_message = "the request cannot be used"


class NameInvalid(BadRequest):
    """A repository name that breaks the distribution grammar (400 NAME_INVALID)."""

    kind = "name_invalid"
    code = "NAME_INVALID"
    default_message = "invalid repository name"


class DigestInvalid(BadRequest):
    """A digest in the path or query that is not one (400 DIGEST_INVALID)."""

    kind = "digest_invalid"
    code = "DIGEST_INVALID"
    default_message = "invalid digest"


class TagInvalid(BadRequest):
    """A manifest reference that is neither a digest nor a valid tag (400 TAG_INVALID)."""

    kind = "tag_invalid"
    code = "TAG_INVALID"
    default_message = "invalid tag"


class OAuthError(BadRequest):
    """An OAuth2 token request error (RFC 6749 §5.2), answered as its JSON with
    ``error`` as the OAuth code (the token endpoint writes its own answers)."""

    def __init__(self, error: str, message: str) -> None:
        super().__init__(message)
        self.error = error


class ClientStalled(TimeoutError):
    """The client stopped sending its request (or reading the answer) within the
    server's deadlines (HEADER_TIMEOUT, BODY_TIMEOUT, BODY_MIN_RATE, SEND_TIMEOUT): raised
    by the gunicorn worker (:mod:`passthrough.web.worker`) from the socket's reads, so a
    view reading an upload's body meets it; answered 408, and the connection is closed.
    Not a PassthroughError: it is the connection's, not the request's."""

    def __init__(self, phase: str) -> None:
        super().__init__(f"the client stalled ({phase})")
        self.phase = phase


class RangeNotSatisfiable(PassthroughError):
    """The Range starts past the end of the blob or archive (416). The spec has no code
    for it: the routes answer an empty 416 with ``Content-Range: bytes */<size>``."""

    status = 416
    kind = "range_not_satisfiable"
    code = None
    default_message = "the range starts past the end"


class ClientAuthRequired(PassthroughError):
    """The route needs the client's Basic credentials (401 with a Basic challenge)."""

    status = 401
    kind = "client_auth_required"
    code = "UNAUTHORIZED"
    default_message = "this route needs registry credentials (HTTP Basic)"
    CHALLENGE = 'Basic realm="registry credentials"'

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message, headers={"WWW-Authenticate": self.CHALLENGE})


class TokenRequired(PassthroughError):
    """/v2 needs a Bearer token from passthrough's token service, or Basic credentials
    (401). The response carries the Bearer challenge naming the realm (PUBLIC_URL), the
    service and the scope to ask for, so a client knows where to get one."""

    status = 401
    kind = "unauthorized"
    code = "UNAUTHORIZED"
    default_message = "authentication required"


class TokenInvalid(PassthroughError):
    """A Bearer token that passthrough did not issue with its key, was altered, is
    malformed or has expired (401). The message never quotes the token."""

    status = 401
    kind = "token_invalid"
    code = "UNAUTHORIZED"
    default_message = "the token is invalid or has expired"


class InsufficientScope(PassthroughError):
    """A valid token that does not grant the action on the repository asked (401 with
    ``error="insufficient_scope"``, so the client fetches a token for that scope)."""

    status = 401
    kind = "insufficient_scope"
    code = "UNAUTHORIZED"
    default_message = "the token does not grant this; ask for its scope"


class LoginFailed(PassthroughError):
    """Wrong user name or password (401). The message never says which was wrong."""

    status = 401
    kind = "unauthorized"
    code = "UNAUTHORIZED"
    default_message = "wrong user name or password"


class TooManyLogins(PassthroughError):
    """The client's address failed to log in too often lately (429, Retry-After)."""

    status = 429
    kind = "too_many_requests"
    code = "TOOMANYREQUESTS"
    default_message = "too many failed logins from this address"


class ClientAuthDisabled(PassthroughError):
    """Client credentials are switched off (REGISTRY_CLIENT_AUTH=off) (403)."""

    status = 403
    kind = "client_auth_disabled"
    code = "DENIED"
    default_message = "client credentials are switched off"


class Forbidden(PassthroughError):
    """The service refuses the target itself, such as a registry host not allowed (403)."""

    status = 403
    kind = "forbidden"
    code = "DENIED"
    default_message = "this target is not allowed"


class NotAcceptable(PassthroughError):
    """The image exists but not in a form we can deliver, such as another platform (404;
    on /v2 the route says which ``*_UNKNOWN``)."""

    status = 404
    kind = "platform_not_found"
    code = None
    default_message = "the image has no such form"


class PlatformNotFound(NotAcceptable):
    """The image has no manifest for the requested platform (404); ``document`` is the
    description without ``selected``, for a JSON answer that lists what there is."""

    def __init__(self, message: str, document: dict[str, Any]) -> None:
        super().__init__(message)
        self.document = document


class NoCertificateAuthority(PassthroughError):
    """GET /ca.crt without a CA to hand out (404; not a /v2 route, so no spec code)."""

    status = 404
    kind = "no_ca"
    code = None
    default_message = "no CA to hand out"


class TooBusy(PassthroughError):
    """This worker already serves as many downloads as it may (503, Retry-After)."""

    status = 503
    kind = "too_busy"
    code = "UNAVAILABLE"
    default_message = "too busy; try again later"


class TooLarge(PassthroughError):
    """A manifest, config or image is over a configured limit (413)."""

    status = 413
    kind = "too_large"
    code = "SIZE_INVALID"
    default_message = "over a configured size limit"


class InsufficientStorage(PassthroughError):
    """The disk for temp files or the cache is full (507)."""

    status = 507
    kind = "insufficient_storage"
    code = "UNKNOWN"
    default_message = "no space left on the disk for temporary or cached layer files"


class Cancelled(PassthroughError):
    """The download this fetch belonged to is gone; stop quietly (499; should a /v2
    client still be waiting, it is told 502)."""

    status = 499
    kind = "cancelled"
    code = "UNAVAILABLE"
    default_message = "cancelled"


# -- the hosted area: the push half of the OCI Distribution API ----------------------------


class RegistryRequestError(PassthroughError):
    """A /v2 request the hosted area refuses, with the spec's code (400 unless a leaf
    says otherwise)."""

    status = 400
    kind = "registry_request"
    code = "UNSUPPORTED"
    default_message = "the operation is unsupported"


class Denied(RegistryRequestError):
    """The client may not do this to this repository (403 DENIED)."""

    status = 403
    kind = "denied"
    code = "DENIED"
    default_message = "requested access to the resource is denied"


class NameUnknown(RegistryRequestError):
    status = 404
    kind = "name_unknown"
    code = "NAME_UNKNOWN"
    default_message = "repository name not known to registry"


class TagUnknown(RegistryRequestError):
    """The repository has no such tag (404 TAG_UNKNOWN; the inventory API)."""

    status = 404
    kind = "tag_unknown"
    code = "TAG_UNKNOWN"
    default_message = "no such tag"


class PaginationInvalid(BadRequest):
    """``n`` or ``last`` of a listing cannot be used (400 PAGINATION_INVALID)."""

    kind = "pagination_invalid"
    code = "PAGINATION_INVALID"
    default_message = "invalid pagination: n must be 1 to 1000"


class ManifestUnknown(RegistryRequestError):
    status = 404
    kind = "manifest_unknown"
    code = "MANIFEST_UNKNOWN"
    default_message = "manifest unknown"


class BlobUnknown(RegistryRequestError):
    status = 404
    kind = "blob_unknown"
    code = "BLOB_UNKNOWN"
    default_message = "blob unknown to registry"


class UploadUnknown(RegistryRequestError):
    """No such upload session, or it belongs to another repository (404)."""

    status = 404
    kind = "blob_upload_unknown"
    code = "BLOB_UPLOAD_UNKNOWN"
    default_message = "blob upload unknown to registry"


class UploadInvalid(RegistryRequestError):
    """A chunk that does not fit the session: out of order (416), or malformed (400)."""

    kind = "blob_upload_invalid"
    code = "BLOB_UPLOAD_INVALID"
    default_message = "blob upload invalid"

    def __init__(self, message: str, *, status: int = 400, headers: dict[str, str] | None = None):
        super().__init__(message, headers=headers)
        self.status = status


class DigestMismatch(RegistryRequestError):
    """The content does not hash to the digest given, or the digest is malformed (400)."""

    kind = "digest_invalid"
    code = "DIGEST_INVALID"
    default_message = "provided digest did not match uploaded content"


class SizeInvalid(RegistryRequestError):
    """The content's length is not the one declared, or over a limit."""

    kind = "size_invalid"
    code = "SIZE_INVALID"
    default_message = "provided length did not match content length"

    def __init__(self, message: str, *, status: int = 400):
        super().__init__(message)
        self.status = status


class ManifestInvalid(RegistryRequestError):
    kind = "manifest_invalid"
    code = "MANIFEST_INVALID"
    default_message = "manifest invalid"


class ManifestBlobUnknown(RegistryRequestError):
    """A pushed manifest references a blob or child manifest the repository lacks."""

    kind = "manifest_blob_unknown"
    code = "MANIFEST_BLOB_UNKNOWN"
    default_message = "manifest references a manifest or blob unknown to registry"


class ArchiveInvalid(BadRequest):
    """An archive given to ``passthrough import`` (or its upload endpoint) that cannot
    be imported whole: truncated, a blob missing or not matching its digest, a
    manifest.json or index.json that is not what it should be (400; nothing is stored)."""

    kind = "archive_invalid"
    code = "ARCHIVE_INVALID"
    default_message = "the archive cannot be imported"
# -- sync runs ----------------------------------------------------------------------------


class SyncFileInvalid(BadRequest):
    """SYNC_FILE is not set, unreadable, or names something wrong (400, one line naming
    the entry)."""

    kind = "sync_file_invalid"
    code = "SYNC_FILE_INVALID"
    default_message = "SYNC_FILE is not set"


class SyncRunning(PassthroughError):
    """A sync run is already under way on this pod (409): one at a time."""

    status = 409
    kind = "sync_running"
    code = "SYNC_RUNNING"
    default_message = "a sync run is already under way on this pod"


# -- the content store -------------------------------------------------------------------


class StoreRequired(PassthroughError):
    """The /v2 API keeps what it serves in the content store; there is none (503)."""

    status = 503
    kind = "store_required"
    code = "UNAVAILABLE"
    default_message = (
        "the /v2 API needs a content store: this server runs with STORE=off (use the default "
        "store, a CACHE_DIR, or STORE=s3)"
    )


class StoreUnavailable(PassthroughError):
    """The content store (the S3 bucket, or Redis behind its lock) failed during a
    request (503); the message names the store, never its credentials."""

    status = 503
    kind = "store_unavailable"
    code = "UNAVAILABLE"
    default_message = "the content store is unavailable"


class TransferAborted(PassthroughError):
    """A read-through ended badly after headers were sent: the transfer must break."""

    status = 502
    kind = "transfer_aborted"
    code = "UNAVAILABLE"
    default_message = "the transfer was aborted"


# -- the upstream registry ------------------------------------------------------------


class UpstreamError(PassthroughError):
    """Something the registry did (or did not do); 502 unless a leaf says otherwise. On
    /v2 the registry's own code, when it is one of the spec's and the status is below
    500, is passed on in place of ``code``."""

    status = 502
    kind = "upstream_error"
    code: str | None = "UNAVAILABLE"
    default_message = "the upstream registry failed"
    #: The registry's error code (MANIFEST_UNKNOWN, DENIED…) when it sent one.
    registry_code: str | None = None


class FetchFailed(UpstreamError):
    """Another process's fetch of this blob failed before its first byte; its status,
    kind (and so its code) and message are passed on."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.code = code_for_kind(kind)


class UpstreamNotFound(UpstreamError):
    """The repository, tag, manifest or blob does not exist upstream (404; on /v2 the
    route says which ``*_UNKNOWN``)."""

    status = 404
    kind = "upstream_not_found"
    code = None
    default_message = "not found on the registry"


class UpstreamUnauthorized(UpstreamError):
    """The registry wants credentials, or refused the ones we sent (401).

    When the route accepts client credentials the response carries the Basic
    challenge, so a client such as IOS-XE can retry with them.
    """

    status = 401
    kind = "upstream_unauthorized"
    code = "UNAUTHORIZED"
    default_message = "the registry requires other credentials"


class UpstreamForbidden(UpstreamError):
    """The registry understood the credentials and denied access (403)."""

    status = 403
    kind = "upstream_forbidden"
    code = "DENIED"
    default_message = "the registry denied access"


class UpstreamRateLimited(UpstreamError):
    """The registry answered 429; its Retry-After is passed on."""

    status = 429
    kind = "upstream_rate_limited"
    code = "TOOMANYREQUESTS"
    default_message = "the registry is rate-limiting us"


class UpstreamUnreachable(UpstreamError):
    """No connection to the registry or its token service could be made (502); the
    message names the host and why (:mod:`passthrough.upstream.failures`: DNS name not
    found, connection refused, reset, no route)."""

    status = 502
    kind = "upstream_unreachable"
    default_message = "the registry cannot be reached"


class UpstreamCertificateError(UpstreamError):
    """The TLS handshake with the registry, its token service or a redirect target
    failed: most often a certificate no trusted CA signed (UPSTREAM_CA_FILE adds one).
    Never retried (it will not heal by itself) nor answered from the store (502)."""

    status = 502
    kind = "upstream_certificate"
    default_message = "the registry's TLS certificate is not trusted"


class UpstreamTimeout(UpstreamError):
    """The registry did not answer in time (504): a connect timeout or a read timeout,
    named as such with the host and the setting that bounds it."""

    status = 504
    kind = "upstream_timeout"
    default_message = "the registry did not answer in time"


class UpstreamUnavailable(UpstreamError):
    """The registry answered 5xx (503)."""

    status = 503
    kind = "upstream_unavailable"
    default_message = "the registry is unavailable"


class OfflineMode(PassthroughError):
    """The answer needs the upstream, which offline mode (OFFLINE, OFFLINE_UPSTREAMS)
    never contacts: a tag list, a confirmation of client credentials (503)."""

    status = 503
    kind = "offline"
    code = "UNAVAILABLE"
    default_message = "offline mode: the upstream registry is never contacted"


class OfflineNotStored(PassthroughError):
    """Offline mode, and the store does not hold what was asked for (404; on /v2 the
    route says which ``*_UNKNOWN``)."""

    status = 404
    kind = "offline_not_stored"
    code = None
    default_message = "offline mode: not in the store, and the upstream is never contacted"


class UpstreamInvalid(UpstreamError):
    """The registry sent something that is not what it promised: bad JSON, a digest
    mismatch, a truncated blob (502)."""

    status = 502
    kind = "upstream_invalid"
    default_message = "the registry sent something invalid"


class UnsupportedImage(UpstreamError):
    """The image uses something we refuse to package: schema1, foreign layers,
    an unknown media type (422)."""

    status = 422
    kind = "unsupported_image"
    code = "UNSUPPORTED"
    default_message = "the image uses something passthrough does not support"


def is_disk_full(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


def disk_full() -> InsufficientStorage:
    return InsufficientStorage()
