"""The per-worker download cap and the free-space check."""

from __future__ import annotations

import pytest

from passthrough.capacity import DownloadSlots, check_free_space
from passthrough.errors import InsufficientStorage, TooBusy


def test_slots_refuse_beyond_capacity_with_retry_after():
    slots = DownloadSlots(2)
    slots.acquire()
    slots.acquire()
    with pytest.raises(TooBusy) as raised:
        slots.acquire()
    assert raised.value.status == 503
    assert raised.value.headers["Retry-After"].isdigit()
    slots.release()
    slots.acquire()
    assert slots.in_use == 2


@pytest.mark.parametrize(
    ("threads", "configured", "capacity"),
    [(16, 0, 14), (8, 0, 6), (16, 4, 4), (8, 50, 6), (2, 0, 1), (1, 0, 1)],
)
def test_cap_stays_below_the_thread_count(threads, configured, capacity):
    slots = DownloadSlots(100)
    slots.fit_to_threads(threads, configured)
    assert slots.capacity == capacity


def test_free_space_check(tmp_path):
    check_free_space(str(tmp_path), 1)
    with pytest.raises(InsufficientStorage) as raised:
        check_free_space(str(tmp_path), 1 << 62)
    assert raised.value.status == 507
