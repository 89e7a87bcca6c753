"""GET|POST /v2/token through the app (Flask's test client): the JSON answer, the
credentials carried inside the token, 400s for a foreign service, a bad scope or an
unsupported grant; the route wins over a /v2 catch-all; and the settings it needs."""

from __future__ import annotations

import base64
import logging

import pytest
from flask import Blueprint, Flask, jsonify, request

from passthrough import create_app
from passthrough.config import ConfigError, load_settings
from passthrough.registry.access import check_access
from passthrough.registry.tokens import TokenService
from passthrough.upstream.auth import Credentials
from passthrough.web.token import tokens_of

SECRET = "the replicas' shared token secret"
PUBLIC = "https://mirror.example:5443"
PASSWORD = "pa55-w0rd-never-logged"


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def make_app(tmp_path, **env: str) -> Flask:
    config = {"ENV_FILE": "/nonexistent", "CACHE_DIR": str(tmp_path / "cache")}
    config.update(env)
    return create_app(config)


@pytest.fixture
def app(tmp_path):
    return make_app(
        tmp_path,
        PROXY_MODE="authenticated",
        PUBLIC_URL=PUBLIC,
        TOKEN_SECRET=SECRET,
        TOKEN_TTL="123",
    )


def service_of(app: Flask) -> TokenService:
    tokens = tokens_of(app)
    assert tokens is not None
    return tokens


def assert_token_answer(response, ttl: int = 123) -> str:
    assert response.status_code == 200, response.data
    assert response.mimetype == "application/json"
    assert response.headers["Cache-Control"] == "no-store"
    body = response.get_json()
    assert set(body) == {"token", "access_token", "expires_in", "issued_at"}
    assert body["token"] == body["access_token"]
    assert body["expires_in"] == ttl
    return str(body["token"])


# -- GET -----------------------------------------------------------------------------------


def test_anonymous_get_gets_pull(app):
    response = app.test_client().get(
        "/v2/token?service=passthrough&scope=repository:library/busybox:pull"
    )
    grant = service_of(app).verify(assert_token_answer(response))
    assert grant.credentials is None and grant.subject is None
    assert grant.allows("library/busybox", "pull")


def test_get_with_basic_carries_the_credentials(app):
    response = app.test_client().get(
        "/v2/token",
        query_string=[
            ("service", "passthrough"),
            ("account", "alice"),
            ("scope", "repository:localhost:5000/team/app:pull,push"),
            ("scope", "repository:library/busybox:pull"),
        ],
        headers={"Authorization": basic("alice", PASSWORD)},
    )
    token = assert_token_answer(response)
    assert PASSWORD not in response.get_data(as_text=True)
    grant = service_of(app).verify(token)
    assert grant.credentials == Credentials("alice", PASSWORD)
    assert grant.subject == "alice"
    assert grant.allows("localhost:5000/team/app", "pull")
    assert grant.allows("library/busybox", "pull")
    # No hosted area: push is dropped from the grant, not refused.
    assert not grant.allows("localhost:5000/team/app", "push")


def test_docker_login_without_scope_gets_a_token(app):
    # `docker login` asks with account and no scope; the token passes the /v2/ check.
    response = app.test_client().get(
        "/v2/token?account=bob&client_id=docker&offline_token=true&service=passthrough",
        headers={"Authorization": basic("bob", PASSWORD)},
    )
    grant = service_of(app).verify(assert_token_answer(response))
    assert grant.scopes == ()
    assert grant.credentials == Credentials("bob", PASSWORD)


def test_an_account_other_than_the_credentials_is_400(app):
    response = app.test_client().get(
        "/v2/token?account=mallory", headers={"Authorization": basic("bob", PASSWORD)}
    )
    assert response.status_code == 400
    assert response.get_json()["error"] == "invalid_request"


def test_a_bearer_header_is_no_identity(app):
    # Only Basic names an upstream identity at the token endpoint.
    response = app.test_client().get(
        "/v2/token?scope=repository:a:pull", headers={"Authorization": "Bearer something"}
    )
    assert service_of(app).verify(assert_token_answer(response)).credentials is None


@pytest.mark.parametrize(
    "query",
    [
        "service=registry.docker.io&scope=repository:a:pull",
        "service=&scope=repository:a:pull",
        "scope=repository:a",
        "scope=repository:x/UP:pull",
        "scope=repository:a:pull&scope=nonsense",
    ],
)
def test_bad_service_or_scope_is_400(app, query):
    response = app.test_client().get(f"/v2/token?{query}")
    assert response.status_code == 400
    assert response.headers["Cache-Control"] == "no-store"
    body = response.get_json()
    assert body["error"] == "invalid_request"
    assert body["error_description"]


def test_malformed_basic_is_400(app):
    response = app.test_client().get("/v2/token", headers={"Authorization": "Basic %%%"})
    assert response.status_code == 400
    assert response.get_json()["error"] == "invalid_request"


def test_other_methods_are_405(app):
    assert app.test_client().put("/v2/token").status_code == 405
    assert app.test_client().head("/v2/token").status_code == 200


# -- POST (OAuth2 form) ---------------------------------------------------------------------


def test_post_password_grant(app):
    response = app.test_client().post(
        "/v2/token",
        data={
            "grant_type": "password",
            "username": "carol",
            "password": PASSWORD,
            "service": "passthrough",
            "client_id": "containerd-client",
            "scope": "repository:library/busybox:pull repository:ghcr.io/o/app:pull",
        },
    )
    token = assert_token_answer(response)
    grant = service_of(app).verify(token)
    assert grant.credentials == Credentials("carol", PASSWORD)
    assert grant.subject == "carol"
    assert grant.allows("library/busybox", "pull") and grant.allows("ghcr.io/o/app", "pull")


@pytest.mark.parametrize("grant_type", ["refresh_token", "client_credentials", ""])
def test_other_grants_are_unsupported(app, grant_type):
    response = app.test_client().post(
        "/v2/token", data={"grant_type": grant_type, "refresh_token": "x", "service": "passthrough"}
    )
    assert response.status_code == 400
    assert response.get_json()["error"] == "unsupported_grant_type"


@pytest.mark.parametrize(
    "form",
    [
        {"grant_type": "password", "password": PASSWORD},
        {"grant_type": "password", "username": "carol"},
        {"grant_type": "password", "username": "ca:rol", "password": PASSWORD},
        {"grant_type": "password", "username": "c", "password": "p", "service": "other"},
        {"grant_type": "password", "username": "c", "password": "p", "scope": "bad"},
    ],
)
def test_bad_post_forms_are_400(app, form):
    response = app.test_client().post("/v2/token", data=form)
    assert response.status_code == 400
    assert response.get_json()["error"] == "invalid_request"
    assert PASSWORD not in response.get_data(as_text=True)


# -- authentication off ------------------------------------------------------------------------


def test_without_a_secret_the_endpoint_still_answers(tmp_path):
    app = make_app(tmp_path, TOKEN_TTL="77")
    assert tokens_of(app) is None
    response = app.test_client().get(
        "/v2/token?service=passthrough&scope=repository:a:pull",
        headers={"Authorization": basic("dan", PASSWORD)},
    )
    assert_token_answer(response, ttl=77)
    assert PASSWORD not in response.get_data(as_text=True)


def test_transparent_tokens_carry_no_credentials(tmp_path):
    app = make_app(tmp_path, TOKEN_SECRET=SECRET)
    response = app.test_client().get(
        "/v2/token?scope=repository:a:pull", headers={"Authorization": basic("dan", PASSWORD)}
    )
    grant = service_of(app).verify(assert_token_answer(response, ttl=300))
    assert grant.credentials is None and grant.subject == "dan"


# -- the token in use, and the route order ------------------------------------------------------


def add_probes(app: Flask) -> None:
    """A /v2 catch-all (which the token route must win over) and a probe outside /v2 that
    shows what identity check_access gives a request."""
    bp = Blueprint("probes", __name__)

    @bp.route("/v2/<path:rest>", methods=["GET", "POST"])
    def catch_all(rest):
        return jsonify(caught=rest)

    @bp.get("/probe/<path:name>")
    def probe(name):
        identity = check_access(
            app.extensions["passthrough"].settings,
            tokens_of(app),
            request.headers.get("Authorization"),
            name,
        )
        has_credentials = identity.credentials is not None
        return jsonify(via=identity.via, subject=identity.subject, credentials=has_credentials)

    app.register_blueprint(bp)


def test_v2_token_wins_over_a_catch_all_and_the_v2_routes(app):
    add_probes(app)
    client = app.test_client()
    assert client.get("/v2/other/thing/x").get_json() == {"caught": "other/thing/x"}
    assert_token_answer(client.get("/v2/token?scope=repository:a:pull"))
    assert_token_answer(
        client.post("/v2/token", data={"grant_type": "password", "username": "u", "password": "p"})
    )
    # A repository called "token" is still a repository.
    challenged = client.get("/v2/token/manifests/latest")
    assert challenged.status_code == 401
    assert 'scope="repository:token:pull"' in challenged.headers["WWW-Authenticate"]


def test_challenge_token_pull_flow(app, caplog):
    caplog.set_level(logging.DEBUG)
    add_probes(app)
    client = app.test_client()
    challenged = client.get("/v2/")
    assert challenged.status_code == 401
    realm = f'Bearer realm="{PUBLIC}/v2/token",service="passthrough"'
    assert challenged.headers["WWW-Authenticate"] == realm
    assert challenged.get_json()["errors"][0]["code"] == "UNAUTHORIZED"
    # The realm is PUBLIC_URL, whatever Host the client sent.
    spoofed = client.get("/v2/library/busybox/manifests/latest", headers={"Host": "evil.test"})
    assert spoofed.status_code == 401
    assert spoofed.headers["WWW-Authenticate"] == (
        realm + ',scope="repository:library/busybox:pull"'
    )

    token = assert_token_answer(
        client.get(
            "/v2/token?service=passthrough&scope=repository:library/busybox:pull",
            headers={"Authorization": basic("erin", PASSWORD)},
        )
    )
    bearer = {"Authorization": f"Bearer {token}"}
    base = client.get("/v2/", headers=bearer)
    assert (base.status_code, base.get_json()) == (200, {})
    assert client.get("/probe/library/busybox", headers=bearer).get_json() == {
        "via": "bearer",
        "subject": "erin",
        "credentials": True,
    }
    for path in (
        "/v2/library/alpine/manifests/latest",
        "/v2/library/alpine/blobs/sha256:" + "a" * 64,
    ):
        other = client.get(path, headers=bearer)
        assert other.status_code == 401
        assert other.headers["WWW-Authenticate"] == (
            realm + ',scope="repository:library/alpine:pull",error="insufficient_scope"'
        )
    tampered = client.get("/v2/", headers={"Authorization": f"Bearer {token[:-4]}AAAA"})
    assert tampered.status_code == 401
    assert tampered.headers["WWW-Authenticate"] == realm + ',error="invalid_token"'
    # Basic straight to /v2 works too.
    assert client.get("/v2/", headers={"Authorization": basic("erin", PASSWORD)}).status_code == 200
    direct = client.get("/probe/library/alpine", headers={"Authorization": basic("erin", PASSWORD)})
    assert direct.get_json() == {"via": "basic", "subject": "erin", "credentials": True}

    assert PASSWORD not in caplog.text
    assert token not in caplog.text


def test_a_replica_with_the_same_secret_accepts_the_token(app, tmp_path):
    replica = make_app(tmp_path, PROXY_MODE="authenticated", PUBLIC_URL=PUBLIC, TOKEN_SECRET=SECRET)
    foreign = make_app(
        tmp_path, PROXY_MODE="authenticated", PUBLIC_URL=PUBLIC, TOKEN_SECRET=SECRET + "-other"
    )
    token = assert_token_answer(app.test_client().get("/v2/token?scope=repository:a:pull"))
    bearer = {"Authorization": f"Bearer {token}"}
    assert replica.test_client().get("/v2/", headers=bearer).status_code == 200
    refused = foreign.test_client().get("/v2/", headers=bearer)
    assert refused.status_code == 401
    assert 'error="invalid_token"' in refused.headers["WWW-Authenticate"]


def test_with_auth_off_v2_needs_no_token(tmp_path):
    app = make_app(tmp_path)
    for headers in ({}, {"Authorization": "Bearer garbage"}):
        answer = app.test_client().get("/v2/", headers=headers)
        assert answer.status_code == 200
        assert "WWW-Authenticate" not in answer.headers


# -- settings ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"PUBLIC_URL": PUBLIC}, "TOKEN_SECRET"),
        ({"TOKEN_SECRET": SECRET}, "PUBLIC_URL"),
        ({}, "PUBLIC_URL"),
    ],
)
def test_authenticated_mode_needs_its_settings(env, variable):
    with pytest.raises(ConfigError, match=variable):
        load_settings({"PROXY_MODE": "authenticated", **env}, env_file="/nonexistent")


def test_authenticated_mode_with_its_settings_loads():
    settings = load_settings(
        {"PROXY_MODE": "authenticated", "PUBLIC_URL": PUBLIC + "/", "TOKEN_SECRET": SECRET},
        env_file="/nonexistent",
    )
    assert settings.auth_enabled
    assert settings.public_url == PUBLIC
    assert SECRET not in repr(settings)
