"""UPSTREAM_RULES: which upstream repositories may be pulled at all, per upstream.

The value is YAML (block or flow; a one-line JSON object is YAML too)::

    docker.io:
      allow: ["library/*", "our-org/*"]   # only these ...
      deny: ["library/busybox"]           # ... and never this one
    ghcr.io:
      deny: ["*/internal-*"]
    "*":                                  # every other upstream
      allow: ["**"]

Keys are upstream hosts as images name them (``docker.io`` for Docker Hub under any of
its names, ``ghcr.io``, ``registry.lab:5000``), an UPSTREAMS alias (``lab``: that
alias's registry), or ``*`` for an upstream no other key names. Patterns are
HOSTED_REPOSITORIES' globs (``*`` one component or part of one, ``**`` any depth) over
the repository *on the upstream* (``library/nginx``, not ``nginx``). A deny pattern that
matches refuses; else with an allow list the repository must match one of it; an
upstream no key names (and no ``*``) is not restricted. The matching itself lives in
:mod:`passthrough.registry.upstream_rules`; here the text is only validated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from passthrough.config.parse import ConfigError, parse_hosted_patterns
from passthrough.oci.endpoint import DOCKER_HUB_ALIASES

VARIABLE = "UPSTREAM_RULES"
ANY_UPSTREAM = "*"
_KEYS = frozenset({"allow", "deny"})


@dataclass(frozen=True)
class UpstreamRule:
    """The rule of one upstream: ``allow`` None means every repository not denied."""

    upstream: str
    allow: tuple[str, ...] | None
    deny: tuple[str, ...] = ()

    def describe(self) -> str:
        """The rule as an operator wrote it, for a refusal's message."""
        parts = []
        if self.allow is not None:
            parts.append("allow: " + ", ".join(self.allow))
        if self.deny:
            parts.append("deny: " + ", ".join(self.deny))
        return f"{self.upstream} ({'; '.join(parts) or 'no patterns'})"


def _fail(what: str) -> ConfigError:
    return ConfigError(f"{VARIABLE}: {what}")


def upstream_key(name: str) -> str:
    """An upstream's key as rules name it: Docker Hub's names are one, ``docker.io``."""
    lowered = name.strip().lower()
    return "docker.io" if lowered in DOCKER_HUB_ALIASES else lowered


def _patterns(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(f"{where} must be a list of patterns such as library/*")
    try:
        return parse_hosted_patterns(",".join(value))
    except ConfigError:
        raise _fail(f"{where}: patterns are globs such as library/* or our-org/**") from None


def parse_upstream_rules_text(text: str) -> tuple[UpstreamRule, ...]:
    """The rules of an UPSTREAM_RULES value; ConfigError says what is wrong."""
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError:
        raise _fail("not valid YAML (e.g. {docker.io: {allow: [library/*]}})") from None
    if document is None:
        return ()
    if not isinstance(document, dict):
        raise _fail("expected a mapping of upstream to allow/deny lists")
    rules: list[UpstreamRule] = []
    seen: set[str] = set()
    for raw_key, body in document.items():
        if not isinstance(raw_key, str) or not raw_key.strip():
            raise _fail(f"{raw_key!r} is not an upstream host or alias")
        key = upstream_key(raw_key)
        if key in seen:
            raise _fail(f"{key} is given twice")
        seen.add(key)
        if not isinstance(body, dict) or not body or set(body) - _KEYS:
            raise _fail(f"{key} must map allow and/or deny to lists of patterns")
        allow = _patterns(body["allow"], f"{key}: allow") if "allow" in body else None
        deny = _patterns(body["deny"], f"{key}: deny") if "deny" in body else ()
        rules.append(UpstreamRule(key, allow, deny))
    return tuple(rules)


def parse_upstream_rules(name: str, raw: str) -> tuple[UpstreamRule, ...]:
    """The settings table's parser of UPSTREAM_RULES."""
    return parse_upstream_rules_text(raw)
