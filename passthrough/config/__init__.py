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
from passthrough.config.rules import (
    EVERYTHING,
    SERVE,
    STORE,
    UPSTREAM,
    combine,
    derive,
    problems,
)
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
    "settings_problems",
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
    given, failed = _parse_given(read_environment(environ, env_file))
    if failed:
        raise ConfigError(*(problem for found in failed.values() for problem in found))
    return combine(_settings_of(given), given, concerns)


def settings_problems(
    environ: Mapping[str, str] | None = None,
    *,
    env_file: str | None = None,
    concerns: Collection[str] = EVERYTHING,
) -> list[str]:
    """Every problem :func:`load_settings` would find, not the first only: each bad
    variable, then each broken combination (a variable that failed is read as its
    default there, and a combination naming it is left out: it is reported already)."""
    given, failed = _parse_given(read_environment(environ, env_file))
    found = [problem for problems_of in failed.values() for problem in problems_of]
    settings = derive(_settings_of(given), given)
    for problem in problems(settings, concerns):
        if not any(name in problem for name in failed):
            found.append(problem)
    return found


def _parse_given(env: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, tuple[str, ...]]]:
    """The parsed value of every variable that is set, and the problems of those that
    failed, both by name."""
    given: dict[str, Any] = {}
    failed: dict[str, tuple[str, ...]] = {}
    for variable in _READ:
        raw = variable.raw(env)
        if raw is None:
            continue
        try:
            given[variable.name] = variable.parse(variable.name, raw)
        except ConfigError as exc:
            failed[variable.name] = exc.problems
    return given, failed


def _settings_of(given: Mapping[str, Any]) -> Settings:
    values = {str(v.field): given.get(v.name, v.read({})) for v in SETTINGS_VARIABLES}
    return Settings(**values)


def load_server_settings(
    environ: Mapping[str, str] | None = None, *, env_file: str | None = None
) -> ServerSettings:
    """What gunicorn.conf.py needs, validated the same way (and read from `.env` too)."""
    env = read_environment(environ, env_file)
    return ServerSettings(**{str(v.field): v.read(env) for v in SERVER_VARIABLES})


def read_variable(name: str, environ: Mapping[str, str] | None = None) -> Any:
    """One declared variable, parsed (its default when unset)."""
    return BY_NAME[name].read(read_environment(environ))
