"""The pod-wide transfer slots (one file, an OFD lock per slot) and the free-space check.
No process is started: the slots are taken by threads of this one, which OFD locks keep
apart exactly as they keep workers apart (classic POSIX locks would not)."""

from __future__ import annotations

import fcntl
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from passthrough import capacity
from passthrough.capacity import (
    SLOTS_FILE_ENV,
    TransferSlots,
    check_free_space,
    count_proc_locks,
    create_slot_file,
)
from passthrough.errors import InsufficientStorage, TooBusy


@pytest.fixture
def slot_file():
    path = create_slot_file()
    yield path
    os.unlink(path)


def test_slots_refuse_beyond_capacity_with_retry_after(slot_file):
    slots = TransferSlots(2, slot_file)
    first, second = slots.acquire(), slots.acquire()
    with pytest.raises(TooBusy) as raised:
        slots.acquire()
    assert raised.value.status == 503
    assert raised.value.headers["Retry-After"].isdigit()
    assert "2 transfers" in raised.value.message
    first.release()
    third = slots.acquire()
    assert slots.in_use() == 2
    for transfer in (second, third):
        transfer.release()
    assert slots.in_use() == 0


def test_release_is_idempotent(slot_file):
    slots = TransferSlots(1, slot_file)
    transfer = slots.acquire()
    transfer.release()
    transfer.release()
    assert not transfer.held
    slots.acquire().release()


def test_two_handles_on_one_file_share_the_slots(slot_file):
    """Each worker makes its own TransferSlots on the master's file: they share it."""
    one, other = TransferSlots(3, slot_file), TransferSlots(3, slot_file)
    held = [one.acquire(), other.acquire(), one.acquire()]
    with pytest.raises(TooBusy):
        other.acquire()
    assert one.in_use() == other.in_use() == 3
    for transfer in held:
        transfer.release()


def test_in_use_reads_the_kernels_lock_table_or_asks_each_byte(slot_file, monkeypatch):
    """/metrics counts the slots in one read of /proc/locks (not one fcntl per slot,
    each a wait for the GIL under load); without it, byte by byte, the same count."""
    one, other = TransferSlots(64, slot_file), TransferSlots(64, slot_file)
    held = [one.acquire() for _ in range(5)] + [other.acquire() for _ in range(3)]
    fd = os.open(slot_file, os.O_RDONLY)
    try:
        assert count_proc_locks(os.fstat(fd), 64) == 8
        assert count_proc_locks(os.fstat(fd), 64, table="/nonexistent") is None
    finally:
        os.close(fd)
    real = capacity.count_proc_locks
    monkeypatch.setattr(capacity, "count_proc_locks", lambda st, n: real(st, n, "/nonexistent"))
    assert one.in_use() == 8
    for transfer in held:
        transfer.release()
    assert one.in_use() == 0


def test_a_worker_takes_the_slot_it_gave_back_first(slot_file, monkeypatch):
    """Acquire tries this process's freed slots first, then scans from past its last
    one: a call or two, not a probe through every slot the pod holds (each fcntl lets go
    of the GIL, and under load each costs a wait for it)."""
    slots, other = TransferSlots(16, slot_file), TransferSlots(16, slot_file)
    mine = [slots.acquire() for _ in range(6)]
    theirs = [other.acquire() for _ in range(9)]
    mine[2].release()
    calls: list[int] = []
    real = fcntl.fcntl

    def counted(fd: int, command: int, arg: bytes) -> bytes:
        calls.append(command)
        return real(fd, command, arg)

    monkeypatch.setattr(fcntl, "fcntl", counted)
    again = slots.acquire()
    assert calls == [fcntl.F_OFD_SETLK]
    monkeypatch.undo()
    assert slots.in_use() == 15
    for transfer in [again, *mine, *theirs]:
        transfer.release()
    assert slots.in_use() == 0


def test_concurrent_threads_get_exactly_the_free_slots(slot_file):
    slots = TransferSlots(50, slot_file)
    start = threading.Barrier(80)

    def take() -> object:
        start.wait()
        try:
            return slots.acquire()
        except TooBusy:
            return None

    with ThreadPoolExecutor(80) as pool:
        results = list(pool.map(lambda _: take(), range(80)))
    held = [r for r in results if r is not None]
    assert len(held) == 50
    assert slots.in_use() == 50
    for transfer in held:
        transfer.release()  # type: ignore[attr-defined]
    assert slots.in_use() == 0


def test_a_closed_descriptor_gives_the_slot_back(slot_file):
    """What a SIGKILL does to a worker's slots: the kernel closes its descriptors."""
    slots = TransferSlots(1, slot_file)
    transfer = slots.acquire()
    os.close(transfer._fd)  # type: ignore[arg-type]  # as the kernel would on exit
    transfer._fd = None
    slots.acquire().release()


def test_for_pod_takes_the_masters_file(slot_file, monkeypatch):
    monkeypatch.setenv(SLOTS_FILE_ENV, slot_file)
    assert TransferSlots.for_pod(4).path == slot_file
    monkeypatch.delenv(SLOTS_FILE_ENV)
    private = TransferSlots.for_pod(4)
    assert private.path != slot_file and os.path.exists(private.path)
    private.acquire().release()


def test_free_space_check(tmp_path):
    check_free_space(str(tmp_path), 1)
    with pytest.raises(InsufficientStorage) as raised:
        check_free_space(str(tmp_path), 1 << 62)
    assert raised.value.status == 507
