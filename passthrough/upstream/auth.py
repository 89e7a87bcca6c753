"""Registry authentication: WWW-Authenticate challenges (RFC 7235), credentials that are
kept in memory for one request only, and a token cache keyed by a keyed hash of the
credential (never the secret itself)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
import threading
import time
from dataclasses import dataclass, field

from passthrough.errors import BadRequest

# A per-process key: cache keys built with it reveal nothing about a password, even to
# someone who can read this process's memory dump of the cache.
_IDENTITY_KEY = secrets.token_bytes(32)


@dataclass(frozen=True)
class Credentials:
    """A username and password. ``repr`` never shows the password."""

    username: str
    password: str = field(repr=False)

    @property
    def identity(self) -> str:
        """A stable, non-reversible name for this credential within this process."""
        material = f"{self.username}\0{self.password}".encode()
        return hmac.new(_IDENTITY_KEY, material, hashlib.sha256).hexdigest()[:32]

    def basic_header(self) -> str:
        token = base64.b64encode(f"{self.username}:{self.password}".encode()).decode("ascii")
        return f"Basic {token}"


def parse_basic_authorization(header: str | None) -> Credentials | None:
    """The client's ``Authorization: Basic …`` as credentials; None when absent or another
    scheme. A malformed Basic header is a 400, not a silent anonymous request."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise BadRequest("the Authorization header is not valid HTTP Basic") from None
    username, colon, password = decoded.partition(":")
    if not colon or not username:
        raise BadRequest("the Authorization header is not valid HTTP Basic (user:password)")
    return Credentials(username, password)


# -- WWW-Authenticate ------------------------------------------------------------------

_TCHAR = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_SCHEME_RE = re.compile(rf"\s*({_TCHAR})")
_PARAM_RE = re.compile(rf'\s*({_TCHAR})\s*=\s*(?:"((?:[^"\\]|\\.)*)"|({_TCHAR}))')
_TCHAR68_RE = re.compile(r"\s+([A-Za-z0-9\-._~+/]+=*)\s*(?=,|$)")


@dataclass(frozen=True)
class Challenge:
    """One authentication challenge: its scheme (lower-cased) and parameters."""

    scheme: str
    params: dict[str, str]

    @property
    def realm(self) -> str | None:
        return self.params.get("realm")


def parse_challenges(header: str) -> list[Challenge]:
    """Parse a WWW-Authenticate value that may hold several challenges, quoted commas
    and ``host:port`` inside scope values. Unparseable tails are ignored, not fatal."""
    challenges: list[Challenge] = []
    pos = 0
    length = len(header)
    while pos < length:
        while pos < length and header[pos] in " \t,":
            pos += 1
        scheme_match = _SCHEME_RE.match(header, pos)
        if not scheme_match:
            break
        scheme = scheme_match.group(1).lower()
        pos = scheme_match.end()
        params: dict[str, str] = {}
        token68 = _TCHAR68_RE.match(header, pos)
        if token68 and not _PARAM_RE.match(header, pos):
            pos = token68.end()
        else:
            while True:
                param = _PARAM_RE.match(header, pos)
                if not param:
                    break
                name = param.group(1).lower()
                quoted, bare = param.group(2), param.group(3)
                value = re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else bare
                params.setdefault(name, value)
                pos = param.end()
                # A comma followed by `name=` continues this challenge; followed by a bare
                # token it starts the next one.
                rest = re.match(r"\s*,", header[pos:])
                if not rest:
                    break
                after = pos + rest.end()
                if _PARAM_RE.match(header, after):
                    pos = after
                    continue
                pos = after
                break
        challenges.append(Challenge(scheme, params))
    return challenges


# -- tokens -----------------------------------------------------------------------------

#: Tokens are reused until this long before they expire.
EXPIRY_MARGIN_SECONDS = 10.0
#: The token spec's default lifetime when the issuer gives none.
DEFAULT_EXPIRES_IN = 60


@dataclass(frozen=True)
class TokenKey:
    """What a token is good for: one realm/service, a set of scopes and one identity
    (a keyed hash, or "anonymous"). Tokens are never shared across identities."""

    realm: str
    service: str
    scopes: tuple[str, ...]
    identity: str


class TokenCache:
    """Bearer tokens in memory, thread-safe, reused until shortly before expiry."""

    def __init__(self) -> None:
        self._tokens: dict[TokenKey, tuple[str, float]] = {}
        self._lock = threading.Lock()
        #: The last challenge each registry sent for each repository: a new client of
        #: that repository authenticates before its first request (with the token this
        #: cache already holds) instead of after a 401, saving a round trip a request.
        self._challenges: dict[tuple[str, str], list[Challenge]] = {}

    def remember_challenges(
        self, registry_url: str, repository: str, challenges: list[Challenge]
    ) -> None:
        kept = [c for c in challenges if c.scheme in ("bearer", "basic")]
        if kept:
            with self._lock:
                if len(self._challenges) > 4096:
                    self._challenges.clear()
                self._challenges[(registry_url, repository)] = kept

    def challenges_for(self, registry_url: str, repository: str) -> list[Challenge] | None:
        with self._lock:
            return self._challenges.get((registry_url, repository))

    def get(self, key: TokenKey) -> str | None:
        now = time.monotonic()
        with self._lock:
            entry = self._tokens.get(key)
            if entry is None:
                return None
            token, expires_at = entry
            if now >= expires_at - EXPIRY_MARGIN_SECONDS:
                del self._tokens[key]
                return None
            return token

    def put(self, key: TokenKey, token: str, expires_in: float) -> None:
        expires_at = time.monotonic() + max(expires_in, 0)
        with self._lock:
            # Bounded: a busy service sees many scopes; drop expired entries as it grows.
            if len(self._tokens) > 4096:
                now = time.monotonic()
                self._tokens = {k: v for k, v in self._tokens.items() if v[1] > now}
            self._tokens[key] = (token, expires_at)

    def discard(self, key: TokenKey) -> None:
        with self._lock:
            self._tokens.pop(key, None)

    def size(self) -> int:
        with self._lock:
            return len(self._tokens)
