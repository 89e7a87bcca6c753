"""The hosted area's gc lock across replicas (:meth:`Flight.gc_lock` with a
:class:`RedisLease`), against a real redis-server (so in the full tier; with Redis
unreachable: tests/unit/test_gc_lock.py): a writer (gc) waits for a reader (a push) and
a reader for a writer, and a holder that stopped renewing (killed) lets the other in
once its lease runs out.

Two "hosts" are two Flights with lock directories of their own, so that only Redis
is shared between them. Every wait is on an event or a state seen in Redis, never a
sleep that hopes something has happened meanwhile; the only time that passes by
itself is a lease running out.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from passthrough.errors import StoreUnavailable
from passthrough.store.flight import Flight, RedisLease
from tests.support.redis_server import RedisServer
from tests.unit.test_gc_lock import lease_of

#: How long a test thread may take before the test fails (a bound, not a measurement).
JOIN = 30.0

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
