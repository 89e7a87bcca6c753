"""The /v2 API (OCI Distribution, read half): each route maps the request to
:class:`passthrough.registry.proxy.Proxy` and turns its answer into the spec's
headers. Errors become the spec's JSON bodies in :mod:`passthrough.web.errors`.

- ``GET /v2/``: 200 ``{}``, or the Bearer challenge when authentication is on;
- ``GET|HEAD /v2/<name>/manifests/<tag|digest>``;
- ``GET|HEAD /v2/<name>/blobs/<digest>`` (Range: 206, also on a miss);
- ``GET /v2/<name>/tags/list`` (n, last);
- ``GET /v2/<name>/referrers/<digest>`` (artifactType).
"""

from __future__ import annotations

from collections.abc import Iterator

from flask import Blueprint, Response, current_app, request

from passthrough.errors import BadRequest, PassthroughError
from passthrough.export.pipeline import Services
from passthrough.observe import metrics
from passthrough.oci.reference import DIGEST_RE, TAG_RE, quote_input
from passthrough.registry.proxy import BlobAnswer, Manifest, Proxy
from passthrough.registry.routing import ProxyRoute, route_name
from passthrough.upstream.auth import Credentials
from passthrough.web.downloads import RangeNotSatisfiable, drop_idle_clients, parse_range

bp = Blueprint("v2", __name__)

API_VERSION = ("Docker-Distribution-API-Version", "registry/2.0")
IMMUTABLE = "max-age=31536000, immutable"


class StoreRequired(PassthroughError):
    """The /v2 API keeps what it serves in the content store; there is none (503)."""

    status = 503
    kind = "store_required"


class DigestInvalid(BadRequest):
    kind = "digest_invalid"


class TagInvalid(BadRequest):
    kind = "tag_invalid"


def _services() -> Services:
    found: Services = current_app.extensions["passthrough"]
    return found


def _proxy() -> Proxy:
    proxy: Proxy | None = current_app.extensions.get("passthrough.proxy")
    if proxy is None:
        services = _services()
        if services.store is None:
            raise StoreRequired(
                "the /v2 API needs a content store: set CACHE_DIR (a directory) or STORE=s3"
            )
        proxy = Proxy(services.settings, services.store, services.tokens, services.policy)
        current_app.extensions["passthrough.proxy"] = proxy
    return proxy


def _authorize(name: str | None) -> Credentials | None:
    """The client's upstream identity: None in transparent mode (the service's own is
    used), the credentials from its token or Basic header in authenticated mode."""
    settings = _services().settings
    if not settings.auth_enabled:
        return None
    from passthrough.registry.access import check_access
    from passthrough.web.token import tokens_of

    identity = check_access(
        settings, tokens_of(current_app), request.headers.get("Authorization"), name, "pull"
    )
    return identity.credentials


def _route(name: str) -> ProxyRoute:
    route = route_name(_services().settings, name, request.args.get("ns"))
    _proxy().check_route(route)
    return route


def _cache_control(immutable: bool) -> str:
    if not immutable:
        return "no-cache"
    scope = "private" if _services().settings.auth_enabled else "public"
    return f"{scope}, {IMMUTABLE}"


@bp.after_app_request
def _api_version(response: Response) -> Response:
    if request.path.startswith("/v2"):
        response.headers[API_VERSION[0]] = API_VERSION[1]
    return response


@bp.get("/v2/")
def base() -> Response:
    _authorize(None)
    return Response("{}", mimetype="application/json", headers={"Cache-Control": "no-store"})


@bp.route("/v2/<path:name>/manifests/<reference>", methods=["GET", "HEAD"])
def manifest(name: str, reference: str) -> Response:
    is_digest = bool(DIGEST_RE.fullmatch(reference))
    if not is_digest:
        if ":" in reference:
            raise DigestInvalid(f"invalid digest {quote_input(reference)}")
        if not TAG_RE.fullmatch(reference):
            raise TagInvalid(f"invalid tag {quote_input(reference)}")
    route = _route(name)
    credentials = _authorize(name)
    want_body = request.method == "GET"
    found = _proxy().manifest(route, reference, credentials, want_body=want_body)
    headers = _manifest_headers(found, immutable=is_digest)
    metrics.v2_request("manifest", found.source, 200)
    if not want_body or found.body is None:
        return _head_response(headers, found.size)
    metrics.v2_sent(found.source, len(found.body))
    return Response(found.body, status=200, headers=headers)


def _manifest_headers(found: Manifest, *, immutable: bool) -> dict[str, str]:
    headers = {
        "Docker-Content-Digest": found.digest,
        "Content-Type": found.media_type,
        "ETag": f'"{found.digest}"',
        "Cache-Control": _cache_control(immutable),
    }
    if found.source == "stale":
        reason = " ".join((found.stale_reason or "upstream unavailable").split())[:200]
        headers["Warning"] = f'110 passthrough "Response is stale: {reason}"'
    return headers


def _head_response(headers: dict[str, str], size: int) -> Response:
    response = Response(iter(()), status=200, headers=headers)
    response.headers["Content-Length"] = str(size)
    return response


@bp.route("/v2/<path:name>/blobs/<digest>", methods=["GET", "HEAD"])
def blob(name: str, digest: str) -> Response:
    if not DIGEST_RE.fullmatch(digest):
        raise DigestInvalid(f"invalid digest {quote_input(digest)}")
    route = _route(name)
    credentials = _authorize(name)
    want_body = request.method == "GET"
    range_header = request.headers.get("Range")
    answer = _proxy().blob(route, digest, credentials, want_body=want_body, allow_redirect=True)
    headers = {
        "Docker-Content-Digest": digest,
        "Content-Type": "application/octet-stream",
        "ETag": f'"{digest}"',
        "Cache-Control": _cache_control(True),
        "Accept-Ranges": "bytes",
    }
    if answer.redirect is not None:
        metrics.v2_request("blob", "redirect", 307)
        # A presigned URL carries its own authorization: clients send none to it.
        return Response(status=307, headers={**headers, "Location": answer.redirect})
    if not want_body or answer.stream is None:
        metrics.v2_request("blob", answer.source, 200)
        return _head_response(headers, answer.size)
    try:
        wanted = parse_range(range_header, answer.size)
    except RangeNotSatisfiable:
        answer.stream.close()
        metrics.v2_request("blob", answer.source, 416)
        return Response(status=416, headers={**headers, "Content-Range": f"bytes */{answer.size}"})
    status = 200
    start, end = 0, answer.size
    if wanted is not None:
        start, end = wanted[0], wanted[1] + 1
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{answer.size}"
    headers["Content-Length"] = str(end - start)
    metrics.v2_request("blob", answer.source, status)
    drop_idle_clients(_services().settings.client_idle_timeout)
    return Response(_send(answer, start, end), status=status, headers=headers)


def _send(answer: BlobAnswer, start: int, end: int) -> Iterator[bytes]:
    """The body: a failure after the first byte raises, so the server breaks the
    transfer instead of ending it cleanly."""
    assert answer.stream is not None
    sent = 0
    try:
        for chunk in answer.stream.chunks(start, end):
            sent += len(chunk)
            yield chunk
    finally:
        answer.stream.close()
        metrics.v2_sent(answer.source, sent)


@bp.get("/v2/<path:name>/tags/list")
def tags(name: str) -> Response:
    route = _route(name)
    credentials = _authorize(name)
    query = {k: v for k, v in request.args.items() if k in ("n", "last")}
    if "n" in query and not query["n"].isdigit():
        raise BadRequest("n must be a whole number")
    listing = _proxy().tags(route, credentials, query)
    metrics.v2_request("tags", "upstream", 200)
    return Response(
        listing.body,
        mimetype=listing.media_type,
        headers={**listing.headers, "Cache-Control": "no-cache"},
    )


@bp.get("/v2/<path:name>/referrers/<digest>")
def referrers(name: str, digest: str) -> Response:
    if not DIGEST_RE.fullmatch(digest):
        raise DigestInvalid(f"invalid digest {quote_input(digest)}")
    route = _route(name)
    credentials = _authorize(name)
    listing = _proxy().referrers(route, digest, credentials, request.args.get("artifactType"))
    metrics.v2_request("referrers", "upstream", 200)
    return Response(
        listing.body,
        mimetype=listing.media_type,
        headers={**listing.headers, "Cache-Control": "no-cache"},
    )
