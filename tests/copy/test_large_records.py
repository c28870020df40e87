"""Large records: an item over DynamoDB's 400 KB is a dead letter of its own, and pages of
10 MB keep the byte bound.

Kinesis takes records up to 10 MiB; kinesalite up to 1 MiB, enough to make items past the limit
and GetRecords pages of 10 MB (it answers with every record the Limit asks for). The size rule
itself is checked against dynalite, which refuses items past 409,600 bytes as DynamoDB does.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.deadletter_support import data_of, file_entries
from tests.faultproxy import FaultProxy
from tests.helpers import Peak, holds, put_records, scan_table, wait_for
from wildrydes_stream.admin.provision import ensure_stream, ensure_table
from wildrydes_stream.config import Settings
from wildrydes_stream.copy.app import Service
from wildrydes_stream.copy.item import MAX_ITEM_BYTES, decode_item, item_size
from wildrydes_stream.errors import RecordError
from wildrydes_stream.runtime.budget import MAX_PAGE_BYTES

MIB = 1024 * 1024
FORMAT = Settings().status_time_format
"""How the service writes StatusTime (and so the items measured here) by default."""


def padded(value: dict[str, Any], size: int) -> bytes:
    """A record whose item is exactly `size` bytes, padded with a `Note`."""
    base = {**value, "Note": ""}
    short = size - item_size(decode_item(_dumps(base), FORMAT)[1])
    assert short >= 0
    return _dumps({**value, "Note": "n" * short})


async def put_large(kinesis: Any, stream: str, records: list[bytes], per_call: int) -> None:
    """PutRecords in calls of `per_call` (kinesalite takes 7 MiB a request, in base64). The
    test's own client is aiobotocore, which warns about request bodies over 1 MiB sent from
    bytes; that warning is about this client, not the service, so it is let through here only."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sending a large body", ResourceWarning)
        for start in range(0, len(records), per_call):
            await put_records(kinesis, stream, records[start : start + per_call])


def dead_letters(settings: Settings) -> list[dict[str, Any]]:
    path = Path(settings.deadletter_file)
    return file_entries(path) if path.exists() else []


def _dumps(value: dict[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def reading(name: str, minute: int, **extra: Any) -> dict[str, Any]:
    return {"Name": name, "StatusTime": f"2016-02-12 00:{minute:02d}:00.000", **extra}


# Numbers of every shape the size rule distinguishes: odd and even digit counts at odd and even
# exponents, negatives, zeros, fractions.
NUMBERS = [0, 7, 10, 99, 1234, -5, -1234, 100000, 12345678901234567890, "0.5", "-0.0012", "1.25"]


@pytest.mark.parametrize("number", NUMBERS, ids=str)
async def test_item_size_is_dynamodbs_at_the_limit(
    one_shard: Settings, dynamodb: Any, number: Any
) -> None:
    """An item measured at exactly the limit is taken; one byte more is refused, by the table
    itself and by decode_item with a reason naming the limit."""
    raw = f'{{"Name":"u","StatusTime":"2016-02-12 00:01:00.000","Distance":{number},"Note":""}}'
    base = decode_item(raw.encode(), FORMAT)[1]
    note = "n" * (MAX_ITEM_BYTES - item_size(base))
    at_limit = raw.replace('"Note":""', f'"Note":"{note}"').encode()
    over = raw.replace('"Note":""', f'"Note":"{note}n"').encode()

    _, item = decode_item(at_limit, FORMAT)
    assert item_size(item) == MAX_ITEM_BYTES
    await dynamodb.put_item(TableName=one_shard.table_name, Item=item)

    with pytest.raises(RecordError, match=r"409,601 bytes, over DynamoDB's item limit of 400 KB"):
        decode_item(over, FORMAT)
    item["Note"] = {"S": note + "n"}
    with pytest.raises(ClientError, match="Item size has exceeded"):
        await dynamodb.put_item(TableName=one_shard.table_name, Item=item)


def test_item_size_counts_utf8_bytes() -> None:
    _, item = decode_item(_dumps(reading("ünïcorn", 1, Note="€" * 10)), "string")
    assert item_size(item) == sum(
        len(name.encode()) + len(next(iter(value.values())).encode())
        for name, value in item.items()
    )


async def test_an_item_over_400_kb_is_a_dead_letter_of_its_own(
    one_shard: Settings, kinesis: Any, dynamodb: Any, dynamodb_proxy: FaultProxy
) -> None:
    """The table never sees it: no write is refused, so no batch is split to find it, and its
    batch-mates are written with their first call."""
    small = [_dumps(reading(f"u{n}", 1, Distance=n)) for n in range(10)]
    at_limit = padded(reading("at-limit", 2), MAX_ITEM_BYTES)
    over = padded(reading("over", 3), MAX_ITEM_BYTES + 1)
    huge = padded(reading("huge", 4), 1_000_000)  # as large as kinesalite takes
    records = [*small[:5], over, at_limit, huge, *small[5:]]
    await put_large(kinesis, one_shard.stream_name, records, 4)

    async with Service(one_shard) as service:
        await wait_for(holds(lambda: service.metrics.snapshot().written == 11), timeout=30)
        await wait_for(holds(lambda: len(dead_letters(one_shard)) == 2))
        refused = service.metrics.errors.labels("BatchWriteItem")._value.get()
        by_table = service.metrics.records_dead_lettered.labels("rejected_by_table")._value.get()
    letters = dead_letters(one_shard)
    assert sorted(data_of(e) for e in letters) == sorted([over, huge])
    assert {e["kind"] for e in letters} == {"invalid_record"}
    reasons = {json.loads(data_of(e))["Name"]: e["reason"] for e in letters}
    assert "item is 409,601 bytes, over DynamoDB's item limit of 400 KB" in reasons["over"]
    assert "over DynamoDB's item limit" in reasons["huge"]
    names = {item["Name"]["S"] for item in await scan_table(dynamodb, one_shard.table_name)}
    assert names == {f"u{n}" for n in range(10)} | {"at-limit"}
    assert refused == by_table == 0
    # One call per batch: a batch split to find a refused item would make one call per item.
    assert dynamodb_proxy.calls["BatchWriteItem"] < 11


async def test_pages_of_10_mb_stay_within_the_byte_bound(
    settings: Settings, kinesis: Any, dynamodb: Any, dynamodb_proxy: FaultProxy
) -> None:
    """Four shards, each read in pages of 10 MB, behind a slow table: every poll reserves a
    whole page before its call, so the bytes held never pass the bound, however many pollers
    fetch at once; and everything is written in the end."""
    shards, per_shard, size = 4, 150, 200_000
    bound = 4 * MAX_PAGE_BYTES  # room for four pages: the bound holds for any page
    # Kinesis answers with 10 MiB at most; kinesalite with all the Limit asks for: 50 records
    # of 200 KB make its pages 10 MB.
    s = settings.replace(
        max_buffered_bytes=bound, queue_size=100_000, writers=4, get_records_limit=50
    )
    await ensure_stream(kinesis, s.stream_name, shards)
    await ensure_table(dynamodb, s)
    records = [
        padded(reading(f"unicorn-{n % 97}", n // 97 % 60, Distance=n), size)
        for n in range(shards * per_shard)
    ]
    await put_large(kinesis, s.stream_name, records, 20)
    dynamodb_proxy.delay("BatchWriteItem", 0.5)

    service = Service(s)
    peak = Peak(service.budget)
    async with service:
        await wait_for(
            holds(lambda: service.metrics.snapshot().written == len(records)), timeout=120
        )
    held = peak.value
    assert held <= bound, f"held {held / MIB:.1f} MiB against a bound of {bound / MIB:.0f} MiB"
    # A page in is taken as its size; a reservation is always page_bytes.
    assert max(peak.takes) == MAX_PAGE_BYTES
    pages = [t for t in peak.takes if t != MAX_PAGE_BYTES]
    assert max(pages) >= 9_000_000, "no page of 10 MB was read"
    assert service.metrics.memory_waits._value.get() > 0, "the bound never bound"
    assert not dead_letters(s)
