"""Helpers of the dead-letter and redrive tests: reading what landed in SQS, S3 and the file."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from wildrydes_stream.records.envelope import DeadLetter
from wildrydes_stream.records.position import position


async def receive_all(sqs: Any, queue_url: str) -> list[dict[str, Any]]:
    """Every message body in the queue, parsed (they stay hidden for the visibility timeout)."""
    bodies: list[dict[str, Any]] = []
    while True:
        response = await sqs.receive_message(
            QueueUrl=queue_url, MaxNumberOfMessages=10, VisibilityTimeout=60
        )
        if not response.get("Messages"):
            return bodies
        bodies += [json.loads(m["Body"]) for m in response["Messages"]]


async def s3_objects(s3: Any, bucket: str, prefix: str = "") -> dict[str, list[dict[str, Any]]]:
    """{key: entries} of the .jsonl objects under the prefix."""
    objects: dict[str, list[dict[str, Any]]] = {}
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    async for page in pages:
        for item in page.get("Contents", []):
            if item["Key"].endswith(".jsonl"):
                body = await (await s3.get_object(Bucket=bucket, Key=item["Key"]))["Body"].read()
                objects[item["Key"]] = [json.loads(line) for line in body.decode().splitlines()]
    return objects


def file_entries(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def data_of(entry: dict[str, Any]) -> bytes:
    return base64.b64decode(entry["data_base64"])


def record(name: str, minute: int, **extra: Any) -> bytes:
    """A valid aggregate record."""
    value = {"Name": name, "StatusTime": f"2016-02-12 00:{minute:02d}:00.000", "Distance": minute}
    return json.dumps({**value, **extra}, separators=(",", ":")).encode()


def reading(name: str, second: int) -> bytes:
    """A valid raw reading, as the producer puts it on the raw stream (a newline after it)."""
    value = {
        "Distance": 1.5,
        "HealthPoints": 150,
        "Latitude": 40.749,
        "Longitude": -73.985,
        "MagicPoints": 110,
        "Name": name,
        "StatusTime": f"2017-06-05 09:{second // 60:02d}:{second % 60:02d}.000",
    }
    return json.dumps(value, separators=(",", ":")).encode() + b"\n"


def letter(
    data: bytes, sequence: int, kind: str = "retries", stream: str = "wildrydes-aggregated"
) -> DeadLetter:
    at = position(sequence)
    return DeadLetter(data, "write retries exhausted", kind, stream, "shardId-000", at, 0.0)


async def stream_records(kinesis: Any, stream: str) -> list[tuple[bytes, str]]:
    """(data, partition key) of every record on the stream, shard by shard in order."""
    records: list[tuple[bytes, str]] = []
    for shard in (await kinesis.list_shards(StreamName=stream))["Shards"]:
        iterator = (
            await kinesis.get_shard_iterator(
                StreamName=stream, ShardId=shard["ShardId"], ShardIteratorType="TRIM_HORIZON"
            )
        )["ShardIterator"]
        while iterator:
            page = await kinesis.get_records(ShardIterator=iterator, Limit=10000)
            records += [(r["Data"], r["PartitionKey"]) for r in page["Records"]]
            if not page["Records"] and page.get("MillisBehindLatest", 0) == 0:
                break
            iterator = page.get("NextShardIterator")
    return records
