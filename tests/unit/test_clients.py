"""The client's address behind a trusted proxy (TRUSTED_PROXIES): what X-Forwarded-For
may say, and who says it."""

from __future__ import annotations

from pathlib import Path

import pytest

from passthrough.config import ConfigError, load_settings, parse_networks
from passthrough.web.clients import ClientAddress
from tests.unit.test_token_users import basic, make_app, user_files

INGRESS = ("10.0.0.0/8", "fd00::/8")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return user_files(tmp_path_factory.mktemp("clients"))


def client_of(peer: str, forwarded_for: str | None) -> str:
    return ClientAddress(lambda environ, start: [], INGRESS).client_of(peer, forwarded_for)


@pytest.mark.parametrize(
    ("peer", "forwarded_for", "client"),
    [
        # No proxy in between: the peer, whatever the header says.
        ("203.0.113.5", "198.51.100.1", "203.0.113.5"),
        ("203.0.113.5", None, "203.0.113.5"),
        # The ingress forwards for its client.
        ("10.1.2.3", "198.51.100.1", "198.51.100.1"),
        # A client writing its own header: the ingress appends the real address, and
        # only what trusted hops appended counts.
        ("10.1.2.3", "192.0.2.66, 198.51.100.1", "198.51.100.1"),
        # Two trusted hops (a load balancer, then the ingress).
        ("10.1.2.3", "198.51.100.1, 10.9.9.9", "198.51.100.1"),
        # Every hop trusted: the leftmost (a client inside the cluster).
        ("10.1.2.3", "10.4.4.4, 10.9.9.9", "10.4.4.4"),
        # Garbage to the left of the trusted hops: the last good one.
        ("10.1.2.3", "unknown, 10.9.9.9", "10.9.9.9"),
        ("10.1.2.3", "198.51.100.1, not-an-ip", "10.1.2.3"),
        # A trusted peer with no header: the peer.
        ("10.1.2.3", "", "10.1.2.3"),
        # Ports and brackets as some proxies write them; IPv6 and IPv4-mapped peers.
        ("10.1.2.3", "198.51.100.1:51234", "198.51.100.1"),
        ("10.1.2.3", "[2001:db8::7]:443", "2001:db8::7"),
        ("fd00::5", "2001:db8::7", "2001:db8::7"),
        ("::ffff:10.1.2.3", "198.51.100.1", "198.51.100.1"),
        ("::ffff:203.0.113.5", "198.51.100.1", "::ffff:203.0.113.5"),
    ],
)
def test_the_client_is_the_first_untrusted_hop_from_the_right(peer, forwarded_for, client):
    assert client_of(peer, forwarded_for) == client


def test_trusted_proxies_are_parsed_and_bad_ones_named():
    assert parse_networks("10.0.0.0/8, 192.0.2.7 fd00::/8") == (
        "10.0.0.0/8",
        "192.0.2.7/32",
        "fd00::/8",
    )
    assert parse_networks("") == ()
    settings = load_settings({"ENV_FILE": "/nonexistent", "TRUSTED_PROXIES": "10.1.0.0/16"})
    assert settings.trusted_proxies == ("10.1.0.0/16",)
    with pytest.raises(ConfigError, match="TRUSTED_PROXIES has 'ingress', which is not"):
        load_settings({"ENV_FILE": "/nonexistent", "TRUSTED_PROXIES": "10.0.0.0/8,ingress"})


def _v2(app, forwarded_for: str, password: str | None = None, peer: str = "10.1.2.3"):
    return app.test_client().get(
        "/v2/",
        headers={"Authorization": basic("alice", password), "X-Forwarded-For": forwarded_for},
        environ_base={"REMOTE_ADDR": peer},
    )


def test_behind_the_ingress_one_clients_failures_lock_out_that_client_only(files):
    app = make_app(files, TRUSTED_PROXIES="10.0.0.0/8")
    for _ in range(10):
        assert _v2(app, "198.51.100.1", "guess").status_code == 401
    assert _v2(app, "198.51.100.1").status_code == 429
    # Naming someone else at the left of the header does not help.
    assert _v2(app, "192.0.2.99, 198.51.100.1").status_code == 429
    # Other clients behind the same ingress still log in.
    assert _v2(app, "198.51.100.2").status_code == 200


def test_without_trusted_proxies_the_header_is_ignored(files):
    app = make_app(files)
    for number in range(10):
        assert _v2(app, f"198.51.100.{number}", "guess").status_code == 401
    # Ten different forwarded addresses from one peer: one address, limited.
    assert _v2(app, "198.51.100.200").status_code == 429
