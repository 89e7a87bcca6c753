"""Settings: read once from the environment (and a `.env` file) when a command starts.

Every variable is declared once, in :mod:`passthrough.config.table` (its parser, default,
documentation and whether it is a secret); :func:`load_settings` reads each one with its
parser, then applies the rules that combine them (:mod:`passthrough.config.rules`) for
the concerns the command has. A bad value raises :class:`ConfigError` naming the
variable, so a bad deployment stops at start-up instead of failing on the first
download. Nothing here runs at import time.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from passthrough.config.parse import (
    CLIENT_AUTH_MODES,
    LOG_FORMATS,
    LOG_LEVELS,
    OTLP_PROTOCOLS,
    PROXY_MODES,
    STORES,
    ConfigError,
    auth_file_host,
    normalize_registry,
    parse_allowlist,
    parse_hosted_patterns,
    parse_networks,
    parse_upstreams,
    read_auth_file,
    read_ca_file,
    read_environment,
)
from passthrough.config.rules import EVERYTHING, SERVE, STORE, UPSTREAM, combine
from passthrough.config.table import (
    BY_NAME,
    EXTERNAL,
    SERVER_VARIABLES,
    SETTINGS_VARIABLES,
    VARIABLES,
    ServerSettings,
    Settings,
    Variable,
)

__all__ = [
    "CLIENT_AUTH_MODES",
    "EVERYTHING",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "OTLP_PROTOCOLS",
    "PROXY_MODES",
    "SERVE",
    "STORE",
    "STORES",
    "UPSTREAM",
    "VARIABLES",
    "ConfigError",
    "ServerSettings",
    "Settings",
    "Variable",
    "auth_file_host",
    "load_server_settings",
    "load_settings",
    "normalize_registry",
    "parse_allowlist",
    "parse_hosted_patterns",
    "parse_networks",
    "parse_upstreams",
    "read_auth_file",
    "read_ca_file",
    "read_environment",
    "read_variable",
]

#: The rows load_settings reads: the fields of Settings, and REGISTRY_NAME.
_READ = (*SETTINGS_VARIABLES, *(v for v in EXTERNAL if v.name == "REGISTRY_NAME"))


def load_settings(
    environ: Mapping[str, str] | None = None,
    *,
    env_file: str | None = None,
    concerns: Collection[str] = EVERYTHING,
) -> Settings:
    """Build validated :class:`Settings` from the environment, checked for ``concerns``
    (every one by default: what the server needs)."""
    env = read_environment(environ, env_file)
    given = {v.name: v.parse(v.name, raw) for v in _READ if (raw := v.raw(env)) is not None}
    values = {str(v.field): given.get(v.name, v.read({})) for v in SETTINGS_VARIABLES}
    return combine(Settings(**values), given, concerns)


def load_server_settings(
    environ: Mapping[str, str] | None = None, *, env_file: str | None = None
) -> ServerSettings:
    """What gunicorn.conf.py needs, validated the same way (and read from `.env` too)."""
    env = read_environment(environ, env_file)
    return ServerSettings(**{str(v.field): v.read(env) for v in SERVER_VARIABLES})


def read_variable(name: str, environ: Mapping[str, str] | None = None) -> Any:
    """One declared variable, parsed (its default when unset)."""
    return BY_NAME[name].read(read_environment(environ))

