"""The byte bound's line of waiting readers: woken only as many at a time as pages fit."""

from __future__ import annotations

from wildrydes_stream.runtime.budget import MAX_PAGE_BYTES, ByteBudget


async def test_a_page_given_back_wakes_one_waiter_and_room_for_two_wakes_two() -> None:
    budget = ByteBudget(4 * MAX_PAGE_BYTES)
    for _ in range(4):
        budget.take(budget.page_bytes)  # four pages in flight: the bound is full
    assert not budget.room.is_set()
    waiters = [budget.waiter() for _ in range(5)]
    budget.give_back(budget.page_bytes)
    assert [w.done() for w in waiters] == [True, False, False, False, False]
    budget.give_back(2 * budget.page_bytes)  # room for three now; one is already woken
    assert [w.done() for w in waiters] == [True, True, True, True, False]


async def test_a_woken_waiter_that_left_passes_its_turn_on() -> None:
    budget = ByteBudget(4 * MAX_PAGE_BYTES)
    budget.take(4 * budget.page_bytes)
    first, second = budget.waiter(), budget.waiter()
    first.cancel()  # its reader was cancelled while waiting: skipped
    budget.give_back(budget.page_bytes)
    assert second.done()
    third = budget.waiter()
    budget.wake_waiters()  # `second` woke but halted instead of taking the page
    assert third.done()
