"""Dead letters reach an SQS queue (moto's server speaks the real SQS protocol)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest

from tests.deadletter_support import data_of, file_entries, receive_all
from tests.faultproxy import AwsError, FaultProxy
from tests.helpers import put_records, scan_table, wait_for
from wildrydes_stream.config import Settings
from wildrydes_stream.copy.app import Service
from wildrydes_stream.errors import WildrydesError

SQS_INTERNAL = AwsError(
    500, "com.amazonaws.sqs#InternalError", "We encountered an internal error. Please try again."
)
ENTRY_FIELDS = {
    "reason",
    "kind",
    "application",
    "stream",
    "shard_id",
    "sequence_number",
    "subsequence_number",
    "arrival_time",
    "dead_lettered_at",
    "data_base64",
}


async def test_bad_records_go_to_the_sqs_queue_with_their_context(
    resources: Settings, sqs: Any, queue_url: str, kinesis: Any, dynamodb: Any
) -> None:
    settings = resources.replace(deadletter_file="", deadletter_queue_url=queue_url)
    good = {"Name": "Rocinante", "StatusTime": "2016-02-12 00:00:00.000", "Distance": 1}
    results = await put_records(
        kinesis, settings.stream_name, [b"not json at all", good, b'{"Name": "NoTime"}']
    )

    async with Service(settings) as service:
        await service.run_burst()

    messages = await receive_all(sqs, queue_url)
    assert len(await scan_table(dynamodb, settings.table_name)) == 1
    by_data = {data_of(m): m for m in messages}
    assert set(by_data) == {b"not json at all", b'{"Name": "NoTime"}'}
    letter = by_data[b"not json at all"]
    assert letter["reason"].startswith("not JSON")
    assert letter["stream"] == settings.stream_name
    assert letter["shard_id"] == results[0]["ShardId"]
    assert letter["sequence_number"] == results[0]["SequenceNumber"]
    assert "StatusTime" in by_data[b'{"Name": "NoTime"}']["reason"]


async def test_entries_store_the_payload_once_as_base64(
    one_shard: Settings, sqs: Any, queue_url: str, kinesis: Any
) -> None:
    settings = one_shard.replace(deadletter_queue_url=queue_url)
    raw = "caf\u00e9 is not JSON".encode()
    await put_records(kinesis, settings.stream_name, [raw])

    async with Service(settings) as service:
        await service.run_burst()

    (in_queue,) = await receive_all(sqs, queue_url)
    (in_file,) = file_entries(Path(settings.deadletter_file))
    for entry in (in_queue, in_file):
        assert set(entry) == ENTRY_FIELDS  # no text copy beside the base64
        assert data_of(entry) == raw


async def test_large_dead_letters_are_split_across_sqs_batches(
    resources: Settings, sqs: Any, queue_url: str, kinesis: Any
) -> None:
    # Five 100 KB records: each fits in a message, but not all in one 256 KiB batch.
    bad = [bytes([ord("a") + i]) * 100_000 for i in range(5)]
    settings = resources.replace(deadletter_file="", deadletter_queue_url=queue_url)
    await put_records(kinesis, settings.stream_name, bad)

    async with Service(settings) as service:
        await service.run_burst()

    assert {data_of(m) for m in await receive_all(sqs, queue_url)} == set(bad)


async def test_without_s3_a_record_too_large_for_sqs_keeps_its_metadata_and_warns(
    one_shard: Settings,
    sqs: Any,
    queue_url: str,
    kinesis: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = one_shard.replace(deadletter_file="", deadletter_queue_url=queue_url)
    (result,) = await put_records(kinesis, settings.stream_name, [b"x" * 300_000])

    with caplog.at_level(logging.WARNING):
        async with Service(settings) as service:
            await service.run_burst()

    (message,) = await receive_all(sqs, queue_url)
    assert "data_base64" not in message
    assert "data_s3_uri" not in message
    assert message["sequence_number"] == result["SequenceNumber"]
    assert message["reason"].endswith("(record data too large for SQS, omitted)")
    assert any("deadletter_s3_uri" in r.getMessage() for r in caplog.records)


async def test_a_wrong_queue_url_fails_at_start_naming_the_setting(
    one_shard: Settings, queue_url: str
) -> None:
    settings = one_shard.replace(deadletter_queue_url=queue_url.replace("deadletter", "nosuch"))

    with pytest.raises(WildrydesError) as failure:
        await Service(settings).start()

    message = str(failure.value)
    assert "deadletter_queue_url" in message
    assert "nosuch" in message
    assert "\n" not in message


async def test_sqs_failing_for_a_while_is_retried_and_the_letters_arrive(
    one_shard: Settings,
    sqs: Any,
    queue_url: str,
    moto_endpoint: str,
    kinesis: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    proxy = FaultProxy(moto_endpoint)
    await proxy.start()
    monkeypatch.setenv("AWS_ENDPOINT_URL_SQS", proxy.endpoint)
    proxy.fail("SendMessageBatch", SQS_INTERNAL, times=None)
    settings = one_shard.replace(deadletter_file="", deadletter_queue_url=queue_url)
    bad = [b"bad record %d" % i for i in range(3)]
    await put_records(kinesis, settings.stream_name, bad)

    try:
        with caplog.at_level(logging.WARNING):
            async with Service(settings) as service:
                registry = service.metrics.registry

                def failures(destination: str) -> float:
                    value = registry.get_sample_value(
                        "wildrydes_deadletter_failures_total", {"destination": destination}
                    )
                    assert value is not None  # exported from the start
                    return value

                assert failures("sqs") == failures("s3") == failures("file") == 0
                burst = asyncio.create_task(service.run_burst())

                async def failed_repeatedly() -> bool:
                    return failures("sqs") >= 3

                await wait_for(failed_repeatedly, timeout=30)
                assert not burst.done()
                assert service.exit_code == 0
                assert await receive_all(sqs, queue_url) == []
                proxy.clear()
                await asyncio.wait_for(burst, timeout=30)
                assert service.exit_code == 0
    finally:
        await proxy.close()

    assert {data_of(m) for m in await receive_all(sqs, queue_url)} == set(bad)
    warnings = [r for r in caplog.records if "dead-letter destination sqs failed" in r.getMessage()]
    assert len(warnings) == 1  # rate-limited: one line per blocked_log_interval_seconds
    assert "deadletter_queue_url" in warnings[0].getMessage()
