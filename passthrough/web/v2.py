"""The /v2 API (OCI Distribution): each route maps the request to the hosted area
(:class:`passthrough.registry.hosted.Hosted`, for names HOSTED_REPOSITORIES matches) or
to the pull-through proxy (:class:`passthrough.registry.proxy.Proxy`, every other name)
and turns the answer into the spec's headers. Errors become the spec's JSON bodies in
:mod:`passthrough.web.errors`.

- ``GET /v2/``: 200 ``{}``, or the Bearer challenge when authentication is on;
- ``GET|HEAD|PUT|DELETE /v2/<name>/manifests/<tag|digest>`` (PUT, DELETE: hosted);
- ``GET|HEAD|DELETE /v2/<name>/blobs/<digest>`` (Range: 206, also on a miss);
- ``POST /v2/<name>/blobs/uploads/`` (``?digest=`` monolithic, ``?mount=&from=``) and
  ``GET|PATCH|PUT|DELETE /v2/<name>/blobs/uploads/<id>``: hosted uploads;
- ``GET /v2/<name>/tags/list``, ``GET /v2/_catalog`` (n, last, Link);
- ``GET /v2/<name>/referrers/<digest>`` (artifactType).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

from flask import Blueprint, Response, current_app, request

from passthrough.errors import (
    BadRequest,
    Denied,
    DigestInvalid,
    ManifestUnknown,
    RangeNotSatisfiable,
    StoreRequired,
    TagInvalid,
    UploadInvalid,
)
from passthrough.export.pipeline import Services
from passthrough.observe import metrics, telemetry
from passthrough.oci.manifest import OCI_INDEX
from passthrough.oci.reference import DIGEST_RE, TAG_RE, quote_input
from passthrough.registry.access import ANONYMOUS, Identity, check_access
from passthrough.registry.hosted import Hosted, check_digest
from passthrough.registry.pages import next_page_link, page
from passthrough.registry.proxy import BlobAnswer, Manifest, Proxy
from passthrough.registry.routing import ProxyRoute, check_name, is_hosted, route_name
from passthrough.store.content import ContentStore
from passthrough.store.readthrough import BlobStream
from passthrough.store.uploads import UploadState
from passthrough.upstream.auth import Credentials
from passthrough.web.downloads import drop_idle_clients, parse_range

bp = Blueprint("v2", __name__)

API_VERSION = ("Docker-Distribution-API-Version", "registry/2.0")
IMMUTABLE = "max-age=31536000, immutable"


def _services() -> Services:
    found: Services = current_app.extensions["passthrough"]
    return found


def _store() -> ContentStore:
    store = _services().store
    if store is None:
        raise StoreRequired()
    return store


def _proxy() -> Proxy:
    proxy: Proxy | None = current_app.extensions.get("passthrough.proxy")
    if proxy is None:
        services = _services()
        proxy = Proxy(services.settings, _store(), services.tokens, services.policy)
        current_app.extensions["passthrough.proxy"] = proxy
    return proxy


def _hosted() -> Hosted:
    hosted: Hosted | None = current_app.extensions.get("passthrough.hosted")
    if hosted is None:
        hosted = Hosted(_services().settings, _store())
        current_app.extensions["passthrough.hosted"] = hosted
    return hosted


def _identity(name: str | None, action: str = "pull") -> Identity:
    """Who the client is, checked for ``action`` on ``name`` (a 401 with the Bearer
    challenge, or 403, when it may not)."""
    settings = _services().settings
    if not settings.auth_enabled:
        return ANONYMOUS
    from passthrough.web.token import gate_of, tokens_of

    return check_access(
        settings,
        tokens_of(current_app),
        request.headers.get("Authorization"),
        name,
        action,
        gate=gate_of(current_app),
        client=request.remote_addr,
    )


def _authorize(name: str | None) -> Credentials | None:
    """The client's upstream identity for a proxied read: None in transparent mode (the
    service's own is used), the credentials from its token or Basic header in
    authenticated mode."""
    return _identity(name).credentials


def _is_hosted(name: str) -> bool:
    return is_hosted(_services().settings, check_name(name))


def _writable(name: str, action: str) -> Identity:
    """A push or delete: only on a hosted name, by a client that may."""
    if not _is_hosted(name):
        patterns = ", ".join(_services().settings.hosted_repositories)
        where = f"pushes go to {patterns}" if patterns else "this registry hosts no repositories"
        raise Denied(f"{quote_input(name)} is not a hosted repository: {where}")
    return _identity(name, action)


def _body() -> Iterator[bytes]:
    stream = request.stream
    received = 0
    try:
        while chunk := stream.read(1 << 20):
            received += len(chunk)
            yield chunk
    finally:
        metrics.push_received(received)


_CONTENT_RANGE_RE = re.compile(r"^(?:bytes[ =])?(\d+)-(\d+)(?:/(?:\d+|\*))?$")


def _content_range() -> int | None:
    """The start of a chunk's ``Content-Range: <start>-<end>``; None for a streamed
    PATCH. The end must agree with the Content-Length."""
    header = request.headers.get("Content-Range")
    if header is None:
        return None
    match = _CONTENT_RANGE_RE.fullmatch(header.strip())
    if match is None:
        raise UploadInvalid(f"invalid Content-Range {quote_input(header)}", status=416)
    start, end = int(match.group(1)), int(match.group(2))
    length = request.content_length
    if end < start or (length is not None and end - start + 1 != length):
        raise UploadInvalid(
            f"Content-Range {quote_input(header)} does not match the body's length", status=416
        )
    return start


def _upload_headers(name: str, state: UploadState) -> dict[str, str]:
    headers = {
        "Location": f"/v2/{name}/blobs/uploads/{state.id}",
        "Range": f"0-{max(state.size - 1, 0)}",
        "Docker-Upload-UUID": state.id,
        "Content-Length": "0",
    }
    minimum = _hosted().store.uploads.min_chunk
    if minimum:
        headers["OCI-Chunk-Min-Length"] = str(minimum)
    return headers


def _paged(items: list[str], base: str) -> tuple[list[str], dict[str, str]]:
    n, last = request.args.get("n"), request.args.get("last")
    chosen, more = page(items, n, last)
    headers = {"Cache-Control": "no-cache"}
    if more and chosen:
        headers["Link"] = next_page_link(base, n or "", chosen[-1])
    return chosen, headers


def _route(name: str) -> ProxyRoute:
    route = route_name(_services().settings, name, request.args.get("ns"))
    _proxy().check_route(route)
    return route


def _cache_control(immutable: bool, source: str) -> str:
    """Content by digest may be cached for good; shared caches may keep it unless only
    some clients may read it (hosted repositories behind users, proxied reads with each
    client's own upstream identity)."""
    if not immutable:
        return "no-cache"
    settings = _services().settings
    private = settings.auth_enabled if source == "hosted" else settings.uses_client_identity
    return f"{'private' if private else 'public'}, {IMMUTABLE}"


@bp.after_app_request
def _api_version(response: Response) -> Response:
    if request.path.startswith("/v2"):
        response.headers[API_VERSION[0]] = API_VERSION[1]
    return response


@bp.get("/v2/")
def base() -> Response:
    _authorize(None)
    return Response("{}", mimetype="application/json", headers={"Cache-Control": "no-store"})


@bp.route("/v2/<path:name>/manifests/<reference>", methods=["GET", "HEAD", "PUT", "DELETE"])
def manifest(name: str, reference: str) -> Response:
    is_digest = bool(DIGEST_RE.fullmatch(reference))
    if not is_digest:
        if ":" in reference:
            raise DigestInvalid(f"invalid digest {quote_input(reference)}")
        if not TAG_RE.fullmatch(reference):
            if request.method in ("GET", "HEAD") and _is_hosted(name):
                # No manifest of a hosted repository can have such a tag: the spec's
                # conformance suite reads one (".INVALID_MANIFEST_NAME") and wants the
                # 404 of any absent manifest. A push still gets TAG_INVALID.
                raise ManifestUnknown(
                    f"{quote_input(reference)} is not a valid tag, so no manifest has it"
                )
            raise TagInvalid(f"invalid tag {quote_input(reference)}")
    if request.method == "PUT":
        return _put_manifest(name, reference)
    if request.method == "DELETE":
        _writable(name, "delete")
        _hosted().delete_manifest(name, reference)
        metrics.v2_request("manifest_delete", "hosted", 202)
        return Response(status=202, headers={"Content-Length": "0"})
    want_body = request.method == "GET"
    if _is_hosted(name):
        _identity(name, "pull")
        found = _hosted().manifest(name, reference)
    else:
        route = _route(name)
        credentials = _authorize(name)
        found = _proxy().manifest(route, reference, credentials, want_body=want_body)
    headers = _manifest_headers(found, immutable=is_digest)
    metrics.v2_request("manifest", found.source, 200)
    if not want_body or found.body is None:
        return _head_response(headers, found.size)
    metrics.v2_sent(found.source, len(found.body))
    return Response(found.body, status=200, headers=headers)


def _put_manifest(name: str, reference: str) -> Response:
    _writable(name, "push")
    limit = _services().settings.hosted_manifest_max_bytes
    length = request.content_length
    if length is not None and length > limit:
        from passthrough.errors import SizeInvalid

        raise SizeInvalid(f"the manifest is larger than {limit >> 10} KiB", status=413)
    body = request.stream.read(limit + 1)
    with telemetry.span("hosted_manifest_push", {"oci.repository": name}):
        pushed = _hosted().put_manifest(name, reference, body, request.content_type or "")
        telemetry.set_attributes({"oci.manifest.digest": pushed.digest})
    headers = {
        "Location": f"/v2/{name}/manifests/{pushed.digest}",
        "Docker-Content-Digest": pushed.digest,
        "Content-Length": "0",
    }
    if pushed.subject is not None:
        headers["OCI-Subject"] = pushed.subject
    metrics.v2_request("manifest_push", "hosted", 201)
    return Response(status=201, headers=headers)


def _manifest_headers(found: Manifest, *, immutable: bool) -> dict[str, str]:
    headers = {
        "Docker-Content-Digest": found.digest,
        "Content-Type": found.media_type,
        "ETag": f'"{found.digest}"',
        "Cache-Control": _cache_control(immutable, found.source),
    }
    if found.source == "stale":
        reason = " ".join((found.stale_reason or "upstream unavailable").split())[:200]
        headers["Warning"] = f'110 passthrough "Response is stale: {reason}"'
    return headers


def _head_response(headers: dict[str, str], size: int) -> Response:
    response = Response(iter(()), status=200, headers=headers)
    response.headers["Content-Length"] = str(size)
    return response


@bp.route("/v2/<path:name>/blobs/<digest>", methods=["GET", "HEAD", "DELETE"])
def blob(name: str, digest: str) -> Response:
    if not DIGEST_RE.fullmatch(digest):
        raise DigestInvalid(f"invalid digest {quote_input(digest)}")
    if request.method == "DELETE":
        _writable(name, "delete")
        _hosted().delete_blob(name, digest)
        return Response(status=202, headers={"Content-Length": "0"})
    want_body = request.method == "GET"
    if _is_hosted(name):
        _identity(name, "pull")
        opened = _hosted().open_blob(name, digest)
        answer = BlobAnswer(opened.size, "hosted", stream=BlobStream(opened.size, stored=opened))
        if not want_body:
            opened.close()
            answer.stream = None
    else:
        route = _route(name)
        credentials = _authorize(name)
        answer = _proxy().blob(route, digest, credentials, want_body=want_body, allow_redirect=True)
    headers = {
        "Docker-Content-Digest": digest,
        "Content-Type": "application/octet-stream",
        "ETag": f'"{digest}"',
        "Cache-Control": _cache_control(True, answer.source),
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
        wanted = parse_range(request.headers.get("Range"), answer.size)
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


@bp.post("/v2/<path:name>/blobs/uploads/")
def start_upload(name: str) -> Response:
    identity = _writable(name, "push")
    hosted = _hosted()
    mount, source = request.args.get("mount"), request.args.get("from")
    if mount and source:
        check_digest(mount)
        if _may_pull(identity, source):
            if hosted.mount(name, source, mount) is not None:
                return _blob_created(name, mount, "blob_mount", "mounted")
    digest = request.args.get("digest")
    if digest:
        with telemetry.span(
            "hosted_blob_upload", {"oci.blob.digest": digest, "oci.repository": name}
        ):
            size = hosted.monolithic(name, digest, _body(), request.content_length)
            telemetry.set_attributes({"oci.blob.size": size})
        return _blob_created(name, digest, "blob_push", "committed")
    state = hosted.start_upload(name)
    return Response(status=202, headers=_upload_headers(name, state))


def _blob_created(name: str, digest: str, operation: str, outcome: str) -> Response:
    """201 for a blob that is now in ``name`` (pushed whole, closed, or mounted),
    counted under ``operation`` and the upload ``outcome``."""
    metrics.v2_request(operation, "hosted", 201)
    metrics.upload_finished(outcome)
    return Response(
        status=201,
        headers={
            "Location": f"/v2/{name}/blobs/{digest}",
            "Docker-Content-Digest": digest,
            "Content-Length": "0",
        },
    )


def _may_pull(identity: Identity, repository: str) -> bool:
    """Whether the client may read the source of a cross-repository mount (else the
    spec's answer is a new session, never the blob)."""
    try:
        if not _is_hosted(repository):
            return False
    except BadRequest:
        return False
    settings = _services().settings
    if not settings.auth_enabled:
        return True
    from passthrough.web.token import gate_of

    return gate_of(current_app).may(identity, repository, "pull")


@bp.route("/v2/<path:name>/blobs/uploads/<upload_id>", methods=["GET", "PATCH", "PUT", "DELETE"])
def upload(name: str, upload_id: str) -> Response:
    _writable(name, "push")
    hosted = _hosted()
    if request.method == "GET":
        state = hosted.upload(name, upload_id)
        headers = _upload_headers(name, state)
        return Response(status=204, headers=headers)
    if request.method == "DELETE":
        hosted.cancel(name, upload_id)
        return Response(status=204, headers={"Content-Length": "0"})
    if request.method == "PATCH":
        start = _content_range()
        state = hosted.append(name, upload_id, _body(), start=start, length=request.content_length)
        metrics.v2_request("blob_chunk", "hosted", 202)
        return Response(status=202, headers=_upload_headers(name, state))
    digest = request.args.get("digest")
    if not digest:
        raise DigestInvalid("the closing PUT of an upload needs ?digest=")
    start = _content_range()
    length = request.content_length
    with telemetry.span("hosted_blob_commit", {"oci.blob.digest": digest, "oci.repository": name}):
        size = hosted.finish(name, upload_id, digest, _body(), start=start, length=length)
        telemetry.set_attributes({"oci.blob.size": size})
    return _blob_created(name, digest, "blob_push", "committed")


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


@bp.get("/v2/_catalog")
def catalog() -> Response:
    settings = _services().settings
    identity = ANONYMOUS
    if settings.auth_enabled:
        # Users only (registry:catalog:*), and each sees what it may pull.
        from passthrough.registry.access import check_catalog
        from passthrough.web.token import gate_of, tokens_of

        identity = check_catalog(
            settings,
            tokens_of(current_app),
            request.headers.get("Authorization"),
            gate=gate_of(current_app),
            client=request.remote_addr,
        )
    names = _hosted().repositories()
    if settings.auth_enabled:
        names = [n for n in names if _may_pull(identity, n)]
    chosen, headers = _paged(names, "/v2/_catalog")
    return Response(
        json.dumps({"repositories": chosen}), mimetype="application/json", headers=headers
    )


@bp.get("/v2/<path:name>/tags/list")
def tags(name: str) -> Response:
    if _is_hosted(name):
        _identity(name, "pull")
        chosen, headers = _paged(_hosted().tags(name), f"/v2/{name}/tags/list")
        return Response(
            json.dumps({"name": name, "tags": chosen}),
            mimetype="application/json",
            headers=headers,
        )
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
    if _is_hosted(name):
        _identity(name, "pull")
        artifact_type = request.args.get("artifactType")
        found = _hosted().referrers(name, digest, artifact_type)
        headers = {"Cache-Control": "no-cache"}
        if artifact_type:
            headers["OCI-Filters-Applied"] = "artifactType"
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": found}
        return Response(json.dumps(index), mimetype=OCI_INDEX, headers=headers)
    route = _route(name)
    credentials = _authorize(name)
    listing = _proxy().referrers(route, digest, credentials, request.args.get("artifactType"))
    metrics.v2_request("referrers", "upstream", 200)
    return Response(
        listing.body,
        mimetype=listing.media_type,
        headers={**listing.headers, "Cache-Control": "no-cache"},
    )
