"""``POST /api/v1/import``: an archive uploaded as the request body (a docker save
archive or an OCI archive) put into the hosted area, as ``passthrough import`` does
(:mod:`passthrough.registry.importer`).

Who may: an HTPASSWD_FILE user (HTTP Basic, or a /v2 Bearer token of one) who may push
every repository the archive would write (ACCESS_FILE); that is known only once the
archive is read, so the body is first streamed into a staging file of the store (never
held in memory), then planned, authorized and imported. Query: ``repository-prefix``
and ``repository``, as the command's options. Answers: 201 with the import's report as
JSON; errors as the /api JSON (``{"errors":[{"code":..,"message":..}]}``): 400
ARCHIVE_INVALID, 401, 403 DENIED, 503 without a store. Nothing partial is stored.
"""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Response, current_app, jsonify, request

from passthrough.errors import (
    ArchiveInvalid,
    ClientStalled,
    Denied,
    LoginFailed,
    PassthroughError,
    StoreRequired,
    TokenInvalid,
    disk_full,
    is_disk_full,
)
from passthrough.oci.reference import quote_input
from passthrough.registry.archives import TarSource
from passthrough.registry.importer import Importer, Naming
from passthrough.services import services_of
from passthrough.upstream.auth import parse_basic_authorization
from passthrough.web.errors import drain_request_body, v2_error_response, v2_status_and_code

bp = Blueprint("imports", __name__)

#: Clients that did not send credentials are asked for Basic ones (curl -u, scripts).
CHALLENGE = {"WWW-Authenticate": 'Basic realm="passthrough import"'}


def _user() -> str:
    """The HTPASSWD_FILE user the request's Basic credentials (or a /v2 Bearer token
    the token service issued to a user) prove; 401 otherwise."""
    services = services_of(current_app)
    gate = services.access()
    if gate.users is None:
        raise Denied("importing needs users: HTPASSWD_FILE is not set")
    authorization = request.headers.get("Authorization") or ""
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() == "bearer" and services.token_service is not None:
        try:
            user = services.token_service.verify(token.strip()).user
        except TokenInvalid as exc:
            raise TokenInvalid(exc.message, headers=CHALLENGE) from None
        if user is None or not gate.is_user(user):
            raise LoginFailed("the token names no user of this service", headers=CHALLENGE)
        return user
    credentials = parse_basic_authorization(authorization or None)
    if credentials is None:
        raise LoginFailed("importing needs a login: HTTP Basic with a user", headers=CHALLENGE)
    return gate.login(credentials, request.remote_addr, CHALLENGE)


def _receive(path: Path) -> int:
    """Stream the body into ``path``; its size, checked against Content-Length."""
    declared = request.content_length
    received = 0
    try:
        with path.open("wb") as handle:
            while chunk := request.stream.read(1 << 20):
                handle.write(chunk)
                received += len(chunk)
    except OSError as exc:
        raise disk_full() if is_disk_full(exc) else exc from None
    if declared is not None and received != declared:
        raise ArchiveInvalid(f"the body ended after {received} of {declared} bytes")
    if received == 0:
        raise ArchiveInvalid("the request has no body: send the archive as the body")
    return received


@bp.post("/api/v1/import")
def import_archive() -> Response:
    services = services_of(current_app)
    if services.store is None or services.hosted is None:
        raise StoreRequired()
    user = _user()
    gate = services.access()

    def authorize(repositories: list[str]) -> None:
        for repository in repositories:
            if not gate.user_may(user, repository, "push"):
                raise Denied(f"user {user!r} may not push {quote_input(repository)}")

    naming = Naming.of(request.args.get("repository-prefix", ""), request.args.get("repository"))
    path, handle = services.store.new_part("import-upload")
    handle.close()
    try:
        _receive(path)
        source = TarSource(path, label="the uploaded archive")
        try:
            report = Importer(services.settings, services.store, services.hosted).run(
                source, naming, authorize
            )
        finally:
            source.close()
    finally:
        path.unlink(missing_ok=True)
    response = jsonify(report.as_json())
    response.status_code = 201
    return response


@bp.errorhandler(PassthroughError)
def _error(error: PassthroughError) -> Response:
    """The /api JSON for every refusal of this route (the body is drained first, so
    that the client reads the answer)."""
    status, code = v2_status_and_code(error)
    drain_request_body()
    return v2_error_response(status, code, error.message, error.headers)


@bp.errorhandler(ClientStalled)
def _stalled(error: ClientStalled) -> Response:
    return v2_error_response(408, "UNKNOWN", "the request body arrived too slowly")
