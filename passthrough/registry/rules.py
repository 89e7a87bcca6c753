"""ACCESS_FILE: who may pull, push and delete which hosted repositories.

YAML::

    groups:
      team-a: [alice, bob]
    rules:
      - repositories: ["team/*"]      # HOSTED_REPOSITORIES' globs: * one component, ** any
        pull: [alice, "@team-a"]       # users, @groups, "*" any user, "anonymous" no login
        push: ["@team-a"]
        delete: [alice]

The group ``admin`` is special: its members are the door's administrators (the
inventory of cached images, sync runs, evictions; see :meth:`AccessRules.is_admin`).

The first rule whose patterns name the repository decides; an action it does not list
is refused, and so is everything on a repository no rule names. The file only narrows:
anonymous pulls also need HOSTED_ANONYMOUS_PULL, and anonymous clients never push or
delete. Without ACCESS_FILE every user may do everything on every hosted repository.

The file is validated at start-up (a ConfigError naming ACCESS_FILE and what is wrong)
and read again when it changes; a later edit that breaks it is logged and the rules
read before are kept.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from passthrough.config import ConfigError, parse_hosted_patterns
from passthrough.registry.routing import matches_pattern
from passthrough.registry.watched import WatchedFile

VARIABLE = "ACCESS_FILE"
#: The actions a rule grants, in the order of the token spec's scopes.
ACTIONS = ("pull", "push", "delete")
#: The group whose members administer the door (inventory, sync, eviction).
ADMIN_GROUP = "admin"
#: Principals with a meaning of their own.
ANY_USER = "*"
ANONYMOUS = "anonymous"
_GROUP_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_RULE_KEYS = frozenset({"repositories", *ACTIONS})
MAX_FILE_BYTES = 1 << 20


@dataclass(frozen=True)
class Rule:
    """One rule: its patterns, and per action the users (``*``, ``anonymous`` kept as
    such) it lets do it, groups already expanded."""

    number: int
    repositories: tuple[str, ...]
    allowed: Mapping[str, frozenset[str]]

    def names(self, repository: str) -> bool:
        return any(matches_pattern(p, repository) for p in self.repositories)

    def lets(self, user: str | None, action: str) -> bool:
        principals = self.allowed.get(action, frozenset())
        if user is None:
            return ANONYMOUS in principals
        return ANY_USER in principals or user in principals


@dataclass(frozen=True)
class AccessRules:
    """The parsed file: the rules in order."""

    rules: tuple[Rule, ...]
    admins: frozenset[str] = frozenset()

    def is_admin(self, user: str | None) -> bool:
        """Whether ``user`` is in the file's ``admin`` group (anonymous never is)."""
        return user is not None and user in self.admins

    def rule_for(self, repository: str) -> Rule | None:
        return next((r for r in self.rules if r.names(repository)), None)

    def allows(self, user: str | None, repository: str, action: str) -> bool:
        rule = self.rule_for(repository)
        return rule is not None and rule.lets(user, action)

    @property
    def mentions_anonymous(self) -> bool:
        return any(ANONYMOUS in r.allowed.get("pull", ()) for r in self.rules)


def _fail(what: str) -> ConfigError:
    return ConfigError(f"{VARIABLE}: {what}")


def _string_list(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        # A single name where a list belongs: accepted, it cannot mean anything else.
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise _fail(f"{where} must be a list of names")
    return [v.strip() for v in value]


def parse_access(text: str) -> AccessRules:
    """The YAML text of an ACCESS_FILE, validated; ConfigError says what is wrong."""
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise _fail(f"not valid YAML{where}") from None
    if not isinstance(document, dict):
        raise _fail("expected a mapping with 'rules' (and optionally 'groups')")
    unknown = set(document) - {"groups", "rules"}
    if unknown:
        raise _fail(f"unknown key {sorted(map(str, unknown))[0]!r}; expected groups and rules")

    groups: dict[str, frozenset[str]] = {}
    raw_groups = document.get("groups") or {}
    if not isinstance(raw_groups, dict):
        raise _fail("groups must map a group name to a list of users")
    for name, members in raw_groups.items():
        if not isinstance(name, str) or not _GROUP_RE.fullmatch(name):
            raise _fail(f"group name {name!r} must be letters, digits, '.', '_' or '-'")
        listed = _string_list(members, f"group {name!r}")
        if any(m.startswith("@") or m in (ANY_USER, ANONYMOUS) for m in listed):
            raise _fail(f"group {name!r} may list users only (no @groups, '*' or 'anonymous')")
        groups[name] = frozenset(listed)

    raw_rules = document.get("rules")
    if not isinstance(raw_rules, list) or not raw_rules:
        raise _fail("rules must be a non-empty list")
    rules: list[Rule] = []
    for number, raw in enumerate(raw_rules, start=1):
        where = f"rule {number}"
        if not isinstance(raw, dict):
            raise _fail(f"{where} must be a mapping with repositories and pull/push/delete")
        extra = set(raw) - _RULE_KEYS
        if extra:
            raise _fail(
                f"{where}: unknown key {sorted(map(str, extra))[0]!r}; "
                "expected repositories, pull, push, delete"
            )
        patterns = _string_list(raw.get("repositories"), f"{where}: repositories")
        try:
            parsed = parse_hosted_patterns(",".join(patterns))
        except ConfigError:
            raise _fail(
                f"{where}: repositories must be patterns such as team/* or apps/**"
            ) from None
        allowed: dict[str, frozenset[str]] = {}
        for action in ACTIONS:
            if action not in raw or raw[action] is None:
                continue
            principals: set[str] = set()
            for name in _string_list(raw[action], f"{where}: {action}"):
                if name.startswith("@"):
                    if name[1:] not in groups:
                        raise _fail(f"{where}: {action} names the unknown group {name!r}")
                    principals |= groups[name[1:]]
                elif name == ANONYMOUS and action != "pull":
                    raise _fail(f"{where}: anonymous clients may only pull, never {action}")
                else:
                    principals.add(name)
            allowed[action] = frozenset(principals)
        rules.append(Rule(number, parsed, allowed))
    return AccessRules(tuple(rules), groups.get(ADMIN_GROUP, frozenset()))


class AccessFile:
    """ACCESS_FILE, read again when it changes (:class:`WatchedFile`)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._file = WatchedFile(
            path,
            VARIABLE,
            parse_access,
            noun="rules",
            count=lambda rules: len(rules.rules),
            max_bytes=MAX_FILE_BYTES,
        )

    def __repr__(self) -> str:
        return f"AccessFile(path={self.path!r}, rules={len(self.rules().rules)})"

    def rules(self) -> AccessRules:
        return self._file.current()
