"""ACCESS_FILE: the documented example, first matching rule wins, groups, "*" and
"anonymous", no rule means no access, every validation error naming ACCESS_FILE, and
reloading when the file changes."""

from __future__ import annotations

import os
import textwrap

import pytest

from passthrough.config import ConfigError
from passthrough.registry.rules import AccessFile, parse_access

EXAMPLE = textwrap.dedent(
    """\
    groups:
      team-a: [alice, bob]
    rules:
      - repositories: ["team/*"]
        pull: [alice, "@team-a"]
        push: ["@team-a"]
        delete: [alice]
      - repositories: ["team/**", "apps/**"]
        pull: ["*", anonymous]
        push: [carol]
      - repositories: [public]
        pull: anonymous
    """
)


def test_the_example():
    rules = parse_access(EXAMPLE)
    assert rules.allows("alice", "team/app", "delete")
    assert rules.allows("bob", "team/app", "push")
    assert not rules.allows("bob", "team/app", "delete")
    assert not rules.allows("carol", "team/app", "pull")
    assert not rules.allows(None, "team/app", "pull")


def test_the_first_matching_rule_wins():
    rules = parse_access(EXAMPLE)
    # team/app is rule 1's even though rule 2 would let carol push there.
    assert rules.rule_for("team/app").number == 1  # type: ignore[union-attr]
    assert not rules.allows("carol", "team/app", "push")
    # team/x/y only matches rule 2.
    assert rules.allows("carol", "team/x/y", "push")
    assert rules.allows("dave", "team/x/y", "pull")
    assert rules.allows(None, "apps/a/b/c", "pull")
    assert not rules.allows("alice", "team/x/y", "push")


def test_no_matching_rule_is_no_access():
    rules = parse_access(EXAMPLE)
    for user in ("alice", None):
        for action in ("pull", "push", "delete"):
            assert not rules.allows(user, "elsewhere/app", action)
    # A one-word list where a list belongs.
    assert rules.allows(None, "public", "pull")
    assert not rules.allows("alice", "public", "pull")


def test_star_is_any_user_not_anonymous():
    rules = parse_access("rules:\n  - repositories: ['**']\n    pull: ['*']\n")
    assert rules.allows("anyone", "a/b", "pull")
    assert not rules.allows(None, "a/b", "pull")
    assert not rules.allows("anyone", "a/b", "push")
    assert not rules.mentions_anonymous
    assert parse_access(EXAMPLE).mentions_anonymous


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("rules: [\n", "not valid YAML (line 2)"),
        ("- a\n", "expected a mapping"),
        ("rules: []\n", "rules must be a non-empty list"),
        ("users: {}\nrules: []\n", "unknown key 'users'"),
        ("groups: [a]\nrules: [{repositories: [a]}]\n", "groups must map"),
        ("groups: {'bad name': [a]}\nrules: [{repositories: [a]}]\n", "group name 'bad name'"),
        ("groups: {g: ['@h']}\nrules: [{repositories: [a]}]\n", "may list users only"),
        ("groups: {g: [1]}\nrules: [{repositories: [a]}]\n", "group 'g' must be a list"),
        ("rules: [a]\n", "rule 1 must be a mapping"),
        ("rules: [{repositories: [a], pul: [x]}]\n", "rule 1: unknown key 'pul'"),
        ("rules: [{pull: [x]}]\n", "rule 1: repositories must be a list"),
        ("rules: [{repositories: ['Team/*']}]\n", "rule 1: repositories must be patterns"),
        ("rules: [{repositories: [a]}, {repositories: [b], push: ['@x']}]\n", "rule 2: push"),
        ("rules: [{repositories: [a], push: [anonymous]}]\n", "may only pull, never push"),
        ("rules: [{repositories: [a], delete: anonymous}]\n", "never delete"),
        ("rules: [{repositories: [a], pull: {a: b}}]\n", "rule 1: pull must be a list"),
    ],
)
def test_validation_names_access_file_and_the_fault(text, expected):
    with pytest.raises(ConfigError, match=r"^ACCESS_FILE: ") as caught:
        parse_access(text)
    assert expected in str(caught.value)


def test_the_file_is_read_again_when_it_changes(tmp_path, caplog):
    path = tmp_path / "access.yaml"
    path.write_text(EXAMPLE)
    access = AccessFile(str(path))
    assert access.rules().allows("alice", "team/app", "delete")

    def rewrite(text: str) -> None:
        before = path.stat().st_mtime_ns
        path.write_text(text)
        os.utime(path, ns=(before + 2_000_000_000, before + 2_000_000_000))

    rewrite("rules:\n  - repositories: ['team/*']\n    pull: [bob]\n")
    assert not access.rules().allows("alice", "team/app", "delete")
    assert access.rules().allows("bob", "team/app", "pull")
    # A broken edit is logged; the rules read before stay.
    rewrite("rules: [\n")
    assert access.rules().allows("bob", "team/app", "pull")
    assert any("ACCESS_FILE not reloaded" in r.getMessage() for r in caplog.records)


def test_a_bad_file_at_start_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"^ACCESS_FILE: "):
        AccessFile(str(tmp_path / "missing.yaml"))
    path = tmp_path / "big.yaml"
    path.write_text("#" * (1 << 20) + "\n")
    with pytest.raises(ConfigError, match="larger than"):
        AccessFile(str(path))


def test_admin_group_names_the_administrators() -> None:
    rules = parse_access(
        "groups:\n  admin: [root]\n  ops: [alice]\nrules:\n"
        "  - repositories: ['team/*']\n    pull: ['*']\n"
    )
    assert rules.is_admin("root")
    assert not rules.is_admin("alice")
    assert not rules.is_admin(None)
    assert not parse_access("rules:\n  - repositories: ['team/*']\n    pull: ['*']\n").admins
