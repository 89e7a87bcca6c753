"""UPSTREAM_RULES: parsing (every mistake named), matching (deny first, then the allow
list; by host, Docker Hub's names, alias, or ``*``), and the refusal on /v2 (JSON) and
the tar routes (plain text) before any upstream request (responses registers none, so
one would fail the test)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import responses

from passthrough import create_app
from passthrough.config import ConfigError, Settings, load_settings, normalize_registry
from passthrough.config.upstream_rules import parse_upstream_rules_text
from passthrough.errors import Denied
from passthrough.registry.upstream_rules import upstream_allowed

RULES = (
    '{docker.io: {allow: ["library/*", "our-org/*"], deny: [library/busybox]}, lab: {deny: ["**"]}}'
)
HUB = normalize_registry("docker.io")
LAB = normalize_registry("http://10.1.2.3:5000")


def settings_with(tmp_path: Path, rules: str = RULES, **env: str) -> Settings:
    base = {
        "CACHE_DIR": str(tmp_path / "cache"),
        "UPSTREAMS": "lab=http://10.1.2.3:5000",
        "UPSTREAM_RULES": rules,
        "UPSTREAM_RETRIES": "0",
    }
    return load_settings({**base, **env}, env_file=str(tmp_path / "none.env"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[docker.io]", "expected a mapping"),
        ("{docker.io: [library/*]}", "must map allow and/or deny"),
        ("{docker.io: {allow: [library/*], only: [x]}}", "must map allow and/or deny"),
        ("{docker.io: {allow: [Library/*]}}", "patterns are globs"),
        ("{docker.io: {allow: 3}}", "must be a list of patterns"),
        ("{docker.io: {deny: [x]}, index.docker.io: {deny: [y]}}", "docker.io is given twice"),
        ("{docker.io: {allow: [", "not valid YAML"),
    ],
)
def test_mistakes_are_named(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match="UPSTREAM_RULES") as caught:
        parse_upstream_rules_text(text)
    assert message in str(caught.value)


def test_block_yaml_and_hub_names_read_as_one() -> None:
    rules = parse_upstream_rules_text("registry-1.docker.io:\n  allow:\n    - library/*\n")
    assert rules[0].upstream == "docker.io" and rules[0].allow == ("library/*",)
    assert parse_upstream_rules_text("") == ()


@pytest.mark.parametrize(
    ("endpoint", "repository", "refused"),
    [
        (HUB, "library/nginx", None),
        (HUB, "our-org/app", None),
        (HUB, "library/busybox", "UPSTREAM_RULES docker.io denies 'library/busybox'"),
        (HUB, "someone/miner", "UPSTREAM_RULES docker.io allows only library/*, our-org/*"),
        (HUB, "our-org/nested/app", "allows only"),  # * is one component
        (LAB, "team/app", "UPSTREAM_RULES lab denies '**'"),
        (normalize_registry("ghcr.io"), "org/app", None),  # no rule, no "*"
    ],
)
def test_deny_then_allow(tmp_path, endpoint, repository, refused) -> None:
    settings = settings_with(tmp_path)
    if refused is None:
        upstream_allowed(settings, endpoint, repository)
        return
    with pytest.raises(Denied) as caught:
        upstream_allowed(settings, endpoint, repository)
    assert refused in caught.value.message and repository in caught.value.message


def test_the_star_rule_covers_every_other_upstream(tmp_path) -> None:
    settings = settings_with(tmp_path, '{"*": {allow: [allowed/*]}}')
    upstream_allowed(settings, normalize_registry("ghcr.io"), "allowed/app")
    with pytest.raises(Denied, match=r"UPSTREAM_RULES \* allows only allowed/\*"):
        upstream_allowed(settings, normalize_registry("quay.io"), "other/app")


@responses.activate
def test_v2_refuses_with_denied_naming_the_rule(tmp_path) -> None:
    client = create_app({"SETTINGS": settings_with(tmp_path)}).test_client()
    for path in (
        "/v2/someone/miner/manifests/latest",
        "/v2/docker.io/someone/miner/manifests/latest",
        "/v2/library/busybox/blobs/sha256:" + "a" * 64,
        "/v2/lab/team/app/tags/list",
    ):
        response = client.get(path)
        assert response.status_code == 403, path
        error = json.loads(response.data)["errors"][0]
        assert error["code"] == "DENIED" and "UPSTREAM_RULES" in error["message"], path


@responses.activate
def test_tar_routes_refuse_in_plain_text(tmp_path) -> None:
    client = create_app({"SETTINGS": settings_with(tmp_path)}).test_client()
    for path in (
        "/docker/busybox_1.36.tar",
        "/ref/someone/miner:latest.tar",
        "/registry/https/registry-1.docker.io/ref/someone/miner:latest.tar",
    ):
        response = client.get(path)
        assert response.status_code == 403, (path, response.data)
        assert response.mimetype == "text/plain"
        assert b"UPSTREAM_RULES docker.io" in response.data, response.data


def test_sync_is_bound_by_the_rules_before_any_request(tmp_path: Path) -> None:
    from passthrough.services import Services
    from passthrough.sync.engine import Sync
    from passthrough.sync.spec import parse_sync_file

    settings = settings_with(tmp_path)
    proxy = Services.create(settings).proxy
    assert proxy is not None
    sync = Sync(proxy)
    denied = parse_sync_file(
        "images:\n  - repository: library/busybox\n    tags: ['1']\n", settings
    )
    failed: list[str] = []
    # No upstream answers here: a request would fail with another message.
    assert sync.plan(denied, failed) == []
    assert len(failed) == 1 and "library/busybox may not be pulled" in failed[0]
