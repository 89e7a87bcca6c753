"""The access check every /v2 request goes through: who the client is (its upstream
identity) and whether it may do what it asks.

With PROXY_MODE=authenticated every request needs a Bearer token from passthrough's
token service, or Basic credentials sent straight to /v2; anything else is answered with
the Bearer challenge. A Basic challenge would not do: dockerd without credentials drops
a mirror whose /v2/ asks for Basic and pulls from Docker Hub instead, while it follows a
Bearer challenge anonymously. The challenge's realm is PUBLIC_URL, never the Host
header, which the client controls.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from passthrough.config import Settings
from passthrough.errors import (
    InsufficientScope,
    PassthroughError,
    TokenInvalid,
    TokenRequired,
)
from passthrough.registry.tokens import SERVICE, TokenService, is_repository_name
from passthrough.upstream.auth import Credentials, parse_basic_authorization

Via = Literal["none", "bearer", "basic"]


@dataclass(frozen=True)
class Identity:
    """The client of one /v2 request: the upstream credentials it brought (in a token or
    as Basic), a name for logs (the username, never the password) and how it came."""

    credentials: Credentials | None = field(repr=False)
    subject: str | None
    via: Via


ANONYMOUS = Identity(None, None, "none")


def token_realm(settings: Settings) -> str:
    """Where clients fetch tokens: PUBLIC_URL + /v2/token."""
    if settings.public_url is None:
        # load_settings refuses authenticated mode without PUBLIC_URL; a Settings built
        # by hand may still lack it, and the Host header is no substitute.
        raise PassthroughError("PUBLIC_URL is not set: there is no token realm to send clients to")
    return settings.public_url.rstrip("/") + "/v2/token"


def challenge(
    settings: Settings,
    repository: str | None = None,
    action: str = "pull",
    error: str | None = None,
) -> str:
    """The WWW-Authenticate value for a 401 from /v2."""
    parts = [f'realm="{token_realm(settings)}"', f'service="{SERVICE}"']
    # Only a well-formed name goes into the header: it comes from the request path.
    if repository is not None and is_repository_name(repository) and action.isalpha():
        parts.append(f'scope="repository:{repository}:{action}"')
    if error is not None:
        parts.append(f'error="{error}"')
    return "Bearer " + ",".join(parts)


def check_access(
    settings: Settings,
    tokens: TokenService | None,
    authorization: str | None,
    repository: str | None,
    action: str = "pull",
) -> Identity:
    """The identity of a /v2 request, or a 401 carrying the Bearer challenge.

    ``repository`` None is the ``/v2/`` base check: any valid token will do. Basic
    credentials are accepted as given; only upstream can judge them, and does on the
    request they are used for.
    """
    if not settings.auth_enabled:
        # Transparent mode: the service's own identity goes upstream; the header means
        # nothing here, a token from the (optional) endpoint included.
        return ANONYMOUS

    scheme, _, value = (authorization or "").strip().partition(" ")
    scheme = scheme.lower()
    if scheme == "basic":
        # A malformed Basic header is a 400 (parse_basic_authorization), as on the tar routes.
        credentials = parse_basic_authorization(authorization)
        assert credentials is not None
        return Identity(credentials, credentials.username, "basic")
    if scheme != "bearer":
        raise TokenRequired(
            "authentication required: get a Bearer token from the token service",
            headers={"WWW-Authenticate": challenge(settings, repository, action)},
        )
    if tokens is None:
        raise PassthroughError("TOKEN_SECRET is not set: Bearer tokens cannot be verified")
    try:
        grant = tokens.verify(value.strip())
    except TokenInvalid as exc:
        raise TokenInvalid(
            exc.message,
            headers={"WWW-Authenticate": challenge(settings, repository, action, "invalid_token")},
        ) from None
    if repository is not None and not grant.allows(repository, action):
        raise InsufficientScope(
            f"the token does not grant {action} on this repository; ask for its scope",
            headers={
                "WWW-Authenticate": challenge(settings, repository, action, "insufficient_scope")
            },
        )
    return Identity(grant.credentials, grant.subject, "bearer")
