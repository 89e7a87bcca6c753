"""Offline mode: the upstreams passthrough never contacts.

``OFFLINE=true`` takes every upstream offline; ``OFFLINE_UPSTREAMS`` some of them, each
named by its ``UPSTREAMS`` alias, ``default`` (``REGISTRY_URL``) or its registry host
(``docker.io`` and Docker Hub's other names are one). The tar routes
(:mod:`passthrough.export.stale`), the /v2 proxy (:mod:`passthrough.registry.proxy`)
and ``/ready`` ask :func:`offline_reason` before any upstream call.
"""

from __future__ import annotations

from passthrough.config import Settings
from passthrough.oci.endpoint import DOCKER_HUB_ALIASES, RegistryEndpoint


def offline_names(settings: Settings, endpoint: RegistryEndpoint) -> set[str]:
    """Every name OFFLINE_UPSTREAMS may give ``endpoint``: its host and familiar name,
    its aliases, ``default`` when it is REGISTRY_URL."""
    names = {endpoint.name.lower(), endpoint.host.lower()}
    if endpoint.url == settings.registry.url:
        names.add("default")
    names.update(alias for alias, other in settings.upstreams if other.url == endpoint.url)
    if endpoint.is_docker_hub:
        names.update(DOCKER_HUB_ALIASES)
    return names


def offline_reason(settings: Settings, endpoint: RegistryEndpoint) -> str | None:
    """Why ``endpoint`` is never contacted (the setting that says so), or None."""
    if settings.offline:
        return "OFFLINE=true"
    if not settings.offline_upstreams:
        return None
    names = offline_names(settings, endpoint)
    named = next((entry for entry in settings.offline_upstreams if entry in names), None)
    return None if named is None else f"OFFLINE_UPSTREAMS names {named}"
