"""The download routes: each maps a URL to a :class:`DownloadRequest` and hands it to
the pipeline. Headers are final before streaming begins; the body is a generator.

- ``GET /docker/<filename>``: the environment's registry.
- ``GET /registry/<scheme>/<host>/docker/<filename>``: a registry named by the URL.
- ``GET /registry-auth/<scheme>/<host>/docker/<filename>``: the same, client
  credentials required.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterator
from typing import TypeVar

from flask import Blueprint, Response, current_app, request

from passthrough.capacity import Transfer
from passthrough.errors import (
    ClientAuthRequired,
    RangeNotSatisfiable,
    TooBusy,
    UpstreamUnauthorized,
)
from passthrough.export.checksum import recorded, split_suffix
from passthrough.export.download import Download, prepare_download
from passthrough.export.request import DownloadRequest, OutputOptions, parse_platform
from passthrough.export.tarstream import FileRegion, Piece
from passthrough.observe import metrics, telemetry
from passthrough.registry.pulls import CACHED, HOSTED, Served
from passthrough.services import Services, services_of
from passthrough.upstream.auth import parse_basic_authorization
from passthrough.upstream.target import Route
from passthrough.web.checksums import checksum_response
from passthrough.web.errors import error_response
from passthrough.web.worker import SEND_REGION

bp = Blueprint("downloads", __name__)

T = TypeVar("T")


def services() -> Services:
    return services_of(current_app)


def parse_range(header: str | None, total: int) -> tuple[int, int] | None:
    """A single ``bytes=`` range as (start, end inclusive); None to send everything.
    Several ranges are answered with the whole archive, which RFC 9110 allows."""
    if not header:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash or not (first.isdigit() or last.isdigit()):
        return None
    if not first:  # suffix: the last N bytes
        length = int(last)
        if length == 0:
            raise RangeNotSatisfiable()
        return max(0, total - length), total - 1
    start = int(first)
    end = int(last) if last.isdigit() else total - 1
    if start >= total:
        raise RangeNotSatisfiable()
    if end < start:
        return None
    return start, min(end, total - 1)


def download_request(
    route: Route,
    *,
    filename: str | None = None,
    reference_path: str | None = None,
    scheme: str | None = None,
    host: str | None = None,
) -> DownloadRequest:
    """The pipeline's view of this HTTP request (path, query, Authorization)."""
    settings = services().settings
    # `<tar URL>.sha256` and `.md5` name the same archive (passthrough.web.checksums).
    filename = split_suffix(filename)[0] if filename is not None else None
    reference_path = split_suffix(reference_path)[0] if reference_path is not None else None
    return DownloadRequest(
        route=route,
        filename=filename,
        reference_path=reference_path,
        scheme=scheme,
        host=host,
        client_credentials=parse_basic_authorization(request.headers.get("Authorization")),
        client_address=request.remote_addr,
        platform=parse_platform(request.args.get("platform"), settings.default_platform),
        platform_explicit="platform" in request.args,
        options=OutputOptions.from_query(request.args.get("layers"), request.args.get("format")),
    )


def offer_client_challenge(route: Route, exc: UpstreamUnauthorized) -> None:
    """Let a client that can answer a challenge (IOS-XE asks for credentials only after
    one) retry with its own credentials."""
    if route is Route.REGISTRY_AUTH or services().settings.client_auth != "off":
        exc.headers.setdefault("WWW-Authenticate", ClientAuthRequired.CHALLENGE)


def drop_idle_clients(timeout: float) -> None:
    """Have the kernel drop this connection when sent data stays unacknowledged for
    ``timeout`` seconds (a client that stopped reading): TCP_USER_TIMEOUT on the client
    socket. The send then fails, the generator is closed and its temp files go."""
    sock = request.environ.get("gunicorn.socket")
    if isinstance(sock, socket.socket) and hasattr(socket, "TCP_USER_TIMEOUT"):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(timeout * 1000))


def take_transfer(kind: str) -> Transfer:
    """One of the pod's MAX_TRANSFERS slots for this response's body, or TooBusy (503
    with Retry-After) at once, counted by ``kind`` (tar, v2)."""
    try:
        return services().slots.acquire()
    except TooBusy:
        metrics.transfer_refused(kind)
        raise


def prepared(route: Route, prepare: Callable[[], T]) -> tuple[T, Transfer | None]:
    """``prepare()`` (everything before the first byte) with one of the pod's transfer
    slots taken for a GET; on failure the slot goes back and a client that can answer
    a challenge is offered one."""
    # Each download holds a thread for its whole life: over the pod's cap, 503 at once.
    transfer = take_transfer("tar") if request.method == "GET" else None
    try:
        return prepare(), transfer
    except BaseException as exc:
        if transfer is not None:
            transfer.release()
        if isinstance(exc, UpstreamUnauthorized):
            offer_client_challenge(route, exc)
        telemetry.record_error(exc)
        raise


def _download(download_request: DownloadRequest) -> Response:
    svc = services()
    download, transfer = prepared(
        download_request.route, lambda: prepare_download(svc, download_request, fetch=False)
    )
    algorithm = split_suffix(request.path)[1]
    if algorithm is not None:
        return checksum_response(download, algorithm, transfer)
    if transfer is not None:
        download.on_close(transfer.release)
    drop_idle_clients(svc.settings.client_idle_timeout)
    headers = download.headers()
    status = 200
    start, end = 0, None
    total = download.total_size
    if total is not None and _if_range_matches(download.etag):
        try:
            byte_range = parse_range(request.headers.get("Range"), total)
        except RangeNotSatisfiable:
            download.close()
            return error_response(
                416,
                "the range starts past the end of the archive",
                {"Content-Range": f"bytes */{total}"},
            )
        if byte_range is not None:
            start, end = byte_range
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{total}"
            headers["Content-Length"] = str(end - start + 1)
    if request.method == "HEAD":
        download.close()
        head = Response(status=status, headers=headers)
        # Unknown size (cold): say nothing rather than let Werkzeug announce 0 bytes.
        head.automatically_set_content_length = False
        return head
    download.start_fetching(start, end)
    if start == 0:
        _count_pull(svc, download)
    response = Response(_body(svc, download, start, end, status), status=status, headers=headers)
    # A response closed before its body started never runs the generator's cleanup.
    response.call_on_close(download.close)
    # Werkzeug must not buffer or inspect the generator: stream as produced.
    response.direct_passthrough = True
    return response


def _body(
    svc: Services, download: Download, start: int, end: int | None, status: int
) -> Iterator[bytes]:
    """The archive's bytes for the server to write, a layer on local disk handed to the
    worker's sendfile instead when it offers one (web/worker.py, SEND_REGION)."""
    send_region = request.environ.get(SEND_REGION)
    if send_region is None:
        body = download.body(start, end)
        # The whole archive: its digests are recorded on the way.
        return recorded(svc.store, download, body) if status == 200 else body
    pieces = download.pieces(start, end)
    if status == 200:
        pieces = recorded(svc.store, download, pieces)
    return _sent_by(send_region, pieces)


def _sent_by(send_region: Callable[[FileRegion], None], pieces: Iterator[Piece]) -> Iterator[bytes]:
    try:
        for piece in pieces:
            if isinstance(piece, FileRegion):
                send_region(piece)  # what was yielded before is written by now
            else:
                yield piece
    finally:
        close = getattr(pieces, "close", None)
        if close is not None:
            close()  # a client gone: the download's own cleanup runs now


def _count_pull(svc: Services, download: Download) -> None:
    """A download from its first byte is a pull of its tag, for the inventory (a
    resumed one is not counted twice; a download by digest names no tag)."""
    reference = download.selection.reference
    if svc.pulls is None or not reference.tag or reference.digest:
        return
    digest = download.image.index_digest or download.image.manifest_digest
    if download.selection.hosted:
        served = Served(HOSTED, None, None, reference.repository, reference.tag, digest)
    else:
        registry = download.selection.target.registry
        served = Served(
            CACHED, registry.url, registry.name, reference.repository, reference.tag, digest
        )
    svc.pulls.record(served)


def _if_range_matches(etag: str) -> bool:
    condition = request.headers.get("If-Range")
    return condition is None or condition.strip() == etag


METHODS = ["GET", "HEAD"]


@bp.route("/docker/<filename>", methods=METHODS)
def docker_download(filename: str) -> Response:
    return _download(download_request(Route.ENVIRONMENT, filename=filename))


@bp.route("/registry/<scheme>/<host>/docker/<filename>", methods=METHODS)
def registry_download(scheme: str, host: str, filename: str) -> Response:
    return _download(download_request(Route.REGISTRY, filename=filename, scheme=scheme, host=host))


@bp.route("/registry-auth/<scheme>/<host>/docker/<filename>", methods=METHODS)
def registry_auth_download(scheme: str, host: str, filename: str) -> Response:
    return _download(
        download_request(Route.REGISTRY_AUTH, filename=filename, scheme=scheme, host=host)
    )


# Full references: tags with underscores, pinned digests (`:` and `@` may arrive
# percent-encoded; the WSGI server decodes them before routing).


@bp.route("/ref/<path:reference>", methods=METHODS)
def ref_download(reference: str) -> Response:
    return _download(download_request(Route.ENVIRONMENT, reference_path=reference))


@bp.route("/registry/<scheme>/<host>/ref/<path:reference>", methods=METHODS)
def registry_ref_download(scheme: str, host: str, reference: str) -> Response:
    return _download(
        download_request(Route.REGISTRY, reference_path=reference, scheme=scheme, host=host)
    )


@bp.route("/registry-auth/<scheme>/<host>/ref/<path:reference>", methods=METHODS)
def registry_auth_ref_download(scheme: str, host: str, reference: str) -> Response:
    return _download(
        download_request(Route.REGISTRY_AUTH, reference_path=reference, scheme=scheme, host=host)
    )


@bp.after_request
def observe_download(response: Response) -> Response:
    """A download answered with an error before its first byte counts as failed (by
    route and status); whether the client was offered the Basic challenge goes on the
    request's span. Streamed downloads are counted when their body ends (pipeline)."""
    rule = request.url_rule
    if request.method != "GET" or rule is None:
        return response
    challenged = response.status_code == 401 and "WWW-Authenticate" in response.headers
    telemetry.set_attributes({"registry.client_auth.challenge_sent": challenged})
    if response.status_code >= 400:
        metrics.download_failed(telemetry.route_template(rule.rule), response.status_code)
    return response
