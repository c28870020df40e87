"""The lease table both ways with the Kinesis Client Library.

Fixtures are items as KCL's lease serializer writes them (DynamoDBLeaseSerializer: leaseKey S,
leaseOwner S, leaseCounter N, checkpoint S, checkpointSubSequenceNumber N,
ownerSwitchesSinceCheckpoint N, parentShardId SS, pendingCheckpoint S, childShardIds SS,
startingHashKey / endingHashKey S), written straight into the table the service then uses.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.copy.test_faults import keys_of, make_records, table_keys
from tests.helpers import holds, put_records, wait_for
from wildrydes_stream.config import Settings
from wildrydes_stream.consumer.leases import LeaseTable
from wildrydes_stream.copy.app import Service
from wildrydes_stream.errors import WildrydesError

SHARD = "shardId-000000000000"


def kcl_lease(shard: str, checkpoint: str, **extra: dict[str, Any]) -> dict[str, Any]:
    """A lease as a KCL 2.x worker leaves it (its owner gone: the counter never moves)."""
    return {
        "leaseKey": {"S": shard},
        "leaseOwner": {"S": "kcl-worker-1"},
        "leaseCounter": {"N": "41"},
        "checkpoint": {"S": checkpoint},
        "checkpointSubSequenceNumber": {"N": "0"},
        "ownerSwitchesSinceCheckpoint": {"N": "2"},
        **extra,
    }


OTHER_ITEMS = [
    # A multi-stream application's lease, and a KCL 3 item that is not a lease at all.
    kcl_lease("123456789012:another-stream:1700000000:shardId-000000000000", "TRIM_HORIZON"),
    {"leaseKey": {"S": "worker-metrics-1"}, "entityType": {"S": "WORKER_METRICS"}},
]


async def write_table(dynamodb: Any, settings: Settings, items: list[dict[str, Any]]) -> None:
    await LeaseTable(dynamodb, settings.lease_table_name, "fixture").ensure_table()
    for item in items:
        await dynamodb.put_item(TableName=settings.lease_table_name, Item=item)


async def raw_items(dynamodb: Any, settings: Settings) -> dict[str, dict[str, Any]]:
    response = await dynamodb.scan(TableName=settings.lease_table_name, ConsistentRead=True)
    return {item["leaseKey"]["S"]: item for item in response["Items"]}


async def run_until_written(settings: Settings, count: int) -> None:
    """Run the service until it has written `count` records (once KCL's lease expired)."""
    async with Service(settings) as service:
        await wait_for(holds(lambda: service.metrics.snapshot().written >= count), timeout=20)
    assert service.exit_code == 0


@pytest.fixture
def fast(one_shard: Settings) -> Settings:
    # KCL's worker is gone: its lease expires after lease_duration_seconds of our clock.
    return one_shard.replace(lease_duration_seconds=0.3)


async def test_the_service_continues_from_a_kcl_checkpoint_and_clears_its_pending_one(
    fast: Settings, kinesis: Any, dynamodb: Any
) -> None:
    records = make_records(30)
    results = await put_records(kinesis, fast.stream_name, records)
    done = results[9]["SequenceNumber"]
    pending = {"pendingCheckpoint": {"S": results[12]["SequenceNumber"]}}
    pending["pendingCheckpointSubSequenceNumber"] = {"N": "0"}
    await write_table(dynamodb, fast, [kcl_lease(SHARD, done, **pending), *OTHER_ITEMS])

    await run_until_written(fast, 20)

    # Everything after KCL's checkpoint, nothing before it (no replay from TRIM_HORIZON).
    assert await table_keys(dynamodb, fast.table_name) == keys_of(records[10:])
    items = await raw_items(dynamodb, fast)
    lease = items[SHARD]
    assert lease["checkpoint"] == {"S": results[-1]["SequenceNumber"]}
    assert "pendingCheckpoint" not in lease
    assert "pendingCheckpointSubSequenceNumber" not in lease
    # The items that are not leases of this stream are as they were.
    for other in OTHER_ITEMS:
        assert items[other["leaseKey"]["S"]] == other


async def test_a_kcl_checkpoint_with_a_sub_sequence_number_is_compared_as_kcl_compares_it(
    fast: Settings, kinesis: Any, dynamodb: Any
) -> None:
    records = make_records(20)
    results = await put_records(kinesis, fast.stream_name, records)
    lease = kcl_lease(SHARD, results[9]["SequenceNumber"])
    lease["checkpointSubSequenceNumber"] = {"N": "3"}  # done through user record 3 of it
    await write_table(dynamodb, fast, [lease])

    await run_until_written(fast, 10)

    # Record 9 is a plain record: (sequence, 0) is at or before (sequence, 3), so it is done,
    # as KCL decides; reading resumes with record 10.
    assert await table_keys(dynamodb, fast.table_name) == keys_of(records[10:])
    item = (await raw_items(dynamodb, fast))[SHARD]
    assert item["checkpointSubSequenceNumber"] == {"N": "0"}


async def test_an_at_timestamp_sentinel_without_a_time_is_one_line_at_start(
    fast: Settings, dynamodb: Any
) -> None:
    await write_table(dynamodb, fast, [kcl_lease(SHARD, "AT_TIMESTAMP")])
    service = Service(fast)
    with pytest.raises(WildrydesError, match=r"AT_TIMESTAMP with no time: set starting_timestamp"):
        await service.start()
    await service.stop()


async def test_leases_are_written_in_kcl_layout_with_hash_ranges_and_children(
    one_shard: Settings, kinesis: Any, dynamodb: Any
) -> None:
    await put_records(kinesis, one_shard.stream_name, make_records(5))
    async with Service(one_shard) as service:
        await wait_for(holds(lambda: service.metrics.snapshot().written == 5))
        shard = (await kinesis.list_shards(StreamName=one_shard.stream_name))["Shards"][0]
        middle = str(int(shard["HashKeyRange"]["EndingHashKey"]) // 2)
        await kinesis.split_shard(
            StreamName=one_shard.stream_name, ShardToSplit=SHARD, NewStartingHashKey=middle
        )

        async def children_noted_and_leased() -> bool:
            items = await raw_items(dynamodb, one_shard)
            children = items.get(SHARD, {}).get("childShardIds", {}).get("SS", [])
            return len(children) == 2 and all(child in items for child in children)

        await wait_for(children_noted_and_leased, timeout=20)

    items = await raw_items(dynamodb, one_shard)
    parent = items[SHARD]
    assert parent["checkpoint"] == {"S": "SHARD_END"}
    assert parent["startingHashKey"] == {"S": "0"}
    assert parent["endingHashKey"] == {"S": shard["HashKeyRange"]["EndingHashKey"]}
    children = sorted(parent["childShardIds"]["SS"])
    assert len(children) == 2
    for child in children:
        item = items[child]
        assert item["parentShardId"] == {"SS": [SHARD]}
        assert set(item) >= {
            "leaseKey",
            "leaseCounter",
            "checkpoint",
            "checkpointSubSequenceNumber",
            "ownerSwitchesSinceCheckpoint",
            "startingHashKey",
            "endingHashKey",
        }
        assert "N" in item["leaseCounter"]
        assert "N" in item["checkpointSubSequenceNumber"]
