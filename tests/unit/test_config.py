"""Settings: defaults, Docker Hub aliases, .env under the real environment, and
invalid values stopping start-up with the variable's name; each command checking what it
uses; gunicorn.conf.py reading its variables the same way."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import replace
from pathlib import Path

import pytest

from passthrough.capacity import TRANSFER_RESERVE
from passthrough.cli import main
from passthrough.config import ConfigError, ServerSettings, Settings, load_settings
from passthrough.config.rules import DEFAULT_CACHE_DIR


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


def test_otel_protocol_is_checked_once_in_the_settings():
    assert load_settings({"ENV_FILE": "/nonexistent"}).otel_protocol == "grpc"
    s = load_settings({"OTEL_EXPORTER_OTLP_PROTOCOL": "HTTP/protobuf", "ENV_FILE": "/nonexistent"})
    assert s.otel_protocol == "http/protobuf"
    with pytest.raises(ConfigError, match="OTEL_EXPORTER_OTLP_PROTOCOL must be one of grpc, "):
        load_settings({"OTEL_EXPORTER_OTLP_PROTOCOL": "udp", "ENV_FILE": "/nonexistent"})


def test_each_default_is_the_tables(tmp_path):
    """Settings() and load_settings of an empty environment agree (but the derived
    Docker Hub token service), so no default is written twice."""
    loaded = load_settings({"ENV_FILE": "/nonexistent"})
    underived = replace(loaded, registry_auth_url=None, registry_service=None, cache_dir=None)
    assert underived == Settings()
    # The filesystem store's directory when CACHE_DIR is unset: under the working directory.
    assert loaded.cache_dir == os.path.abspath(DEFAULT_CACHE_DIR)


def test_gc_checks_the_store_only_and_the_server_the_token_service(tmp_path, monkeypatch, capsys):
    """gc issues no token: HTPASSWD_FILE without PUBLIC_URL is no reason to refuse it;
    the server (load_settings' default concerns, check-config) still refuses."""
    users = tmp_path / "htpasswd"
    users.write_text("")
    monkeypatch.chdir(tmp_path)
    for name in ("STORE", "S3_BUCKET", "PUBLIC_URL", "TOKEN_SECRET", "PROXY_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HTPASSWD_FILE", str(users))
    assert main(["gc"]) == 0
    assert capsys.readouterr().out.startswith("dry run: would remove 0 manifests")
    with pytest.raises(ConfigError, match="PUBLIC_URL is required with HTPASSWD_FILE"):
        load_settings()
    assert main(["check-config"]) == 2
    assert "PUBLIC_URL is required with HTPASSWD_FILE" in capsys.readouterr().err


def test_gc_still_needs_a_complete_store(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("STORE", "s3")
    monkeypatch.delenv("S3_BUCKET", raising=False)
    assert main(["gc"]) == 2
    assert "S3_BUCKET is required with STORE=s3" in capsys.readouterr().err


GUNICORN_CONF = Path(__file__).resolve().parents[2] / "gunicorn.conf.py"


def load_gunicorn_conf(monkeypatch, tmp_path, **env):
    """Execute gunicorn.conf.py as gunicorn does (a module from a file) in tmp_path."""
    monkeypatch.chdir(tmp_path)
    for name in (
        "WEB_CONCURRENCY", "GUNICORN_THREADS", "GRACEFUL_TIMEOUT", "BIND", "LOG_LEVEL",
        "HEALTH_BIND", "MAX_TRANSFERS", "MAX_CONCURRENT_DOWNLOADS",
    ):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    spec = importlib.util.spec_from_file_location("gunicorn_conf_under_test", GUNICORN_CONF)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gunicorn_reads_env_file_under_the_environment(tmp_path, monkeypatch):
    (tmp_path / ".env").write_text("WEB_CONCURRENCY=5\nGUNICORN_THREADS=7\nLOG_LEVEL=debug\n")
    conf = load_gunicorn_conf(monkeypatch, tmp_path, GUNICORN_THREADS="9")
    assert (conf.workers, conf.threads, conf.loglevel) == (5, 9, "debug")
    assert conf.graceful_timeout == ServerSettings().graceful_timeout == 120
    assert conf.bind == ["0.0.0.0:8080"]  # the probe port is the probe server's (when_ready)


def test_gunicorn_sizes_threads_so_one_worker_holds_every_transfer(tmp_path, monkeypatch):
    conf = load_gunicorn_conf(monkeypatch, tmp_path)
    assert conf.threads == 512 + TRANSFER_RESERVE
    assert conf.worker_connections > conf.threads
    assert conf.worker_class == "passthrough.web.worker.PassthroughWorker"
    conf = load_gunicorn_conf(monkeypatch, tmp_path, MAX_CONCURRENT_DOWNLOADS="100")
    assert conf.threads == 100 + TRANSFER_RESERVE, "the old name is read as MAX_TRANSFERS"
    conf = load_gunicorn_conf(monkeypatch, tmp_path, HEALTH_BIND="off", MAX_TRANSFERS="0")
    assert conf.bind == ["0.0.0.0:8080"]
    assert conf.threads == 512 + TRANSFER_RESERVE, "0: the default"


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("WEB_CONCURRENCY", "two", "WEB_CONCURRENCY must be a whole number, got 'two'"),
        ("WEB_CONCURRENCY", "0", "WEB_CONCURRENCY must be at least 1, got '0'"),
        ("GRACEFUL_TIMEOUT", "-1", "GRACEFUL_TIMEOUT must be a whole number, got '-1'"),
        ("LOG_LEVEL", "chatty", "LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL"),
    ],
)
def test_a_bad_gunicorn_variable_stops_start_up_in_one_line(
    tmp_path, monkeypatch, name, value, message
):
    with pytest.raises(SystemExit) as stopped:
        load_gunicorn_conf(monkeypatch, tmp_path, **{name: value})
    text = str(stopped.value.code)
    assert text.startswith(f"passthrough: configuration error: {message}")
    assert "\n" not in text
