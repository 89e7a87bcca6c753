"""passthrough's own token service for /v2: the distribution token spec's scopes, and
Bearer tokens that carry the grant (and, in PROXY_MODE=authenticated, the client's
upstream credentials) encrypted and authenticated with a key every worker and replica
derives from TOKEN_SECRET.

A token is a Fernet token (AES-128-CBC with HMAC-SHA256) over a small JSON payload, so
it is opaque to the client, cannot be altered, and any replica holding the same secret
can verify it without shared session state. Nothing in this module logs; error messages
never quote a token or a credential.
"""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from passthrough.config import Settings
from passthrough.errors import BadRequest, TokenInvalid
from passthrough.oci.reference import MAX_REPOSITORY_LENGTH, PATH_COMPONENT_RE, quote_input
from passthrough.upstream.auth import Credentials

#: The ``service`` of the Bearer challenge and of the token endpoint.
SERVICE = "passthrough"

# The spec's grammar: resourcetype := /[a-z0-9]+/ ['(' /[a-z0-9]+/ ')'], action :=
# /[a-z]*/; "*" is what registry:catalog:* and the token servers use for "every action".
_TYPE_RE = re.compile(r"[a-z0-9]+(?:\([a-z0-9]+\)){0,1}")
_ACTION_RE = re.compile(r"[a-z]*|\*")
# A registry host as the first component of a name (localhost:5000/x, ghcr.io/o/x).
_HOST_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?(?::\d{1,5})?")
# Bounds on what one request may ask: a token travels in every request's header.
MAX_SCOPES = 32
MAX_SCOPE_LENGTH = 512
# A token is a few hundred bytes; anything much larger is not one of ours.
MAX_TOKEN_LENGTH = 16384

_KEY_LABEL = b"passthrough /v2 token key v1"
_PAYLOAD_VERSION = 1


def is_repository_name(name: str) -> bool:
    """Whether ``name`` is a repository name as a scope may hold it: path components of
    the distribution grammar, the first of which may be a registry host[:port]."""
    if not name or len(name) > MAX_REPOSITORY_LENGTH:
        return False
    components = name.split("/")
    first, rest = components[0], components[1:]
    if not PATH_COMPONENT_RE.fullmatch(first) and not (rest and _HOST_RE.fullmatch(first)):
        return False
    return all(PATH_COMPONENT_RE.fullmatch(c) for c in rest)


@dataclass(frozen=True)
class Scope:
    """One resource and the actions asked or granted on it (``repository:team/app:pull``)."""

    type: str
    name: str
    actions: frozenset[str]

    def __str__(self) -> str:
        return f"{self.type}:{self.name}:{','.join(sorted(self.actions))}"


def parse_scope(text: str) -> Scope:
    """One scope string. The name may hold ':' (``repository:localhost:5000/x:pull``), so
    the type ends at the first ':' and the actions start after the last one."""
    if len(text) > MAX_SCOPE_LENGTH:
        raise BadRequest(f"a scope is longer than {MAX_SCOPE_LENGTH} characters")
    kind, first, remainder = text.partition(":")
    name, last, actions_text = remainder.rpartition(":")
    if not first or not last or not name:
        raise BadRequest(
            f"invalid scope {quote_input(text)}: expected type:name:actions "
            "such as repository:library/alpine:pull"
        )
    if not _TYPE_RE.fullmatch(kind):
        raise BadRequest(f"invalid scope {quote_input(text)}: the resource type is malformed")
    if kind == "repository" and not is_repository_name(name):
        raise BadRequest(f"invalid scope {quote_input(text)}: the repository name is malformed")
    if kind != "repository" and not re.fullmatch(r"[A-Za-z0-9._/:-]+", name):
        raise BadRequest(f"invalid scope {quote_input(text)}: the resource name is malformed")
    actions = [a.strip() for a in actions_text.split(",")]
    if not all(_ACTION_RE.fullmatch(a) for a in actions):
        raise BadRequest(f"invalid scope {quote_input(text)}: actions are words such as pull")
    return Scope(kind, name, frozenset(a for a in actions if a))


def parse_scopes(values: Iterable[str]) -> list[Scope]:
    """Scopes from repeated ``scope`` parameters, each of which may hold several
    space-separated scopes (docker repeats the parameter, OAuth2 clients join with
    spaces). The same resource asked twice becomes one scope with both sets of actions,
    in the order first asked."""
    merged: dict[tuple[str, str], set[str]] = {}
    for value in values:
        for text in value.split():
            scope = parse_scope(text)
            merged.setdefault((scope.type, scope.name), set()).update(scope.actions)
            if len(merged) > MAX_SCOPES:
                raise BadRequest(f"a token request may ask for at most {MAX_SCOPES} scopes")
    return [Scope(kind, name, frozenset(actions)) for (kind, name), actions in merged.items()]


def grantable_scopes(settings: Settings, requested: Iterable[Scope]) -> tuple[Scope, ...]:
    """What passthrough grants of ``requested`` on proxied names: "pull" on any
    repository asked, to anonymous clients too (upstream decides per request, with the
    client's credentials in PROXY_MODE=authenticated, so public images through a dockerd
    mirror without credentials work). "push", "delete" and every other action or
    resource type are dropped from the grant, as distribution's token servers drop what
    they will not give, rather than refused. Hosted names are granted per user by
    :meth:`passthrough.registry.access.Gate.grant`."""
    # Settings will decide more once a hosted area exists; today every mode grants alike.
    del settings
    granted: list[Scope] = []
    for scope in requested:
        if scope.type != "repository":
            continue
        if "pull" in scope.actions or "*" in scope.actions:
            granted.append(Scope(scope.type, scope.name, frozenset({"pull"})))
    return tuple(granted)


@dataclass(frozen=True)
class Grant:
    """What a verified token allows, and who presented it."""

    subject: str | None
    scopes: tuple[Scope, ...]
    credentials: Credentials | None = field(repr=False)
    expires_at: float
    #: The passthrough user (HTPASSWD_FILE) the token service verified, if any; the
    #: subject alone may be an upstream login that passthrough never checked.
    user: str | None = None

    def allows(self, repository: str, action: str) -> bool:
        return any(
            s.type == "repository" and s.name == repository and action in s.actions
            for s in self.scopes
        )


def derive_key(secret: str) -> bytes:
    """The Fernet key for ``secret``: HKDF-SHA256 under a fixed label, so the key is
    uniform whatever the secret looks like, and is never the secret itself."""
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_KEY_LABEL)
    return base64.urlsafe_b64encode(hkdf.derive(secret.encode("utf-8")))


def rfc3339(moment: float) -> str:
    """A time as the token spec's issued_at (RFC 3339, UTC, whole seconds)."""
    return datetime.fromtimestamp(int(moment), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class TokenService:
    """Issues and verifies passthrough's Bearer tokens. Two instances with the same
    secret accept each other's tokens (workers, replicas); another secret's are refused."""

    def __init__(
        self,
        secret: str,
        ttl: int,
        service: str = SERVICE,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not secret:
            raise ValueError("a token service needs a secret")
        if ttl <= 0:
            raise ValueError("a token's lifetime must be positive")
        self._fernet = Fernet(derive_key(secret))
        self.ttl = ttl
        self.service = service
        # Wall-clock time: tokens cross processes and machines, a monotonic clock does not.
        self._clock = clock

    def __repr__(self) -> str:
        return f"TokenService(service={self.service!r}, ttl={self.ttl})"

    def issue(
        self,
        scopes: Iterable[Scope],
        *,
        credentials: Credentials | None = None,
        subject: str | None = None,
        user: str | None = None,
    ) -> dict[str, Any]:
        """A token for ``scopes`` (already filtered to what may be granted), in the token
        spec's answer: ``token`` and ``access_token`` (the same, for OAuth2 clients),
        ``expires_in`` and ``issued_at``."""
        now = self._clock()
        payload: dict[str, Any] = {
            "v": _PAYLOAD_VERSION,
            "aud": self.service,
            "iat": int(now),
            "exp": int(now) + self.ttl,
            "sub": subject,
            "access": [[s.type, s.name, sorted(s.actions)] for s in scopes],
        }
        if user is not None:
            payload["usr"] = user
        if credentials is not None:
            payload["cred"] = [credentials.username, credentials.password]
        data = json.dumps(payload, separators=(",", ":")).encode("utf-8")
        token = self._fernet.encrypt_at_time(data, int(now)).decode("ascii")
        return {
            "token": token,
            "access_token": token,
            "expires_in": self.ttl,
            "issued_at": rfc3339(now),
        }

    def verify(self, token: str) -> Grant:
        """The grant inside ``token``; :class:`TokenInvalid` for a token that is malformed,
        altered, made with another key or for another service, or expired."""
        if not token or len(token) > MAX_TOKEN_LENGTH:
            raise TokenInvalid("the Bearer token is not one this service issued")
        try:
            # Fernet's own timestamp is not checked (no ttl): the payload's exp is the
            # expiry, so a replica whose clock is slightly ahead still accepts fresh tokens.
            data = self._fernet.decrypt(token.encode("ascii"))
        except (InvalidToken, UnicodeEncodeError):
            raise TokenInvalid("the Bearer token is not one this service issued") from None
        try:
            grant = self._grant(json.loads(data))
        except (ValueError, TypeError, KeyError):
            # Authenticated yet unreadable: a future or foreign payload version.
            raise TokenInvalid("the Bearer token is not one this service issued") from None
        if self._clock() >= grant.expires_at:
            raise TokenInvalid("the Bearer token has expired; ask the token service again")
        return grant

    def _grant(self, payload: Any) -> Grant:
        if not isinstance(payload, dict) or payload.get("v") != _PAYLOAD_VERSION:
            raise ValueError("unknown payload")
        if payload.get("aud") != self.service:
            raise ValueError("another service's token")
        expires_at = payload["exp"]
        subject = payload.get("sub")
        user = payload.get("usr")
        if not isinstance(expires_at, int) or not all(
            value is None or isinstance(value, str) for value in (subject, user)
        ):
            raise ValueError("malformed payload")
        scopes = tuple(
            Scope(str(kind), str(name), frozenset(str(a) for a in actions))
            for kind, name, actions in payload["access"]
        )
        credentials = None
        if "cred" in payload:
            username, password = payload["cred"]
            if not isinstance(username, str) or not isinstance(password, str):
                raise ValueError("malformed credentials")
            credentials = Credentials(username, password)
        return Grant(subject, scopes, credentials, float(expires_at), user)
