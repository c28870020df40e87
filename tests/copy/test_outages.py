"""Faults that last: outages, lost permissions, throttling storms, odd answers, poison records.

The promise under test: a record is dead-lettered only for a fault of its own. Everything else
is retried for as long as it lasts, with the checkpoint held where it is, and the service
catches up by itself when the fault clears. Every fault is driven through the fault proxy.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import aiohttp
import pytest

from tests.copy.test_faults import (
    dead_letters,
    keys_of,
    make_records,
    run_burst,
    sample,
    table_keys,
)
from tests.faultproxy import (
    DYNAMODB_ACCESS_DENIED,
    DYNAMODB_TABLE_MISSING,
    DYNAMODB_THROTTLED,
    DYNAMODB_UNAVAILABLE,
    EXPIRED_TOKEN,
    FORBIDDEN_PAGE,
    INVALID_SIGNATURE,
    KINESIS_ACCESS_DENIED,
    UNRECOGNIZED_CLIENT,
    AwsError,
    FaultProxy,
)
from tests.helpers import holds, put_records, wait_for
from wildrydes_stream.config import Settings
from wildrydes_stream.consumer.leases import LeaseTable
from wildrydes_stream.copy.app import Service
from wildrydes_stream.records.fields import status_time_to_epoch_ms


async def feed(
    kinesis: Any, stream: str, records: list[dict[str, Any]], chunk: int = 50
) -> list[dict[str, Any]]:
    """Put `records` a chunk at a time, as a steady producer would; results in order."""
    results: list[dict[str, Any]] = []
    for start in range(0, len(records), chunk):
        results += await put_records(kinesis, stream, records[start : start + chunk])
        await asyncio.sleep(0.02)  # pacing the producer, not waiting for a result
    return results


async def assert_checkpoints_cover_only_written_records(
    dynamodb: Any,
    settings: Settings,
    records: list[dict[str, Any]],
    results: list[dict[str, Any]],
) -> None:
    """Invariant 1: every record at or below a shard's checkpoint is in the table."""
    leases = await LeaseTable(dynamodb, settings.lease_table_name, "reader").all()
    written = await table_keys(dynamodb, settings.table_name)
    for record, result in zip(records, results, strict=True):
        lease = leases.get(result["ShardId"])
        if lease is None or not lease.checkpoint.isdigit():
            continue
        if int(result["SequenceNumber"]) <= int(lease.checkpoint):
            key = (record["Name"], str(status_time_to_epoch_ms(record["StatusTime"])))
            assert key in written, (result, lease)


async def http_status(service: Service, path: str) -> int:
    assert service.http is not None
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{service.http.port}{path}") as response,
    ):
        return response.status


async def test_a_long_dynamodb_outage_under_load_loses_nothing_and_dead_letters_nothing(
    resources: Settings, dynamodb_proxy: FaultProxy, kinesis: Any, dynamodb: Any
) -> None:
    records = make_records(1500)
    async with Service(resources) as service:
        producer = asyncio.create_task(feed(kinesis, resources.stream_name, records))

        async def some_written() -> bool:
            return service.metrics.snapshot().written >= 100

        await wait_for(some_written)
        dynamodb_proxy.fail("BatchWriteItem", DYNAMODB_UNAVAILABLE, times=None)

        async def outage_has_lasted() -> bool:
            # Hundreds of failed calls: far past any fixed retry budget.
            assert service.exit_code == 0, "a stage failed"
            return dynamodb_proxy.injected["BatchWriteItem"] >= 300

        await wait_for(outage_has_lasted, timeout=60)
        results = await producer
        await assert_checkpoints_cover_only_written_records(dynamodb, resources, records, results)
        assert await http_status(service, "/healthz") == 200
        dynamodb_proxy.clear()

        async def caught_up() -> bool:
            assert service.exit_code == 0, "a stage failed"
            return service.metrics.snapshot().written >= len(records)

        await wait_for(caught_up, timeout=60)
        assert service.metrics.snapshot().dead_lettered == 0

        async def checkpointed() -> bool:
            leases = await LeaseTable(dynamodb, resources.lease_table_name, "reader").all()
            last = {r["ShardId"]: r["SequenceNumber"] for r in results}
            return all(leases[s].checkpoint == seq for s, seq in last.items())

        await wait_for(checkpointed)

    assert service.exit_code == 0
    assert dead_letters(resources) == []
    assert await table_keys(dynamodb, resources.table_name) == keys_of(records)


@pytest.mark.parametrize(
    ("error", "cause"),
    [
        pytest.param(DYNAMODB_ACCESS_DENIED, "permission", id="access-denied"),
        pytest.param(DYNAMODB_TABLE_MISSING, "missing", id="table-missing"),
        pytest.param(UNRECOGNIZED_CLIENT, "credentials", id="unrecognized-client"),
        pytest.param(EXPIRED_TOKEN, "credentials", id="expired-token"),
        pytest.param(INVALID_SIGNATURE, "credentials", id="clock-skew"),
        pytest.param(FORBIDDEN_PAGE, "other", id="proxy-403-page"),
    ],
)
async def test_writes_failing_for_an_operator_to_fix_are_held_not_dead_lettered(
    resources: Settings,
    dynamodb_proxy: FaultProxy,
    kinesis: Any,
    dynamodb: Any,
    caplog: pytest.LogCaptureFixture,
    error: AwsError,
    cause: str,
) -> None:
    records = make_records(200)
    await put_records(kinesis, resources.stream_name, records)
    dynamodb_proxy.fail("BatchWriteItem", error, times=None)
    blocked = "wildrydes_blocked"
    errors = "wildrydes_blocked_errors_total"

    with caplog.at_level(logging.ERROR, logger="wildrydes_stream"):
        async with Service(resources) as service:

            async def reported() -> bool:
                assert service.exit_code == 0, "a stage failed"
                return sample(service, blocked, api="BatchWriteItem") == 1

            await wait_for(reported)

            async def failed_a_while() -> bool:
                # Counted by the service as well as sent by the proxy (which counts first).
                counted = sample(service, errors, api="BatchWriteItem", cause=cause)
                return dynamodb_proxy.injected["BatchWriteItem"] >= 60 and counted >= 60

            await wait_for(failed_a_while, timeout=60)
            # Not ready (an operator must act), but alive: a restart does not fix IAM.
            assert await http_status(service, "/readyz") == 503
            assert await http_status(service, "/healthz") == 200
            assert sample(service, errors, api="BatchWriteItem", cause=cause) >= 60
            assert service.metrics.snapshot().dead_lettered == 0
            dynamodb_proxy.clear()

            async def all_written() -> bool:
                return service.metrics.snapshot().written == len(records)

            await wait_for(all_written)
            assert sample(service, blocked, api="BatchWriteItem") == 0
            assert await http_status(service, "/readyz") == 200

    assert service.exit_code == 0
    assert dead_letters(resources) == []
    assert await table_keys(dynamodb, resources.table_name) == keys_of(records)
    # One clear line names the cause, not one per failed call.
    lines = [r.getMessage() for r in caplog.records if "BatchWriteItem" in r.getMessage()]
    assert any("keeps failing" in line for line in lines), lines
    assert len(lines) < 10, lines
    if cause == "permission":
        assert "grant dynamodb:BatchWriteItem on table" in lines[0]


async def test_a_throttling_storm_cuts_write_concurrency_and_it_recovers(
    resources: Settings, dynamodb_proxy: FaultProxy, kinesis: Any, dynamodb: Any
) -> None:
    settings = resources.replace(writers=8)
    records = make_records(2000)
    dynamodb_proxy.fail("BatchWriteItem", DYNAMODB_THROTTLED, times=None)
    limit = "wildrydes_write_concurrency_limit"

    async with Service(settings) as service:
        assert sample(service, limit) == 8  # before any write: one slot per writer
        await put_records(kinesis, settings.stream_name, records)

        async def cut_to_one() -> bool:
            return sample(service, limit) == 1

        await wait_for(cut_to_one)
        calls_at_cut = dynamodb_proxy.calls["BatchWriteItem"]

        async def throttled_a_while() -> bool:
            return dynamodb_proxy.injected["BatchWriteItem"] >= calls_at_cut + 40

        await wait_for(throttled_a_while, timeout=60)
        dynamodb_proxy.clear()

        async def all_written() -> bool:
            assert service.exit_code == 0, "a stage failed"
            return service.metrics.snapshot().written == len(records)

        await wait_for(all_written, timeout=60)
        # Additive increase: one more slot per window of successful calls.
        assert sample(service, limit) >= 4
        assert service.metrics.snapshot().dead_lettered == 0
    assert await table_keys(dynamodb, settings.table_name) == keys_of(records)


async def test_records_past_max_record_age_are_dead_lettered_while_writes_fail(
    one_shard: Settings, dynamodb_proxy: FaultProxy, kinesis: Any, dynamodb: Any
) -> None:
    settings = one_shard.replace(max_record_age_seconds=1.0)
    stale = make_records(30, names=("Stale",))
    fresh = make_records(30, names=("Fresh",))
    dynamodb_proxy.fail("BatchWriteItem", DYNAMODB_UNAVAILABLE, times=None)
    await put_records(kinesis, settings.stream_name, stale)

    async with Service(settings) as service:

        async def aged_out() -> bool:
            return service.metrics.snapshot().dead_lettered == len(stale)

        await wait_for(aged_out, timeout=20)
        dynamodb_proxy.clear()
        await put_records(kinesis, settings.stream_name, fresh)

        async def fresh_written() -> bool:
            return service.metrics.snapshot().written == len(fresh)

        await wait_for(fresh_written)
        assert sample(service, "wildrydes_records_dead_lettered_total", reason="record_age") == 30

    letters = dead_letters(settings)
    assert {x["kind"] for x in letters} == {"record_age"}
    assert all("max_record_age_seconds" in x["reason"] for x in letters)
    assert all("ServiceUnavailable" in x["reason"] for x in letters)
    assert await table_keys(dynamodb, settings.table_name) == keys_of(fresh)


async def test_a_large_answer_is_not_compressed_so_its_crc_holds(
    one_shard: Settings, dynamodb_proxy: FaultProxy, kinesis: Any, dynamodb: Any
) -> None:
    settings = one_shard.replace(writers=1, batch_window_seconds=0.2)
    records = make_records(100)
    await put_records(kinesis, settings.stream_name, records)
    # DynamoDB gzips large answers for clients that accept gzip, and computes x-amz-crc32
    # over the compressed bytes; an UnprocessedItems answer of 25 items is large.
    dynamodb_proxy.compress_large = True
    dynamodb_proxy.unprocess(times=3, forward=0)

    service = await run_burst(settings)

    assert dynamodb_proxy.compressed == 0
    assert sample(service, "wildrydes_aws_errors_total", api="BatchWriteItem") == 0
    assert sample(service, "wildrydes_unprocessed_items_retried_total") == (
        dynamodb_proxy.unprocessed_returned
    )
    assert await table_keys(dynamodb, settings.table_name) == keys_of(records)


async def test_a_non_json_answer_to_a_single_item_write_does_not_dead_letter_it(
    one_shard: Settings, dynamodb_proxy: FaultProxy, kinesis: Any, dynamodb: Any
) -> None:
    records = make_records(1)
    await put_records(kinesis, one_shard.stream_name, records)
    dynamodb_proxy.garble("BatchWriteItem", times=2)

    service = await run_burst(one_shard)

    assert dynamodb_proxy.injected["BatchWriteItem"] == 2
    assert dead_letters(one_shard) == []
    assert service.metrics.snapshot().dead_lettered == 0
    assert await table_keys(dynamodb, one_shard.table_name) == keys_of(records)


async def test_a_deeply_nested_record_is_dead_lettered_and_the_service_keeps_running(
    one_shard: Settings, kinesis: Any, dynamodb: Any
) -> None:
    before, after = make_records(20), make_records(40)[20:]
    poison = [b"[" * 1000 + b"]" * 1000, b'{"Name":' * 1500, b"1" * 5000]
    await put_records(kinesis, one_shard.stream_name, [*before, *poison, *after])

    await run_burst(one_shard)

    letters = dead_letters(one_shard)
    assert [x["kind"] for x in letters] == ["invalid_record"] * 3
    assert "RecursionError" in letters[0]["reason"]
    assert await table_keys(dynamodb, one_shard.table_name) == keys_of(before + after)


async def test_a_write_unit_budget_paces_the_writers(
    one_shard: Settings, kinesis: Any, dynamodb: Any
) -> None:
    # Each record is well under 1 KiB: one write unit. 100 units a second, one second saved
    # up: 300 records cannot be written in less than two seconds.
    settings = one_shard.replace(max_write_units_per_second=100.0)
    records = make_records(300)
    await put_records(kinesis, settings.stream_name, records)

    started = time.monotonic()
    await run_burst(settings)
    elapsed = time.monotonic() - started

    assert elapsed >= 1.9
    assert await table_keys(dynamodb, settings.table_name) == keys_of(records)


@pytest.mark.parametrize("api", ["GetShardIterator", "GetRecords"])
async def test_reads_refused_for_a_while_are_retried_and_reported_not_fatal(
    resources: Settings, kinesis_proxy: FaultProxy, kinesis: Any, dynamodb: Any, api: str
) -> None:
    records = make_records(200)
    await put_records(kinesis, resources.stream_name, records)
    kinesis_proxy.fail(api, KINESIS_ACCESS_DENIED, times=None)

    async with Service(resources) as service:

        async def reported() -> bool:
            assert service.exit_code == 0, "a stage failed"
            return sample(service, "wildrydes_blocked", api=api) == 1

        await wait_for(reported)
        await wait_for(holds(lambda: kinesis_proxy.injected[api] >= 20), timeout=30)
        assert await http_status(service, "/readyz") == 503
        assert await http_status(service, "/healthz") == 200
        kinesis_proxy.clear()

        async def all_written() -> bool:
            assert service.exit_code == 0, "a stage failed"
            return service.metrics.snapshot().written == len(records)

        await wait_for(all_written, timeout=30)
        assert sample(service, "wildrydes_blocked", api=api) == 0
        assert await http_status(service, "/readyz") == 200
    assert await table_keys(dynamodb, resources.table_name) == keys_of(records)


async def test_an_outage_of_every_dynamodb_call_longer_than_a_lease_is_ridden_out(
    resources: Settings, dynamodb_proxy: FaultProxy, kinesis: Any, dynamodb: Any
) -> None:
    # The lease table fails too: renewals fail past the lease duration, so the owner fences
    # its own tenures, and takes its leases back once DynamoDB answers again.
    settings = resources.replace(lease_duration_seconds=1.0)
    records = make_records(900)
    async with Service(settings) as service:
        producer = asyncio.create_task(feed(kinesis, settings.stream_name, records))

        async def some_written() -> bool:
            return service.metrics.snapshot().written >= 100

        await wait_for(some_written)
        dynamodb_proxy.fail("*", DYNAMODB_UNAVAILABLE, times=None)

        async def leases_dropped() -> bool:
            assert service.exit_code == 0, "a stage failed"
            return sample(service, "wildrydes_shards_owned") == 0

        await wait_for(leases_dropped, timeout=30)
        results = await producer
        dynamodb_proxy.clear()

        async def caught_up() -> bool:
            assert service.exit_code == 0, "a stage failed"
            return await table_keys(dynamodb, settings.table_name) == keys_of(records)

        await wait_for(caught_up, timeout=60, interval=0.5)
        await assert_checkpoints_cover_only_written_records(dynamodb, settings, records, results)
        assert sample(service, "wildrydes_shards_owned") == 4
        assert service.metrics.snapshot().dead_lettered == 0
    assert service.exit_code == 0
    assert dead_letters(settings) == []
