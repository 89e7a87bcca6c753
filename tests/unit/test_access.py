"""check_access, branch by branch: authentication off ignores the header; on, a Bearer
token is verified and checked against the repository, Basic credentials are taken as
the client's upstream identity, and anything else gets the exact Bearer challenge."""

from __future__ import annotations

import base64

import pytest

from passthrough.config import Settings
from passthrough.errors import (
    BadRequest,
    Denied,
    InsufficientScope,
    PassthroughError,
    TokenInvalid,
    TokenRequired,
)
from passthrough.registry.access import Identity, challenge, check_access
from passthrough.registry.tokens import Scope, TokenService
from passthrough.upstream.auth import Credentials

SECRET = "a shared secret for every replica"
PUBLIC = "https://mirror.example:5443"
REALM = f'Bearer realm="{PUBLIC}/v2/token",service="passthrough"'

AUTH = Settings(proxy_mode="authenticated", public_url=PUBLIC, token_secret=SECRET)
OFF = Settings()


class Clock:
    now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def pull(name: str) -> Scope:
    return Scope("repository", name, frozenset({"pull"}))


@pytest.fixture
def tokens():
    return TokenService(SECRET, 300)


# -- authentication off ------------------------------------------------------------------


@pytest.mark.parametrize("header", [None, "", "Bearer garbage", basic("a", "b"), "Basic !!!"])
def test_off_ignores_the_header(tokens, header):
    for service in (None, tokens):
        identity = check_access(OFF, service, header, "library/busybox")
        assert identity == Identity(None, None, "none")
        assert check_access(OFF, service, header, None).via == "none"


# -- no or unknown credentials -----------------------------------------------------------


@pytest.mark.parametrize("header", [None, "", "   ", "Negotiate abc", "Token xyz", "Digest x=1"])
def test_missing_credentials_get_the_challenge(tokens, header):
    with pytest.raises(TokenRequired) as caught:
        check_access(AUTH, tokens, header, None)
    error = caught.value
    assert (error.status, error.kind) == (401, "unauthorized")
    assert error.headers == {"WWW-Authenticate": REALM}


def test_the_challenge_names_the_repository_scope(tokens):
    with pytest.raises(TokenRequired) as caught:
        check_access(AUTH, tokens, None, "localhost:5000/team/app")
    assert caught.value.headers["WWW-Authenticate"] == (
        REALM + ',scope="repository:localhost:5000/team/app:pull"'
    )


def test_the_realm_is_public_url_with_its_path():
    settings = Settings(
        proxy_mode="authenticated", public_url="https://edge.example/mirror", token_secret=SECRET
    )
    assert challenge(settings) == (
        'Bearer realm="https://edge.example/mirror/v2/token",service="passthrough"'
    )


def test_a_malformed_name_stays_out_of_the_header(tokens):
    with pytest.raises(TokenRequired) as caught:
        check_access(AUTH, tokens, None, 'evil",error="x\r\nSet-Cookie: a=b')
    assert caught.value.headers["WWW-Authenticate"] == REALM


def test_no_public_url_is_no_realm(tokens):
    # load_settings refuses this; a hand-built Settings must not fall back to the Host.
    with pytest.raises(PassthroughError, match="PUBLIC_URL") as caught:
        check_access(Settings(proxy_mode="authenticated"), tokens, None, None)
    assert caught.value.status == 500


# -- Bearer --------------------------------------------------------------------------------


def test_a_valid_token_passes_the_base_check(tokens):
    token = tokens.issue([])["token"]
    assert check_access(AUTH, tokens, f"Bearer {token}", None) == Identity(None, None, "bearer")


def test_a_token_with_the_scope_carries_its_identity(tokens):
    credentials = Credentials("alice", "pw-alice")
    token = tokens.issue([pull("library/busybox")], credentials=credentials, subject="alice")[
        "token"
    ]
    identity = check_access(AUTH, tokens, f"bearer {token}", "library/busybox")
    assert identity == Identity(credentials, "alice", "bearer")
    assert "pw-alice" not in repr(identity)


def test_a_token_without_the_scope_is_insufficient(tokens):
    token = tokens.issue([pull("library/busybox")])["token"]
    with pytest.raises(InsufficientScope) as caught:
        check_access(AUTH, tokens, f"Bearer {token}", "library/alpine")
    assert caught.value.status == 401
    assert caught.value.headers["WWW-Authenticate"] == (
        REALM + ',scope="repository:library/alpine:pull",error="insufficient_scope"'
    )
    # A push to a proxied name is no matter of scope: it is DENIED (test_access_hosted).
    with pytest.raises(Denied):
        check_access(AUTH, tokens, f"Bearer {token}", "library/busybox", "push")


@pytest.mark.parametrize("value", ["", "garbage", "gAAAAABnot-a-real-token=="])
def test_a_bad_token_is_invalid_token(tokens, value):
    with pytest.raises(TokenInvalid) as caught:
        check_access(AUTH, tokens, f"Bearer {value}", "library/busybox")
    error = caught.value
    assert (error.status, error.kind) == (401, "token_invalid")
    assert error.headers["WWW-Authenticate"] == (
        REALM + ',scope="repository:library/busybox:pull",error="invalid_token"'
    )
    assert not value or value not in error.message


def test_an_expired_token_is_invalid_token():
    clock = Clock()
    tokens = TokenService(SECRET, 60, clock=clock)
    token = tokens.issue([pull("a")])["token"]
    assert check_access(AUTH, tokens, f"Bearer {token}", "a").via == "bearer"
    clock.now += 60
    with pytest.raises(TokenInvalid, match="expired") as caught:
        check_access(AUTH, tokens, f"Bearer {token}", None)
    assert caught.value.headers["WWW-Authenticate"] == REALM + ',error="invalid_token"'


def test_another_secrets_token_is_invalid(tokens):
    foreign = TokenService("some other secret entirely", 300).issue([pull("a")])["token"]
    with pytest.raises(TokenInvalid):
        check_access(AUTH, tokens, f"Bearer {foreign}", "a")


def test_bearer_without_a_token_service_is_a_server_error():
    with pytest.raises(PassthroughError, match="TOKEN_SECRET") as caught:
        check_access(AUTH, None, "Bearer abc", None)
    assert caught.value.status == 500


# -- Basic ---------------------------------------------------------------------------------


@pytest.mark.parametrize("repository", [None, "library/busybox"])
def test_basic_is_the_upstream_identity(tokens, repository):
    identity = check_access(AUTH, tokens, basic("bob", "pw:with:colons"), repository)
    assert identity == Identity(Credentials("bob", "pw:with:colons"), "bob", "basic")
    assert "pw:with:colons" not in repr(identity)
    # No token service is needed for Basic.
    assert check_access(AUTH, None, basic("bob", "x"), repository).via == "basic"


@pytest.mark.parametrize("header", ["Basic !!!", "Basic " + base64.b64encode(b"nocolon").decode()])
def test_malformed_basic_is_400(tokens, header):
    with pytest.raises(BadRequest) as caught:
        check_access(AUTH, tokens, header, "a")
    assert caught.value.status == 400
