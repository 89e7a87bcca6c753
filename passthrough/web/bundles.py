"""``GET /bundle.tar?image=…&image=…``: several images in one archive
(:mod:`passthrough.export.bundle`), with the access rules and credential handling of the
single-image tar routes (the client's Basic credentials when it sends them). Query:
``image`` (repeated; ``nginx:1.25``, ``ghcr.io/org/app:2.0``, ``lab/team/app@sha256:…``),
``platform``, ``format=docker|oci``, ``layers=tar|gzip`` (docker format), ``all=1`` (oci:
whole multi-platform indexes). ``/bundle.tar.sha256`` and ``.md5`` give its digest.
"""

from __future__ import annotations

from flask import Blueprint, Response, request

from passthrough.export.bundle import BundleRequest, prepare_bundle
from passthrough.export.checksum import recorded, split_suffix
from passthrough.export.request import parse_platform
from passthrough.upstream.auth import parse_basic_authorization
from passthrough.upstream.target import Route
from passthrough.web.checksums import checksum_response
from passthrough.web.downloads import drop_idle_clients, prepared, services

bp = Blueprint("bundles", __name__)

TRUE = ("1", "true", "yes", "on")


def bundle_request() -> BundleRequest:
    settings = services().settings
    return BundleRequest(
        images=tuple(request.args.getlist("image")),
        platform=parse_platform(request.args.get("platform"), settings.default_platform),
        platform_explicit="platform" in request.args,
        format=(request.args.get("format") or "docker").lower(),
        layers=(request.args.get("layers") or "tar").lower(),
        all_platforms=request.args.get("all", "").lower() in TRUE,
        client_credentials=parse_basic_authorization(request.headers.get("Authorization")),
        client_address=request.remote_addr,
    )


@bp.route("/bundle.tar", methods=["GET", "HEAD"])
@bp.route("/bundle.tar.sha256", methods=["GET", "HEAD"])
@bp.route("/bundle.tar.md5", methods=["GET", "HEAD"])
def bundle_download() -> Response:
    svc = services()
    wanted = bundle_request()
    bundle, transfer = prepared(Route.ENVIRONMENT, lambda: prepare_bundle(svc, wanted))
    algorithm = split_suffix(request.path)[1]
    if algorithm is not None:
        return checksum_response(bundle, algorithm, transfer)
    headers = bundle.headers()
    if request.method == "HEAD":
        bundle.close()
        head = Response(headers=headers)
        head.automatically_set_content_length = False
        return head
    drop_idle_clients(svc.settings.client_idle_timeout)
    bundle.start_fetching()
    response = Response(recorded(svc.store, bundle, bundle.body()), headers=headers)
    response.call_on_close(bundle.close)
    if transfer is not None:
        response.call_on_close(transfer.release)
    response.direct_passthrough = True
    return response
