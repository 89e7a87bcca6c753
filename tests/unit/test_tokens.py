"""The /v2 token service: scope strings, tokens that round-trip, expire, refuse tampering
and foreign keys, work across replicas sharing TOKEN_SECRET, and never show the
credentials they carry."""

from __future__ import annotations

import base64
import json
import re
from datetime import UTC, datetime

import pytest

from passthrough.config import Settings
from passthrough.errors import BadRequest, TokenInvalid
from passthrough.registry.tokens import (
    MAX_SCOPES,
    Grant,
    Scope,
    TokenService,
    grantable_scopes,
    parse_scopes,
)
from passthrough.upstream.auth import Credentials

SECRET = "correct horse battery staple"
PASSWORD = "hunter2-very-secret"


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def pull(name: str) -> Scope:
    return Scope("repository", name, frozenset({"pull"}))


# -- scopes ------------------------------------------------------------------------------


def test_parse_one_scope():
    assert parse_scopes(["repository:team/app:pull,push"]) == [
        Scope("repository", "team/app", frozenset({"pull", "push"}))
    ]


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("repository:localhost:5000/x:pull", "localhost:5000/x"),
        ("repository:127.0.0.1:5000/team/app:pull", "127.0.0.1:5000/team/app"),
        ("repository:ghcr.io/owner/app:pull", "ghcr.io/owner/app"),
        ("repository:library/busybox:pull", "library/busybox"),
        ("repository:alpine:pull", "alpine"),
    ],
)
def test_names_with_hosts_and_ports(text, name):
    (scope,) = parse_scopes([text])
    assert (scope.type, scope.name, scope.actions) == ("repository", name, frozenset({"pull"}))


def test_space_separated_and_repeated_parameters_merge():
    scopes = parse_scopes(
        ["repository:a:pull repository:b:pull", "repository:a:push", "registry:catalog:*"]
    )
    assert scopes == [
        Scope("repository", "a", frozenset({"pull", "push"})),
        pull("b"),
        Scope("registry", "catalog", frozenset({"*"})),
    ]


def test_no_scope_is_no_scope():
    assert parse_scopes([]) == []
    assert parse_scopes([""]) == []


def test_resource_class_and_empty_actions_follow_the_grammar():
    assert parse_scopes(["repository(plugin):a/b:pull"])[0].type == "repository(plugin)"
    assert parse_scopes(["repository:a/b:"])[0].actions == frozenset()


@pytest.mark.parametrize(
    "text",
    [
        "repository",
        "repository:x",
        "repository::pull",
        ":x:pull",
        "Repository:x:pull",
        "repository:team/UPPER:pull",
        "repository:a//b:pull",
        "repository:-a:pull",
        "repository:x:pull;rm",
        "repository:x:PULL",
        'repository:x":pull',
        "repository:" + "a" * 600 + ":pull",
    ],
)
def test_malformed_scopes_are_400(text):
    with pytest.raises(BadRequest) as caught:
        parse_scopes([text])
    assert caught.value.status == 400
    assert "\n" not in caught.value.message


def test_too_many_scopes_are_400():
    with pytest.raises(BadRequest, match="at most"):
        parse_scopes([" ".join(f"repository:r{i}:pull" for i in range(MAX_SCOPES + 1))])


def test_scope_text():
    scope = Scope("repository", "a/b", frozenset({"push", "pull"}))
    assert str(scope) == "repository:a/b:pull,push"


def test_only_pull_on_repositories_is_granted():
    asked = parse_scopes(
        [
            "repository:a:pull,push",
            "repository:b:push,delete",
            "repository:c:*",
            "registry:catalog:*",
            "repository:d:pull",
        ]
    )
    assert grantable_scopes(Settings(proxy_mode="authenticated"), asked) == (
        pull("a"),
        pull("c"),
        pull("d"),
    )
    assert grantable_scopes(Settings(), asked) == (pull("a"), pull("c"), pull("d"))


# -- tokens ------------------------------------------------------------------------------


def test_round_trip_with_credentials():
    clock = Clock()
    service = TokenService(SECRET, 300, clock=clock)
    answer = service.issue(
        [pull("library/busybox"), pull("localhost:5000/x")],
        credentials=Credentials("alice", PASSWORD),
        subject="alice",
    )
    assert answer["token"] == answer["access_token"]
    assert answer["expires_in"] == 300
    assert answer["issued_at"] == datetime.fromtimestamp(clock.now, UTC).strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", answer["issued_at"])
    grant = service.verify(answer["token"])
    assert grant == Grant(
        "alice",
        (pull("library/busybox"), pull("localhost:5000/x")),
        Credentials("alice", PASSWORD),
        clock.now + 300,
    )
    assert grant.allows("library/busybox", "pull")
    assert grant.allows("localhost:5000/x", "pull")
    assert not grant.allows("library/busybox", "push")
    assert not grant.allows("library/alpine", "pull")


def test_anonymous_token_carries_no_credentials():
    service = TokenService(SECRET, 60)
    grant = service.verify(service.issue([pull("a")])["token"])
    assert grant.credentials is None and grant.subject is None
    assert grant.allows("a", "pull")


def test_token_without_scopes_allows_nothing():
    service = TokenService(SECRET, 60)
    grant = service.verify(service.issue([])["token"])
    assert grant.scopes == ()
    assert not grant.allows("a", "pull")


def test_expiry_follows_the_clock():
    clock = Clock()
    service = TokenService(SECRET, 60, clock=clock)
    token = service.issue([pull("a")])["token"]
    clock.now += 59
    assert service.verify(token).allows("a", "pull")
    clock.now += 1
    with pytest.raises(TokenInvalid, match="expired") as caught:
        service.verify(token)
    assert caught.value.status == 401
    assert caught.value.kind == "token_invalid"


def test_tampered_tokens_are_refused():
    service = TokenService(SECRET, 60)
    token = service.issue([pull("a")])["token"]
    raw = bytearray(base64.urlsafe_b64decode(token))
    for position in (9, 30, len(raw) - 40, len(raw) - 1):
        altered = bytearray(raw)
        altered[position] ^= 0x01
        with pytest.raises(TokenInvalid):
            service.verify(base64.urlsafe_b64encode(bytes(altered)).decode())


@pytest.mark.parametrize(
    "token",
    ["", "x", "not a token at all", "gAAAAA" + "A" * 100, "é" * 10, "A" * 20000, "Zm9vYmFy"],
)
def test_malformed_tokens_are_refused(token):
    with pytest.raises(TokenInvalid) as caught:
        TokenService(SECRET, 60).verify(token)
    assert not token or token not in caught.value.message


def test_another_secret_is_refused_and_replicas_agree():
    first = TokenService(SECRET, 60)
    replica = TokenService(SECRET, 60)
    foreign = TokenService("another secret of enough length", 60)
    token = first.issue([pull("a")], credentials=Credentials("bob", PASSWORD), subject="bob")[
        "token"
    ]
    assert replica.verify(token).credentials == Credentials("bob", PASSWORD)
    assert first.verify(replica.issue([pull("b")])["token"]).allows("b", "pull")
    with pytest.raises(TokenInvalid):
        foreign.verify(token)


def test_another_service_name_is_refused():
    token = TokenService(SECRET, 60, service="elsewhere").issue([pull("a")])["token"]
    with pytest.raises(TokenInvalid):
        TokenService(SECRET, 60).verify(token)


def test_credentials_never_show():
    service = TokenService(SECRET, 60)
    credentials = Credentials("carol", PASSWORD)
    token = service.issue([pull("a")], credentials=credentials, subject="carol")["token"]
    # The token text, and its base64 decoded, hold neither the password nor its base64.
    decoded = base64.urlsafe_b64decode(token)
    for needle in (PASSWORD, base64.b64encode(PASSWORD.encode()).decode()):
        assert needle not in token
        assert needle.encode() not in decoded
    assert b"carol" not in decoded
    grant = service.verify(token)
    assert PASSWORD not in repr(grant)
    assert PASSWORD not in repr(service) and SECRET not in repr(service)
    # An error about that token quotes neither the token nor what it carries.
    tampered = token[:-6] + ("AAAAAA" if not token.endswith("AAAAAA") else "BBBBBB")
    with pytest.raises(TokenInvalid) as caught:
        service.verify(tampered)
    assert tampered not in str(caught.value) and PASSWORD not in str(caught.value)
    assert token not in str(caught.value)


def test_the_payload_is_json_with_exp_sub_scopes_and_cred():
    # White box: the payload the key protects (what a future version must still read).
    from cryptography.fernet import Fernet

    from passthrough.registry.tokens import derive_key

    clock = Clock()
    token = TokenService(SECRET, 60, clock=clock).issue(
        [pull("a")], credentials=Credentials("dan", PASSWORD), subject="dan"
    )["token"]
    payload = json.loads(Fernet(derive_key(SECRET)).decrypt(token.encode()))
    assert payload["exp"] == int(clock.now) + 60
    assert payload["sub"] == "dan"
    assert payload["access"] == [["repository", "a", ["pull"]]]
    assert payload["cred"] == ["dan", PASSWORD]
    anonymous = TokenService(SECRET, 60).issue([pull("a")])["token"]
    assert "cred" not in json.loads(Fernet(derive_key(SECRET)).decrypt(anonymous.encode()))
    assert derive_key(SECRET) != derive_key(SECRET + "x")
    assert SECRET.encode() not in base64.urlsafe_b64decode(derive_key(SECRET))


def test_a_service_needs_a_secret_and_a_lifetime():
    with pytest.raises(ValueError):
        TokenService("", 60)
    with pytest.raises(ValueError):
        TokenService(SECRET, 0)
