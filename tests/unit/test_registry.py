"""The credential precedence matrix and the registry a route chooses."""

from __future__ import annotations

import pytest

from passthrough.config import load_settings
from passthrough.errors import BadRequest, ClientAuthDisabled, ClientAuthRequired
from passthrough.upstream.auth import Credentials
from passthrough.upstream.target import AuthKind, Route, choose_target, registry_from_url

CLIENT = Credentials("client", "client-secret")
ENV_REGISTRY = "http://127.0.0.1:5000"


def settings(**env):
    base = {"REGISTRY_URL": ENV_REGISTRY, "ENV_FILE": "/nonexistent"}
    base.update(env)
    return load_settings(base)


ENV_CREDS = {"REGISTRY_USERNAME": "envuser", "REGISTRY_PASSWORD": "env-secret"}
BEARER = {"REGISTRY_BEARER_TOKEN": "static-token"}


@pytest.mark.parametrize(
    ("env", "client", "expected_kind", "expected_source"),
    [
        ({}, None, AuthKind.ANONYMOUS, None),
        ({}, CLIENT, AuthKind.CREDENTIALS, "client"),
        (ENV_CREDS, None, AuthKind.CREDENTIALS, "environment"),
        (ENV_CREDS, CLIENT, AuthKind.CREDENTIALS, "client"),
        (BEARER, None, AuthKind.STATIC_BEARER, None),
        (BEARER, CLIENT, AuthKind.STATIC_BEARER, None),
        ({**BEARER, **ENV_CREDS}, None, AuthKind.STATIC_BEARER, None),
        ({**ENV_CREDS, "REGISTRY_CLIENT_AUTH": "off"}, CLIENT, AuthKind.CREDENTIALS, "environment"),
        ({"REGISTRY_CLIENT_AUTH": "off"}, CLIENT, AuthKind.ANONYMOUS, None),
    ],
)
def test_precedence_on_environment_registry(env, client, expected_kind, expected_source):
    target = choose_target(settings(**env), Route.ENVIRONMENT, client)
    assert target.auth is expected_kind
    assert target.credentials_source == expected_source
    if expected_source == "client":
        assert target.credentials == CLIENT
    if expected_kind is AuthKind.STATIC_BEARER:
        assert target.bearer_token == "static-token"
        assert "static-token" not in repr(target)


def test_environment_secrets_never_go_to_another_host():
    s = settings(**ENV_CREDS, **BEARER, REGISTRY_AUTH_URL="http://127.0.0.1:5001/token")
    other = registry_from_url("https", "elsewhere.example.com")
    target = choose_target(s, Route.REGISTRY, None, other)
    assert target.auth is AuthKind.ANONYMOUS
    assert target.credentials is None and target.bearer_token is None
    assert target.realm_override is None
    with_client = choose_target(s, Route.REGISTRY, CLIENT, other)
    assert with_client.credentials == CLIENT and with_client.bearer_token is None


def test_url_naming_the_environment_registry_uses_its_settings():
    s = settings(**ENV_CREDS, REGISTRY_AUTH_URL="http://127.0.0.1:5001/token")
    same = registry_from_url("http", "127.0.0.1:5000")
    target = choose_target(s, Route.REGISTRY, None, same)
    assert target.credentials_source == "environment"
    assert target.realm_override == "http://127.0.0.1:5001/token"


def test_client_auth_modes():
    with pytest.raises(ClientAuthRequired) as raised:
        choose_target(settings(), Route.REGISTRY_AUTH, None, registry_from_url("http", "h:1"))
    assert raised.value.headers == {"WWW-Authenticate": 'Basic realm="registry credentials"'}
    with pytest.raises(ClientAuthRequired):
        choose_target(
            settings(REGISTRY_CLIENT_AUTH="required", **ENV_CREDS), Route.ENVIRONMENT, None
        )
    with pytest.raises(ClientAuthDisabled):
        choose_target(
            settings(REGISTRY_CLIENT_AUTH="off"),
            Route.REGISTRY_AUTH,
            CLIENT,
            registry_from_url("http", "h:1"),
        )
    required = choose_target(settings(REGISTRY_CLIENT_AUTH="required"), Route.ENVIRONMENT, CLIENT)
    assert required.credentials_source == "client"


@pytest.mark.parametrize(
    ("scheme", "host", "url", "name"),
    [
        ("http", "127.0.0.1:5000", "http://127.0.0.1:5000", "127.0.0.1:5000"),
        (
            "https",
            "Registry2.Example.com:5000",
            "https://registry2.example.com:5000",
            "registry2.example.com:5000",
        ),
        ("https", "docker.io", "https://registry-1.docker.io", "docker.io"),
        ("http", "index.docker.io", "https://registry-1.docker.io", "docker.io"),
        ("https", "[::1]:5000", "https://[::1]:5000", "[::1]:5000"),
    ],
)
def test_registry_from_url(scheme, host, url, name):
    registry = registry_from_url(scheme, host)
    assert (registry.url, registry.name) == (url, name)


@pytest.mark.parametrize(
    ("scheme", "host"),
    [
        ("ftp", "h"),
        ("HTTP", "h"),
        ("http", "user@h"),
        ("http", "h/x"),
        ("http", "h:99999"),
        ("http", "h:"),
        ("http", ""),
    ],
)
def test_bad_registry_urls(scheme, host):
    with pytest.raises(BadRequest):
        registry_from_url(scheme, host)
