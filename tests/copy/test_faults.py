"""Faults the emulators never produce, injected by a proxy between the service and them.

Each test names a behaviour under a fault (throttling, UnprocessedItems, 5xx, expired iterators,
a slow table, items the table refuses, an exhausted retry budget) and fails if it breaks:
assertions are on the table, the dead-letter file, checkpoints and the service's metrics.
"""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.faultproxy import (
    DYNAMODB_INTERNAL,
    DYNAMODB_THROTTLED,
    KINESIS_EXPIRED_ITERATOR,
    KINESIS_THROTTLED,
    FaultProxy,
)
from tests.helpers import put_records, scan_table, wait_for
from wildrydes_stream.config import Settings
from wildrydes_stream.consumer.leases import LeaseTable
from wildrydes_stream.copy.app import Service
from wildrydes_stream.records.fields import status_time_to_epoch_ms

if TYPE_CHECKING:
    pass

Key = tuple[str, str]


def make_records(
    count: int, names: tuple[str, ...] = ("Shadowfax", "Rocinante", "Epona")
) -> list[dict[str, Any]]:
    """`count` distinct aggregates, one a minute per unicorn from 2016-02-12 00:00 UTC."""
    records = []
    for i in range(count):
        minute = i // len(names)
        records.append(
            {
                "Name": names[i % len(names)],
                "StatusTime": f"2016-02-12 {minute // 60 % 24:02d}:{minute % 60:02d}:00.000",
                "Distance": 1000 + i,
                "MinMagicPoints": 140,
                "MaxMagicPoints": 150,
                "MinHealthPoints": 141,
                "MaxHealthPoints": 149,
            }
        )
    if count > len(names) * 24 * 60:
        raise ValueError("one day per unicorn at most: keys would repeat")
    return records


def keys_of(records: list[dict[str, Any]]) -> set[Key]:
    return {(r["Name"], str(status_time_to_epoch_ms(r["StatusTime"]))) for r in records}


async def table_keys(dynamodb: Any, table: str) -> set[Key]:
    return {(i["Name"]["S"], i["StatusTime"]["N"]) for i in await scan_table(dynamodb, table)}


def dead_letters(settings: Settings) -> list[dict[str, Any]]:
    path = Path(settings.deadletter_file)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def sample(service: Service, name: str, **labels: str) -> float:
    value = service.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def run_burst(settings: Settings, timeout: float = 30.0) -> Service:
    """`run_burst` with a deadline; a stage failing raises out of it at once."""
    async with Service(settings) as service:
        await asyncio.wait_for(service.run_burst(), timeout)
    assert service.exit_code == 0
    return service


async def test_unprocessed_items_are_retried_until_every_record_is_written(
    resources: Settings, dynamodb_proxy: FaultProxy, kinesis: Any, dynamodb: Any
) -> None:
    records = make_records(500)
    await put_records(kinesis, resources.stream_name, records)
    dynamodb_proxy.unprocess(times=8)

    service = await run_burst(resources)

    assert dynamodb_proxy.injected["BatchWriteItem"] == 8
    assert dynamodb_proxy.unprocessed_returned > 0
    # Every item handed back was sent again, and counted once for it.
    retried = sample(service, "wildrydes_unprocessed_items_retried_total")
    assert retried == dynamodb_proxy.unprocessed_returned
    assert await table_keys(dynamodb, resources.table_name) == keys_of(records)
    assert service.metrics.snapshot().dead_lettered == 0


async def test_throttled_and_failing_batch_writes_are_retried_until_written(
    resources: Settings, dynamodb_proxy: FaultProxy, kinesis: Any, dynamodb: Any
) -> None:
    records = make_records(300)
    await put_records(kinesis, resources.stream_name, records)
    dynamodb_proxy.fail("BatchWriteItem", DYNAMODB_THROTTLED, times=3)
    dynamodb_proxy.fail("BatchWriteItem", DYNAMODB_INTERNAL, times=3)

    service = await run_burst(resources)

    assert dynamodb_proxy.injected["BatchWriteItem"] == 6
    assert sample(service, "wildrydes_throttles_total", api="BatchWriteItem") == 3
    assert sample(service, "wildrydes_aws_errors_total", api="BatchWriteItem") == 3
    assert await table_keys(dynamodb, resources.table_name) == keys_of(records)
    snapshot = service.metrics.snapshot()
    assert snapshot.dead_lettered == 0
    assert snapshot.written == len(records)


async def test_a_garbled_batch_write_answer_neither_stops_the_writers_nor_loses_records(
    resources: Settings, dynamodb_proxy: FaultProxy, kinesis: Any, dynamodb: Any
) -> None:
    records = make_records(100)
    await put_records(kinesis, resources.stream_name, records)
    # A 200 that is not JSON is no ClientError: whether the batch is then retried or split into
    # single writes, the writer must live on and every record still land.
    dynamodb_proxy.garble("BatchWriteItem", times=1)

    service = await run_burst(resources)

    assert dynamodb_proxy.injected["BatchWriteItem"] == 1
    assert await table_keys(dynamodb, resources.table_name) == keys_of(records)
    assert service.metrics.snapshot().dead_lettered == 0


async def test_throttled_get_records_is_retried_and_nothing_is_missing(
    resources: Settings, kinesis_proxy: FaultProxy, kinesis: Any, dynamodb: Any
) -> None:
    settings = resources.replace(get_records_limit=100)
    records = make_records(800)
    await put_records(kinesis, settings.stream_name, records)
    # Past the first calls, so shards are throttled mid-stream, not only before their first read.
    kinesis_proxy.fail("GetRecords", KINESIS_THROTTLED, times=6, after=2)

    service = await run_burst(settings)

    assert kinesis_proxy.injected["GetRecords"] == 6
    assert sample(service, "wildrydes_throttles_total", api="GetRecords") == 6
    assert await table_keys(dynamodb, settings.table_name) == keys_of(records)
    # A throttled call returns nothing, so retrying it reads nothing twice.
    assert service.metrics.snapshot().read == len(records)


async def test_expired_iterator_is_renewed_after_the_last_record_read(
    one_shard: Settings, kinesis_proxy: FaultProxy, kinesis: Any, dynamodb: Any
) -> None:
    settings = one_shard.replace(get_records_limit=100)
    records = make_records(1000)
    await put_records(kinesis, settings.stream_name, records)
    # Three pages (300 records) are read, then the iterator "expires" twice in a row.
    kinesis_proxy.fail("GetRecords", KINESIS_EXPIRED_ITERATOR, times=2, after=3)

    service = await run_burst(settings)

    assert kinesis_proxy.injected["GetRecords"] == 2
    # One iterator at the start, one per expiry.
    assert kinesis_proxy.calls["GetShardIterator"] == 3
    assert await table_keys(dynamodb, settings.table_name) == keys_of(records)
    # Renewal is AFTER_SEQUENCE_NUMBER of the last record read: no replay at all. Renewing from
    # the starting position would read the first 300 again; from LATEST would miss the rest.
    assert service.metrics.snapshot().read == len(records)


async def test_a_slow_table_slows_the_pollers_and_keeps_memory_bounded(
    resources: Settings, dynamodb_proxy: FaultProxy, kinesis: Any, dynamodb: Any
) -> None:
    settings = resources.replace(queue_size=50, writers=2, get_records_limit=100)
    shards = 4
    records = make_records(2000)
    await put_records(kinesis, settings.stream_name, records)
    dynamodb_proxy.delay("BatchWriteItem", 0.05)

    async with Service(settings) as service:
        capacity = sample(service, "wildrydes_queue_capacity_records")
        assert capacity == 50
        # Records held between reading and finishing: the queues, one batch per writer, and a
        # GetRecords page per poller (counted as read once dispatched, so this is generous).
        in_flight_bound = (
            capacity + settings.writers * settings.batch_size + shards * settings.get_records_limit
        )
        burst = asyncio.create_task(service.run_burst())
        depths: list[float] = []

        async def done_and_bounded() -> bool:
            snapshot = service.metrics.snapshot()
            depths.append(snapshot.queued)
            assert service.exit_code == 0, "a stage failed"
            assert snapshot.queued <= capacity, depths
            assert snapshot.read - snapshot.finished <= in_flight_bound, snapshot
            return burst.done()

        try:
            await wait_for(done_and_bounded, timeout=30, interval=0.01)
        finally:
            if not burst.done():
                burst.cancel()
        await burst

    assert service.exit_code == 0
    assert await table_keys(dynamodb, settings.table_name) == keys_of(records)
    # The table really was the bottleneck: the queue filled up (pollers waited on it).
    assert len(depths) > 20
    assert max(depths) >= capacity / 2, depths


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param({"Name": "x" * 3000}, id="partition-key-over-2048-bytes"),
        # An item over 400 KB never reaches the table: tests/copy/test_large_records.py.
    ],
)
async def test_an_item_the_table_refuses_is_dead_lettered_and_its_batch_written(
    resources: Settings, kinesis: Any, dynamodb: Any, extra: dict[str, Any]
) -> None:
    # One writer and a wide batching window put the bad record in a batch with its neighbours.
    settings = resources.replace(writers=1, batch_window_seconds=0.2)
    records = make_records(60)
    bad = {**records[30], **extra}
    records[30] = bad
    # StatusTime as the partition key: Kinesis takes at most 256 characters there.
    results = await put_records(kinesis, settings.stream_name, records, key="StatusTime")

    service = await run_burst(settings)

    letters = dead_letters(settings)
    assert len(letters) == 1, letters
    [letter] = letters
    assert letter["kind"] == "rejected_by_table"
    assert "ValidationException" in letter["reason"]
    assert letter["shard_id"] == results[30]["ShardId"]
    assert letter["sequence_number"] == results[30]["SequenceNumber"]
    assert json.loads(base64.b64decode(letter["data_base64"])) == bad
    assert await table_keys(dynamodb, settings.table_name) == keys_of(records) - keys_of([bad])
    snapshot = service.metrics.snapshot()
    assert (snapshot.written, snapshot.dead_lettered) == (59, 1)
    # The batch was refused as a whole at least once before the bad item was isolated.
    assert sample(service, "wildrydes_batch_write_duration_seconds_count", outcome="error") >= 2


async def test_writes_past_the_retry_budget_are_dead_lettered_and_the_shard_moves_on(
    one_shard: Settings, dynamodb_proxy: FaultProxy, kinesis: Any, dynamodb: Any
) -> None:
    settings = one_shard.replace(max_retry_attempts=2)
    blocked = make_records(40, names=("Blocked",))
    later = make_records(40, names=("Freed",))
    dynamodb_proxy.fail("BatchWriteItem", DYNAMODB_THROTTLED, times=None)
    blocked_results = await put_records(kinesis, settings.stream_name, blocked)

    async with Service(settings) as service:

        async def all_dead_lettered() -> bool:
            assert service.exit_code == 0, "a stage failed"
            return service.metrics.snapshot().dead_lettered == len(blocked)

        await wait_for(all_dead_lettered, timeout=20)
        dynamodb_proxy.clear()
        later_results = await put_records(kinesis, settings.stream_name, later)

        async def later_written() -> bool:
            assert service.exit_code == 0, "a stage failed"
            return service.metrics.snapshot().written == len(later)

        await wait_for(later_written, timeout=20)
        throttled = dynamodb_proxy.injected["BatchWriteItem"]
        assert sample(service, "wildrydes_throttles_total", api="BatchWriteItem") == throttled
        # Every batch of the blocked records was tried exactly 1 + max_retry_attempts times.
        tries = 1 + settings.max_retry_attempts
        assert throttled % tries == 0
        assert throttled >= tries

    letters = dead_letters(settings)
    assert sorted(int(x["sequence_number"]) for x in letters) == sorted(
        int(r["SequenceNumber"]) for r in blocked_results
    )
    assert {x["kind"] for x in letters} == {"retries"}
    assert all(x["reason"].startswith("write failed 3 times: Provisioned") for x in letters)
    assert await table_keys(dynamodb, settings.table_name) == keys_of(later)
    # The checkpoint passed the dead-lettered records and reached the last one written.
    leases = await LeaseTable(dynamodb, settings.lease_table_name, "reader").all()
    [lease] = leases.values()
    assert lease.checkpoint == later_results[-1]["SequenceNumber"]


async def test_a_shard_behind_the_tip_is_polled_again_at_once_and_its_lag_exported(
    one_shard: Settings, kinesis_proxy: FaultProxy, kinesis: Any
) -> None:
    # Caught up on records (fewer than the limit) and a 30 s idle wait: only being behind
    # the tip can make the poller call again at once.
    settings = one_shard.replace(idle_poll_interval_seconds=30.0, min_poll_interval_seconds=0.05)
    results = await put_records(kinesis, settings.stream_name, make_records(20))
    shard = results[0]["ShardId"]
    kinesis_proxy.behind(5000)

    async with Service(settings) as service:

        async def polled_again() -> bool:
            return kinesis_proxy.calls["GetRecords"] >= 10

        await wait_for(polled_again, timeout=10)
        assert sample(service, "wildrydes_shard_behind_latest_seconds", shard=shard) == 5.0
        kinesis_proxy.clear()

        async def caught_up() -> bool:
            return sample(service, "wildrydes_shard_behind_latest_seconds", shard=shard) == 0.0

        await wait_for(caught_up, timeout=10)
