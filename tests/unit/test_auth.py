"""WWW-Authenticate parsing (RFC 7235), Basic credentials and the token cache."""

from __future__ import annotations

import base64

import pytest

from passthrough.errors import BadRequest
from passthrough.upstream.auth import (
    Challenge,
    Credentials,
    TokenCache,
    TokenKey,
    parse_basic_authorization,
    parse_challenges,
)


def test_docker_hub_challenge():
    header = (
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/nginx:pull"'
    )
    assert parse_challenges(header) == [
        Challenge(
            "bearer",
            {
                "realm": "https://auth.docker.io/token",
                "service": "registry.docker.io",
                "scope": "repository:library/nginx:pull",
            },
        )
    ]


def test_several_challenges_quoted_commas_and_host_port_scopes():
    header = (
        'Basic realm="Registry Realm, with comma", Bearer realm="http://127.0.0.1:5001/token",'
        'service="127.0.0.1:5000",scope="repository:127.0.0.1:5000/team/api:pull,push '
        'repository:other:pull",error="insufficient_scope"'
    )
    basic, bearer = parse_challenges(header)
    assert basic == Challenge("basic", {"realm": "Registry Realm, with comma"})
    assert bearer.scheme == "bearer"
    assert bearer.realm == "http://127.0.0.1:5001/token"
    assert bearer.params["service"] == "127.0.0.1:5000"
    assert bearer.params["scope"].split() == [
        "repository:127.0.0.1:5000/team/api:pull,push",
        "repository:other:pull",
    ]
    assert bearer.params["error"] == "insufficient_scope"


def test_token68_escapes_case_and_whitespace():
    challenges = parse_challenges(
        r'Negotiate abc123==, BEARER  Realm = "a\"b" , Service=token-value'
    )
    assert challenges[0] == Challenge("negotiate", {})
    assert challenges[1] == Challenge("bearer", {"realm": 'a"b', "service": "token-value"})


@pytest.mark.parametrize("header", ["", ",,,", "   ", "=broken"])
def test_garbage_is_not_fatal(header):
    assert isinstance(parse_challenges(header), list)


def test_basic_authorization_parsing():
    value = "Basic " + base64.b64encode(b"alice:pa:ss").decode()
    creds = parse_basic_authorization(value)
    assert creds == Credentials("alice", "pa:ss")
    assert "pa:ss" not in repr(creds)
    assert parse_basic_authorization(None) is None
    assert parse_basic_authorization("Bearer x") is None
    for bad in ("Basic !!!", "Basic " + base64.b64encode(b"nocolon").decode()):
        with pytest.raises(BadRequest):
            parse_basic_authorization(bad)


def test_identity_is_keyed_and_distinct():
    a, b = Credentials("alice", "one"), Credentials("alice", "two")
    assert a.identity != b.identity
    assert a.identity == Credentials("alice", "one").identity
    assert "one" not in a.identity and "alice" not in a.identity


def test_token_cache_reuses_until_margin_and_keys_by_identity(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr("passthrough.upstream.auth.time.monotonic", lambda: now[0])
    cache = TokenCache()
    alice = TokenKey("realm", "svc", ("repository:a:pull",), "id-alice")
    bob = TokenKey("realm", "svc", ("repository:a:pull",), "id-bob")
    cache.put(alice, "T1", 60)
    assert cache.get(alice) == "T1"
    assert cache.get(bob) is None
    now[0] += 49
    assert cache.get(alice) == "T1"
    now[0] += 2  # within 10 s of expiry: not reused
    assert cache.get(alice) is None
