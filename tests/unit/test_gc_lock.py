"""The hosted area's gc lock across replicas (:meth:`Flight.gc_lock` with a
:class:`RedisLease`), against a real redis-server: a writer (gc) waits for a reader (a
push) and a reader for a writer, a holder that stopped renewing (killed) lets the
other in once its lease runs out, and with Redis unreachable a push goes on while gc
refuses to delete (one line naming Redis by host and port, never the password).

Two "hosts" are two Flights with lock directories of their own, so that only Redis
is shared between them. Every wait is on an event or a state seen in Redis, never a
sleep that hopes something has happened meanwhile; the only time that passes by
itself is a lease running out.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import uuid
from collections.abc import Callable, Iterator
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
from tests.support.redis_server import RedisServer
from tests.unit.test_gc import Rig, build_garbage

#: Long enough never to run out while a test holds the lock on purpose.
LONG_LEASE = 30.0
#: How long a test thread may take before the test fails (a bound, not a measurement).
JOIN = 30.0


def lease_of(url: str, namespace: str, *, lease: float = LONG_LEASE) -> RedisLease:
    return RedisLease(url, lease_seconds=lease, namespace=namespace, poll=0.01, rw_max_wait=60)


class NoRenewal(RedisLease):
    """A holder that never renews its lease: as one killed right after it got in."""

    def _renew(self, *args: Any, **kwargs: Any) -> None:
        return None


@pytest.fixture
def namespace() -> str:
    return f"passthrough:test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def redis_up(redis_server: RedisServer) -> RedisServer:
    return redis_server.ensure_running()


def watch(lease: RedisLease, method: str, when: Callable[[Any], bool]) -> threading.Event:
    """An event set the first time ``lease.client.<method>`` returns something ``when``
    accepts: the proof that a waiter has seen the other side and is waiting."""
    seen = threading.Event()
    original = getattr(lease.client, method)

    def watched(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        if method == "scan_iter":
            result = list(result)
        if when(result):
            seen.set()
        return result

    setattr(lease.client, method, watched)
    return seen


def run(target: Callable[[], None]) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def body() -> None:
        try:
            target()
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread, errors


def joined(thread: threading.Thread, errors: list[BaseException]) -> None:
    thread.join(JOIN)
    assert not thread.is_alive(), "a lock holder or waiter did not finish"
    assert not errors, errors


def test_a_writer_waits_for_a_reader_on_another_host(
    redis_up: RedisServer, namespace: str, tmp_path: Path
) -> None:
    push_host = Flight(tmp_path / "a", lease_of(redis_up.url, namespace))
    gc_lease = lease_of(redis_up.url, namespace)
    gc_host = Flight(tmp_path / "b", gc_lease)
    waited = watch(gc_lease, "scan_iter", bool)  # a SCAN found a reader's key
    order: list[str] = []
    in_push, leave_push = threading.Event(), threading.Event()

    def push() -> None:
        with push_host.gc_lock(exclusive=False):
            order.append("push in")
            in_push.set()
            leave_push.wait(JOIN)
            order.append("push out")

    def gc() -> None:
        with gc_host.gc_lock(exclusive=True) as held:
            held.check()
            order.append("gc in")

    pusher = run(push)
    assert in_push.wait(JOIN)
    collector = run(gc)
    assert waited.wait(JOIN), "gc never saw the push's key"
    # gc holds the writer's key (no new push gets in) and waits for this one.
    assert redis_up.client().exists(f"{namespace}:gc:writer")
    assert order == ["push in"]
    leave_push.set()
    joined(*pusher)
    joined(*collector)
    assert order == ["push in", "push out", "gc in"]
    assert not list(redis_up.client().scan_iter(match=f"{namespace}:*"))


def test_a_reader_waits_for_a_writer_on_another_host(
    redis_up: RedisServer, namespace: str, tmp_path: Path
) -> None:
    push_lease = lease_of(redis_up.url, namespace)
    push_host = Flight(tmp_path / "a", push_lease)
    gc_host = Flight(tmp_path / "b", lease_of(redis_up.url, namespace))
    backed_off = watch(push_lease, "exists", bool)  # the push saw the writer's key
    order: list[str] = []
    in_gc, leave_gc = threading.Event(), threading.Event()

    def gc() -> None:
        with gc_host.gc_lock(exclusive=True):
            order.append("gc in")
            in_gc.set()
            leave_gc.wait(JOIN)
            order.append("gc out")

    def push() -> None:
        with push_host.gc_lock(exclusive=False):
            order.append("push in")

    collector = run(gc)
    assert in_gc.wait(JOIN)
    pusher = run(push)
    assert backed_off.wait(JOIN), "the push never saw gc's key"
    assert order == ["gc in"]
    leave_gc.set()
    joined(*collector)
    joined(*pusher)
    assert order == ["gc in", "gc out", "push in"]
    assert not list(redis_up.client().scan_iter(match=f"{namespace}:*"))


def test_a_killed_reader_blocks_gc_only_until_its_lease_runs_out(
    redis_up: RedisServer, namespace: str, tmp_path: Path
) -> None:
    # The push got in, then its replica died: its key is never renewed nor deleted.
    dead_host = Flight(
        tmp_path / "a", NoRenewal(redis_up.url, lease_seconds=1.0, namespace=namespace)
    )
    gc_lease = lease_of(redis_up.url, namespace)
    gc_host = Flight(tmp_path / "b", gc_lease)
    waited = watch(gc_lease, "scan_iter", bool)
    in_push, gc_in = threading.Event(), threading.Event()
    never = threading.Event()

    def dead_push() -> None:
        with dead_host.gc_lock(exclusive=False):
            in_push.set()
            never.wait(JOIN)  # "killed": it never leaves while gc waits

    def gc() -> None:
        with gc_host.gc_lock(exclusive=True) as held:
            held.check()
            gc_in.set()

    pusher = run(dead_push)
    assert in_push.wait(JOIN)
    collector = run(gc)
    assert waited.wait(JOIN), "gc never saw the push's key"
    joined(*collector)  # the key expired: gc got in while the dead push is still "in"
    assert gc_in.is_set() and not never.is_set()
    never.set()
    joined(*pusher)


def test_a_killed_gc_blocks_pushes_only_until_its_lease_runs_out(
    redis_up: RedisServer, namespace: str, tmp_path: Path
) -> None:
    dead_gc = Flight(
        tmp_path / "a", NoRenewal(redis_up.url, lease_seconds=1.0, namespace=namespace)
    )
    push_lease = lease_of(redis_up.url, namespace)
    push_host = Flight(tmp_path / "b", push_lease)
    backed_off = watch(push_lease, "exists", bool)
    in_gc, never = threading.Event(), threading.Event()

    def killed_gc() -> None:
        with dead_gc.gc_lock(exclusive=True):
            in_gc.set()
            never.wait(JOIN)

    collector = run(killed_gc)
    assert in_gc.wait(JOIN)

    def push() -> None:
        with push_host.gc_lock(exclusive=False):
            pass

    pushed = run(push)
    assert backed_off.wait(JOIN), "the push never saw gc's key"
    joined(*pushed)  # the key expired: the push got in while the dead gc is still "in"
    assert not never.is_set()
    never.set()
    joined(*collector)


def test_gc_stops_deleting_when_its_lease_may_have_run_out(
    redis_up: RedisServer, namespace: str, tmp_path: Path
) -> None:
    """Renewals failing (here: never made) make ``check()`` raise before the key can
    have expired in Redis, so gc's next delete does not happen."""
    flight = Flight(tmp_path / "a", NoRenewal(redis_up.url, lease_seconds=1.0, namespace=namespace))
    with flight.gc_lock(exclusive=True) as held:
        held.check()
        with pytest.raises(StoreUnavailable, match=r"gc lost its lock in redis at 127\.0\.0\.1:"):
            while True:  # until two thirds of the lease went by without a renewal
                held.check()
                threading.Event().wait(0.05)


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
