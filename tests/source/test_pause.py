"""Idle pauses end on a shared grid, so idle shards wake (and call) in the same turn of the loop.

The timers the pauses ask the loop for are recorded, so what is checked is the decision itself,
not how late a loaded machine runs them."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from wildrydes_stream.config import Settings
from wildrydes_stream.consumer.progress import ShardProgress
from wildrydes_stream.observability.metrics import Metrics
from wildrydes_stream.records.envelope import Envelope, ItemKey
from wildrydes_stream.source.pages import ReaderParts, ShardReader, coalesce_grid


async def _dispatch(envelopes: list[Envelope]) -> None:
    del envelopes


async def _letters(letters: list[object]) -> None:
    del letters


def _decode(data: bytes) -> tuple[ItemKey, object]:
    return ("", ""), data


def reader(shard_id: str) -> ShardReader:
    parts = ReaderParts(
        Settings(),
        _dispatch,
        _letters,  # type: ignore[arg-type]
        Metrics(),
        asyncio.Event(),
        _decode,
    )
    return ShardReader(shard_id, parts, ShardProgress(shard_id))


class TimerSpy:
    """Records the `when` of every `call_at` the pauses make (and still schedules them)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.asked: list[float] = []
        self.asked_at: list[float] = []  # the loop's time when each was asked for
        self._loop = loop
        self._call_at = loop.call_at

    def __call__(self, when: float, callback: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self.asked.append(when)
        self.asked_at.append(self._loop.time())
        return self._call_at(when, callback, *args, **kwargs)


def spy_on(monkeypatch: pytest.MonkeyPatch) -> TimerSpy:
    loop = asyncio.get_running_loop()
    spy = TimerSpy(loop)
    monkeypatch.setattr(loop, "call_at", spy)
    return spy


GRID = coalesce_grid(0.3)


def test_the_grid_is_a_quarter_of_the_pause_within_its_bounds() -> None:
    assert coalesce_grid(1.0) == 0.25  # the default idle pause: four wake-ups a second
    assert coalesce_grid(0.2) == 0.05
    assert coalesce_grid(0.3) == pytest.approx(0.075)
    assert coalesce_grid(0.01) == 0.05
    assert coalesce_grid(30.0) == 0.25


async def test_idle_pauses_started_apart_end_on_one_grid_tick_near_what_was_asked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    readers = [reader(f"shard-{i}") for i in range(5)]  # built before, so not timed
    timers = spy_on(monkeypatch)
    start = asyncio.get_running_loop().time()

    async def pause_after(delay: float, shard: ShardReader) -> None:
        await asyncio.sleep(delay)
        await shard._pause(0.3, coalesce=True)

    await asyncio.gather(*(pause_after(i * 0.007, r) for i, r in enumerate(readers)))
    asked = [
        (at, when)
        for at, when in zip(timers.asked_at, timers.asked, strict=True)
        if when > start + 0.2
    ]  # the pauses, not the sleeps
    assert len(asked) == 5
    pauses = [when for _, when in asked]
    for when in pauses:  # on the grid ...
        assert abs(when / GRID - round(when / GRID)) < 1e-6
    # ... within half a tick of what each asked for (the pause read the clock a moment before the
    # spy did, hence the 5 ms), so started 7 ms apart they share ticks.
    for at, when in asked:
        assert -GRID / 2 - 0.005 <= when - (at + 0.3) <= GRID / 2 + 1e-6
    assert len(set(pauses)) < len(pauses)


async def test_a_busy_pause_is_not_moved_to_the_grid(monkeypatch: pytest.MonkeyPatch) -> None:
    timers = spy_on(monkeypatch)
    loop = asyncio.get_running_loop()
    before = loop.time()
    await reader("shard")._pause(0.013)
    [when] = [w for w in timers.asked if w >= before]
    assert before + 0.013 <= when <= loop.time()
    assert abs(when / GRID - round(when / GRID)) > 1e-9
