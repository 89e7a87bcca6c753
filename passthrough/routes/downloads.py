"""The download routes: each maps a URL to a :class:`DownloadRequest` and hands it to
the pipeline. Headers are final before streaming begins; the body is a generator.

- ``GET /docker/<filename>``: the environment's registry.
- ``GET /registry/<scheme>/<host>/docker/<filename>``: a registry named by the URL.
- ``GET /registry-auth/<scheme>/<host>/docker/<filename>``: the same, client
  credentials required.
"""

from __future__ import annotations

from flask import Blueprint, Response, current_app, request

from passthrough.auth import parse_basic_authorization
from passthrough.errors import ClientAuthRequired, UpstreamUnauthorized
from passthrough.pipeline import DownloadRequest, Services, prepare_download
from passthrough.registry import Route

bp = Blueprint("downloads", __name__)


def services() -> Services:
    found: Services = current_app.extensions["passthrough"]
    return found


def _download(
    route: Route, filename: str, scheme: str | None = None, host: str | None = None
) -> Response:
    svc = services()
    download_request = DownloadRequest(
        route=route,
        filename=filename,
        scheme=scheme,
        host=host,
        client_credentials=parse_basic_authorization(request.headers.get("Authorization")),
        client_address=request.remote_addr,
    )
    try:
        download = prepare_download(svc, download_request, fetch=request.method != "HEAD")
    except UpstreamUnauthorized as exc:
        # Let a client that can answer a challenge (IOS-XE asks for credentials only
        # after one) retry with its own credentials.
        if route is Route.REGISTRY_AUTH or svc.settings.client_auth != "off":
            exc.headers.setdefault("WWW-Authenticate", ClientAuthRequired.CHALLENGE)
        raise
    if request.method == "HEAD":
        download.close()
        return Response(status=200, headers=download.headers())
    response = Response(download.body(), status=200, headers=download.headers())
    # Werkzeug must not buffer or inspect the generator: stream as produced.
    response.direct_passthrough = True
    return response


@bp.route("/docker/<filename>", methods=["GET", "HEAD"])
def docker_download(filename: str) -> Response:
    return _download(Route.ENVIRONMENT, filename)


@bp.route("/registry/<scheme>/<host>/docker/<filename>", methods=["GET", "HEAD"])
def registry_download(scheme: str, host: str, filename: str) -> Response:
    return _download(Route.REGISTRY, filename, scheme, host)


@bp.route("/registry-auth/<scheme>/<host>/docker/<filename>", methods=["GET", "HEAD"])
def registry_auth_download(scheme: str, host: str, filename: str) -> Response:
    return _download(Route.REGISTRY_AUTH, filename, scheme, host)
