"""GET|POST /v2/token: passthrough's token service (the distribution token spec, and its
OAuth2 form for clients such as containerd).

Credentials that name one of passthrough's users (HTPASSWD_FILE) are checked here: a
wrong password is a 401, so ``docker login`` fails visibly, counted and rate limited per
client address. The token's subject is then that user, and its scopes what the user may
do (push and delete on hosted names per ACCESS_FILE, pull on proxied names).

Other credentials (``docker login <passthrough>`` with an upstream account, or the
Docker Hub credentials dockerd sends for a mirror) are the client's upstream identity
in PROXY_MODE=authenticated: they travel inside the token, encrypted, so any replica
can use them and the client holds only an opaque string. They cannot be checked here
(only upstream can judge them), so they are accepted as given. A passthrough user's
credentials travel too in that mode, so a user whose upstream login is the same works
on both. In transparent mode credentials naming no user are refused when they are a
login (a request for no scope, as ``docker login`` sends) and otherwise ignored: they
are another registry's (dockerd sends its Docker Hub login to a mirror). Anonymous
clients get a token for what anonymous may do.

When authentication is off the endpoint still answers, with a token nobody needs, so
clients that always ask keep working.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Mapping
from typing import Any

from flask import Blueprint, Flask, Response, current_app, jsonify, request

from passthrough.config import Settings
from passthrough.errors import BadRequest, OAuthError, PassthroughError
from passthrough.oci.reference import quote_input
from passthrough.registry.access import Gate
from passthrough.registry.tokens import (
    SERVICE,
    TokenService,
    parse_scopes,
    rfc3339,
)
from passthrough.services import services_of
from passthrough.upstream.auth import Credentials, parse_basic_authorization

log = logging.getLogger(__name__)

bp = Blueprint("token", __name__)

#: The token endpoint's own challenge for a failed login: Basic, which is what it takes.
LOGIN_CHALLENGE = {"WWW-Authenticate": f'Basic realm="{SERVICE}"'}


def tokens_of(app: Flask) -> TokenService | None:
    """The app's TokenService (None without TOKEN_SECRET)."""
    return services_of(app).token_service


def gate_of(app: Flask) -> Gate:
    """The app's :class:`Gate` (users, rules, the failed-login limiter)."""
    return services_of(app).access()


def _settings() -> Settings:
    return services_of(current_app).settings


@bp.errorhandler(PassthroughError)
def token_error(error: PassthroughError) -> Response:
    # Token clients read JSON errors (RFC 6749 §5.2); the message is safe to show (and
    # to log: it never holds a credential).
    log.info("token request refused: %s %s", error.status, error.message)
    if isinstance(error, OAuthError):
        code = error.error
    elif isinstance(error, BadRequest):
        code = "invalid_request"
    else:
        code = error.kind
    response = jsonify({"error": code, "error_description": error.message})
    response.status_code = error.status
    response.headers["Cache-Control"] = "no-store"
    for name, value in error.headers.items():
        response.headers[name] = value
    return response


def _check_service(service: str | None) -> None:
    if service is not None and service != SERVICE:
        raise OAuthError(
            "invalid_request",
            f"unknown service {quote_input(service)}: this token service is {SERVICE!r}",
        )


def _answer(
    scope_values: list[str], credentials: Credentials | None, account: str | None
) -> Response:
    settings = _settings()
    if credentials is not None and account and account != credentials.username:
        raise OAuthError("invalid_request", "the account does not match the credentials given")
    requested = parse_scopes(scope_values)
    gate = gate_of(current_app)
    authenticated_mode = settings.proxy_mode == "authenticated"
    user: str | None = None
    if credentials is not None and gate.users is not None:
        # A user's credentials are checked (and so are a login's with an unknown name in
        # transparent mode, where they could mean nothing else); see the module's text.
        if gate.is_user(credentials.username) or not (authenticated_mode or requested):
            user = gate.login(credentials, request.remote_addr, LOGIN_CHALLENGE)
        elif not authenticated_mode:
            credentials = None
    granted = gate.grant(user, requested)
    tokens = tokens_of(current_app)
    body: dict[str, Any]
    if tokens is None:
        # No TOKEN_SECRET, so authentication is off: a random token nobody checks.
        placeholder = secrets.token_urlsafe(24)
        body = {
            "token": placeholder,
            "access_token": placeholder,
            "expires_in": settings.token_ttl,
            "issued_at": rfc3339(time.time()),
        }
    else:
        # Only authenticated mode uses the client's credentials upstream; in transparent
        # mode they would be dead weight in every request's header.
        carried = credentials if authenticated_mode else None
        subject = credentials.username if credentials is not None else None
        body = tokens.issue(granted, credentials=carried, subject=subject, user=user)
    response = jsonify(body)
    # A token is a credential: no cache may keep it.
    response.headers["Cache-Control"] = "no-store"
    response.headers["Pragma"] = "no-cache"
    return response


@bp.get("/v2/token")
def get_token() -> Response:
    """The token spec's GET: ?service=&scope=…&account=, optional Basic credentials."""
    _check_service(request.args.get("service"))
    credentials = parse_basic_authorization(request.headers.get("Authorization"))
    return _answer(request.args.getlist("scope"), credentials, request.args.get("account"))


@bp.post("/v2/token")
def post_token() -> Response:
    """The OAuth2 form (grant_type=password with username and password), as containerd
    sends when it has credentials."""
    form: Mapping[str, str] = request.form
    _check_service(form.get("service"))
    grant_type = form.get("grant_type")
    if grant_type != "password":
        # No refresh tokens are issued; containerd then falls back to GET with Basic.
        raise OAuthError(
            "unsupported_grant_type", "only grant_type=password is supported; or use GET"
        )
    username, password = form.get("username"), form.get("password")
    if not username or password is None or ":" in username:
        raise OAuthError("invalid_request", "grant_type=password needs a username and password")
    scope_values = request.form.getlist("scope")
    return _answer(scope_values, Credentials(username, password), None)
