"""The pod-wide transfer slots (one file, an OFD lock per slot) and the free-space check.
No process is started: the slots are taken by threads of this one, which OFD locks keep
apart exactly as they keep workers apart (classic POSIX locks would not)."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from passthrough.capacity import SLOTS_FILE_ENV, TransferSlots, check_free_space, create_slot_file
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
