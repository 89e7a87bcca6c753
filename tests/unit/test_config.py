"""Settings: defaults, Docker Hub aliases, .env under the real environment, and
invalid values stopping start-up with the variable's name."""

from __future__ import annotations

import pytest

from passthrough.config import ConfigError, load_settings


def test_defaults_are_docker_hub():
    s = load_settings({"ENV_FILE": "/nonexistent"})
    assert s.registry.url == "https://registry-1.docker.io"
    assert s.registry.name == "docker.io"
    assert s.registry_auth_url == "https://auth.docker.io/token"
    assert s.registry_service == "registry.docker.io"
    assert s.client_auth == "optional"


@pytest.mark.parametrize(
    "alias", ["docker.io", "index.docker.io", "registry-1.docker.io", "https://index.docker.io/"]
)
def test_docker_hub_aliases(alias):
    s = load_settings({"REGISTRY_URL": alias, "ENV_FILE": "/nonexistent"})
    assert s.registry.is_docker_hub and s.registry_service == "registry.docker.io"


def test_env_file_is_read_and_real_environment_wins(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("REGISTRY_URL=http://from-file:5000\nREGISTRY_DEFAULT_NAMESPACE=team\n")
    s = load_settings({"ENV_FILE": str(env_file), "REGISTRY_URL": "http://real:5000"})
    assert s.registry.url == "http://real:5000"
    assert s.default_namespace == "team"


def test_token_alias_and_secrets_not_in_repr():
    s = load_settings(
        {
            "REGISTRY_TOKEN": "tok-secret",
            "REGISTRY_USERNAME": "u",
            "REGISTRY_PASSWORD": "pw-secret",
            "ENV_FILE": "/nonexistent",
        }
    )
    assert s.bearer_token == "tok-secret"
    assert "tok-secret" not in repr(s) and "pw-secret" not in repr(s)


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"REGISTRY_URL": "ftp://x"}, "REGISTRY_URL"),
        ({"REGISTRY_URL": "http://u:p@x"}, "REGISTRY_URL"),
        ({"REGISTRY_URL": "http://x/path"}, "REGISTRY_URL"),
        ({"REGISTRY_CLIENT_AUTH": "sometimes"}, "REGISTRY_CLIENT_AUTH"),
        ({"REGISTRY_USERNAME": "u"}, "REGISTRY_PASSWORD"),
        ({"REGISTRY_PASSWORD": "p"}, "REGISTRY_USERNAME"),
        ({"REGISTRY_DEFAULT_NAMESPACE": "Team"}, "REGISTRY_DEFAULT_NAMESPACE"),
        ({"LOG_LEVEL": "chatty"}, "LOG_LEVEL"),
        ({"REGISTRY_AUTH_URL": "not a url"}, "REGISTRY_AUTH_URL"),
        ({"UPSTREAM_READ_TIMEOUT": "soon"}, "UPSTREAM_READ_TIMEOUT"),
        ({"LAYER_CONCURRENCY": "0"}, "LAYER_CONCURRENCY"),
        ({"TEMP_DIR": "/does/not/exist"}, "TEMP_DIR"),
    ],
)
def test_invalid_values_name_the_variable(env, variable):
    with pytest.raises(ConfigError) as raised:
        load_settings({**env, "ENV_FILE": "/nonexistent"})
    assert variable in str(raised.value)
