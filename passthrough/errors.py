"""The exceptions passthrough raises, and what each one means to a client.

One root, :class:`PassthroughError`; every leaf carries the HTTP status it maps to
and a one-line message that is safe to show (it never holds a credential, a token
or an upstream body). :mod:`passthrough.web.errors` turns them into responses in
one place.
"""

from __future__ import annotations

import errno


class PassthroughError(Exception):
    """Root of every error passthrough answers with an HTTP status."""

    status: int = 500
    #: A short, stable name for logs, metrics and traces (``error.type``).
    kind: str = "internal"
    #: The OCI Distribution error code this error is on /v2, when it fixes one.
    code: str | None = None

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers: dict[str, str] = dict(headers or {})


# -- the client's request --------------------------------------------------------------


class BadRequest(PassthroughError):
    """The filename, reference or query cannot be used (400)."""

    status = 400
    kind = "bad_request"


class ClientAuthRequired(PassthroughError):
    """The route needs the client's Basic credentials (401 with a Basic challenge)."""

    status = 401
    kind = "client_auth_required"
    CHALLENGE = 'Basic realm="registry credentials"'

    def __init__(self, message: str = "this route needs registry credentials (HTTP Basic)") -> None:
        super().__init__(message, headers={"WWW-Authenticate": self.CHALLENGE})


class TokenRequired(PassthroughError):
    """/v2 needs a Bearer token from passthrough's token service, or Basic credentials
    (401). The response carries the Bearer challenge naming the realm (PUBLIC_URL), the
    service and the scope to ask for, so a client knows where to get one."""

    status = 401
    kind = "unauthorized"


class TokenInvalid(PassthroughError):
    """A Bearer token that passthrough did not issue with its key, was altered, is
    malformed or has expired (401). The message never quotes the token."""

    status = 401
    kind = "token_invalid"


class InsufficientScope(PassthroughError):
    """A valid token that does not grant the action on the repository asked (401 with
    ``error="insufficient_scope"``, so the client fetches a token for that scope)."""

    status = 401
    kind = "insufficient_scope"


class ClientAuthDisabled(PassthroughError):
    """Client credentials are switched off (REGISTRY_CLIENT_AUTH=off) (403)."""

    status = 403
    kind = "client_auth_disabled"


class Forbidden(PassthroughError):
    """The service refuses the target itself, such as a registry host not allowed (403)."""

    status = 403
    kind = "forbidden"


class NotAcceptable(PassthroughError):
    """The image exists but not in a form we can deliver, such as another platform (404)."""

    status = 404
    kind = "platform_not_found"


class TooBusy(PassthroughError):
    """This worker already serves as many downloads as it may (503, Retry-After)."""

    status = 503
    kind = "too_busy"


class TooLarge(PassthroughError):
    """A manifest, config or image is over a configured limit (413)."""

    status = 413
    kind = "too_large"


class InsufficientStorage(PassthroughError):
    """The disk for temp files or the cache is full (507)."""

    status = 507
    kind = "insufficient_storage"


class Cancelled(PassthroughError):
    """The download this fetch belonged to is gone; stop quietly."""

    status = 499
    kind = "cancelled"


# -- the hosted area: the push half of the OCI Distribution API ----------------------------


class RegistryRequestError(PassthroughError):
    """A /v2 request the hosted area refuses, with the spec's code (400 unless a leaf
    says otherwise)."""

    status = 400
    kind = "registry_request"
    code = "UNSUPPORTED"


class Denied(RegistryRequestError):
    """The client may not do this to this repository (403 DENIED)."""

    status = 403
    kind = "denied"
    code = "DENIED"


class NameUnknown(RegistryRequestError):
    status = 404
    kind = "name_unknown"
    code = "NAME_UNKNOWN"


class ManifestUnknown(RegistryRequestError):
    status = 404
    kind = "manifest_unknown"
    code = "MANIFEST_UNKNOWN"


class BlobUnknown(RegistryRequestError):
    status = 404
    kind = "blob_unknown"
    code = "BLOB_UNKNOWN"


class UploadUnknown(RegistryRequestError):
    """No such upload session, or it belongs to another repository (404)."""

    status = 404
    kind = "blob_upload_unknown"
    code = "BLOB_UPLOAD_UNKNOWN"


class UploadInvalid(RegistryRequestError):
    """A chunk that does not fit the session: out of order (416), or malformed (400)."""

    kind = "blob_upload_invalid"
    code = "BLOB_UPLOAD_INVALID"

    def __init__(self, message: str, *, status: int = 400, headers: dict[str, str] | None = None):
        super().__init__(message, headers=headers)
        self.status = status


class DigestMismatch(RegistryRequestError):
    """The content does not hash to the digest given, or the digest is malformed (400)."""

    kind = "digest_invalid"
    code = "DIGEST_INVALID"


class SizeInvalid(RegistryRequestError):
    """The content's length is not the one declared, or over a limit."""

    kind = "size_invalid"
    code = "SIZE_INVALID"

    def __init__(self, message: str, *, status: int = 400):
        super().__init__(message)
        self.status = status


class ManifestInvalid(RegistryRequestError):
    kind = "manifest_invalid"
    code = "MANIFEST_INVALID"


class ManifestBlobUnknown(RegistryRequestError):
    """A pushed manifest references a blob or child manifest the repository lacks."""

    kind = "manifest_blob_unknown"
    code = "MANIFEST_BLOB_UNKNOWN"


# -- the content store -------------------------------------------------------------------


class StoreUnavailable(PassthroughError):
    """The content store (the S3 bucket, or Redis behind its lock) failed during a
    request (503); the message names the store, never its credentials."""

    status = 503
    kind = "store_unavailable"


# -- the upstream registry ------------------------------------------------------------


class UpstreamError(PassthroughError):
    """Something the registry did (or did not do); 502 unless a leaf says otherwise."""

    status = 502
    kind = "upstream_error"
    #: The registry's error code (MANIFEST_UNKNOWN, DENIED…) when it sent one.
    registry_code: str | None = None


class UpstreamNotFound(UpstreamError):
    """The repository, tag, manifest or blob does not exist upstream (404)."""

    status = 404
    kind = "upstream_not_found"


class UpstreamUnauthorized(UpstreamError):
    """The registry wants credentials, or refused the ones we sent (401).

    When the route accepts client credentials the response carries the Basic
    challenge, so a client such as IOS-XE can retry with them.
    """

    status = 401
    kind = "upstream_unauthorized"


class UpstreamForbidden(UpstreamError):
    """The registry understood the credentials and denied access (403)."""

    status = 403
    kind = "upstream_forbidden"


class UpstreamRateLimited(UpstreamError):
    """The registry answered 429; its Retry-After is passed on."""

    status = 429
    kind = "upstream_rate_limited"


class UpstreamUnreachable(UpstreamError):
    """No connection to the registry or its token service could be made (502)."""

    status = 502
    kind = "upstream_unreachable"


class UpstreamCertificateError(UpstreamError):
    """The TLS handshake with the registry, its token service or a redirect target
    failed: most often a certificate no trusted CA signed (UPSTREAM_CA_FILE adds one).
    Never retried (it will not heal by itself) nor answered from the store (502)."""

    status = 502
    kind = "upstream_certificate"


class UpstreamTimeout(UpstreamError):
    """The registry did not answer in time (504)."""

    status = 504
    kind = "upstream_timeout"


class UpstreamUnavailable(UpstreamError):
    """The registry answered 5xx (503)."""

    status = 503
    kind = "upstream_unavailable"


class UpstreamInvalid(UpstreamError):
    """The registry sent something that is not what it promised: bad JSON, a digest
    mismatch, a truncated blob (502)."""

    status = 502
    kind = "upstream_invalid"


class UnsupportedImage(UpstreamError):
    """The image uses something we refuse to package: schema1, foreign layers,
    an unknown media type (422)."""

    status = 422
    kind = "unsupported_image"


def is_disk_full(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


def disk_full() -> InsufficientStorage:
    return InsufficientStorage("no space left on the disk for temporary or cached layer files")
