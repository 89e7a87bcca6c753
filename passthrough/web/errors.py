"""Errors mapped to responses in one place: every :class:`PassthroughError` becomes its
status with a one-line reason, as plain text on the tar routes and as the OCI
Distribution spec's JSON (``{"errors": [{"code": …, "message": …}]}``) on /v2;
anything unexpected becomes a 500 whose details go to the log only."""

from __future__ import annotations

import json
import logging

from flask import Blueprint, Response, request
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from passthrough.errors import ClientStalled, PassthroughError, UpstreamError, code_for_status
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
#: What a 404 whose error names no code (from upstream, or no route) means, by the /v2
#: endpoint that met it.
UNKNOWN_BY_ENDPOINT = {
    "v2.manifest": "MANIFEST_UNKNOWN",
    "v2.blob": "BLOB_UNKNOWN",
}


def is_v2() -> bool:
    return request.path == "/v2" or request.path.startswith("/v2/")


def is_api() -> bool:
    """The inventory API (``/api/``): JSON errors, as on /v2, but not counted as /v2."""
    return request.path.startswith("/api/")


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    # One line, no control characters: the message may quote client input.
    line = " ".join(message.split())
    response = Response(f"{status} {line}\n", status=status, mimetype="text/plain")
    response.headers["Cache-Control"] = "no-store"
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def v2_code(status: int, code: str | None, registry_code: str | None = None) -> str:
    """The spec's error code for an error met on a /v2 route: the upstream's own when it
    is one of the spec's and a client error, else the error class's ``code``, else by
    the status (a 404 by the endpoint)."""
    if registry_code in PASSED_ON_CODES and status < 500:
        return registry_code
    if code is not None:
        return code
    if status == 404:
        return UNKNOWN_BY_ENDPOINT.get(request.endpoint or "", "NAME_UNKNOWN")
    return code_for_status(status)


def v2_status_and_code(error: PassthroughError) -> tuple[int, str]:
    """The status and spec code ``error`` is answered with on /v2."""
    status = error.status
    if status == 401 and "WWW-Authenticate" not in error.headers:
        # Upstream refused the service's own identity (transparent mode): nothing the
        # client can answer with credentials, so not a challenge.
        return 403, "DENIED"
    if status == 499:
        status = 502
    registry_code = error.registry_code if isinstance(error, UpstreamError) else None
    return status, v2_code(status, error.code, registry_code)


#: The order a 405 lists the methods a route takes in.
_METHOD_ORDER = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")

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
        status, code = v2_status_and_code(error)
        operation = (request.endpoint or "unknown").removeprefix("v2.")
        metrics.v2_error(operation, code, status)
        if operation in ("upload", "start_upload") and request.method in ("PUT", "POST"):
            metrics.upload_finished("failed")
        drain_request_body()
        return v2_error_response(status, code, error.message, error.headers)
    if is_api():
        status = error.status
        code = error.code or ("NAME_UNKNOWN" if status == 404 else code_for_status(status))
        return v2_error_response(status, code, error.message, error.headers)
    return error_response(error.status, error.message, error.headers)


@bp.app_errorhandler(ClientStalled)
def handle_client_stalled(error: ClientStalled) -> Response:
    """An upload's body stalled past its deadline: 408, and the worker drops the
    connection (and counts it); nothing for the error log."""
    log.info("request failed: 408 %s", error)
    message = "the request body arrived too slowly; the connection is closed"
    if is_v2():
        return v2_error_response(408, "UNKNOWN", message)
    return error_response(408, message)


@bp.app_errorhandler(HTTPException)
def handle_http_exception(error: HTTPException) -> Response:
    status = error.code or 500
    if is_v2():
        headers: dict[str, str] = {}
        message = {404: "no such /v2 endpoint"}.get(status, error.name)
        if isinstance(error, MethodNotAllowed) and error.valid_methods:
            allowed = [m for m in _METHOD_ORDER if m in error.valid_methods]
            message = f"method not allowed: this route takes {', '.join(allowed)}"
            headers["Allow"] = ", ".join(allowed)
        return v2_error_response(status, v2_code(status, None), message, headers)
    if is_api():
        message = {404: "no such /api/v1 endpoint"}.get(status, error.name)
        return v2_error_response(status, code_for_status(status), message)
    description = {
        404: "no such route; downloads are /docker/<image>_<tag>.tar",
        405: "method not allowed; use GET or HEAD",
    }.get(status, error.name)
    return error_response(status, description)


@bp.app_errorhandler(Exception)
def handle_unexpected(error: Exception) -> Response:
    log.exception("unexpected error")
    if is_v2() or is_api():
        return v2_error_response(500, "UNKNOWN", "internal error; see the server log")
    return error_response(500, "internal error; see the server log")
