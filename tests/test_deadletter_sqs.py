"""Dead letters reach an SQS queue (moto's server speaks the real SQS protocol)."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from moto.server import ThreadedMotoServer

from tests.helpers import client, put_records, scan_table
from wildrydes_stream.config import Settings
from wildrydes_stream.service import Service


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def sqs_endpoint(aws_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("AWS_ENDPOINT_URL_SQS", endpoint)
    yield endpoint
    server.stop()


async def test_bad_records_go_to_the_sqs_queue_with_their_context(
    resources: Settings, sqs_endpoint: str, kinesis: Any, dynamodb: Any
) -> None:
    async with client("sqs") as sqs:
        queue_url = (await sqs.create_queue(QueueName="wildrydes-deadletter"))["QueueUrl"]
        settings = resources.replace(deadletter_file="", deadletter_queue_url=queue_url)
        good = {"Name": "Rocinante", "StatusTime": "2016-02-12 00:00:00.000", "Distance": 1}
        results = await put_records(
            kinesis, settings.stream_name, [b"not json at all", good, b'{"Name": "NoTime"}']
        )

        async with Service(settings) as service:
            await service.run_burst()

        messages: list[dict[str, Any]] = []
        while True:
            response = await sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10)
            batch = response.get("Messages", [])
            if not batch:
                break
            messages.extend(json.loads(m["Body"]) for m in batch)

    assert len(await scan_table(dynamodb, settings.table_name)) == 1
    by_data = {m["data"]: m for m in messages}
    assert set(by_data) == {"not json at all", '{"Name": "NoTime"}'}
    letter = by_data["not json at all"]
    assert letter["reason"].startswith("not JSON")
    assert letter["stream"] == settings.stream_name
    assert letter["shard_id"] == results[0]["ShardId"]
    assert letter["sequence_number"] == results[0]["SequenceNumber"]
    assert "StatusTime" in by_data['{"Name": "NoTime"}']["reason"]


async def test_large_dead_letters_are_split_across_sqs_batches(
    resources: Settings, sqs_endpoint: str, kinesis: Any
) -> None:
    # Five 100 KB records: each fits in a message, but not all in one 256 KiB batch.
    bad = [bytes([ord("a") + i]) * 100_000 for i in range(5)]
    async with client("sqs") as sqs:
        queue_url = (await sqs.create_queue(QueueName="wildrydes-deadletter"))["QueueUrl"]
        settings = resources.replace(deadletter_file="", deadletter_queue_url=queue_url)
        await put_records(kinesis, settings.stream_name, bad)

        async with Service(settings) as service:
            await service.run_burst()

        received: set[str] = set()
        while True:
            response = await sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10)
            if not response.get("Messages"):
                break
            received.update(json.loads(m["Body"])["data"] for m in response["Messages"])
    assert received == {record.decode() for record in bad}
