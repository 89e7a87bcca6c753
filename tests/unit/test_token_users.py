"""/v2/token and /v2 through the app with HTPASSWD_FILE: a user's credentials are checked
(a wrong password is a 401 so that docker login fails; counted and rate limited, 429
with Retry-After), the token's subject is the user and its scopes what the user may
do; in PROXY_MODE=authenticated other credentials are carried as before and a user's
too; in transparent mode an unknown login is refused and another registry's
credentials on a scoped request are ignored; Basic straight to /v2; the metric; and no
password in any log."""

from __future__ import annotations

import base64
import logging
from pathlib import Path

import pytest
from flask import Flask
from prometheus_client.parser import text_string_to_metric_families

from passthrough import create_app
from passthrough.config import ConfigError
from passthrough.registry.tokens import Grant
from passthrough.upstream.auth import Credentials
from passthrough.web.token import tokens_of
from tests.support.htpasswd import bcrypt_line, htpasswd
from tests.unit.test_access_hosted import ACCESS, PASSWORDS

SECRET = "the replicas' shared token secret"
PUBLIC = "https://registry.example"


def basic(user: str, password: str | None = None) -> str:
    secret = PASSWORDS.get(user, "x") if password is None else password
    return "Basic " + base64.b64encode(f"{user}:{secret}".encode()).decode()


def user_files(root: Path) -> dict[str, Path]:
    """HTPASSWD_FILE and ACCESS_FILE of the users of these tests, under ``root``."""
    users = root / "htpasswd"
    users.write_text("".join(bcrypt_line(u, p) + "\n" for u, p in PASSWORDS.items()))
    access = root / "access.yaml"
    access.write_text(ACCESS)
    return {"users": users, "access": access, "root": root}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return user_files(tmp_path_factory.mktemp("token-users"))


def make_app(files: dict[str, Path], **env: str) -> Flask:
    config = {
        "ENV_FILE": "/nonexistent",
        "CACHE_DIR": str(files["root"] / "cache"),
        "PUBLIC_URL": PUBLIC,
        "TOKEN_SECRET": SECRET,
        "HTPASSWD_FILE": str(files["users"]),
        "ACCESS_FILE": str(files["access"]),
        "HOSTED_REPOSITORIES": "team/*,apps/**",
    }
    config.update(env)
    return create_app({k: v for k, v in config.items() if v})


@pytest.fixture
def app(files) -> Flask:
    return make_app(files)


@pytest.fixture
def authenticated_app(files) -> Flask:
    return make_app(files, PROXY_MODE="authenticated")


def token_grant(app: Flask, response) -> Grant:
    assert response.status_code == 200, response.data
    tokens = tokens_of(app)
    assert tokens is not None
    return tokens.verify(response.get_json()["token"])


def get_token(app: Flask, header: str | None, *scopes: str, client: str = "192.0.2.10"):
    query = [("service", "passthrough"), *(("scope", s) for s in scopes)]
    headers = {"Authorization": header} if header else {}
    return app.test_client().get(
        "/v2/token", query_string=query, headers=headers, environ_base={"REMOTE_ADDR": client}
    )


def failures(app: Flask, reason: str) -> float:
    text = app.test_client().get("/metrics").get_data(as_text=True)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if (
                sample.name == "passthrough_login_failures_total"
                and sample.labels.get("reason") == reason
            ):
                return float(sample.value)
    return 0.0


def test_a_user_gets_what_the_rules_allow(app):
    response = get_token(
        app,
        basic("bob"),
        "repository:team/app:pull,push,delete",
        "repository:library/nginx:pull,push",
        "registry:catalog:*",
    )
    grant = token_grant(app, response)
    assert (grant.subject, grant.user, grant.credentials) == ("bob", "bob", None)
    assert grant.allows("team/app", "push") and grant.allows("team/app", "pull")
    assert not grant.allows("team/app", "delete")
    assert grant.allows("library/nginx", "pull") and not grant.allows("library/nginx", "push")
    assert any(s.type == "registry" for s in grant.scopes)
    # And the token opens the door it names.
    answer = app.test_client().get(
        "/v2/", headers={"Authorization": f"Bearer {response.get_json()['token']}"}
    )
    assert answer.status_code == 200


def test_docker_login_with_a_wrong_password_fails(app):
    before = failures(app, "wrong_password")
    response = get_token(app, basic("alice", "wrong"))
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == 'Basic realm="passthrough"'
    assert response.get_json() == {
        "error": "unauthorized",
        "error_description": "wrong user name or password",
    }
    assert failures(app, "wrong_password") == before + 1


def test_transparent_mode_an_unknown_login_fails_other_credentials_are_ignored(app):
    before = failures(app, "unknown_user")
    assert get_token(app, basic("hub-user", "hub-pw")).status_code == 401
    assert failures(app, "unknown_user") == before + 1
    # With a scope: dockerd's Docker Hub login sent to its mirror; not ours to judge.
    grant = token_grant(app, get_token(app, basic("hub-user", "hub-pw"), "repository:x/y:pull"))
    assert (grant.subject, grant.user, grant.credentials) == (None, None, None)
    assert grant.allows("x/y", "pull")


def test_authenticated_mode_carries_credentials_users_and_others(authenticated_app):
    app = authenticated_app
    other = token_grant(app, get_token(app, basic("hub-user", "hub-pw"), "repository:x/y:pull"))
    assert (other.user, other.credentials) == (None, Credentials("hub-user", "hub-pw"))
    assert token_grant(app, get_token(app, basic("hub-user", "hub-pw"))).user is None
    alice = token_grant(
        app, get_token(app, basic("alice"), "repository:x/y:pull", "repository:team/a:push")
    )
    assert alice.user == "alice"
    assert alice.credentials == Credentials("alice", PASSWORDS["alice"])
    assert alice.allows("team/a", "push") and alice.allows("x/y", "pull")
    # A passthrough user's name with another password: refused, not carried upstream.
    assert get_token(app, basic("alice", "hub-pw"), "repository:x/y:pull").status_code == 401


def test_anonymous_tokens(files, app):
    grant = token_grant(
        app, get_token(app, None, "repository:team/a:pull,push", "repository:b:pull")
    )
    assert grant.allows("b", "pull") and not grant.allows("team/a", "pull")
    anonymous = make_app(files, HOSTED_ANONYMOUS_PULL="true")
    grant = token_grant(anonymous, get_token(anonymous, None, "repository:apps/x:pull,push"))
    assert grant.allows("apps/x", "pull") and not grant.allows("apps/x", "push")


def test_the_oauth2_form_checks_users(app):
    client = app.test_client()
    form = {"grant_type": "password", "service": "passthrough", "scope": "repository:team/a:push"}
    ok = client.post(
        "/v2/token", data={**form, "username": "alice", "password": PASSWORDS["alice"]}
    )
    assert token_grant(app, ok).allows("team/a", "push")
    bad = client.post("/v2/token", data={**form, "username": "alice", "password": "nope"})
    assert bad.status_code == 401


def test_failed_logins_are_rate_limited_per_address(app):
    for _ in range(10):
        assert get_token(app, basic("alice", "guess"), client="203.0.113.5").status_code == 401
    limited = get_token(app, basic("alice"), client="203.0.113.5")
    assert limited.status_code == 429
    assert 1 <= int(limited.headers["Retry-After"]) <= 60
    assert limited.get_json()["error"] == "too_many_requests"
    # /v2 itself refuses the address too, with the spec's code.
    v2 = app.test_client().get(
        "/v2/",
        headers={"Authorization": basic("alice")},
        environ_base={"REMOTE_ADDR": "203.0.113.5"},
    )
    assert v2.status_code == 429
    assert v2.get_json()["errors"][0]["code"] == "TOOMANYREQUESTS"
    assert "Retry-After" in v2.headers
    # Another address logs in.
    assert get_token(app, basic("alice"), client="203.0.113.6").status_code == 200


def test_basic_straight_to_v2(app):
    client = app.test_client()
    assert client.get("/v2/", headers={"Authorization": basic("carol")}).status_code == 200
    wrong = client.get("/v2/", headers={"Authorization": basic("carol", "no")})
    assert wrong.status_code == 401
    assert wrong.get_json()["errors"][0]["code"] == "UNAUTHORIZED"
    assert wrong.headers["WWW-Authenticate"].startswith(f'Bearer realm="{PUBLIC}/v2/token"')
    anonymous = client.get("/v2/")
    assert anonymous.status_code == 401


def test_a_bad_htpasswd_file_stops_the_app(files, tmp_path):
    weak = tmp_path / "weak"
    weak.write_text(bcrypt_line("alice", "a") + "\n" + htpasswd("-m", "bob", "b") + "\n")
    with pytest.raises(ConfigError, match="HTPASSWD_FILE line 2: user 'bob' has a MD5"):
        make_app(files, HTPASSWD_FILE=str(weak))
    broken = tmp_path / "access.yaml"
    broken.write_text("rules: [{repositories: [a], push: [anonymous]}]\n")
    with pytest.raises(ConfigError, match="ACCESS_FILE: rule 1"):
        make_app(files, ACCESS_FILE=str(broken))


def test_no_password_in_any_log(app, authenticated_app, caplog):
    caplog.set_level(logging.DEBUG)
    for each in (app, authenticated_app):
        for header in (basic("alice"), basic("alice", "wrong-pw-Qz"), basic("eve", "eve-pw-Qz")):
            get_token(each, header, "repository:team/a:push")
            get_token(each, header)
            each.test_client().get("/v2/team/a/tags/list", headers={"Authorization": header})
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "login refused" in text
    for secret in (*PASSWORDS.values(), "wrong-pw-Qz", "eve-pw-Qz", "$2y$"):
        assert secret not in text
