"""Idle pauses end on a shared grid, so idle shards wake (and call) in the same turn of the loop."""

from __future__ import annotations

import asyncio
import itertools

from wildrydes_stream.config import Settings
from wildrydes_stream.consumer.progress import ShardProgress
from wildrydes_stream.observability.metrics import Metrics
from wildrydes_stream.records.envelope import Envelope, ItemKey
from wildrydes_stream.source.pages import COALESCE_SECONDS, ShardReader


async def _dispatch(envelopes: list[Envelope]) -> None:
    del envelopes


async def _letters(letters: list[object]) -> None:
    del letters


def _decode(data: bytes) -> tuple[ItemKey, object]:
    return ("", ""), data


def reader(shard_id: str) -> ShardReader:
    return ShardReader(
        shard_id,
        Settings(),
        ShardProgress(shard_id),
        _dispatch,
        _letters,  # type: ignore[arg-type]
        Metrics(),
        asyncio.Event(),
        _decode,
    )


async def test_idle_pauses_started_apart_wake_together_near_what_was_asked() -> None:
    loop = asyncio.get_running_loop()
    woke: list[float] = []
    asked: list[float] = []

    async def pause_after(delay: float, shard: str) -> None:
        await asyncio.sleep(delay)
        asked.append(loop.time() + 0.3)
        await reader(shard)._pause(0.3, coalesce=True)
        woke.append(loop.time())

    await asyncio.gather(*(pause_after(i * 0.007, f"shard-{i}") for i in range(5)))
    # Asked 7 ms apart, they woke in at most two bursts (the asks may straddle the midpoint
    # between two ticks), not five ...
    ordered = sorted(woke)
    bursts = 1 + sum(1 for a, b in itertools.pairwise(ordered) if b - a > 0.004)
    assert bursts <= 2
    # ... each within half a tick (plus the loop's own lateness) of what it asked for.
    for want, got in zip(sorted(asked), sorted(woke), strict=True):
        assert abs(got - want) <= COALESCE_SECONDS / 2 + 0.02


async def test_a_busy_pause_is_not_moved_to_the_grid() -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    await reader("shard")._pause(0.013)
    assert 0.013 <= loop.time() - start < 0.013 + COALESCE_SECONDS / 2
