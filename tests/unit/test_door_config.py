"""The door out of the box: the default store, `passthrough check-config` reporting every
problem at once (bad values and broken combinations), and the start-up summary, which
never shows a secret."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import pytest

from passthrough.cli import main
from passthrough.config import VARIABLES, load_settings, settings_problems
from passthrough.config.rules import DEFAULT_CACHE_DIR
from passthrough.config.summary import size_text, summary, summary_lines, without_userinfo
from passthrough.config.table import SETTINGS_VARIABLES

SENTINEL = "door-Sentinel-value-0123456789"
# bcrypt of a throwaway password (`htpasswd -nbB -C 4`).
USERS = "alice:$2y$04$AO48Zy6uktwkwoe5.Q0AwOPcXMZyTOvs73x5NF6eTolhDgE/4jQRi\n"


@pytest.fixture
def here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory of its own and an environment without passthrough's settings."""
    monkeypatch.chdir(tmp_path)
    for variable in VARIABLES:
        for name in (variable.name, *variable.aliases):
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ENV_FILE", str(tmp_path / "none.env"))
    return tmp_path


def test_the_default_is_a_capped_store_under_the_working_directory(here: Path, capsys: Any) -> None:
    settings = load_settings()
    assert settings.store == "filesystem" and settings.cache_max_bytes == 20 << 30
    assert settings.cache_dir == str(here / DEFAULT_CACHE_DIR)
    assert main(["check-config"]) == 0
    out = capsys.readouterr().out
    assert f"store: filesystem {here / DEFAULT_CACHE_DIR}, 20 GiB" in out
    assert "/v2: on" in out and "hosted: none" in out
    assert (here / DEFAULT_CACHE_DIR).is_dir(), "check-config makes the directory, as start-up"


def test_store_off_is_no_store(here: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STORE", "off")
    monkeypatch.setenv("CACHE_DIR", str(here / "ignored"))
    settings = load_settings()
    assert settings.cache_dir is None
    assert "store: off" in "\n".join(summary_lines(settings))
    assert "/v2: off" in "\n".join(summary_lines(settings))


def test_check_config_reports_every_problem_at_once(
    here: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    users = here / "htpasswd"
    users.write_text(USERS)
    for name, value in {
        "LOG_FORMAT": "xml",  # a bad value
        "TOKEN_TTL": "1",  # another
        "STORE": "off",
        "HOSTED_REPOSITORIES": "team/*",  # hosted without a store
        "HTPASSWD_FILE": str(users),  # users without PUBLIC_URL nor TOKEN_SECRET
        "TLS_CERT_FILE": str(users),  # a certificate without its key
        "REGISTRY_USERNAME": "someone",  # half a credential
    }.items():
        monkeypatch.setenv(name, value)
    assert main(["check-config"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "configuration error: 7 problems"
    problems = "\n".join(err[1:])
    for named in (
        "LOG_FORMAT", "TOKEN_TTL", "REGISTRY_PASSWORD must be set together",
        "HOSTED_REPOSITORIES needs the content store", "PUBLIC_URL is required with HTPASSWD_FILE",
        "TOKEN_SECRET is required with HTPASSWD_FILE", "TLS_CERT_FILE and TLS_KEY_FILE",
    ):  # fmt: skip
        assert named in problems, named
    assert all(line.startswith("  - ") for line in err[1:]) and len(err) == 8


def test_a_combination_naming_a_bad_variable_is_left_out(here: Path) -> None:
    """HTPASSWD_FILE that is no file is one problem, not also "hosted needs users"."""
    env = {"HTPASSWD_FILE": str(here / "missing"), "HOSTED_REPOSITORIES": "team/*"}
    found = settings_problems({**env, "ENV_FILE": str(here / "none.env")})
    assert len(found) == 1 and "HTPASSWD_FILE" in found[0] and "is not a file" in found[0]


def test_start_up_stops_with_every_problem_on_one_line(here: Path) -> None:
    with pytest.raises(ValueError) as raised:
        load_settings({"LOG_FORMAT": "xml", "TOKEN_TTL": "1", "ENV_FILE": "none.env"})
    assert "\n" not in str(raised.value)
    assert "LOG_FORMAT" in str(raised.value) and "TOKEN_TTL" in str(raised.value)


def test_the_summary_never_shows_a_secret(here: Path) -> None:
    users = here / "htpasswd"
    users.write_text(USERS)
    auth = here / "auth.json"
    token = base64.b64encode(f"robot:{SENTINEL}".encode()).decode()
    auth.write_text(json.dumps({"auths": {"ghcr.io": {"auth": token}}}))
    env = {
        "ENV_FILE": "none.env",
        "REGISTRY_URL": "https://registry.example.com",
        "REGISTRY_USERNAME": f"user-{SENTINEL}",
        "REGISTRY_PASSWORD": SENTINEL,
        "TOKEN_SECRET": SENTINEL,
        "REDIS_URL": f"redis://:{SENTINEL}@redis.example.com:6379/0",
        "REGISTRY_AUTH_FILE": str(auth),
        "HTPASSWD_FILE": str(users),
        "PUBLIC_URL": "https://door.example.com",
        "HOSTED_REPOSITORIES": "team/*",
        "UPSTREAMS": "ghcr=https://ghcr.io",
        "TLS_SELF_SIGNED": "true",
    }
    secrets = {v.name for v in SETTINGS_VARIABLES if v.secret} | {"REDIS_URL"}
    assert secrets <= set(env) | {"REGISTRY_BEARER_TOKEN"}, "every secret is set here"
    text = summary(load_settings(env))
    assert SENTINEL not in text
    assert "hosted: team/*" in text and "users from" in text and "Redis" in text
    assert "tls: self-signed for localhost,127.0.0.1" in text
    assert "ghcr=https://ghcr.io" in text and "REGISTRY_AUTH_FILE for 1 host" in text
    bearer = summary(load_settings({"ENV_FILE": "none.env", "REGISTRY_BEARER_TOKEN": SENTINEL}))
    assert SENTINEL not in bearer and "as REGISTRY_BEARER_TOKEN" in bearer


def test_the_summary_helpers() -> None:
    assert size_text(20 << 30) == "20 GiB" and size_text(1536) == "1536 bytes"
    assert size_text(3 << 20) == "3 MiB"
    assert without_userinfo("https://u:p@h.example:5000/x") == "https://h.example:5000/x"
    assert without_userinfo("http://h") == "http://h"


def test_nothing_is_made_when_the_settings_are_read(here: Path) -> None:
    load_settings()
    assert not os.path.exists(here / DEFAULT_CACHE_DIR), "only the store's opening makes it"
