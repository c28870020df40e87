"""`aggregate` at a fleet's size: a thousand unicorns a shard, a split and a merge with late
readings on both sides, producers' duplicates, a unicorn whose clock is two hours ahead, and
names nobody expected. Every window must equal what its readings give, each reading once.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

from tests.aggregate.test_aggregate import (
    T0,
    Key,
    aggregating,
    dead_letters,
    metric,
    reading,
    reference,
    wait_output,
)
from tests.conftest import ReadMode
from tests.helpers import holds, put_records, wait_for
from wildrydes_stream.aggregate.readings import decode_reading
from wildrydes_stream.aggregate.windows import Emission, ShardWindows
from wildrydes_stream.config import Settings
from wildrydes_stream.consumer.state import held_by
from wildrydes_stream.records.routing import hash_key

FLEET = [f"unicorn-{i:04d}" for i in range(1000)] + ["Silver Blaze", "Épona", "a\r\nb", " "]
SKEWED = "Clockwork"
"""A unicorn whose clock runs two hours ahead of everyone else's."""
MIDDLE = 2**127


def minute_of(names: Iterable[str], minute: int, seconds: Iterable[int], seed: int) -> list[Any]:
    rng = random.Random(seed)
    return [
        reading(
            name,
            T0 + timedelta(minutes=minute, seconds=second, milliseconds=rng.randint(0, 999)),
            rng.randint(0, 40),
            rng.randint(20, 200),
            rng.randint(20, 200),
        )
        for second in seconds
        for name in names
    ]


def skewed(minute: int) -> list[Any]:
    return [
        reading(SKEWED, T0 + timedelta(hours=2, minutes=minute, seconds=s), 7, 150, 150)
        for s in range(0, 60, 10)
    ]


def once(readings: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The readings as counted: the first of each (Name, StatusTime)."""
    seen: dict[tuple[str, str], dict[str, Any]] = {}
    for r in readings:
        seen.setdefault((r["Name"], r["StatusTime"]), r)
    return list(seen.values())


def emitted(emissions: Iterable[Emission]) -> dict[Key, Any]:
    return {(e.name, str(e.start_ms)): e.values for e in emissions}


def test_one_unicorns_clock_never_moves_anothers_windows() -> None:
    """A unicorn two hours ahead, put first: nobody else's readings are late or refused, and
    every window comes out with exactly its readings."""
    names = FLEET[:300]
    readings = skewed(0) + minute_of(names, 0, range(0, 60, 5), 1)
    readings += minute_of(names, 1, range(0, 60, 5), 2)
    windows = ShardWindows("shardId-0", 60_000, 10_000, 3_600_000)
    out: list[Emission] = []
    for raw in readings:
        added = windows.add(decode_reading(json.dumps(raw).encode())[1], 0.0)
        assert not added.refused, raw["Name"]
        assert not added.late, raw["Name"]
        out += added.emissions
    for name in [*names, SKEWED]:
        out += windows.idle(name)
    expected = {
        (r["Name"], str(_start_ms(r["StatusTime"]))): r for r in reference(readings).values()
    }
    assert set(emitted(out)) == set(expected)
    for key, values in emitted(out).items():
        assert values.distance == expected[key]["Distance"], key
        assert values.min_magic == expected[key]["MinMagicPoints"], key


def test_a_reading_put_twice_counts_once() -> None:
    first = minute_of(FLEET[:50], 0, range(0, 60, 5), 3)
    twice = first + random.Random(4).sample(first, 200)
    windows = ShardWindows("shardId-0", 60_000, 10_000, 3_600_000)
    duplicates = 0
    for raw in twice:
        added = windows.add(decode_reading(json.dumps(raw).encode())[1], 0.0)
        duplicates += added.duplicate
    assert duplicates == 200
    out = emitted(e for name in FLEET[:50] for e in windows.idle(name))
    for (name, _), values in out.items():
        assert values.distance == sum(r["Distance"] for r in first if r["Name"] == name)


def test_a_split_gives_each_child_exactly_its_unicorns_windows() -> None:
    windows = ShardWindows("parent", 60_000, 10_000, 3_600_000)
    for raw in minute_of(FLEET, 0, (0, 30), 5):
        windows.add(decode_reading(json.dumps(raw).encode())[1], 0.0)
    state = windows.entries()
    lower = held_by(("0", str(MIDDLE - 1)), state)
    upper = held_by((str(MIDDLE), str(2**128 - 1)), state)
    assert lower.keys() | upper.keys() == state.keys()
    assert not lower.keys() & upper.keys()
    assert all(hash_key(name) < MIDDLE for name, _ in lower)
    merged = ShardWindows("merged", 60_000, 10_000, 3_600_000)
    merged.restore([lower, upper])
    assert merged.entries() == state


async def test_a_fleet_through_a_split_and_a_merge_with_late_readings_and_duplicates(
    settings: Settings, kinesis: Any, read_mode: ReadMode
) -> None:
    from tests.aggregate.test_aggregate import aggregate_settings
    from wildrydes_stream.admin.provision import ensure_stream

    s = aggregate_settings(settings, idle_window_timeout_seconds=2.0, late_horizon_seconds=600.0)
    s = await read_mode.apply(s, s.raw_stream_name)
    await ensure_stream(kinesis, s.raw_stream_name, 1)
    await ensure_stream(kinesis, s.stream_name, 1)
    raw = s.raw_stream_name
    rng = random.Random(6)
    put: list[dict[str, Any]] = []

    async def send(readings: list[dict[str, Any]]) -> list[dict[str, Any]]:
        put.extend(readings)
        return await put_records(kinesis, raw, readings)

    async def resharded() -> None:
        """Wait until the stream is ACTIVE again."""

        async def active() -> bool:
            summary = await kinesis.describe_stream_summary(StreamName=raw)
            return bool(summary["StreamDescriptionSummary"]["StreamStatus"] == "ACTIVE")

        await wait_for(active, timeout=30)

    async with aggregating(s) as aggregator:
        # Minute 0 of a thousand unicorns, a few put twice, and one two hours ahead.
        minute0 = minute_of(FLEET, 0, range(0, 50, 10), 10)
        await send(skewed(0) + minute0 + rng.sample(minute0, 300))
        [parent] = [x["ShardId"] for x in (await kinesis.list_shards(StreamName=raw))["Shards"]]
        await wait_for(
            holds(lambda: metric(aggregator, "wildrydes_checkpoints_total", shard=parent) > 0),
            timeout=60,
        )
        await kinesis.split_shard(
            StreamName=raw, ShardToSplit=parent, NewStartingHashKey=str(MIDDLE)
        )
        await resharded()
        # Minute 1 on the children, with minute 0's late readings (after its windows were put).
        minute1 = minute_of(FLEET, 1, range(0, 60, 10), 11)
        late0 = minute_of(rng.sample(FLEET, 300), 0, (55,), 12)
        results = await send(minute1 + late0 + rng.sample(minute1, 300) + skewed(1))
        children = sorted({r["ShardId"] for r in results} - {parent})
        assert len(children) == 2, children
        await wait_for(
            holds(
                lambda: all(
                    metric(aggregator, "wildrydes_checkpoints_total", shard=c) > 0 for c in children
                )
            ),
            timeout=60,
        )
        await kinesis.merge_shards(
            StreamName=raw, ShardToMerge=children[0], AdjacentShardToMerge=children[1]
        )
        await resharded()
        # Minute 2 on the merged shard, late readings of minutes 0 and 1, duplicates.
        minute2 = minute_of(FLEET, 2, range(0, 60, 10), 13)
        late = minute_of(rng.sample(FLEET, 300), 0, (57,), 14)
        late += minute_of(rng.sample(FLEET, 300), 1, (58,), 15)
        await send(minute2 + late + rng.sample(minute0 + minute1, 300) + skewed(2))

        await wait_output(kinesis, s.stream_name, reference(once(put)), timeout=120)
    assert not dead_letters(s)


def _start_ms(status_time: str) -> int:
    from wildrydes_stream.records.fields import status_time_to_epoch_ms

    return status_time_to_epoch_ms(status_time)
