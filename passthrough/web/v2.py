"""The /v2 API (OCI Distribution).

One step runs before every repository view, as distribution's dispatcher does
(:func:`_dispatched`): the path's own checks, the name checked and routed (the hosted
area for names HOSTED_REPOSITORIES matches, else the pull-through proxy and the upstream
the name routes to), the action authorized (pull, push or delete), and the view handed a
:class:`~passthrough.registry.repository.Repository`. The views turn its answers into
the spec's headers and never ask which kind it is. Every /v2 request, errors included,
is counted once (``passthrough_v2_requests_total``, :func:`_count`). Errors become the
spec's JSON bodies in :mod:`passthrough.web.errors`.

- ``GET /v2/``: 200 ``{}``, or the Bearer challenge when authentication is on;
- ``GET|HEAD|PUT|DELETE /v2/<name>/manifests/<tag|digest>`` (PUT, DELETE: hosted);
- ``GET|HEAD|DELETE /v2/<name>/blobs/<digest>`` (Range: 206, also on a miss);
- ``POST /v2/<name>/blobs/uploads/`` (``?digest=`` monolithic, ``?mount=&from=``) and
  ``GET|PATCH|PUT|DELETE /v2/<name>/blobs/uploads/<id>``: hosted uploads;
- ``GET /v2/<name>/tags/list``, ``GET /v2/_catalog`` (n, last, Link);
- ``GET /v2/<name>/referrers/<digest>`` (artifactType).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from flask import Blueprint, Response, current_app, g, request

from passthrough.capacity import Transfer
from passthrough.errors import (
    DigestInvalid,
    ManifestUnknown,
    RangeNotSatisfiable,
    SizeInvalid,
    StoreRequired,
    TagInvalid,
    UploadInvalid,
)
from passthrough.observe import metrics, telemetry
from passthrough.oci.reference import DIGEST_RE, TAG_RE, quote_input
from passthrough.registry.access import (
    ANONYMOUS,
    Identity,
    check_access,
    may_read_hosted,
    not_hosted,
)
from passthrough.registry.hosted import Hosted
from passthrough.registry.pages import paged
from passthrough.registry.proxy import BlobAnswer, Listing, Manifest, Proxy
from passthrough.registry.repository import HostedRepository, ProxiedRepository, Repository
from passthrough.registry.routing import check_name, is_hosted, route_name
from passthrough.registry.upstream_rules import upstream_allowed
from passthrough.services import Services, services_of
from passthrough.store.uploads import UploadState
from passthrough.web.downloads import drop_idle_clients, parse_range, take_transfer

bp = Blueprint("v2", __name__)

API_VERSION = ("Docker-Distribution-API-Version", "registry/2.0")
IMMUTABLE = "max-age=31536000, immutable"

#: What a /v2 request is counted as (``operation``), by endpoint, then method ("": any
#: other). The view may say more: a POST that mounted is ``blob_mount``.
OPERATIONS: dict[str, dict[str, str]] = {
    "v2.base": {"": "base"},
    "v2.catalog": {"": "catalog"},
    "token.get_token": {"": "token"},
    "token.post_token": {"": "token"},
    "v2.manifest": {"": "manifest", "PUT": "manifest_push", "DELETE": "manifest_delete"},
    "v2.blob": {"": "blob", "DELETE": "blob_delete"},
    "v2.start_upload": {"": "upload_start"},
    "v2.upload": {
        "": "upload_status",
        "PATCH": "blob_chunk",
        "PUT": "blob_push",
        "DELETE": "upload_cancel",
    },
    "v2.tags": {"": "tags"},
    "v2.referrers": {"": "referrers"},
}
#: The ``source`` of a request no repository answered, when it succeeded (else "error").
SOURCES = {"v2.catalog": "hosted"}
#: The action a method asks for on a repository (anything else pushes).
ACTIONS = {"GET": "pull", "HEAD": "pull", "DELETE": "delete"}
#: Where the dispatcher notes what a view answered, for :func:`_count`.
_NOTED = "passthrough_v2_noted"


@dataclass(frozen=True)
class Answer:
    """A repository view's response, and what to count it as where the request alone
    does not say: where the content came from (store, upstream, stale, redirect…), and
    the operation of a POST that mounted."""

    response: Response
    source: str | None = None
    operation: str | None = None


def _services() -> Services:
    return services_of(current_app)


def _proxy() -> Proxy:
    proxy = _services().proxy
    if proxy is None:
        raise StoreRequired()
    return proxy


def _hosted() -> Hosted:
    hosted = _services().hosted
    if hosted is None:
        raise StoreRequired()
    return hosted


# -- the one step before every repository view -----------------------------------------------


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


def _may_read(identity: Identity, repository: str) -> bool:
    """Whether the client may read another hosted repository (a mount's source, a
    catalog entry)."""
    settings = _services().settings
    from passthrough.web.token import gate_of

    gate = gate_of(current_app) if settings.auth_enabled else None
    return may_read_hosted(settings, gate, identity, repository)


class _Name:
    """The repository name of one request; checked (NAME_INVALID) when first needed."""

    def __init__(self, name: str) -> None:
        self.name = name

    @functools.cached_property
    def hosted(self) -> bool:
        return is_hosted(_services().settings, check_name(self.name))


def _open(name: _Name, action: str) -> Repository:
    """Route ``name`` and authorize ``action`` on it: the repository the view works on.
    The refusals come in the order clients have always seen them."""
    settings = _services().settings
    if name.hosted:
        identity = _identity(name.name, action)
        return HostedRepository(_hosted(), name.name, functools.partial(_may_read, identity))
    if action != "pull":
        raise not_hosted(settings, name.name)
    route = route_name(settings, name.name, request.args.get("ns"))
    proxy = _proxy()
    # A host the client named must pass the outbound policy before anything else.
    proxy.check_route(route)
    upstream_allowed(settings, route.upstream, route.repository)
    credentials = _identity(name.name, "pull").credentials
    return ProxiedRepository(proxy, route, credentials)


RepositoryView = Callable[..., Answer]


def _dispatched(
    *, action: str | None = None, check: Callable[..., None] | None = None
) -> Callable[[RepositoryView], Callable[..., Response]]:
    """Make a view of ``/v2/<name>/…`` a repository view: ``check`` (the path's own
    parameters, before the name as ever), then :func:`_open` for ``action`` (by default
    the method's); the view gets the repository and the other path parameters."""

    def decorate(view: RepositoryView) -> Callable[..., Response]:
        @functools.wraps(view)
        def dispatched(name: str, **path: str) -> Response:
            target = _Name(name)
            if check is not None:
                check(target, **path)
            repository = _open(target, action or ACTIONS.get(request.method, "push"))
            answer = view(repository, **path)
            operation = answer.operation or _operation()
            setattr(g, _NOTED, (operation, answer.source or repository.source))
            return answer.response

        return dispatched

    return decorate


# -- counting: every /v2 request once ---------------------------------------------------------


def _operation() -> str:
    by_method = OPERATIONS.get(request.endpoint or "", {})
    operation = by_method.get(request.method) or by_method.get("", "unknown")
    if operation == "upload_start" and request.args.get("digest"):
        return "blob_push"  # POST ?digest=: the whole blob in one request
    return operation


def _count(status: int) -> None:
    """One count per /v2 request: as its view's answer was noted, else (an error, a
    route without a repository) by its endpoint and method."""
    noted: tuple[str, str] | None = g.pop(_NOTED, None)
    if noted is None:
        source = "error" if status >= 400 else SOURCES.get(request.endpoint or "", "local")
        noted = (_operation(), source)
    metrics.v2_request(*noted, status)


@bp.after_app_request
def _after_v2(response: Response) -> Response:
    if request.path.startswith("/v2"):
        response.headers[API_VERSION[0]] = API_VERSION[1]
        _count(response.status_code)
    return response


# -- helpers of the views -------------------------------------------------------------------


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


def _upload_headers(name: str, state: UploadState, min_chunk: int) -> dict[str, str]:
    headers = {
        "Location": f"/v2/{name}/blobs/uploads/{state.id}",
        "Range": f"0-{max(state.size - 1, 0)}",
        "Docker-Upload-UUID": state.id,
        "Content-Length": "0",
    }
    if min_chunk:
        headers["OCI-Chunk-Min-Length"] = str(min_chunk)
    return headers


def _cache_control(immutable: bool, private: bool) -> str:
    """Content by digest may be cached for good; shared caches may keep it unless only
    some clients may read it (:attr:`Repository.private`)."""
    if not immutable:
        return "no-cache"
    return f"{'private' if private else 'public'}, {IMMUTABLE}"


def _listing_response(listing: Listing) -> Response:
    return Response(
        listing.body,
        mimetype=listing.media_type,
        headers={**listing.headers, "Cache-Control": "no-cache"},
    )


def _head_response(headers: dict[str, str], size: int) -> Response:
    response = Response(iter(()), status=200, headers=headers)
    response.headers["Content-Length"] = str(size)
    return response


def _check_digest(name: _Name, digest: str) -> None:
    if not DIGEST_RE.fullmatch(digest):
        raise DigestInvalid(f"invalid digest {quote_input(digest)}")


def _check_reference(name: _Name, reference: str) -> None:
    """A manifest's tag or digest (DIGEST_INVALID, TAG_INVALID)."""
    if DIGEST_RE.fullmatch(reference) or TAG_RE.fullmatch(reference):
        return
    if ":" in reference:
        raise DigestInvalid(f"invalid digest {quote_input(reference)}")
    if request.method in ("GET", "HEAD") and name.hosted:
        # No manifest of a hosted repository can have such a tag: the spec's
        # conformance suite reads one (".INVALID_MANIFEST_NAME") and wants the 404 of
        # any absent manifest. A push still gets TAG_INVALID.
        raise ManifestUnknown(f"{quote_input(reference)} is not a valid tag, so no manifest has it")
    raise TagInvalid(f"invalid tag {quote_input(reference)}")


# -- the views -------------------------------------------------------------------------------


@bp.get("/v2/")
def base() -> Response:
    _identity(None)
    return Response("{}", mimetype="application/json", headers={"Cache-Control": "no-store"})


@bp.route("/v2/<path:name>/manifests/<reference>", methods=["GET", "HEAD", "PUT", "DELETE"])
@_dispatched(check=_check_reference)
def manifest(repository: Repository, reference: str) -> Answer:
    if request.method == "PUT":
        return _put_manifest(repository, reference)
    if request.method == "DELETE":
        repository.delete_manifest(reference)
        return Answer(Response(status=202, headers={"Content-Length": "0"}))
    want_body = request.method == "GET"
    found = repository.manifest(reference, want_body=want_body)
    pulls = _services().pulls
    if pulls is not None and not DIGEST_RE.fullmatch(reference):
        pulls.record(repository.served(reference, found.digest))
    immutable = bool(DIGEST_RE.fullmatch(reference))
    headers = _manifest_headers(found, _cache_control(immutable, repository.private))
    if not want_body or found.body is None:
        return Answer(_head_response(headers, found.size), found.source)
    metrics.v2_sent(found.source, len(found.body))
    return Answer(Response(found.body, status=200, headers=headers), found.source)


def _put_manifest(repository: Repository, reference: str) -> Answer:
    limit = _services().settings.hosted_manifest_max_bytes
    length = request.content_length
    if length is not None and length > limit:
        raise SizeInvalid(f"the manifest is larger than {limit >> 10} KiB", status=413)
    body = request.stream.read(limit + 1)
    with telemetry.span("hosted_manifest_push", {"oci.repository": repository.name}):
        pushed = repository.put_manifest(reference, body, request.content_type or "")
        telemetry.set_attributes({"oci.manifest.digest": pushed.digest})
    headers = {
        "Location": f"/v2/{repository.name}/manifests/{pushed.digest}",
        "Docker-Content-Digest": pushed.digest,
        "Content-Length": "0",
    }
    if pushed.subject is not None:
        headers["OCI-Subject"] = pushed.subject
    return Answer(Response(status=201, headers=headers))


def _manifest_headers(found: Manifest, cache_control: str) -> dict[str, str]:
    headers = {
        "Docker-Content-Digest": found.digest,
        "Content-Type": found.media_type,
        "ETag": f'"{found.digest}"',
        "Cache-Control": cache_control,
    }
    if found.source == "stale":
        reason = " ".join((found.stale_reason or "upstream unavailable").split())[:200]
        headers["Warning"] = f'110 passthrough "Response is stale: {reason}"'
    return headers


@bp.route("/v2/<path:name>/blobs/<digest>", methods=["GET", "HEAD", "DELETE"])
@_dispatched(check=_check_digest)
def blob(repository: Repository, digest: str) -> Answer:
    if request.method == "DELETE":
        repository.delete_blob(digest)
        return Answer(Response(status=202, headers={"Content-Length": "0"}))
    want_body = request.method == "GET"
    # A body holds a thread for its whole life: one of the pod's slots, or 503 at once.
    transfer = take_transfer("v2") if want_body else None
    try:
        answer = repository.blob(digest, want_body=want_body)
    except BaseException:
        if transfer is not None:
            transfer.release()
        raise
    if transfer is not None and answer.stream is None:
        transfer.release()  # a redirect, or nothing to send: no transfer after all
    headers = {
        "Docker-Content-Digest": digest,
        "Content-Type": "application/octet-stream",
        "ETag": f'"{digest}"',
        "Cache-Control": _cache_control(True, repository.private),
        "Accept-Ranges": "bytes",
    }
    if answer.redirect is not None:
        # A presigned URL carries its own authorization: clients send none to it.
        redirect = Response(status=307, headers={**headers, "Location": answer.redirect})
        return Answer(redirect, "redirect")
    if not want_body or answer.stream is None:
        return Answer(_head_response(headers, answer.size), answer.source)
    assert transfer is not None
    return Answer(_blob_body(answer, headers, transfer), answer.source)


def _blob_body(answer: BlobAnswer, headers: dict[str, str], transfer: Transfer) -> Response:
    """The whole blob, or the Range asked for (206; 416 past its end); the transfer's
    slot goes back when the body is closed (sent, broken, or never started)."""
    assert answer.stream is not None
    try:
        wanted = parse_range(request.headers.get("Range"), answer.size)
    except RangeNotSatisfiable:
        answer.stream.close()
        transfer.release()
        return Response(status=416, headers={**headers, "Content-Range": f"bytes */{answer.size}"})
    status = 200
    start, end = 0, answer.size
    if wanted is not None:
        start, end = wanted[0], wanted[1] + 1
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{answer.size}"
    headers["Content-Length"] = str(end - start)
    drop_idle_clients(_services().settings.client_idle_timeout)
    response = Response(_send(answer, start, end), status=status, headers=headers)
    # Also when the body never starts (the client left before it): the slot comes back.
    response.call_on_close(transfer.release)
    return response


@bp.post("/v2/<path:name>/blobs/uploads/")
@_dispatched(action="push")
def start_upload(repository: Repository) -> Answer:
    uploads = repository.uploads()
    mount, source = request.args.get("mount"), request.args.get("from")
    if mount and source and uploads.mount(source, mount):
        return _blob_created(repository.name, mount, "mounted", operation="blob_mount")
    digest = request.args.get("digest")
    if digest:
        with telemetry.span(
            "hosted_blob_upload", {"oci.blob.digest": digest, "oci.repository": repository.name}
        ):
            size = uploads.monolithic(digest, _body(), request.content_length)
            telemetry.set_attributes({"oci.blob.size": size})
        return _blob_created(repository.name, digest, "committed")
    state = uploads.start()
    return Answer(
        Response(status=202, headers=_upload_headers(repository.name, state, uploads.min_chunk))
    )


def _blob_created(name: str, digest: str, outcome: str, operation: str | None = None) -> Answer:
    """201 for a blob that is now in ``name`` (pushed whole, closed, or mounted), the
    upload counted under ``outcome``."""
    metrics.upload_finished(outcome)
    headers = {
        "Location": f"/v2/{name}/blobs/{digest}",
        "Docker-Content-Digest": digest,
        "Content-Length": "0",
    }
    return Answer(Response(status=201, headers=headers), operation=operation)


@bp.route("/v2/<path:name>/blobs/uploads/<upload_id>", methods=["GET", "PATCH", "PUT", "DELETE"])
@_dispatched(action="push")
def upload(repository: Repository, upload_id: str) -> Answer:
    uploads = repository.uploads()
    name = repository.name
    if request.method == "GET":
        state = uploads.status(upload_id)
        return Answer(Response(status=204, headers=_upload_headers(name, state, uploads.min_chunk)))
    if request.method == "DELETE":
        uploads.cancel(upload_id)
        return Answer(Response(status=204, headers={"Content-Length": "0"}))
    if request.method == "PATCH":
        start = _content_range()
        state = uploads.append(upload_id, _body(), start=start, length=request.content_length)
        return Answer(Response(status=202, headers=_upload_headers(name, state, uploads.min_chunk)))
    digest = request.args.get("digest")
    if not digest:
        raise DigestInvalid("the closing PUT of an upload needs ?digest=")
    start = _content_range()
    length = request.content_length
    with telemetry.span("hosted_blob_commit", {"oci.blob.digest": digest, "oci.repository": name}):
        size = uploads.finish(upload_id, digest, _body(), start=start, length=length)
        telemetry.set_attributes({"oci.blob.size": size})
    return _blob_created(name, digest, "committed")


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
        names = [n for n in names if _may_read(identity, n)]
    chosen, links = paged(names, request.args.get("n"), request.args.get("last"), "/v2/_catalog")
    return Response(
        json.dumps({"repositories": chosen}),
        mimetype="application/json",
        headers={"Cache-Control": "no-cache", **links},
    )


@bp.get("/v2/<path:name>/tags/list")
@_dispatched()
def tags(repository: Repository) -> Answer:
    listing = repository.tags(request.args.get("n"), request.args.get("last"))
    return Answer(_listing_response(listing))


@bp.get("/v2/<path:name>/referrers/<digest>")
@_dispatched(check=_check_digest)
def referrers(repository: Repository, digest: str) -> Answer:
    listing = repository.referrers(digest, request.args.get("artifactType"))
    return Answer(_listing_response(listing))
