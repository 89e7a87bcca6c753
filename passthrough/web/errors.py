"""Errors mapped to responses in one place: every :class:`PassthroughError` becomes its
status with a one-line plain-text reason; anything unexpected becomes a 500 whose
details go to the log only."""

from __future__ import annotations

import logging

from flask import Blueprint, Response
from werkzeug.exceptions import HTTPException

from passthrough.errors import PassthroughError

log = logging.getLogger(__name__)

bp = Blueprint("errors", __name__)


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    # One line, no control characters: the message may quote client input.
    line = " ".join(message.split())
    response = Response(f"{status} {line}\n", status=status, mimetype="text/plain")
    response.headers["Cache-Control"] = "no-store"
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


@bp.app_errorhandler(PassthroughError)
def handle_passthrough_error(error: PassthroughError) -> Response:
    log.info("request failed: %s %s", error.status, error.message)
    return error_response(error.status, error.message, error.headers)


@bp.app_errorhandler(HTTPException)
def handle_http_exception(error: HTTPException) -> Response:
    status = error.code or 500
    description = {
        404: "no such route; downloads are /docker/<image>_<tag>.tar",
        405: "method not allowed; use GET or HEAD",
    }.get(status, error.name)
    return error_response(status, description)


@bp.app_errorhandler(Exception)
def handle_unexpected(error: Exception) -> Response:
    log.exception("unexpected error")
    return error_response(500, "internal error; see the server log")
