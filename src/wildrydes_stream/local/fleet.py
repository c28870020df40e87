"""A simulated fleet for `local`: raw readings on the `wildrydes` stream, and what they mean.

Each unicorn is the producer's model (produce/model.py), one reading a simulated second;
simulated time runs `speed` times faster than real time, so a demo fills the table quickly.
Every reading Kinesis accepted is also folded into `expected`: the per-minute aggregates the
pipeline must end with in the table, computed here the obvious way.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from wildrydes_stream.produce.model import NAMES, Reading, Unicorn, status_time
from wildrydes_stream.produce.packing import ShardMap, pack

__all__ = ["NAMES", "Expected", "RawFleet", "Unicorn"]

MinuteKey = tuple[str, str]
"""(Name, StatusTime of the minute's start)."""


@dataclass
class Expected:
    """Per unicorn and minute: Distance summed, min and max of the points."""

    minutes: dict[MinuteKey, dict[str, int]] = field(default_factory=dict)
    readings: int = 0

    def add(self, reading: Reading) -> None:
        self.readings += 1
        start = status_time(reading.status_time.replace(second=0, microsecond=0))
        window = self.minutes.get((reading.name, start))
        if window is None:
            self.minutes[(reading.name, start)] = {
                "Distance": reading.distance,
                "MinMagicPoints": reading.magic_points,
                "MaxMagicPoints": reading.magic_points,
                "MinHealthPoints": reading.health_points,
                "MaxHealthPoints": reading.health_points,
            }
            return
        window["Distance"] += reading.distance
        window["MinMagicPoints"] = min(window["MinMagicPoints"], reading.magic_points)
        window["MaxMagicPoints"] = max(window["MaxMagicPoints"], reading.magic_points)
        window["MinHealthPoints"] = min(window["MinHealthPoints"], reading.health_points)
        window["MaxHealthPoints"] = max(window["MaxHealthPoints"], reading.health_points)


@dataclass
class RawFleet:
    kinesis: Any
    stream: str
    unicorns: int = 6
    speed: float = 60.0
    """Simulated seconds per real second."""
    seed: int | None = None
    kpl: int = 1
    """Readings packed into one Kinesis record in the KPL's aggregate format (1: plain)."""
    expected: Expected = field(default_factory=Expected)
    _shards: ShardMap | None = None

    async def run(self, stop: asyncio.Event) -> None:
        rng = random.Random(self.seed)
        herd = [
            Unicorn(NAMES[i % len(NAMES)] + ("" if i < len(NAMES) else f"-{i}"), rng)
            for i in range(self.unicorns)
        ]
        start = datetime.now(UTC).replace(microsecond=0)
        began = time.monotonic()
        tick = 0
        while not stop.is_set():
            at = start + timedelta(seconds=tick)
            await self._put([unicorn.reading(at) for unicorn in herd])
            tick += 1
            due = began + tick / self.speed - time.monotonic()
            if due > 0:
                try:
                    await asyncio.wait_for(stop.wait(), due)
                except TimeoutError:
                    continue

    async def _put(self, readings: list[Reading]) -> None:
        """PutRecords until every reading is in (the emulator does not throttle, but a busy
        one may refuse a few entries)."""
        if self.kpl > 1 and self._shards is None:
            self._shards = await ShardMap.of(self.kinesis, self.stream)
        pending = readings
        for attempt in range(20):
            if self._shards is not None:
                packed = pack(pending, self.kpl, self._shards)
                entries = [p.entry() for p in packed]
                groups = [list(p.readings) for p in packed]
            else:
                entries = [{"Data": r.encode(), "PartitionKey": r.name} for r in pending]
                groups = [[r] for r in pending]
            response = await self.kinesis.put_records(StreamName=self.stream, Records=entries)
            failed = []
            for group, result in zip(groups, response["Records"], strict=True):
                if "ErrorCode" in result:
                    failed += group
                else:
                    for reading in group:
                        self.expected.add(reading)
            if not failed:
                return
            pending = failed
            await asyncio.sleep(min(1.0, 0.05 * 2**attempt))
