"""The describe routes: ``/describe`` + any download path answers JSON about what that
download would deliver (see :mod:`passthrough.describe` for the shape), with the same
parsing, registry choice, credentials and Basic challenge as the download itself."""

from __future__ import annotations

import json
from typing import Any

from flask import Blueprint, Response, request

from passthrough.errors import PlatformNotFound, UpstreamUnauthorized
from passthrough.export.describe import describe, download_path, download_query
from passthrough.export.request import DownloadRequest
from passthrough.upstream.target import Route
from passthrough.web.downloads import download_request, offer_client_challenge, services

bp = Blueprint("describe", __name__, url_prefix="/describe")


def json_response(document: dict[str, Any], status: int = 200) -> Response:
    """Key order kept (Flask's jsonify sorts); never cached: a tag moves, and the image
    may be private."""
    body = json.dumps(document, indent=2) + "\n"
    return Response(
        body,
        status=status,
        mimetype="application/json",
        headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"},
    )


def _describe(
    route: Route,
    *,
    filename: str | None = None,
    reference_path: str | None = None,
    scheme: str | None = None,
    host: str | None = None,
) -> Response:
    wanted: DownloadRequest = download_request(
        route, filename=filename, reference_path=reference_path, scheme=scheme, host=host
    )
    query = download_query(wanted, request.args.keys())
    url = download_path(
        route,
        filename=filename,
        reference_path=reference_path,
        scheme=scheme,
        host=host,
        query=query,
    )
    try:
        document = describe(services(), wanted, url=url, query=query)
    except UpstreamUnauthorized as exc:
        offer_client_challenge(route, exc)
        raise
    except PlatformNotFound as exc:
        return json_response(exc.document, exc.status)
    return json_response(document)


@bp.get("/docker/<filename>")
def describe_docker(filename: str) -> Response:
    return _describe(Route.ENVIRONMENT, filename=filename)


@bp.get("/registry/<scheme>/<host>/docker/<filename>")
def describe_registry(scheme: str, host: str, filename: str) -> Response:
    return _describe(Route.REGISTRY, filename=filename, scheme=scheme, host=host)


@bp.get("/registry-auth/<scheme>/<host>/docker/<filename>")
def describe_registry_auth(scheme: str, host: str, filename: str) -> Response:
    return _describe(Route.REGISTRY_AUTH, filename=filename, scheme=scheme, host=host)


@bp.get("/ref/<path:reference>")
def describe_ref(reference: str) -> Response:
    return _describe(Route.ENVIRONMENT, reference_path=reference)


@bp.get("/registry/<scheme>/<host>/ref/<path:reference>")
def describe_registry_ref(scheme: str, host: str, reference: str) -> Response:
    return _describe(Route.REGISTRY, reference_path=reference, scheme=scheme, host=host)


@bp.get("/registry-auth/<scheme>/<host>/ref/<path:reference>")
def describe_registry_auth_ref(scheme: str, host: str, reference: str) -> Response:
    return _describe(Route.REGISTRY_AUTH, reference_path=reference, scheme=scheme, host=host)
