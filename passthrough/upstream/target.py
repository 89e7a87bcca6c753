"""Stage 2, choose the registry and the credentials for one request.

The route decides the registry (the environment's, or one named in the URL), and the
client-auth mode decides whether the client's Basic credentials are used. The
environment's secrets go only to the environment's own registry: a client that names
another host in the URL never makes us hand our credentials to it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from passthrough.config import ConfigError, Settings, normalize_registry
from passthrough.errors import BadRequest, ClientAuthDisabled, ClientAuthRequired
from passthrough.oci.endpoint import RegistryEndpoint
from passthrough.oci.reference import quote_input
from passthrough.upstream.auth import Credentials


class Route(StrEnum):
    """The three download route families."""

    ENVIRONMENT = "docker"  # /docker/{filename}
    REGISTRY = "registry"  # /registry/{scheme}/{host}/docker/{filename}
    REGISTRY_AUTH = "registry-auth"  # /registry-auth/{scheme}/{host}/docker/{filename}


class AuthKind(StrEnum):
    """How we will authenticate to the registry, in the reference's order of precedence."""

    STATIC_BEARER = "static_bearer"  # REGISTRY_BEARER_TOKEN, sent as it is
    CREDENTIALS = "credentials"  # token exchange at the realm, or direct Basic
    ANONYMOUS = "anonymous"  # anonymous token exchange, or nothing


@dataclass(frozen=True)
class Target:
    """One request's registry and how to authenticate to it. Lives in memory only for
    the request; ``repr`` never shows a secret."""

    registry: RegistryEndpoint
    #: "environment" for /docker and for a URL naming the environment's registry.
    source: str
    auth: AuthKind
    credentials: Credentials | None = None
    #: "client" or "environment" when credentials are set.
    credentials_source: str | None = None
    bearer_token: str | None = None
    #: REGISTRY_AUTH_URL / REGISTRY_SERVICE, for the environment's registry only.
    realm_override: str | None = None
    service_override: str | None = None

    def __repr__(self) -> str:  # the dataclass repr would print the bearer token
        return (
            f"Target(registry={self.registry.url!r}, source={self.source!r}, "
            f"auth={self.auth.value!r}, credentials_source={self.credentials_source!r})"
        )


_URL_HOST_RE = re.compile(r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(?::\d{1,5})?$")


def registry_from_url(scheme: str, host: str) -> RegistryEndpoint:
    """The registry named by ``/registry/{scheme}/{host}/``; host may carry a port."""
    if scheme not in ("http", "https"):
        raise BadRequest(f"the registry scheme must be http or https, not {quote_input(scheme)}")
    if not _URL_HOST_RE.fullmatch(host):
        raise BadRequest(f"invalid registry host {quote_input(host)}: expected host or host:port")
    try:
        return normalize_registry(f"{scheme}://{host}", variable="the registry host")
    except ConfigError as exc:
        raise BadRequest(str(exc)) from None


def choose_target(
    settings: Settings,
    route: Route,
    client_credentials: Credentials | None,
    registry: RegistryEndpoint | None = None,
) -> Target:
    """Apply REGISTRY_CLIENT_AUTH and the precedence: static bearer token; else the client's
    credentials when present, else the environment's; else anonymous."""
    chosen = settings.registry if route is Route.ENVIRONMENT or registry is None else registry
    is_environment_registry = chosen.url == settings.registry.url

    mode = settings.client_auth
    if route is Route.REGISTRY_AUTH:
        if mode == "off":
            raise ClientAuthDisabled(
                "client credentials are switched off on this service (REGISTRY_CLIENT_AUTH=off)"
            )
        if client_credentials is None:
            raise ClientAuthRequired()
    elif mode == "required" and client_credentials is None:
        raise ClientAuthRequired()
    if mode == "off":
        client_credentials = None

    realm = settings.registry_auth_url if is_environment_registry else None
    service = settings.registry_service if is_environment_registry else None
    source = "environment" if is_environment_registry else "request"

    if is_environment_registry and settings.bearer_token:
        return Target(
            chosen,
            source,
            AuthKind.STATIC_BEARER,
            bearer_token=settings.bearer_token,
            realm_override=realm,
            service_override=service,
        )
    if client_credentials is not None:
        return Target(
            chosen,
            source,
            AuthKind.CREDENTIALS,
            credentials=client_credentials,
            credentials_source="client",
            realm_override=realm,
            service_override=service,
        )
    if is_environment_registry and settings.username and settings.password:
        return Target(
            chosen,
            source,
            AuthKind.CREDENTIALS,
            credentials=Credentials(settings.username, settings.password),
            credentials_source="environment",
            realm_override=realm,
            service_override=service,
        )
    return Target(
        chosen, source, AuthKind.ANONYMOUS, realm_override=realm, service_override=service
    )
