"""Which upstream a /v2 name goes to: aliases, host-like first components, containerd's
?ns= and the default upstream, and the names the grammar refuses."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from passthrough.config import ConfigError, Settings, load_settings
from passthrough.errors import NameInvalid
from passthrough.registry.routing import (
    check_name,
    route_name,
    upstream_credentials,
)

ENV = {
    "REGISTRY_URL": "http://127.0.0.1:5000",
    "UPSTREAMS": "hub=https://registry-1.docker.io,ghcr=https://ghcr.io,lab=http://10.1.2.3:5000",
}


def settings(**extra: str) -> Settings:
    return load_settings({**ENV, **extra}, env_file="/nonexistent")


@pytest.mark.parametrize(
    ("name", "ns", "url", "repository", "via"),
    [
        ("ghcr/org/app", None, "https://ghcr.io", "org/app", "alias"),
        ("hub/nginx", None, "https://registry-1.docker.io", "library/nginx", "alias"),
        ("hub/bitnami/redis", None, "https://registry-1.docker.io", "bitnami/redis", "alias"),
        ("lab/acc/plain", None, "http://10.1.2.3:5000", "acc/plain", "alias"),
        ("quay.io/coreos/etcd", None, "https://quay.io", "coreos/etcd", "host"),
        ("docker.io/nginx", None, "https://registry-1.docker.io", "library/nginx", "host"),
        ("localhost/app", None, "https://localhost", "app", "host"),
        # A host that an alias names keeps that alias's scheme (a plain-HTTP lab).
        ("10.1.2.3:5000/acc/plain", None, "http://10.1.2.3:5000", "acc/plain", "host"),
        ("acc/plain", None, "http://127.0.0.1:5000", "acc/plain", "default"),
        ("library/nginx", None, "http://127.0.0.1:5000", "library/nginx", "default"),
        ("acc/plain", "ghcr.io", "https://ghcr.io", "acc/plain", "ns"),
        ("acc/plain", "10.1.2.3:5000", "http://10.1.2.3:5000", "acc/plain", "ns"),
        ("nginx", "docker.io", "https://registry-1.docker.io", "library/nginx", "ns"),
        ("acc/plain", "registry.example:8443", "https://registry.example:8443", "acc/plain", "ns"),
        # An alias alone is a repository of the default upstream, not an empty name.
        ("ghcr", None, "http://127.0.0.1:5000", "ghcr", "default"),
    ],
)
def test_routes(name: str, ns: str | None, url: str, repository: str, via: str) -> None:
    route = route_name(settings(), name, ns)
    assert (route.upstream.url, route.repository, route.via) == (url, repository, via)
    assert route.name == name


def test_default_docker_hub_adds_library() -> None:
    route = route_name(load_settings({}, env_file="/nonexistent"), "nginx")
    assert route.upstream.is_docker_hub and route.repository == "library/nginx"


def test_default_namespace_applies_to_the_default_upstream() -> None:
    route = route_name(settings(REGISTRY_DEFAULT_NAMESPACE="team"), "api")
    assert route.repository == "team/api"


@pytest.mark.parametrize(
    "name", ["", "UPPER/case", "a//b", "a/../b", "-lead/x", "ghcr/Bad", "a" * 600, "ex ample/x"]
)
def test_bad_names_are_name_invalid(name: str) -> None:
    with pytest.raises(NameInvalid):
        route_name(settings(), name)


@pytest.mark.parametrize(
    "name", ["10.1.2.3:5000/acc/plain", "127.0.0.1:5000/app", "[::1]:5000/a/b", "acc/plain"]
)
def test_check_name_takes_a_host_with_a_port_as_route_name_does(name: str) -> None:
    """The web layer checks a name (check_name) before it routes it: a host:port first
    component must pass there too, or /v2/127.0.0.1:5000/app/manifests/v1 would be
    NAME_INVALID although route_name knows where it goes."""
    assert check_name(name) == name
    route_name(settings(), name)


@pytest.mark.parametrize("name", ["127.0.0.1:5000", "bad host:1/app", "h:5000/UPPER", "h:x:1/a"])
def test_check_name_still_refuses_bad_names_with_a_colon(name: str) -> None:
    with pytest.raises(NameInvalid):
        check_name(name)


def test_bad_ns_is_name_invalid() -> None:
    with pytest.raises(NameInvalid):
        route_name(settings(), "acc/plain", "bad host!")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("hub", "is not alias=url"),
        ("Hub!=https://x.io", "must be a lowercase name"),
        ("a=https://x.io,a=https://y.io", "given twice"),
        ("a=ftp://x.io", "must use http or https"),
        ("v2=https://x.io", "must be a lowercase name"),
    ],
)
def test_bad_upstreams(value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings({"UPSTREAMS": value}, env_file="/nonexistent")


def test_auth_file_gives_the_service_identity_per_host(tmp_path: Path) -> None:
    auth = base64.b64encode(b"robot:s3cret").decode()
    path = tmp_path / "auth.json"
    path.write_text(
        json.dumps(
            {
                "auths": {
                    "ghcr.io": {"auth": auth},
                    "https://index.docker.io/v1/": {"username": "hubuser", "password": "pw"},
                }
            }
        )
    )
    current = settings(REGISTRY_AUTH_FILE=str(path))
    ghcr = upstream_credentials(current, route_name(current, "ghcr/org/app").upstream)
    hub = upstream_credentials(current, route_name(current, "hub/nginx").upstream)
    lab = upstream_credentials(current, route_name(current, "lab/x").upstream)
    assert ghcr is not None and (ghcr.username, ghcr.password) == ("robot", "s3cret")
    assert hub is not None and hub.username == "hubuser"
    assert lab is None
    assert "s3cret" not in repr(current) and "s3cret" not in repr(ghcr)


def test_registry_username_means_registry_url_only() -> None:
    current = settings(REGISTRY_USERNAME="me", REGISTRY_PASSWORD="pw")
    default = upstream_credentials(current, route_name(current, "acc/x").upstream)
    other = upstream_credentials(current, route_name(current, "ghcr/acc/x").upstream)
    assert default is not None and default.username == "me"
    assert other is None


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "is not JSON"),
        ('{"auths": 1}', "has no \"auths\" object"),
        ('{"auths": {"ghcr.io": {"auth": "%%%"}}}', "not base64"),
        ('{"auths": {"ghcr.io": {}}}', "has no credentials"),
    ],
)
def test_bad_auth_files(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "auth.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message) as caught:
        settings(REGISTRY_AUTH_FILE=str(path))
    assert "%%%" not in str(caught.value)


def test_missing_auth_file() -> None:
    with pytest.raises(ConfigError, match="cannot be read"):
        settings(REGISTRY_AUTH_FILE="/nonexistent/auth.json")


def test_users_of_the_hosted_area_leave_the_proxy_transparent(tmp_path: Path) -> None:
    """HTPASSWD_FILE turns authentication on, not PROXY_MODE=authenticated: proxied
    names still go upstream with the service's identity, cached reads stay shared."""
    from passthrough.registry.proxy import Proxy
    from passthrough.upstream.auth import Credentials, TokenCache
    from passthrough.upstream.netguard import HostPolicy
    from passthrough.upstream.target import AuthKind
    from tests.support.stores import filesystem_store

    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text("")
    current = settings(
        HTPASSWD_FILE=str(htpasswd),
        PUBLIC_URL="http://127.0.0.1:8080",
        TOKEN_SECRET="s" * 20,
        REGISTRY_USERNAME="robot",
        REGISTRY_PASSWORD="pw",
    )
    assert current.auth_enabled and not current.uses_client_identity
    proxy = Proxy(current, filesystem_store(tmp_path / "c", 0), TokenCache(),
                  HostPolicy())
    target = proxy.target(route_name(current, "acc/plain"), None)
    assert target.auth is AuthKind.CREDENTIALS and target.credentials_source == "environment"
    authenticated = settings(
        PROXY_MODE="authenticated", PUBLIC_URL="http://127.0.0.1:8080", TOKEN_SECRET="s" * 20
    )
    own = Proxy(authenticated, proxy.store, TokenCache(), HostPolicy()).target(
        route_name(authenticated, "acc/plain"), Credentials("alice", "x")
    )
    assert own.credentials_source == "client"
