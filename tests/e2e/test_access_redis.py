"""The failed-login limiter shared through a real redis-server (so in the full tier; the
rest of check_access, and the limiter without Redis: tests/unit/test_access_hosted.py):
two workers count failures of one address together."""

from __future__ import annotations

import dataclasses
import secrets

import pytest

from passthrough.errors import TooManyLogins
from passthrough.registry.access import Gate, RedisLoginLimiter, check_access

# files and transparent are the fixtures of the unit module, shared (imported by name).
from tests.unit.test_access_hosted import basic, fail_login, files, transparent  # noqa: F401


def test_redis_shares_the_count_between_workers(transparent, redis_server):  # noqa: F811
    settings = dataclasses.replace(transparent, redis_url=redis_server.url)
    # Two workers (or replicas): five failures on each make ten for the address.
    first, second = Gate.create(settings), Gate.create(settings)
    assert isinstance(first.limiter, RedisLoginLimiter)
    client = f"198.18.{secrets.randbelow(256)}.{secrets.randbelow(256)}"
    for n in range(10):
        fail_login(first if n % 2 else second, settings, client)
    for gate in (first, second):
        with pytest.raises(TooManyLogins) as caught:
            check_access(settings, None, basic("alice"), "team/app", gate=gate, client=client)
        assert 1 <= int(caught.value.headers["Retry-After"]) <= 60
    # Another address logs in.
    other = check_access(
        settings, None, basic("alice"), "team/app", gate=first, client="192.0.2.99"
    )
    assert other.user == "alice"
