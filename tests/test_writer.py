"""The writer slot: one writing transaction per database, waits in Python, no self-waits."""

from __future__ import annotations

import asyncio
import threading

import pytest
from sqlalchemy.util import greenlet_spawn

from evals_orm import DatabaseError
from evals_orm._writer import WriterSlot


def test_a_free_slot_is_taken_and_the_holder_takes_it_again() -> None:
    """try_acquire takes a free slot; the same holder and owner may take it again."""
    slot, holder, owner = WriterSlot(), object(), object()
    assert slot.try_acquire(holder, owner)
    assert slot.try_acquire(holder, owner)


def test_another_owner_does_not_get_the_slot_until_it_is_released() -> None:
    """A second owner is refused without waiting, and its waiter is woken by the release."""
    slot, first, second = WriterSlot(), object(), object()
    woken: list[str] = []
    assert slot.try_acquire(first, "a")
    assert not slot.try_acquire(second, "b")
    slot.notify_on_release(lambda: woken.append("b"))
    assert [] == woken
    slot.release(second)  # not the holder: nothing happens
    assert [] == woken
    slot.release(first)
    assert ["b"] == woken
    assert slot.try_acquire(second, "b")


def test_the_same_owner_through_another_connection_fails_at_once() -> None:
    """An owner that already writes through one connection cannot wait for itself."""
    slot = WriterSlot()
    assert slot.try_acquire(object(), "a")
    with pytest.raises(DatabaseError, match="commit it first"):
        slot.acquire(object(), "a")


def test_one_shared_connection_of_another_owner_is_another_writer() -> None:
    """An in-memory database's one connection, used by another thread, waits its turn."""
    slot, shared = WriterSlot(), object()
    assert slot.try_acquire(shared, "a")
    assert not slot.try_acquire(shared, "b")


def test_acquire_waits_for_the_release_by_another_thread() -> None:
    """acquire blocks until the holder of another thread releases, then takes the slot."""
    slot, first, second = WriterSlot(), object(), object()
    slot.acquire(first, "a")
    taken = threading.Event()

    def wait() -> None:
        slot.acquire(second, "b")
        taken.set()

    thread = threading.Thread(target=wait)
    thread.start()
    assert not taken.wait(0.2)
    slot.release(first)
    assert taken.wait(10)
    thread.join()


def test_a_task_cancelled_as_the_slot_is_released_stays_cancelled() -> None:
    """Cancelled in the same turn as the release that wakes it, a waiting task does not take it.

    (``asyncio.wait_for`` before Python 3.12 returned the woken wait and
    dropped the cancellation: the task went on to write.)
    """
    slot, first, second = WriterSlot(), object(), object()

    async def main() -> tuple[bool, bool]:
        slot.acquire(first, "a")
        waiting = asyncio.create_task(greenlet_spawn(slot.acquire, second, "b"))
        for _ in range(3):  # let it start waiting
            await asyncio.sleep(0)
        slot.release(first)
        waiting.cancel()
        await asyncio.wait((waiting,), timeout=10)
        return waiting.cancelled(), slot.try_acquire(first, "a")

    assert (True, True) == asyncio.run(main())
