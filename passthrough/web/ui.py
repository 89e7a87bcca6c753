"""The route-builder page: ``GET /`` serves a form that turns registry, image, tag and
options into a download URL, a curl command and the IOS-XE ``copy`` and ``app-hosting``
lines. Everything it loads comes from this app (operators are often offline).

- ``GET /``: the page (passthrough/static/index.html).
- ``GET /ui/static/<file>``: its script and style sheet.
- ``GET /ui/info``: what the page needs to know about this server, as JSON — the
  configured registry, the default platform, the client-auth mode. Never a secret: no
  credential, token or whether the server holds any.
"""

from __future__ import annotations

import json
from pathlib import Path

from flask import Blueprint, Response

from passthrough.web.downloads import services

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

bp = Blueprint("ui", __name__, static_folder=str(STATIC_DIR), static_url_path="/ui/static")

#: The page loads only its own files and talks only to this server.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


@bp.get("/")
def index() -> Response:
    response = bp.send_static_file("index.html")
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["Cache-Control"] = "no-cache"
    return response


@bp.get("/ui/info")
def info() -> Response:
    settings = services().settings
    document = {
        "registry": {"url": settings.registry.url, "name": settings.registry.name},
        "defaultPlatform": settings.default_platform,
        "defaultNamespace": settings.default_namespace,
        "clientAuth": settings.client_auth,
    }
    return Response(
        json.dumps(document) + "\n",
        mimetype="application/json",
        headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"},
    )
