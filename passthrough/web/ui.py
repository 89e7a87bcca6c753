"""The web page on ``/``: the console (what this door holds, from /api/v1) beside the
route builder (a form that turns registry, image, tag and options into a download URL,
a curl command and the IOS-XE ``copy`` and ``app-hosting`` lines). Everything it loads
comes from this app (operators are often offline); no build step, no framework.

- ``GET /``: the page (passthrough/static/index.html).
- ``GET /ui/static/<file>``: its scripts and style sheet.
- ``GET /ui/info``: what the page needs to know about this server, as JSON — the
  configured registry, the default platform, the client-auth mode, the hosted patterns
  and the host ``docker pull`` names. Never a secret: no credential, token or whether
  the server holds any.
- ``GET /ui/route?name=<v2 name>``: which tar route serves a repository as /v2 names it
  (``ghcr.io/org/app`` → ``registry/https/ghcr.io/`` and ``org/app``), so the console
  builds the same URLs as the route builder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from flask import Blueprint, Response, request

from passthrough.errors import BadRequest
from passthrough.registry.routing import is_hosted, route_name
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


def _json(document: dict[str, Any]) -> Response:
    return Response(
        json.dumps(document) + "\n",
        mimetype="application/json",
        headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"},
    )


@bp.get("/ui/info")
def info() -> Response:
    settings = services().settings
    pull_host = urlsplit(settings.public_url).netloc if settings.public_url else None
    return _json(
        {
            "registry": {"url": settings.registry.url, "name": settings.registry.name},
            "defaultPlatform": settings.default_platform,
            "defaultNamespace": settings.default_namespace,
            "clientAuth": settings.client_auth,
            "hosted": list(settings.hosted_repositories),
            # The host `docker pull` names (PUBLIC_URL's; the page's own without one).
            "pullHost": pull_host,
        }
    )


@bp.get("/ui/route")
def tar_route() -> Response:
    """``{"prefix": "", "repository": "team/app", "hosted": true}``: the download path is
    ``prefix`` + ``docker/…`` or ``ref/…`` with ``repository``."""
    settings = services().settings
    name = request.args.get("name", "").strip()
    if not name:
        raise BadRequest("name is required (a repository as /v2 names it)")
    if is_hosted(settings, name):
        return _json({"prefix": "", "repository": name, "hosted": True})
    proxied = route_name(settings, name)
    upstream = proxied.upstream
    if upstream.url == settings.registry.url:
        prefix = ""
    else:
        parts = urlsplit(upstream.url)
        prefix = f"registry/{parts.scheme}/{quote(parts.netloc, safe='')}/"
    return _json({"prefix": prefix, "repository": proxied.repository, "hosted": False})
