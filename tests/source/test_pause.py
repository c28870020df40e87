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
from wildrydes_stream.source.pages import COALESCE_SECONDS, ReaderParts, ShardReader


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
        self._call_at = loop.call_at

    def __call__(self, when: float, callback: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self.asked.append(when)
        return self._call_at(when, callback, *args, **kwargs)


def spy_on(monkeypatch: pytest.MonkeyPatch) -> TimerSpy:
    loop = asyncio.get_running_loop()
    spy = TimerSpy(loop)
    monkeypatch.setattr(loop, "call_at", spy)
    return spy


async def test_idle_pauses_started_apart_end_on_one_grid_tick_near_what_was_asked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    timers = spy_on(monkeypatch)
    loop = asyncio.get_running_loop()
    wanted: list[float] = []

    async def pause_after(delay: float, shard: str) -> None:
        await asyncio.sleep(delay)
        wanted.append(loop.time() + 0.3)
        await reader(shard)._pause(0.3, coalesce=True)

    await asyncio.gather(*(pause_after(i * 0.007, f"shard-{i}") for i in range(5)))
    pauses = [w for w in timers.asked if w >= min(wanted) - COALESCE_SECONDS]  # not the sleeps
    assert len(pauses) == 5
    for when in pauses:  # on the grid ...
        assert abs(when / COALESCE_SECONDS - round(when / COALESCE_SECONDS)) < 1e-6
    # ... within half a tick of what each asked for, so started 7 ms apart they share ticks.
    for want, when in zip(sorted(wanted), sorted(pauses), strict=True):
        assert abs(when - want) <= COALESCE_SECONDS / 2 + 1e-6
    assert len(set(pauses)) < len(pauses)


async def test_a_busy_pause_is_not_moved_to_the_grid(monkeypatch: pytest.MonkeyPatch) -> None:
    timers = spy_on(monkeypatch)
    loop = asyncio.get_running_loop()
    before = loop.time()
    await reader("shard")._pause(0.013)
    [when] = [w for w in timers.asked if w >= before]
    assert before + 0.013 <= when <= loop.time()
    assert abs(when / COALESCE_SECONDS - round(when / COALESCE_SECONDS)) > 1e-9
