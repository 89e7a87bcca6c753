"""The outbound connection policy: allowlist patterns and refused addresses."""

from __future__ import annotations

import pytest

from passthrough.config import parse_allowlist
from passthrough.errors import Forbidden
from passthrough.upstream.netguard import HostPolicy, trusted_hosts


@pytest.mark.parametrize(
    "address",
    ["169.254.169.254", "169.254.0.1", "fe80::1", "fd00:ec2::254", "::ffff:169.254.169.254"],
)
def test_link_local_and_metadata_addresses_are_refused(address):
    with pytest.raises(Forbidden) as raised:
        HostPolicy().check_address("some.host", address)
    assert raised.value.status == 403
    HostPolicy(allow_link_local=True).check_address("some.host", address)


@pytest.mark.parametrize("address", ["127.0.0.1", "10.1.2.3", "::1", "8.8.8.8", "fd00:ec2::253"])
def test_ordinary_addresses_pass(address):
    HostPolicy().check_address("some.host", address)


def test_allowlist_patterns_and_trusted_hosts():
    policy = HostPolicy(
        allowlist=parse_allowlist("ghcr.io, *.docker.io registry.internal:5000 127.0.0.1:*"),
        trusted=trusted_hosts(["http://env-registry:5000", None]),
    )
    for host, port in [
        ("ghcr.io", 443),
        ("auth.docker.io", 443),
        ("registry.internal", 5000),
        ("127.0.0.1", 1234),
        ("env-registry", 5000),
        ("GHCR.IO", 443),
    ]:
        policy.check_host(host, port)
    for host, port in [
        ("evil.org", 443),
        ("docker.io.evil.org", 443),
        ("registry.internal", 5001),
        ("env-registry", 5001),
    ]:
        with pytest.raises(Forbidden):
            policy.check_host(host, port)
    HostPolicy().check_host("anything.example", 1)  # no allowlist: every host
