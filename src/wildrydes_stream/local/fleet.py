"""A simulated fleet of unicorns putting per-minute aggregates on the stream.

Follows the workshop producer: each second a unicorn's Distance is a per-run base in
[100, 199] plus 0..19, and its magic and health points start at 150 and move by -1, 0 or +1.
A minute aggregate sums Distance and keeps the min and max of the points. Simulated minutes
pass faster than real ones (`rate` a second), so a demo fills the table quickly.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from wildrydes_stream.records import status_time_to_epoch_ms

NAMES = (
    "Shadowfax",
    "Rocinante",
    "Bucephalus",
    "Pegasus",
    "Epona",
    "Artax",
    "Brego",
    "Silver",
    "Trigger",
    "Binky",
    "Falada",
    "Sleipnir",
)


@dataclass
class Unicorn:
    name: str
    rng: random.Random
    base: int = 0
    magic: int = 150
    health: int = 150

    def __post_init__(self) -> None:
        self.base = self.rng.randint(100, 199)

    def minute(self, start: datetime) -> dict[str, Any]:
        """One minute of once-a-second readings, aggregated."""
        distance = 0
        magic_seen, health_seen = [], []
        for _ in range(60):
            distance += self.base + self.rng.randint(0, 19)
            self.magic += self.rng.choice((-1, 0, 1))
            self.health += self.rng.choice((-1, 0, 1))
            magic_seen.append(self.magic)
            health_seen.append(self.health)
        return {
            "Name": self.name,
            "StatusTime": start.strftime("%Y-%m-%d %H:%M:%S.000"),
            "Distance": distance,
            "MinMagicPoints": min(magic_seen),
            "MaxMagicPoints": max(magic_seen),
            "MinHealthPoints": min(health_seen),
            "MaxHealthPoints": max(health_seen),
        }


@dataclass
class Fleet:
    kinesis: Any
    stream: str
    unicorns: int = 6
    rate: float = 20.0
    seed: int | None = None
    produced: set[tuple[str, int]] = field(default_factory=set)
    """(Name, StatusTime in epoch ms) of every record Kinesis accepted."""

    async def run(self, stop: asyncio.Event) -> None:
        rng = random.Random(self.seed)
        herd = [
            Unicorn(NAMES[i % len(NAMES)] + ("" if i < len(NAMES) else f"-{i}"), rng)
            for i in range(self.unicorns)
        ]
        minute = datetime.now(UTC).replace(second=0, microsecond=0)
        period = 1.0 / self.rate
        next_tick = time.monotonic()
        while not stop.is_set():
            records = [unicorn.minute(minute) for unicorn in herd]
            await self._put(records)
            minute += timedelta(minutes=1)
            next_tick += period
            try:
                await asyncio.wait_for(stop.wait(), max(0.0, next_tick - time.monotonic()))
            except TimeoutError:
                continue

    async def _put(self, records: list[dict[str, Any]]) -> None:
        pending = records
        for attempt in range(10):
            response = await self.kinesis.put_records(
                StreamName=self.stream,
                Records=[
                    {
                        "Data": json.dumps(r, separators=(",", ":")).encode(),
                        "PartitionKey": r["Name"],
                    }
                    for r in pending
                ],
            )
            failed = []
            for record, result in zip(pending, response["Records"], strict=True):
                if "ErrorCode" in result:
                    failed.append(record)
                else:
                    epoch = status_time_to_epoch_ms(record["StatusTime"])
                    self.produced.add((record["Name"], epoch))
            if not failed:
                return
            pending = failed
            await asyncio.sleep(min(1.0, 0.05 * 2**attempt))
