"""UPSTREAM_RULES applied: whether an upstream repository may be pulled at all.

One function, :func:`upstream_allowed`, for every way in: the tar routes
(:func:`passthrough.export.request.select`), the /v2 proxy (``web/v2.py``'s dispatch)
and sync. A refusal is :class:`~passthrough.errors.Denied` (403 ``DENIED``) naming the
rule, so an operator reading a client's error knows which line to change. The rules
themselves are parsed with the settings (:mod:`passthrough.config.upstream_rules`).
"""

from __future__ import annotations

from passthrough.config import Settings
from passthrough.config.upstream_rules import ANY_UPSTREAM, UpstreamRule, upstream_key
from passthrough.errors import Denied
from passthrough.oci.endpoint import RegistryEndpoint
from passthrough.registry.routing import matches_pattern


def rule_for(settings: Settings, endpoint: RegistryEndpoint) -> UpstreamRule | None:
    """The rule that governs ``endpoint``: its host's, else its alias's (UPSTREAMS),
    else ``*``'s, else none."""
    rules = {rule.upstream: rule for rule in settings.upstream_rules}
    if not rules:
        return None
    names = [upstream_key(endpoint.name), upstream_key(endpoint.host)]
    names += [alias for alias, aliased in settings.upstreams if aliased.url == endpoint.url]
    for name in names:
        if name in rules:
            return rules[name]
    return rules.get(ANY_UPSTREAM)


def refusal(rule: UpstreamRule, repository: str) -> str | None:
    """Why ``rule`` refuses ``repository`` (one line), or None when it allows it."""
    denied = next((p for p in rule.deny if matches_pattern(p, repository)), None)
    if denied is not None:
        return f"UPSTREAM_RULES {rule.upstream} denies {denied!r}"
    if rule.allow is not None and not any(matches_pattern(p, repository) for p in rule.allow):
        return f"UPSTREAM_RULES {rule.upstream} allows only {', '.join(rule.allow) or 'nothing'}"
    return None


def refused_by_rules(settings: Settings, endpoint: RegistryEndpoint, repository: str) -> bool:
    """Whether UPSTREAM_RULES forbid pulling ``repository`` from ``endpoint``."""
    rule = rule_for(settings, endpoint)
    return rule is not None and refusal(rule, repository) is not None


def upstream_allowed(settings: Settings, endpoint: RegistryEndpoint, repository: str) -> None:
    """Raise Denied (403 DENIED, naming the rule) when UPSTREAM_RULES forbids pulling
    ``repository`` (as named on the upstream: ``library/nginx``) from ``endpoint``."""
    rule = rule_for(settings, endpoint)
    if rule is None:
        return
    reason = refusal(rule, repository)
    if reason is not None:
        raise Denied(f"{endpoint.name}/{repository} may not be pulled through this door: {reason}")
