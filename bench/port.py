"""The workshop's Kinesis Data Analytics SQL application, ported straight to aiobotocore: the
aggregator's baseline.

    SELECT STREAM "Name", FLOOR(ROWTIME TO MINUTE) AS "StatusTime", SUM("Distance"),
           MIN("MagicPoints"), MAX("MagicPoints"), MIN("HealthPoints"), MAX("HealthPoints")
    FROM "SOURCE_SQL_STREAM_001" GROUP BY "Name", FLOOR(ROWTIME TO MINUTE)

Shard after shard: GetRecords, json.loads each reading, group by name and minute (of the
reading's StatusTime, parsed with strptime, as the service groups by event time), and
PutRecords the windows a unicorn's watermark has closed (its latest StatusTime less the same
allowed lateness as the service's default, so both put the same windows). No checkpoints, no
state kept anywhere, duplicates counted twice: the least a port does.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from aiobotocore.session import get_session

LATENESS = timedelta(seconds=60)
MINUTE = timedelta(minutes=1)


class _Window:
    __slots__ = ("distance", "max_health", "max_magic", "min_health", "min_magic")

    def __init__(self, reading: dict[str, Any]) -> None:
        self.distance = reading["Distance"]
        self.min_magic = self.max_magic = reading["MagicPoints"]
        self.min_health = self.max_health = reading["HealthPoints"]

    def add(self, reading: dict[str, Any]) -> None:
        self.distance += reading["Distance"]
        self.min_magic = min(self.min_magic, reading["MagicPoints"])
        self.max_magic = max(self.max_magic, reading["MagicPoints"])
        self.min_health = min(self.min_health, reading["HealthPoints"])
        self.max_health = max(self.max_health, reading["HealthPoints"])


def _record(name: str, minute: datetime, w: _Window) -> dict[str, Any]:
    body = {
        "Name": name,
        "StatusTime": minute.strftime("%Y-%m-%d %H:%M:%S.000"),
        "Distance": w.distance,
        "MinMagicPoints": w.min_magic,
        "MaxMagicPoints": w.max_magic,
        "MinHealthPoints": w.min_health,
        "MaxHealthPoints": w.max_health,
    }
    return {"Data": json.dumps(body, separators=(",", ":")).encode(), "PartitionKey": name}


async def run_port(
    source: str, output: str, limit: int, on_read: Callable[[int], None]
) -> dict[str, int]:
    """Read `source` to its end, putting closed windows on `output`; `on_read(n)` after each
    page with the readings read so far."""
    read = put = 0
    windows: dict[str, dict[datetime, _Window]] = {}
    latest: dict[str, datetime] = {}
    session = get_session()
    async with session.create_client("kinesis") as kinesis:

        async def put_records(records: list[dict[str, Any]]) -> None:
            await asyncio.gather(
                *(
                    kinesis.put_records(StreamName=output, Records=records[k : k + 500])
                    for k in range(0, len(records), 500)
                )
            )

        shards = (await kinesis.list_shards(StreamName=source))["Shards"]
        for shard in shards:
            iterator = (
                await kinesis.get_shard_iterator(
                    StreamName=source, ShardId=shard["ShardId"], ShardIteratorType="TRIM_HORIZON"
                )
            )["ShardIterator"]
            while iterator:
                response = await kinesis.get_records(ShardIterator=iterator, Limit=limit)
                records = response["Records"]
                if not records and response.get("MillisBehindLatest", 0) == 0:
                    break
                closed: list[dict[str, Any]] = []
                for record in records:
                    reading = json.loads(record["Data"])
                    name = reading["Name"]
                    at = datetime.strptime(reading["StatusTime"], "%Y-%m-%d %H:%M:%S.%f")
                    minute = at.replace(second=0, microsecond=0)
                    own = windows.setdefault(name, {})
                    window = own.get(minute)
                    if window is None:
                        own[minute] = _Window(reading)
                    else:
                        window.add(reading)
                    if at > latest.get(name, at - MINUTE):
                        latest[name] = at
                    watermark = latest[name] - LATENESS
                    for start in [s for s in own if s + MINUTE <= watermark]:
                        closed.append(_record(name, start, own.pop(start)))
                if closed:
                    await put_records(closed)
                    put += len(closed)
                read += len(records)
                on_read(read)
                iterator = response.get("NextShardIterator")
    return {"read": read, "put": put}


def clock(total: int, marks: dict[str, float], fraction: float = 0.1) -> Callable[[int], None]:
    """An `on_read` that notes the CPU seconds (process_time) when `fraction` of `total` and
    when all of it have been read, in `marks` ("first", "last")."""

    def on_read(read: int) -> None:
        if "first" not in marks and read >= fraction * total:
            marks["first"], marks["first_read"] = time.process_time(), read
        if "last" not in marks and read >= total:
            marks["last"], marks["last_read"] = time.process_time(), read

    return on_read
