"""End to end against kinesalite and dynalite: every record lands, with the right shape."""

from __future__ import annotations

from typing import Any

import pytest

from tests.helpers import put_records, scan_table, unicorn_records
from wildrydes_stream.config import Settings
from wildrydes_stream.consumer.leases import LeaseTable
from wildrydes_stream.copy.app import Service
from wildrydes_stream.copy.item import METRIC_FIELDS
from wildrydes_stream.records.fields import status_time_to_epoch_ms

UNICORNS = ("Shadowfax", "Rocinante", "Bucephalus", "Pegasus", "Epona", "Artax")


async def test_every_record_of_a_multi_shard_stream_lands_with_the_item_shape(
    resources: Settings, kinesis: Any, dynamodb: Any
) -> None:
    records = unicorn_records(UNICORNS, minutes=300)
    await put_records(kinesis, resources.stream_name, records)

    async with Service(resources) as service:
        await service.run_burst()
        read = service.metrics.snapshot().read

    items = await scan_table(dynamodb, resources.table_name)
    assert len(items) == len(records)
    assert read >= len(records)
    by_key = {(i["Name"]["S"], i["StatusTime"]["N"]): i for i in items}
    for record in records:
        key = (record["Name"], str(status_time_to_epoch_ms(record["StatusTime"])))
        item = by_key[key]
        assert set(item) == set(record)
        for field in METRIC_FIELDS:
            assert item[field] == {"N": str(record[field])}
    shards = {
        (await kinesis.list_shards(StreamName=resources.stream_name))["Shards"][i]["ShardId"]
        for i in range(4)
    }
    assert len(shards) == 4


@pytest.mark.usefixtures("shadowfax_available")  # asserts the workshop's real first record
async def test_first_record_has_epoch_milliseconds_and_checkpoints_reach_the_last_record(
    resources: Settings, kinesis: Any, dynamodb: Any
) -> None:
    records = unicorn_records(("Shadowfax",), minutes=60)
    results = await put_records(kinesis, resources.stream_name, records)

    async with Service(resources) as service:
        await service.run_burst()

    items = await scan_table(dynamodb, resources.table_name)
    first = next(i for i in items if i["StatusTime"]["N"] == "1455235200000")
    assert first == {
        "Name": {"S": "Shadowfax"},
        "StatusTime": {"N": "1455235200000"},  # 2016-02-12 00:00:00 UTC
        "Distance": {"N": "1317"},
        "MinMagicPoints": {"N": "146"},
        "MaxMagicPoints": {"N": "149"},
        "MinHealthPoints": {"N": "144"},
        "MaxHealthPoints": {"N": "149"},
    }
    leases = await LeaseTable(dynamodb, resources.lease_table_name, "reader").all()
    shard = results[-1]["ShardId"]
    last = max(int(r["SequenceNumber"]) for r in results)
    assert leases[shard].checkpoint == str(last)
    assert leases[shard].owner is None  # released at stop
