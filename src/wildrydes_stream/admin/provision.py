"""Creating the stream and the table when missing (development and the `local` command)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from botocore.exceptions import ClientError

from wildrydes_stream.config import Settings
from wildrydes_stream.copy.schema import table_problems

log = logging.getLogger(__name__)


async def ensure_stream(kinesis: Any, name: str, shards: int, timeout: float = 60.0) -> bool:
    """Create the stream if missing and wait until ACTIVE; True when it was created."""
    created = False
    try:
        await kinesis.create_stream(StreamName=name, ShardCount=shards)
        created = True
    except ClientError as exc:
        if exc.response["Error"]["Code"] != "ResourceInUseException":
            raise
    async with asyncio.timeout(timeout):
        while True:
            summary = await kinesis.describe_stream_summary(StreamName=name)
            if summary["StreamDescriptionSummary"]["StreamStatus"] == "ACTIVE":
                return created
            await asyncio.sleep(0.05)


async def ensure_table(dynamodb: Any, settings: Settings, timeout: float = 60.0) -> bool:
    """Create the item table (Name, StatusTime) if missing and wait until ACTIVE."""
    sort_type = "N" if settings.status_time_format == "epoch_ms" else "S"
    created = False
    try:
        await dynamodb.create_table(
            TableName=settings.table_name,
            AttributeDefinitions=[
                {"AttributeName": "Name", "AttributeType": "S"},
                {"AttributeName": "StatusTime", "AttributeType": sort_type},
            ],
            KeySchema=[
                {"AttributeName": "Name", "KeyType": "HASH"},
                {"AttributeName": "StatusTime", "KeyType": "RANGE"},
            ],
            BillingMode="PAY_PER_REQUEST",
        )
        created = True
    except ClientError as exc:
        if exc.response["Error"]["Code"] != "ResourceInUseException":
            raise
    async with asyncio.timeout(timeout):
        while True:
            table = await dynamodb.describe_table(TableName=settings.table_name)
            if table["Table"]["TableStatus"] == "ACTIVE":
                return created
            await asyncio.sleep(0.05)


async def provision(kinesis: Any, dynamodb: Any, settings: Settings, shards: int) -> list[str]:
    """Create what is missing; what exists is checked. Returns one line per problem found
    with what exists (empty when everything is as the settings and `shards` want)."""
    problems = []
    if await ensure_stream(kinesis, settings.stream_name, shards):
        log.info("created stream", extra={"stream": settings.stream_name, "shards": shards})
    else:
        problems += await stream_problems(kinesis, settings.stream_name, shards)
    if await ensure_table(dynamodb, settings):
        log.info("created table", extra={"table": settings.table_name})
    else:
        described = await dynamodb.describe_table(TableName=settings.table_name)
        problems += table_problems(described["Table"], settings)
    return problems


async def provision_aggregate(kinesis: Any, settings: Settings, shards: int) -> list[str]:
    """The aggregator's two streams, created if missing: the raw one it reads
    (`raw_stream_name`) and the one it puts on (`stream_name`). Its lease and state tables it
    creates itself at start; it writes no item table."""
    problems = []
    for name in (settings.raw_stream_name, settings.stream_name):
        if await ensure_stream(kinesis, name, shards):
            log.info("created stream", extra={"stream": name, "shards": shards})
        else:
            problems += await stream_problems(kinesis, name, shards)
    return problems


async def stream_problems(kinesis: Any, name: str, shards: int) -> list[str]:
    summary = await kinesis.describe_stream_summary(StreamName=name)
    open_shards = summary["StreamDescriptionSummary"]["OpenShardCount"]
    if open_shards == shards:
        return []
    return [
        f"stream {name} exists with {open_shards} open shards, not {shards}: reshard it "
        "(aws kinesis update-shard-count) or pass --shards " + str(open_shards)
    ]
