"""The hosted area's gc lock across replicas (:meth:`Flight.gc_lock` with a
:class:`RedisLease`) with Redis unreachable: a push goes on while gc refuses to delete
(one line naming Redis by host and port, never the password). Against a real
redis-server (readers and writers on two hosts, leases running out) in the full tier:
tests/e2e/test_gc_lock.py.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from passthrough import create_app
from passthrough.cli import main
from passthrough.config import load_settings
from passthrough.errors import StoreUnavailable
from passthrough.store.flight import Flight, RedisLease
from tests.support.helpers import digest
from tests.support.procs import free_port
from tests.unit.test_gc import Rig, build_garbage

#: Long enough never to run out while a test holds the lock on purpose.
LONG_LEASE = 30.0


def lease_of(url: str, namespace: str, *, lease: float = LONG_LEASE) -> RedisLease:
    return RedisLease(url, lease_seconds=lease, namespace=namespace, poll=0.01, rw_max_wait=60)


# -- Redis unreachable -------------------------------------------------------------------


@pytest.fixture
def dead_redis_url() -> Iterator[tuple[str, str]]:
    """A URL with a password to a port where nothing listens, and the password."""
    password = "gc-lock-" + uuid.uuid4().hex
    yield f"redis://:{password}@127.0.0.1:{free_port()}/0", password


def test_redis_down_a_push_goes_on_and_gc_refuses(
    dead_redis_url: tuple[str, str],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    url, password = dead_redis_url
    flight = Flight(tmp_path / "a", lease_of(url, "passthrough:down"))
    caplog.set_level(logging.WARNING, logger="passthrough.store.flight")
    for _ in range(3):
        with flight.gc_lock(exclusive=False):
            pass
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1, warnings
    assert "pushing without the cross-replica lock" in warnings[0]
    port = url.rsplit(":", 1)[1].split("/")[0]
    assert f"127.0.0.1:{port}" in warnings[0] and password not in warnings[0]
    with pytest.raises(StoreUnavailable) as raised:
        with flight.gc_lock(exclusive=True):
            raise AssertionError("gc got in without Redis")
    message = str(raised.value)
    assert f"redis at 127.0.0.1:{port}" in message and password not in message
    assert "does not delete" in message


def test_redis_down_pushes_succeed_and_the_command_exits_2_deleting_nothing(
    dead_redis_url: tuple[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: Any,
) -> None:
    url, password = dead_redis_url
    rig = Rig(tmp_path / "cache")
    build_garbage(rig)
    # A server with the same store and REDIS_URL: its pushes work without Redis.
    settings = load_settings(
        {"CACHE_DIR": str(tmp_path / "cache"), "REDIS_URL": url}, env_file="/nonexistent"
    )
    client = create_app(
        {"SETTINGS": replace(settings, hosted_repositories=("team/*",))}
    ).test_client()
    data = b"pushed while redis is down"
    pushed = client.post(f"/v2/team/app/blobs/uploads/?digest={digest(data)}", data=data)
    assert pushed.status_code == 201, pushed.data
    before = rig.snapshot()

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("REDIS_URL", url)
    assert main(["gc", "--grace", "0s", "--delete"]) == 2
    captured = capsys.readouterr()
    port = url.rsplit(":", 1)[1].split("/")[0]
    assert captured.err.count("\n") == 1, captured.err
    assert captured.err.startswith(f"passthrough gc: redis at 127.0.0.1:{port} failed")
    assert password not in captured.err + captured.out
    assert rig.snapshot() == before, "gc deleted without its lock"
    # The dry run needs no lock: it deletes nothing.
    assert main(["gc", "--grace", "0s"]) == 0
    assert "would remove manifest" in capsys.readouterr().out
    with contextlib.suppress(KeyError):
        monkeypatch.delenv("REDIS_URL")
    assert main(["gc", "--grace", "0s", "--delete"]) == 0  # without Redis: the flock only
    assert rig.snapshot() != before
