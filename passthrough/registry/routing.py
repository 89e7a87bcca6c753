"""Which upstream serves a /v2 name, and under which repository.

A name HOSTED_REPOSITORIES matches (:func:`is_hosted`) is the hosted area's and goes to
no upstream. Any other, in order (the first that applies wins):

1. the first component is an alias from UPSTREAMS: that upstream, the rest of the
   name as the repository (``ghcr/org/app`` is ``ghcr.io/org/app``);
2. the first component looks like a host, by Docker's own rule (it holds ``.`` or
   ``:``, or is ``localhost``): ``https://<host>``, the rest as the repository
   (``docker.io`` means Docker Hub, with ``library/`` for one-component names);
3. containerd's mirror parameter ``?ns=<registry>`` (hosts.toml): an alias whose URL
   has that host, else ``https://<registry>``;
4. the default upstream, REGISTRY_URL (Docker Hub unless set): what dockerd's
   ``registry-mirrors`` sends (``/v2/library/nginx/...``).

The environment's credentials follow the environment's registry only
(:func:`upstream_credentials`), as on the tar routes.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from passthrough.config import ConfigError, Settings, normalize_registry
from passthrough.errors import NameInvalid
from passthrough.oci.endpoint import DOCKER_HUB_ALIASES, RegistryEndpoint
from passthrough.oci.reference import MAX_REPOSITORY_LENGTH, PATH_COMPONENT_RE, quote_input
from passthrough.upstream.auth import Credentials

_HOST_COMPONENT_RE = re.compile(
    r"^(?:\[[0-9a-f:.]+\]|[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?)(?::[0-9]{1,5})?$"
)


@dataclass(frozen=True)
class ProxyRoute:
    """Where one /v2 name is read from."""

    #: The name as the client wrote it (scopes, error messages, metrics).
    name: str
    upstream: RegistryEndpoint
    #: The repository on the upstream.
    repository: str
    #: How the upstream was chosen: "alias", "host", "ns" or "default".
    via: str
    #: The alias, when UPSTREAMS chose the upstream.
    alias: str | None = None


@functools.lru_cache(maxsize=256)
def _pattern_regex(pattern: str) -> re.Pattern[str]:
    parts: list[str] = []
    for component in pattern.split("/"):
        if component == "**":
            parts.append(r"[^/]+(?:/[^/]+)*")
        else:
            parts.append("[^/]*".join(re.escape(piece) for piece in component.split("*")))
    return re.compile("/".join(parts))


def matches_pattern(pattern: str, name: str) -> bool:
    """Whether one HOSTED_REPOSITORIES-style glob names ``name`` (ACCESS_FILE's rules
    use the same globs)."""
    return _pattern_regex(pattern).fullmatch(name) is not None


def is_hosted(settings: Settings, name: str) -> bool:
    """Whether HOSTED_REPOSITORIES names this repository (``*`` one path component or
    part of one, ``**`` one or more components), whatever its first component: a hosted
    name is never looked up upstream."""
    return any(_pattern_regex(p).fullmatch(name) for p in settings.hosted_repositories)


def check_name(name: str) -> str:
    """A repository name by the distribution grammar, or NAME_INVALID; a first component
    that is a registry host with a port (``127.0.0.1:5000/app``), which the grammar has
    no room for, is accepted as :func:`route_name` accepts it."""
    components = name.split("/") if name else []
    first = components[0] if components else ""
    if len(components) > 1 and ":" in first and looks_like_host(first):
        if not _HOST_COMPONENT_RE.fullmatch(first):
            raise NameInvalid(f"invalid registry host {quote_input(first)} in the name")
        _check_components(components[1:], name)
        return name
    _check_components(components, name)
    return name


def looks_like_host(component: str) -> bool:
    """Docker's rule for the first component of a name (reference.splitDockerDomain)."""
    return "." in component or ":" in component or component == "localhost"


def _check_components(components: list[str], name: str) -> None:
    if not components or not all(PATH_COMPONENT_RE.fullmatch(c) for c in components):
        raise NameInvalid(
            f"invalid repository name {quote_input(name)}: lowercase path components "
            "such as library/nginx"
        )
    if len("/".join(components)) > MAX_REPOSITORY_LENGTH:
        raise NameInvalid(f"the repository name is longer than {MAX_REPOSITORY_LENGTH} characters")


def _hub_repository(endpoint: RegistryEndpoint, components: list[str]) -> str:
    if endpoint.is_docker_hub and len(components) == 1:
        return f"library/{components[0]}"
    return "/".join(components)


def _host_endpoint(host: str, settings: Settings) -> RegistryEndpoint:
    """``https://<host>``, or the configured upstream with that host (an alias, or
    REGISTRY_URL) so that its scheme (a plain-HTTP lab registry) is kept."""
    lowered = host.lower()
    if lowered in DOCKER_HUB_ALIASES:
        return normalize_registry("docker.io")
    for _, endpoint in settings.upstreams:
        if endpoint.host == lowered or endpoint.name == lowered:
            return endpoint
    if settings.registry.host == lowered or settings.registry.name == lowered:
        return settings.registry
    try:
        return normalize_registry(f"https://{lowered}", variable="the registry host")
    except ConfigError as exc:
        raise NameInvalid(str(exc)) from None


def route_name(settings: Settings, name: str, ns: str | None = None) -> ProxyRoute:
    """The upstream and repository of a /v2 name (see the module's docstring)."""
    if not name or len(name) > 512:
        raise NameInvalid("the repository name is empty or too long")
    components = name.split("/")
    first = components[0]
    aliases = dict(settings.upstreams)
    if first in aliases and len(components) > 1:
        endpoint = aliases[first]
        rest = components[1:]
        _check_components(rest, name)
        return ProxyRoute(name, endpoint, _hub_repository(endpoint, rest), "alias", first)
    if len(components) > 1 and looks_like_host(first):
        if not _HOST_COMPONENT_RE.fullmatch(first):
            raise NameInvalid(f"invalid registry host {quote_input(first)} in the name")
        rest = components[1:]
        _check_components(rest, name)
        endpoint = _host_endpoint(first, settings)
        return ProxyRoute(name, endpoint, _hub_repository(endpoint, rest), "host")
    _check_components(components, name)
    if ns:
        ns_host = ns.strip().lower()
        if not _HOST_COMPONENT_RE.fullmatch(ns_host):
            raise NameInvalid(f"invalid ns parameter {quote_input(ns)}")
        endpoint = _host_endpoint(ns_host, settings)
        return ProxyRoute(name, endpoint, _hub_repository(endpoint, components), "ns")
    endpoint = settings.registry
    repository = "/".join(components)
    if len(components) == 1:
        if settings.default_namespace:
            repository = f"{settings.default_namespace}/{repository}"
        elif endpoint.is_docker_hub:
            repository = f"library/{repository}"
    return ProxyRoute(name, endpoint, repository, "default")


def upstream_credentials(settings: Settings, endpoint: RegistryEndpoint) -> Credentials | None:
    """The service's own identity for an upstream: REGISTRY_USERNAME/PASSWORD for
    REGISTRY_URL's registry, else the REGISTRY_AUTH_FILE entry for its host."""
    if endpoint.url == settings.registry.url and settings.username and settings.password:
        return Credentials(settings.username, settings.password)
    host = "docker.io" if endpoint.is_docker_hub else endpoint.host
    entry = settings.upstream_credentials.get(host) or settings.upstream_credentials.get(
        endpoint.name
    )
    if entry is None:
        parts = urlsplit(endpoint.url)
        entry = settings.upstream_credentials.get((parts.hostname or "").lower())
    return Credentials(*entry) if entry else None


def configured_upstreams(settings: Settings) -> list[tuple[str, RegistryEndpoint]]:
    """Every upstream the configuration names: the default first, then the aliases."""
    return [("default", settings.registry), *settings.upstreams]
