"""Shared test helpers: AWS clients on the emulators, putting records, reading the table."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from aiobotocore.session import get_session

from wildrydes_stream.local.fleet import Unicorn
from wildrydes_stream.runtime.budget import ByteBudget

SHARED_DATA = Path(
    os.environ.get("WILDRYDES_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared/data")
)
SHADOWFAX = SHARED_DATA / "shadowfax-2016-02-12.json"


def read_shadowfax() -> list[dict[str, Any]]:
    with SHADOWFAX.open() as handle:
        return [json.loads(line) for line in handle if line.strip()]


@functools.cache
def _unicorn_day() -> tuple[dict[str, Any], ...]:
    if SHADOWFAX.exists():
        return tuple(read_shadowfax())
    # A clone without the workshop data beside it: the same day from the producer model.
    unicorn = Unicorn("Shadowfax", random.Random(20160212))
    start = datetime(2016, 2, 12, tzinfo=UTC)
    return tuple(unicorn.minute(start + timedelta(minutes=m)) for m in range(1440))


def unicorn_day() -> list[dict[str, Any]]:
    """One day of Shadowfax's aggregates: the workshop's real records when they are beside
    the checkout (../shared/data), else the same shape from the simulated fleet's model."""
    return list(_unicorn_day())


@asynccontextmanager
async def client(service: str) -> AsyncIterator[Any]:
    """A client for the endpoint the environment points at (the emulators, in tests)."""
    async with get_session().create_client(service, region_name="us-east-1") as c:
        yield c


async def put_records(
    kinesis: Any, stream: str, records: Iterable[bytes | dict[str, Any]], *, key: str = "Name"
) -> list[dict[str, Any]]:
    """PutRecords in batches of 500, partition key from the record; returns the results."""
    entries = []
    for record in records:
        if isinstance(record, dict):
            data = json.dumps(record, separators=(",", ":")).encode()
            partition = str(record.get(key, "none"))
        else:
            data, partition = record, "raw"
        entries.append({"Data": data, "PartitionKey": partition})
    results: list[dict[str, Any]] = []
    for start in range(0, len(entries), 500):
        response = await kinesis.put_records(
            StreamName=stream, Records=entries[start : start + 500]
        )
        assert response.get("FailedRecordCount", 0) == 0, response
        results.extend(response["Records"])
    return results


async def scan_table(dynamodb: Any, table: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    paginator = dynamodb.get_paginator("scan")
    async for page in paginator.paginate(TableName=table, ConsistentRead=True):
        items.extend(page.get("Items", []))
    return items


async def wait_for(
    condition: Callable[[], Awaitable[bool]], timeout: float = 30.0, interval: float = 0.05
) -> None:
    """Poll an async condition until it holds; fail with a timeout error if it never does."""
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


def unicorn_records(names: Iterable[str], minutes: int) -> list[dict[str, Any]]:
    """Aggregates for several unicorns: the real Shadowfax day, renamed per unicorn."""
    day = unicorn_day()[:minutes]
    return [{**record, "Name": name} for name in names for record in day]


def holds(check: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    """wait_for takes an async condition; many conditions are plain checks."""

    async def condition() -> bool:
        return check()

    return condition


class Peak:
    """The most a byte budget has held, seen at every take; and every amount taken."""

    def __init__(self, budget: ByteBudget) -> None:
        self.value = 0
        self.takes: list[int] = []
        take = budget.take

        def taking(size: int) -> None:
            take(size)
            self.value = max(self.value, budget.used)
            self.takes.append(size)

        budget.take = taking  # type: ignore[method-assign]
