"""HTTP fronts that stand between a client and a rig registry, to imitate what real
registries do beyond the plain V2 API.

`RedirectFront` answers blob GETs with a 307 to a second, signed-URL blob host on
127.0.0.2 (as S3- or CDN-backed registries do) that refuses requests carrying an
Authorization header. `FaultFront` proxies everything, counts requests and injects
faults on the n-th blob GET (a cut body, corrupt bytes with the right length, 503, 429
with Retry-After) or on manifest requests (503, 429), as a flaky or rate-limiting
registry does.

Both stream bodies in chunks and forward the client's Host header unchanged, so the
URLs the registry generates (upload Locations) point back at the front.

For upstreams that are not there at all: `RefusingPort` holds a loopback port bound but
not listening (every connection refused, and no other process can take the port),
`SilentPort` one that accepts connections and never answers (a read timeout), and
`UNRESOLVABLE_HOST` is a name that never resolves (RFC 6761 reserves `.invalid`).
`TlsFront` serves the registry over HTTPS with a self-signed certificate nobody trusts.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import http.client
import json
import re
import secrets
import socket
import ssl
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, Literal, Self
from urllib.parse import parse_qs, urlsplit

from passthrough.tls import make_self_signed
from tests.support.procs import LOOPBACK, BackgroundHTTPServer
from tests.support.registry import RegistryServer

CHUNK = 64 * 1024

# RFC 9110 hop-by-hop headers: they describe one connection, not the message.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)

BLOB_PATH = re.compile(
    r"^/v2/(?P<name>.+)/blobs/(?P<digest>[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+)$"
)
MANIFEST_PATH = re.compile(r"^/v2/(?P<name>.+)/manifests/(?P<reference>[^/]+)$")

FaultKind = Literal["cut", "corrupt", "503", "429"]
#: A host name no resolver answers (RFC 6761: `.invalid` never resolves).
UNRESOLVABLE_HOST = "nonexistent.invalid"
ManifestFaultKind = Literal["corrupt", "503", "429"]


class _Handler(BaseHTTPRequestHandler):
    """Hands every request to the owning front; keeps connections alive (HTTP/1.1)."""

    protocol_version = "HTTP/1.1"
    server_version = "rig-front"
    # An idle keep-alive connection must not pin a thread forever.
    timeout = 120

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _dispatch(self) -> None:
        owner: _Proxy | BlobHost = self.server.owner  # type: ignore[attr-defined]
        try:
            owner.handle(self)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            # The client went away mid-answer: nothing left to tell it.
            self.close_connection = True

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _dispatch


def _client_headers(handler: BaseHTTPRequestHandler) -> list[tuple[str, str]]:
    connection_tokens = {
        t.strip().lower() for t in (handler.headers.get("Connection") or "").split(",")
    }
    return [
        (k, v)
        for k, v in handler.headers.items()
        if k.lower() not in HOP_BY_HOP and k.lower() not in connection_tokens
    ]


def _send_simple(
    handler: BaseHTTPRequestHandler,
    status: int,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    content_type: str = "application/json",
) -> None:
    handler.send_response(status)
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    if body or status not in (204, 304):
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    if body and handler.command != "HEAD":
        handler.wfile.write(body)


def _registry_error(code: str, message: str) -> bytes:
    return json.dumps({"errors": [{"code": code, "message": message}]}).encode()


def _abort_connection(handler: BaseHTTPRequestHandler) -> None:
    """End the client connection now, mid-body (FIN after what was written)."""
    handler.close_connection = True
    with contextlib.suppress(OSError):
        handler.wfile.flush()
    with contextlib.suppress(OSError):
        handler.connection.shutdown(socket.SHUT_RDWR)


class _Proxy:
    """Shared plumbing: forward one request to the registry and relay the answer."""

    name = "front"

    def __init__(self, registry: RegistryServer, *, host: str = LOOPBACK) -> None:
        if registry.process is None:
            raise ValueError("start the registry before putting a front on it")
        self.registry = registry
        self.upstream_timeout = 60.0
        self._http = BackgroundHTTPServer(_Handler, self, host=host, name=self.name)

    # lifecycle and addresses --------------------------------------------------------

    def start(self) -> Self:
        self._http.start()
        return self

    def stop(self) -> None:
        self._http.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._http.port

    @property
    def host(self) -> str:
        return self._http.address

    @property
    def url(self) -> str:
        return self._http.url

    @property
    def flavour(self) -> str:
        return self.registry.flavour

    def blob_path(self, digest: str) -> Path:
        return self.registry.blob_path(digest)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url} -> {self.registry.url}>"

    # proxying -----------------------------------------------------------------------

    def handle(self, handler: BaseHTTPRequestHandler) -> None:
        self.proxy(handler)

    def forward(
        self,
        handler: BaseHTTPRequestHandler,
        *,
        method: str | None = None,
        drop: frozenset[str] = frozenset(),
        send_body: bool = True,
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """Send the client's request (or a `method` variant of it) to the registry."""
        conn = http.client.HTTPConnection(
            self.registry.bind_host, self.registry.port, timeout=self.upstream_timeout
        )
        method = method or handler.command
        conn.putrequest(method, handler.path, skip_host=True, skip_accept_encoding=True)
        headers = [(k, v) for k, v in _client_headers(handler) if k.lower() not in drop]
        if not any(k.lower() == "host" for k, _ in headers):
            headers.append(("Host", self.host))
        # One upstream connection per request: say so, so the registry closes it and a
        # body shorter than its Content-Length ends instead of stalling the read.
        headers.append(("Connection", "close"))
        length = handler.headers.get("Content-Length")
        chunked = "chunked" in (handler.headers.get("Transfer-Encoding") or "").lower()
        if not send_body:
            length, chunked = None, False
            headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
        for name, value in headers:
            conn.putheader(name, value)
        if chunked:
            conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        if length is not None:
            remaining = int(length)
            while remaining > 0:
                data = handler.rfile.read(min(CHUNK, remaining))
                if not data:
                    raise ConnectionResetError("client body ended early")
                conn.send(data)
                remaining -= len(data)
        elif chunked:
            self._relay_chunked_body(handler, conn)
        return conn, conn.getresponse()

    @staticmethod
    def _relay_chunked_body(
        handler: BaseHTTPRequestHandler, conn: http.client.HTTPConnection
    ) -> None:
        while True:
            size_line = handler.rfile.readline(1024)
            size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                # Trailers, if any, end with an empty line.
                while handler.rfile.readline(8192) not in (b"\r\n", b"\n", b""):
                    pass
                conn.send(b"0\r\n\r\n")
                return
            remaining = size
            while remaining > 0:
                data = handler.rfile.read(min(CHUNK, remaining))
                if not data:
                    raise ConnectionResetError("client body ended early")
                conn.send(b"%x\r\n%s\r\n" % (len(data), data))
                remaining -= len(data)
            handler.rfile.readline(16)  # the CRLF after the chunk

    def relay(
        self,
        handler: BaseHTTPRequestHandler,
        conn: http.client.HTTPConnection,
        response: http.client.HTTPResponse,
        *,
        cut_after: int | None = None,
        corrupt_at: int | None = None,
    ) -> None:
        """Stream the registry's answer to the client; with `cut_after`, stop after that
        many body bytes (never the whole body) and drop the connection; with
        `corrupt_at`, flip the bits of the body byte at that offset (length unchanged)."""
        try:
            handler.send_response_only(response.status, response.reason)
            for name, value in response.getheaders():
                if name.lower() not in HOP_BY_HOP:
                    handler.send_header(name, value)
            has_body = not (
                handler.command == "HEAD"
                or response.status in (204, 304)
                or 100 <= response.status < 200
            )
            length_header = response.getheader("Content-Length")
            chunked = False
            if has_body and length_header is None:
                if handler.request_version == "HTTP/1.1":
                    handler.send_header("Transfer-Encoding", "chunked")
                    chunked = True
                else:
                    handler.close_connection = True
            handler.end_headers()
            if not has_body:
                return
            total = int(length_header) if length_header is not None else None
            limit: int | None = None
            if cut_after is not None:
                limit = cut_after if total is None else min(cut_after, max(total - 1, 0))
            sent = 0
            broken = False
            while True:
                want = CHUNK if limit is None else min(CHUNK, limit - sent)
                if want <= 0:
                    break
                try:
                    data = response.read(want)
                except (OSError, http.client.HTTPException):
                    data, broken = b"", True
                if not data:
                    break
                if corrupt_at is not None and sent <= corrupt_at < sent + len(data):
                    at = corrupt_at - sent
                    data = data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]
                handler.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
                sent += len(data)
            # A cut, or an upstream body that ended short of its Content-Length (as
            # distribution's 416 does): the client must see the connection drop too.
            if limit is not None or broken or (total is not None and sent < total):
                _abort_connection(handler)
            elif chunked:
                handler.wfile.write(b"0\r\n\r\n")
        finally:
            conn.close()

    def proxy(self, handler: BaseHTTPRequestHandler) -> None:
        try:
            conn, response = self.forward(handler)
        except (OSError, http.client.HTTPException) as exc:
            handler.close_connection = True
            _send_simple(handler, 502, _registry_error("UNAVAILABLE", f"front: {exc}"))
            return
        self.relay(handler, conn, response)


# --- RedirectFront ----------------------------------------------------------------------


class RefusingPort:
    """A loopback port bound and never listened on: a connection to it is refused at
    once (RST), as a stopped registry's is, and no other process can take the port
    while this holds it."""

    def __init__(self, host: str = LOOPBACK) -> None:
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.bind((host, 0))
        self.host, self.port = self._socket.getsockname()[:2]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def close(self) -> None:
        self._socket.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SilentPort(RefusingPort):
    """A loopback port that listens and never accepts: the kernel completes each
    connection and no byte ever comes back, as from a hung registry."""

    def __init__(self, host: str = LOOPBACK) -> None:
        super().__init__(host)
        self._socket.listen(64)


class TlsFront(_Proxy):
    """The registry over HTTPS with a certificate of its own CA, made here for
    127.0.0.1 and given to nobody: every client that verifies refuses the handshake."""

    name = "tls-front"

    def __init__(self, registry: RegistryServer, tls_dir: Path) -> None:
        super().__init__(registry)
        files = make_self_signed([LOOPBACK], tls_dir)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(files.cert, files.key)
        self._http.serve_tls(context)


class BlobHost:
    """The signed-URL blob server behind a RedirectFront, on 127.0.0.2: GET/HEAD
    /blobs/<digest>?sig=.. straight from the registry's storage, with Range support.

    Like S3 given both a presigned URL and an Authorization header, it answers 400 to
    any request carrying Authorization; a missing or wrong sig gets 403. With
    `head_allowed` false it answers 403 to every HEAD, as S3 does to a URL presigned
    for GET alone.
    """

    def __init__(self, registry: RegistryServer, secret: bytes, host: str = "127.0.0.2") -> None:
        self.registry = registry
        self.head_allowed = True
        self._secret = secret
        self._lock = threading.Lock()
        self.requests = 0
        self.requests_with_authorization = 0
        self.log: list[BlobHostRequest] = []
        self._http = BackgroundHTTPServer(_Handler, self, host=host, name="blob-host")

    @property
    def url(self) -> str:
        return self._http.url

    @property
    def host(self) -> str:
        return self._http.address

    def start(self) -> BlobHost:
        self._http.start()
        return self

    def stop(self) -> None:
        self._http.stop()

    def sign(self, digest: str) -> str:
        return hmac.new(self._secret, digest.encode(), hashlib.sha256).hexdigest()

    def signed_url(self, digest: str) -> str:
        return f"{self.url}/blobs/{digest}?sig={self.sign(digest)}"

    def reset(self) -> None:
        with self._lock:
            self.requests = 0
            self.requests_with_authorization = 0
            self.log.clear()
            self.head_allowed = True

    def handle(self, handler: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(handler.path)
        has_auth = "Authorization" in handler.headers
        entry = BlobHostRequest(handler.command, parts.path, has_auth, handler.headers.get("Range"))
        with self._lock:
            self.requests += 1
            self.requests_with_authorization += int(has_auth)
            self.log.append(entry)
        entry.status = self._answer(handler, parts.path, parts.query, has_auth)

    def _answer(
        self, handler: BaseHTTPRequestHandler, path: str, query: str, has_auth: bool
    ) -> int:
        xml = "application/xml"
        if handler.command not in ("GET", "HEAD"):
            _send_simple(
                handler, 405, b"<Error><Code>MethodNotAllowed</Code></Error>", content_type=xml
            )
            return 405
        if handler.command == "HEAD" and not self.head_allowed:
            _send_simple(handler, 403, b"", content_type=xml)
            return 403
        if has_auth:
            body = (
                b"<Error><Code>InvalidArgument</Code><Message>Only one auth mechanism allowed;"
                b" only the X-Amz-Algorithm query parameter, Signature query string parameter"
                b" or the Authorization header should be specified</Message></Error>"
            )
            _send_simple(handler, 400, body, content_type=xml)
            return 400
        match = re.fullmatch(r"/blobs/(sha256:[0-9a-f]{64})", path)
        sig = (parse_qs(query).get("sig") or [""])[0]
        if not match or not hmac.compare_digest(sig, self.sign(match[1])):
            _send_simple(
                handler, 403, b"<Error><Code>AccessDenied</Code></Error>", content_type=xml
            )
            return 403
        digest = match[1]
        blob = self.registry.blob_path(digest)
        try:
            size = blob.stat().st_size
        except FileNotFoundError:
            _send_simple(handler, 404, b"<Error><Code>NoSuchKey</Code></Error>", content_type=xml)
            return 404
        start, end = 0, size - 1
        status = 200
        range_header = handler.headers.get("Range")
        if range_header:
            parsed = _parse_range(range_header, size)
            if parsed is None:
                _send_simple(
                    handler,
                    416,
                    b"<Error><Code>InvalidRange</Code></Error>",
                    {"Content-Range": f"bytes */{size}"},
                    content_type=xml,
                )
                return 416
            start, end = parsed
            status = 206
        handler.send_response(status)
        handler.send_header("Content-Type", "application/octet-stream")
        handler.send_header("Content-Length", str(end - start + 1))
        handler.send_header("Accept-Ranges", "bytes")
        handler.send_header("ETag", f'"{digest}"')
        if status == 206:
            handler.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        handler.end_headers()
        if handler.command == "HEAD":
            return status
        with open(blob, "rb") as f:
            f.seek(start)
            remaining = end - start + 1
            while remaining > 0:
                data = f.read(min(CHUNK, remaining))
                if not data:
                    break
                handler.wfile.write(data)
                remaining -= len(data)
        return status


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """(start, end) of a single `bytes=` range, None if unsatisfiable or multiple."""
    match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", header)
    if not match or (not match[1] and not match[2]):
        return None
    if not match[1]:
        suffix = int(match[2])
        if suffix == 0:
            return None
        return max(size - suffix, 0), size - 1
    start = int(match[1])
    end = int(match[2]) if match[2] else size - 1
    if start >= size or end < start:
        return None
    return start, min(end, size - 1)


@dataclass
class BlobHostRequest:
    method: str
    path: str
    has_authorization: bool
    range: str | None
    status: int = 0


class RedirectFront(_Proxy):
    """A front that redirects authorized blob GET/HEADs to a signed blob host.

    `url`/`host` is the front on 127.0.0.1; `blob_host` is the BlobHost on 127.0.0.2.
    Before redirecting it asks the registry (HEAD with the client's headers) whether the
    client may read the blob; any answer but 200 goes back to the client unchanged.
    """

    name = "redirect-front"

    def __init__(
        self, registry: RegistryServer, *, host: str = LOOPBACK, blob_host: str = "127.0.0.2"
    ) -> None:
        super().__init__(registry, host=host)
        self.blob_host = BlobHost(registry, secrets.token_bytes(32), host=blob_host)
        self._lock = threading.Lock()
        self.redirects = 0

    def start(self) -> Self:
        self.blob_host.start()
        try:
            super().start()
        except BaseException:
            self.blob_host.stop()
            raise
        return self

    def stop(self) -> None:
        super().stop()
        self.blob_host.stop()

    def reset(self) -> None:
        with self._lock:
            self.redirects = 0
        self.blob_host.reset()

    def handle(self, handler: BaseHTTPRequestHandler) -> None:
        match = BLOB_PATH.match(urlsplit(handler.path).path)
        if handler.command not in ("GET", "HEAD") or not match:
            self.proxy(handler)
            return
        try:
            conn, check = self.forward(
                handler, method="HEAD", drop=frozenset({"range"}), send_body=False
            )
        except (OSError, http.client.HTTPException) as exc:
            handler.close_connection = True
            _send_simple(handler, 502, _registry_error("UNAVAILABLE", f"front: {exc}"))
            return
        if check.status != 200:
            if handler.command == "HEAD":
                self.relay(handler, conn, check)
            else:
                # A HEAD answer has no body; the client asked GET and should get the
                # registry's error document, so ask again with the real method.
                conn.close()
                self.proxy(handler)
            return
        check.read()
        conn.close()
        with self._lock:
            self.redirects += 1
        location = self.blob_host.signed_url(match["digest"])
        handler.send_response(307)
        handler.send_header("Location", location)
        handler.send_header("Content-Length", "0")
        handler.send_header("Docker-Distribution-Api-Version", "registry/2.0")
        handler.end_headers()


# --- FaultFront -------------------------------------------------------------------------


@dataclass
class Fault:
    kind: FaultKind
    digest: str | None
    nth: int
    times: int
    retry_after: int
    cut_after: int
    seen: int = 0  # matching requests since the fault was injected
    fired: int = 0
    #: "blob": GETs of the blob `digest` (None: any); "manifest": GETs and HEADs of the
    #: manifests of repository `digest` (None: any repository).
    target: Literal["blob", "manifest"] = "blob"


@dataclass
class FrontRequest:
    method: str
    path: str
    key: str | None  # digest for blobs, path for manifests
    range: str | None
    fault: FaultKind | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class FaultFront(_Proxy):
    """A counting proxy with a fault plan for blob GETs and manifest requests.

    `count(method, key)`: requests the front received for a blob (key = digest) or a
    manifest (key = its path, /v2/<name>/manifests/<ref>), faulted ones included.
    `inject(...)` arms a fault on the nth matching blob GET counted from now;
    `inject_manifest(...)` one on the nth manifest GET or HEAD.
    """

    name = "fault-front"

    def __init__(self, registry: RegistryServer, *, host: str = LOOPBACK) -> None:
        super().__init__(registry, host=host)
        self._lock = threading.Lock()
        self._counts: Counter[tuple[str, str]] = Counter()
        self._faults: list[Fault] = []
        self.range_requests = 0
        self.log: list[FrontRequest] = []

    def inject(
        self,
        digest: str | None = None,
        nth: int = 1,
        kind: FaultKind = "cut",
        retry_after: int = 2,
        cut_after: int = 65536,
        times: int = 1,
    ) -> Fault:
        """On the `nth` (and the `times - 1` following) blob GET matching `digest` (None:
        any blob): "cut" = the registry's status and headers, full Content-Length, at
        most `cut_after` body bytes (always fewer than the whole) and a dropped
        connection; "corrupt" = the whole answer, its length and headers unchanged, but
        the body byte at offset `cut_after` flipped (so the digest is wrong); "503";
        "429" with Retry-After: `retry_after`."""
        if kind not in ("cut", "corrupt", "503", "429"):
            raise ValueError(f"unknown fault kind {kind!r}")
        if nth < 1 or times < 1:
            raise ValueError("nth and times start at 1")
        fault = Fault(kind, digest, nth, times, retry_after, cut_after)
        with self._lock:
            self._faults.append(fault)
        return fault

    def inject_manifest(
        self,
        name: str | None = None,
        kind: ManifestFaultKind = "503",
        nth: int = 1,
        times: int = 1,
        retry_after: int = 2,
    ) -> Fault:
        """On the `nth` (and the `times - 1` following) manifest GET or HEAD of repository
        `name` (None: any): "503", "429" with Retry-After: `retry_after`, or (GETs only)
        "corrupt": the body's byte at offset 20 flipped, its length and headers
        (Docker-Content-Digest included) unchanged."""
        if kind not in ("corrupt", "503", "429"):
            raise ValueError(f"unknown manifest fault kind {kind!r}")
        if nth < 1 or times < 1:
            raise ValueError("nth and times start at 1")
        fault = Fault(kind, name, nth, times, retry_after, 20, target="manifest")
        with self._lock:
            self._faults.append(fault)
        return fault

    def reset(self) -> None:
        with self._lock:
            self._faults.clear()
            self._counts.clear()
            self.range_requests = 0
            self.log.clear()

    def count(self, method: str, key: str) -> int:
        with self._lock:
            return self._counts[(method.upper(), key)]

    def count_manifest(self, method: str, name: str, reference: str) -> int:
        return self.count(method, f"/v2/{name}/manifests/{reference}")

    @property
    def counts(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return dict(self._counts)

    @property
    def faults(self) -> list[Fault]:
        with self._lock:
            return list(self._faults)

    def _match_fault(self, target: str, key: str, method: str = "GET") -> Fault | None:
        chosen = None
        for fault in self._faults:
            if fault.target != target or fault.digest not in (None, key):
                continue
            if fault.kind == "corrupt" and method != "GET":
                continue  # a HEAD has no body to corrupt
            fault.seen += 1
            if chosen is None and fault.nth <= fault.seen < fault.nth + fault.times:
                fault.fired += 1
                chosen = fault
        return chosen

    def handle(self, handler: BaseHTTPRequestHandler) -> None:
        path = urlsplit(handler.path).path
        method = handler.command
        blob = BLOB_PATH.match(path)
        manifest = MANIFEST_PATH.match(path)
        key = blob["digest"] if blob else path if manifest else None
        range_header = handler.headers.get("Range")
        entry = FrontRequest(method, path, key, range_header)
        fault = None
        with self._lock:
            self.log.append(entry)
            if key is not None:
                self._counts[(method, key)] += 1
            if blob and range_header:
                self.range_requests += 1
            if blob and method == "GET":
                fault = self._match_fault("blob", blob["digest"])
            elif manifest and method in ("GET", "HEAD"):
                fault = self._match_fault("manifest", manifest["name"], method)
        if fault is None:
            self.proxy(handler)
            return
        entry.fault = fault.kind
        if fault.kind == "503":
            _send_simple(handler, 503, _registry_error("UNAVAILABLE", "injected 503"))
        elif fault.kind == "429":
            _send_simple(
                handler,
                429,
                _registry_error("TOOMANYREQUESTS", "injected 429"),
                {"Retry-After": str(fault.retry_after)},
            )
        else:
            try:
                conn, response = self.forward(handler)
            except (OSError, http.client.HTTPException) as exc:
                handler.close_connection = True
                _send_simple(handler, 502, _registry_error("UNAVAILABLE", f"front: {exc}"))
                return
            if fault.kind == "corrupt":
                self.relay(handler, conn, response, corrupt_at=fault.cut_after)
            else:
                self.relay(handler, conn, response, cut_after=fault.cut_after)
