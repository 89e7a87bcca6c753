"""The rules that combine settings: values one variable cannot check alone.

Each command checks the concerns it uses (:func:`combine`'s ``concerns``): the server
all of them; ``passthrough gc``, which issues no token and serves nobody, the store's
only. The derived values (REGISTRY_NAME folded into the endpoint, Docker Hub's token
service, the S3 store's size default, the filesystem store's default directory) are
filled in for every command. Every check runs: a :class:`ConfigError` lists all the
problems found (``passthrough check-config`` prints them one a line).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Mapping
from dataclasses import replace
from typing import Any

from passthrough.config.parse import ConfigError
from passthrough.config.table import Settings
from passthrough.oci.endpoint import DOCKER_HUB_REALM, DOCKER_HUB_SERVICE, RegistryEndpoint

#: The upstream registry's own credentials.
UPSTREAM = "upstream"
#: The content store: its backend, and what would expire pushed content.
STORE = "store"
#: Serving clients: the hosted area's users, the token service, TLS.
SERVE = "serve"
EVERYTHING: frozenset[str] = frozenset({UPSTREAM, STORE, SERVE})

#: The filesystem store's directory when CACHE_DIR is unset (relative to the working
#: directory; the container image and the chart set CACHE_DIR to their volume).
DEFAULT_CACHE_DIR = "passthrough-store"


def combine(
    settings: Settings, given: Mapping[str, Any], concerns: Collection[str] = EVERYTHING
) -> Settings:
    """``settings`` with the derived values filled in, after the checks of ``concerns``:
    a :class:`ConfigError` carries every problem found, not the first only. ``given``
    holds the parsed value of every variable that is set, by name."""
    settings = derive(settings, given)
    found = problems(settings, concerns)
    if found:
        raise ConfigError(*found)
    return settings


def problems(settings: Settings, concerns: Collection[str] = EVERYTHING) -> list[str]:
    """What the checks of ``concerns`` find wrong with ``settings`` (derived values
    filled in), one line each, in the order of :data:`_CHECKS`."""
    found: list[str] = []
    for concern, checks in _CHECKS.items():
        for check in checks if concern in concerns else ():
            try:
                check(settings)
            except ConfigError as exc:
                found.extend(exc.problems)
    return found


def derive(settings: Settings, given: Mapping[str, Any]) -> Settings:
    """The derived values filled in (no check made)."""
    registry = settings.registry
    name = given.get("REGISTRY_NAME")
    if name is not None:
        registry = RegistryEndpoint(registry.url, name)
    auth_url, service = settings.registry_auth_url, settings.registry_service
    if registry.is_docker_hub:
        auth_url = auth_url or DOCKER_HUB_REALM
        service = service or DOCKER_HUB_SERVICE
    # A bucket usually expires objects with a lifecycle rule instead of a size bound.
    unlimited = settings.store == "s3" and "CACHE_MAX_BYTES" not in given
    return replace(
        settings,
        registry=registry,
        registry_auth_url=auth_url,
        registry_service=service,
        cache_dir=_store_directory(settings),
        cache_max_bytes=0 if unlimited else settings.cache_max_bytes,
    )


def _store_directory(settings: Settings) -> str | None:
    """CACHE_DIR, or the default directory under the working directory when the
    filesystem store has none: a door works out of the box. Made absolute, so the
    start-up summary says where it is; created when the store is opened."""
    if settings.store != "filesystem":
        return None  # CACHE_DIR means nothing to S3, nor with STORE=off
    return os.path.abspath(settings.cache_dir or DEFAULT_CACHE_DIR)


def _credentials_pair(settings: Settings) -> None:
    if bool(settings.username) != bool(settings.password):
        missing = "REGISTRY_PASSWORD" if settings.username else "REGISTRY_USERNAME"
        raise ConfigError(f"{missing} must be set together with the other half of the credential")


def _rate_aliases_exist(settings: Settings) -> None:
    known = {"default", *(alias for alias, _ in settings.upstreams)}
    for alias, _ in settings.upstream_max_rate.per_alias:
        if alias not in known:
            raise ConfigError(
                f"UPSTREAM_MAX_RATE: {alias!r} is not an UPSTREAMS alias (nor default, "
                "for REGISTRY_URL)"
            )


def _store_is_complete(settings: Settings) -> None:
    if settings.store == "s3" and not settings.s3_bucket:
        raise ConfigError("S3_BUCKET is required with STORE=s3")


def _lifecycle_spares_pushes(settings: Settings) -> None:
    if settings.hosted_repositories and settings.s3_lifecycle_days > 0:
        raise ConfigError(
            "S3_LIFECYCLE_DAYS expires every object under the prefix, pushed images too: "
            "leave it off with HOSTED_REPOSITORIES (passthrough gc removes what no tag reaches)"
        )


def _pushes_have_users(settings: Settings) -> None:
    if settings.hosted_repositories and settings.htpasswd_file is None:
        raise ConfigError(
            "HOSTED_REPOSITORIES needs HTPASSWD_FILE: a push needs one of passthrough's users"
        )


def _pushes_have_a_store(settings: Settings) -> None:
    if settings.hosted_repositories and settings.store == "off":
        raise ConfigError(
            "HOSTED_REPOSITORIES needs the content store (pushed images live there): "
            "leave STORE=off out (CACHE_DIR, or STORE=s3)"
        )


def _tokens_have_realm_and_key(settings: Settings) -> None:
    if not settings.auth_enabled:
        return
    why = "PROXY_MODE=authenticated" if settings.uses_client_identity else "HTPASSWD_FILE"
    found = []
    if settings.public_url is None:
        found.append(
            f"PUBLIC_URL is required with {why}: it is the token "
            "realm clients are sent to (never taken from the Host header)"
        )
    if settings.token_secret is None:
        found.append(
            f"TOKEN_SECRET is required with {why}: every worker and replica signs tokens with it"
        )
    if found:
        raise ConfigError(*found)


def _tls_is_one_choice(settings: Settings) -> None:
    if bool(settings.tls_cert_file) != bool(settings.tls_key_file):
        raise ConfigError("TLS_CERT_FILE and TLS_KEY_FILE must be set together")


def _tls_is_not_two(settings: Settings) -> None:
    if settings.tls_self_signed and settings.tls_cert_file:
        raise ConfigError("TLS_SELF_SIGNED and TLS_CERT_FILE exclude each other")


_CHECKS: dict[str, tuple[Callable[[Settings], None], ...]] = {
    UPSTREAM: (_credentials_pair, _rate_aliases_exist),
    STORE: (_store_is_complete, _lifecycle_spares_pushes),
    SERVE: (
        _pushes_have_users,
        _pushes_have_a_store,
        _tokens_have_realm_and_key,
        _tls_is_one_choice,
        _tls_is_not_two,
    ),
}
