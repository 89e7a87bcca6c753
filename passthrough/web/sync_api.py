"""``/api/v1/sync``: an admin starts a sync run of SYNC_FILE in the background
(``POST``: 202 with its report, 409 while one runs on this pod) and reads the last runs
(``GET``: every replica's and the CronJob's, from the store; :mod:`passthrough.sync`).

Admins only (:meth:`~passthrough.registry.access.Gate.is_admin`), with HTTP Basic
credentials of an HTPASSWD_FILE user: 401 with a Basic challenge without them, 403
for a user who is no admin. Errors are the /api JSON: ``{"errors":[{"code","message"}]}``.
"""

from __future__ import annotations

import json
from typing import Any

from flask import Blueprint, Response, request

from passthrough.errors import (
    Forbidden,
    LoginFailed,
    StoreRequired,
)
from passthrough.services import services_of
from passthrough.sync.background import start_run
from passthrough.sync.runs import RunLog
from passthrough.upstream.auth import parse_basic_authorization

bp = Blueprint("sync_api", __name__)

CHALLENGE = {"WWW-Authenticate": 'Basic realm="passthrough admin"'}


def _json(
    document: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    response = Response(json.dumps(document) + "\n", status=status, mimetype="application/json")
    response.headers["Cache-Control"] = "no-store"
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def _admin() -> str:
    """The admin user the request's Basic credentials prove, or the error refusing it."""
    from flask import current_app

    services = services_of(current_app)
    credentials = parse_basic_authorization(request.headers.get("Authorization"))
    if credentials is None:
        raise LoginFailed("the sync API needs an admin user (HTTP Basic)", headers=CHALLENGE)
    gate = services.access()
    user = gate.login(credentials, request.remote_addr, CHALLENGE)
    if not gate.is_admin(user):
        raise Forbidden(f"user {user!r} is no admin of this door")
    return user


@bp.post("/api/v1/sync")
def start() -> Response:
    _admin()
    from flask import current_app

    run = start_run(services_of(current_app).proxy)
    return _json({"run": run}, 202)


@bp.get("/api/v1/sync")
def runs() -> Response:
    _admin()
    from flask import current_app

    store = services_of(current_app).store
    if store is None:
        raise StoreRequired("sync runs are kept in the content store: there is none")
    return _json({"runs": RunLog(store).runs()})
