"""A simulated fleet of unicorns putting per-minute aggregates on the stream.

Each unicorn is the producer's model (produce/model.py): a minute aggregate is 60 of its
once-a-second readings, Distance summed, min and max of the points kept. Simulated minutes pass
faster than real ones (`rate` a second), so a demo fills the table quickly.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from wildrydes_stream.produce.model import NAMES, Unicorn
from wildrydes_stream.records import status_time_to_epoch_ms

__all__ = ["NAMES", "Fleet", "Unicorn"]


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
