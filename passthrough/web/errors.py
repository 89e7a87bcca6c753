"""Errors mapped to responses in one place: every :class:`PassthroughError` becomes its
status with a one-line reason, as plain text on the tar routes and as the OCI
Distribution spec's JSON (``{"errors": [{"code": …, "message": …}]}``) on /v2;
anything unexpected becomes a 500 whose details go to the log only."""

from __future__ import annotations

import json
import logging

from flask import Blueprint, Response, request
from werkzeug.exceptions import HTTPException

from passthrough.errors import PassthroughError, UpstreamError
from passthrough.observe import metrics

log = logging.getLogger(__name__)

bp = Blueprint("errors", __name__)

#: The spec's codes that an upstream's own answer may name and we pass on.
PASSED_ON_CODES = frozenset(
    {
        "BLOB_UNKNOWN",
        "MANIFEST_UNKNOWN",
        "NAME_UNKNOWN",
        "DENIED",
        "UNAUTHORIZED",
        "TOOMANYREQUESTS",
        "UNSUPPORTED",
    }
)
#: Codes by our error kind, where the kind alone decides.
CODES_BY_KIND = {
    "name_invalid": "NAME_INVALID",
    "digest_invalid": "DIGEST_INVALID",
    "tag_invalid": "TAG_INVALID",
    "bad_request": "UNSUPPORTED",
    "forbidden": "DENIED",
    "upstream_forbidden": "DENIED",
    "client_auth_disabled": "DENIED",
    "upstream_rate_limited": "TOOMANYREQUESTS",
    "too_large": "SIZE_INVALID",
    "unsupported_image": "UNSUPPORTED",
}
#: What a 404 from upstream means, by the /v2 endpoint that met it.
UNKNOWN_BY_ENDPOINT = {
    "v2.manifest": "MANIFEST_UNKNOWN",
    "v2.blob": "BLOB_UNKNOWN",
}


def is_v2() -> bool:
    return request.path == "/v2" or request.path.startswith("/v2/")


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    # One line, no control characters: the message may quote client input.
    line = " ".join(message.split())
    response = Response(f"{status} {line}\n", status=status, mimetype="text/plain")
    response.headers["Cache-Control"] = "no-store"
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def v2_code(status: int, kind: str, registry_code: str | None, code: str | None = None) -> str:
    """The spec's error code for an error met on a /v2 route."""
    if code is not None:
        return code
    if registry_code in PASSED_ON_CODES and status < 500:
        return registry_code
    if kind in CODES_BY_KIND:
        return CODES_BY_KIND[kind]
    if status == 404:
        return UNKNOWN_BY_ENDPOINT.get(request.endpoint or "", "NAME_UNKNOWN")
    if status == 401:
        return "UNAUTHORIZED"
    if status == 403:
        return "DENIED"
    if status == 405:
        return "UNSUPPORTED"
    if status == 429:
        return "TOOMANYREQUESTS"
    if status >= 500:
        return "UNAVAILABLE" if status in (502, 503, 504) else "UNKNOWN"
    return "UNSUPPORTED"


#: How much of a refused request's body is read and dropped before the answer, so that
#: the client gets to read it: gunicorn drains only 64 KiB of an unread body before it
#: closes the connection, and a client still sending into a closed socket gets a reset
#: instead of the error (a full disk, a manifest over the limit). Beyond this much the
#: connection closes after all: nobody's gigabytes are read for nothing.
DRAIN_LIMIT = 64 << 20


def drain_request_body() -> None:
    """Read and drop what is left of a refused upload's body (at most DRAIN_LIMIT)."""
    if request.method not in ("POST", "PUT", "PATCH"):
        return
    left = DRAIN_LIMIT
    try:
        stream = request.stream
        while left > 0 and (chunk := stream.read(min(1 << 20, left))):
            left -= len(chunk)
    except (OSError, ValueError, HTTPException):
        # The client is gone, or its body ended short of its Content-Length: there is
        # nothing more to read either way.
        pass


def v2_error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> Response:
    line = " ".join(message.split())
    body = json.dumps({"errors": [{"code": code, "message": line, "detail": None}]})
    response = Response(body, status=status, mimetype="application/json")
    response.headers["Cache-Control"] = "no-store"
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


@bp.app_errorhandler(PassthroughError)
def handle_passthrough_error(error: PassthroughError) -> Response:
    log.info("request failed: %s %s", error.status, error.message)
    if is_v2():
        status, headers = error.status, dict(error.headers)
        registry_code = error.registry_code if isinstance(error, UpstreamError) else None
        if status == 401 and "WWW-Authenticate" not in headers:
            # Upstream refused the service's own identity (transparent mode): nothing
            # the client can answer with credentials, so not a challenge.
            status, registry_code = 403, "DENIED"
        if status == 499:
            status = 502
        code = v2_code(status, error.kind, registry_code, error.code)
        operation = (request.endpoint or "unknown").removeprefix("v2.")
        metrics.v2_error(operation, code, status)
        if operation in ("upload", "start_upload") and request.method in ("PUT", "POST"):
            metrics.upload_finished("failed")
        drain_request_body()
        return v2_error_response(status, code, error.message, headers)
    return error_response(error.status, error.message, error.headers)


@bp.app_errorhandler(HTTPException)
def handle_http_exception(error: HTTPException) -> Response:
    status = error.code or 500
    if is_v2():
        message = {
            404: "no such /v2 endpoint",
            405: "method not allowed: this /v2 API serves pulls (GET and HEAD)",
        }.get(status, error.name)
        return v2_error_response(status, v2_code(status, "", None), message)
    description = {
        404: "no such route; downloads are /docker/<image>_<tag>.tar",
        405: "method not allowed; use GET or HEAD",
    }.get(status, error.name)
    return error_response(status, description)


@bp.app_errorhandler(Exception)
def handle_unexpected(error: Exception) -> Response:
    log.exception("unexpected error")
    if is_v2():
        return v2_error_response(500, "UNKNOWN", "internal error; see the server log")
    return error_response(500, "internal error; see the server log")
