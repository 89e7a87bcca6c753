"""A Docker token issuer for the rig: `GET /token?service=..&scope=..` with optional
HTTP Basic, answering RS256 JWTs that CNCF distribution accepts (x5c chain to the
self-signed certificate the registry trusts as its rootcertbundle).

Grants are per user (None = anonymous) and repository pattern (fnmatch, `*` spans
slashes). As real issuers do, a scope that is not granted still gets a token, with a
reduced or empty access list, so the registry is the one that refuses.
"""

from __future__ import annotations

import base64
import datetime as dt
import fnmatch
import json
import secrets
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from tests.support.procs import LOOPBACK, BackgroundHTTPServer

DEFAULT_SERVICE = "passthrough-test-registry"
DEFAULT_ISSUER = "passthrough-test-issuer"

TokenField = Literal["both", "token", "access_token"]


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def decode_jwt(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(header, claims) of a JWT, without verifying it: for assertions in tests."""
    header, claims, _sig = token.split(".")
    return json.loads(_b64url_decode(header)), json.loads(_b64url_decode(claims))


@dataclass(frozen=True)
class Scope:
    """One `type:name:actions` scope as the Docker token protocol spells it."""

    type: str
    name: str
    actions: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> Scope:
        # The name may itself hold a colon (host:port/repo), so split from both ends.
        kind, _, rest = text.partition(":")
        name, _, actions = rest.rpartition(":")
        if not kind or not name:
            raise ValueError(f"malformed scope {text!r}")
        # `repository(plugin)` is a resource class; the type is what grants match.
        kind = kind.split("(", 1)[0]
        return cls(kind, name, tuple(a for a in actions.split(",") if a))

    def __str__(self) -> str:
        return f"{self.type}:{self.name}:{','.join(self.actions)}"


@dataclass(frozen=True)
class Grant:
    user: str | None  # None: anonymous (and so everyone)
    pattern: str
    actions: frozenset[str]
    type: str = "repository"

    def allows(self, scope: Scope) -> set[str]:
        if scope.type != self.type or not fnmatch.fnmatchcase(scope.name, self.pattern):
            return set()
        if "*" in self.actions:
            return set(scope.actions)
        return set(scope.actions) & self.actions


@dataclass(frozen=True)
class TokenRequest:
    """What one request to the issuer looked like. Passwords are never kept."""

    method: str
    path: str
    query: tuple[tuple[str, str], ...]
    has_authorization: bool
    auth_scheme: str | None  # "Basic", "Bearer", ... as sent
    user: str | None  # the authenticated user, None when anonymous or refused
    status: int
    access: tuple[dict[str, Any], ...] = field(default=())

    def params(self, name: str) -> list[str]:
        return [v for k, v in self.query if k == name]

    @property
    def scopes(self) -> list[str]:
        return self.params("scope")

    @property
    def service(self) -> str | None:
        values = self.params("service")
        return values[0] if values else None

    @property
    def account(self) -> str | None:
        values = self.params("account")
        return values[0] if values else None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "rig-token-issuer"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        issuer: TokenIssuer = self.server.owner  # type: ignore[attr-defined]
        status, body, headers = issuer._handle(
            self.command, self.path, self.headers.get("Authorization")
        )
        self._reply(status, body, headers)

    def do_POST(self) -> None:
        # The OAuth2 POST form of the protocol is not implemented: say so clearly.
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        issuer: TokenIssuer = self.server.owner  # type: ignore[attr-defined]
        issuer._record(
            TokenRequest(
                method="POST",
                path=urlsplit(self.path).path,
                query=tuple(parse_qsl(urlsplit(self.path).query, keep_blank_values=True)),
                has_authorization="Authorization" in self.headers,
                auth_scheme=_scheme(self.headers.get("Authorization")),
                user=None,
                status=405,
            )
        )
        self._reply(405, {"errors": [{"code": "UNSUPPORTED", "message": "use GET"}]}, {})

    def _reply(self, status: int, body: dict[str, Any], headers: dict[str, str]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)


def _scheme(authorization: str | None) -> str | None:
    if not authorization:
        return None
    return authorization.split(" ", 1)[0]


class TokenIssuer:
    """The token server. Start it, then point a registry's auth.token at it:
    realm=`issuer.realm`, service=`issuer.service`, issuer=`issuer.issuer`,
    rootcertbundle=`issuer.cert_path`.

    Options tests may flip (and `reset()` restores): `token_field` ("both", "token" or
    "access_token": which JSON fields carry the token), `include_expires_in`,
    `include_issued_at`, `ttl` (seconds, also the expires_in value).
    """

    def __init__(
        self,
        *,
        service: str = DEFAULT_SERVICE,
        issuer: str = DEFAULT_ISSUER,
        host: str = LOOPBACK,
        ttl: int = 300,
        path: str = "/token",
    ) -> None:
        self.service = service
        self.issuer = issuer
        self.path = path
        self._default_ttl = ttl
        self.ttl = ttl
        self.token_field: TokenField = "both"
        self.include_expires_in = True
        self.include_issued_at = True
        self._users: dict[str, str] = {}
        self._grants: list[Grant] = []
        self._requests: list[TokenRequest] = []
        self._failures: list[tuple[int, int]] = []  # (status, remaining)
        self._lock = threading.Lock()
        self._dir = Path(tempfile.mkdtemp(prefix="rig-token-issuer-"))
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.certificate = self._self_signed(self._key, issuer)
        self.cert_pem: bytes = self.certificate.public_bytes(serialization.Encoding.PEM)
        self.cert_path = self._dir / "rootcertbundle.pem"
        self.cert_path.write_bytes(self.cert_pem)
        self._x5c = [
            base64.b64encode(self.certificate.public_bytes(serialization.Encoding.DER)).decode()
        ]
        self._http = BackgroundHTTPServer(_Handler, self, host=host, name="token-issuer")

    @staticmethod
    def _self_signed(key: rsa.RSAPrivateKey, common_name: str) -> x509.Certificate:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = dt.datetime.now(dt.UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=3650))
            # A CA certificate, since the registry uses it as the root of the x5c chain.
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )

    # --- lifecycle -------------------------------------------------------------------

    def start(self) -> TokenIssuer:
        self._http.start()
        return self

    def stop(self) -> None:
        self._http.stop()
        for child in self._dir.iterdir():
            child.unlink()
        self._dir.rmdir()

    def __enter__(self) -> TokenIssuer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """Base URL, http://127.0.0.1:PORT."""
        return self._http.url

    @property
    def realm(self) -> str:
        """The token endpoint, what WWW-Authenticate names as realm."""
        return self._http.url + self.path

    @property
    def port(self) -> int:
        return self._http.port

    # --- configuration ---------------------------------------------------------------

    def add_user(self, username: str, password: str) -> None:
        with self._lock:
            self._users[username] = password

    def grant(
        self,
        user: str | None,
        pattern: str,
        actions: list[str] | tuple[str, ...],
        *,
        type: str = "repository",
    ) -> None:
        """Let `user` (None: anyone, even anonymous) do `actions` on names matching
        `pattern`; `["*"]` means every action requested."""
        with self._lock:
            self._grants.append(Grant(user, pattern, frozenset(actions), type))

    def fail_next(self, status: int = 503, times: int = 1) -> None:
        """Answer the next `times` token requests with `status` (an outage)."""
        with self._lock:
            self._failures.append((status, times))

    def reset(self) -> None:
        """Default answer options, no pending failures, empty request log. Users and
        grants stay: they are the fixture's, not a test's."""
        with self._lock:
            self.ttl = self._default_ttl
            self.token_field = "both"
            self.include_expires_in = True
            self.include_issued_at = True
            self._failures.clear()
            self._requests.clear()

    # --- observation -----------------------------------------------------------------

    @property
    def requests(self) -> list[TokenRequest]:
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    def _record(self, request: TokenRequest) -> None:
        with self._lock:
            self._requests.append(request)

    # --- tokens ----------------------------------------------------------------------

    def access_for(self, user: str | None, scopes: list[Scope]) -> list[dict[str, Any]]:
        """The access claim a token for `user` asking `scopes` gets."""
        with self._lock:
            grants = [g for g in self._grants if g.user is None or g.user == user]
        merged: dict[tuple[str, str], set[str]] = {}
        order: list[tuple[str, str]] = []
        for scope in scopes:
            allowed: set[str] = set()
            for grant in grants:
                allowed |= grant.allows(scope)
            key = (scope.type, scope.name)
            if key not in merged:
                merged[key] = set()
                order.append(key)
            merged[key] |= allowed
        return [
            {"type": t, "name": n, "actions": sorted(merged[(t, n)])}
            for t, n in order
            if merged[(t, n)]
        ]

    def mint(
        self,
        subject: str,
        access: list[dict[str, Any]],
        *,
        ttl: int | None = None,
        audience: str | None = None,
        issuer: str | None = None,
        not_before: int | None = None,
    ) -> str:
        """A signed token; the keyword arguments let tests forge expired or foreign ones."""
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": self._x5c}
        claims = {
            "iss": issuer or self.issuer,
            "sub": subject,
            "aud": audience or self.service,
            "exp": now + (self.ttl if ttl is None else ttl),
            # A little slack for clocks that disagree by a second.
            "nbf": now - 5 if not_before is None else not_before,
            "iat": now,
            "jti": secrets.token_hex(16),
            "access": access,
        }
        signing_input = (
            _b64url(json.dumps(header, separators=(",", ":")).encode())
            + "."
            + _b64url(json.dumps(claims, separators=(",", ":")).encode())
        )
        signature = self._key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return signing_input + "." + _b64url(signature)

    def _authenticate(self, authorization: str | None) -> tuple[bool, str | None]:
        """(accepted, user). Only Basic identifies a user; anything else is anonymous."""
        if not authorization or _scheme(authorization) != "Basic":
            return True, None
        try:
            decoded = base64.b64decode(authorization.split(" ", 1)[1], validate=True).decode()
        except (ValueError, IndexError):
            return False, None
        username, sep, password = decoded.partition(":")
        with self._lock:
            expected = self._users.get(username)
        if not sep or expected is None or not secrets.compare_digest(expected, password):
            return False, None
        return True, username

    def _handle(
        self, method: str, raw_path: str, authorization: str | None
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        parts = urlsplit(raw_path)
        query = tuple(parse_qsl(parts.query, keep_blank_values=True))

        def record(
            status: int, user: str | None, access: list[dict[str, Any]] | None = None
        ) -> None:
            self._record(
                TokenRequest(
                    method=method,
                    path=parts.path,
                    query=query,
                    has_authorization=authorization is not None,
                    auth_scheme=_scheme(authorization),
                    user=user,
                    status=status,
                    access=tuple(access or ()),
                )
            )

        def error(
            status: int, code: str, message: str
        ) -> tuple[int, dict[str, Any], dict[str, str]]:
            return status, {"errors": [{"code": code, "message": message}], "details": message}, {}

        if parts.path != self.path:
            record(404, None)
            return error(404, "NOT_FOUND", f"no such endpoint {parts.path}")
        with self._lock:
            if self._failures:
                status, remaining = self._failures[0]
                if remaining <= 1:
                    self._failures.pop(0)
                else:
                    self._failures[0] = (status, remaining - 1)
            else:
                status = 0
        if status:
            record(status, None)
            return error(status, "UNAVAILABLE", "injected failure")

        ok, user = self._authenticate(authorization)
        if not ok:
            record(401, None)
            refused = error(401, "UNAUTHORIZED", "incorrect username or password")
            return 401, refused[1], {"WWW-Authenticate": f'Basic realm="{self.realm}"'}
        services = [v for k, v in query if k == "service"]
        if services and services[0] != self.service:
            record(400, user)
            return error(400, "INVALID_REQUEST", f"unknown service {services[0]!r}")
        scopes: list[Scope] = []
        try:
            for value in (v for k, v in query if k == "scope"):
                # One parameter may carry several scopes separated by spaces.
                scopes.extend(Scope.parse(s) for s in value.split())
        except ValueError as exc:
            record(400, user)
            return error(400, "INVALID_REQUEST", str(exc))

        access = self.access_for(user, scopes)
        token = self.mint(user or "", access)
        body: dict[str, Any] = {}
        if self.token_field in ("both", "token"):
            body["token"] = token
        if self.token_field in ("both", "access_token"):
            body["access_token"] = token
        if self.include_expires_in:
            body["expires_in"] = self.ttl
        if self.include_issued_at:
            body["issued_at"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        record(200, user, access)
        return 200, body, {}
