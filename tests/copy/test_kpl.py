"""KPL aggregates on the stream: every user record is written, a corrupt aggregate is one dead
letter saying why, and checkpoints inside an aggregate resume after its last finished user
record (ours and KCL's alike)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import signal
from pathlib import Path
from typing import Any

from tests.deadletter_support import file_entries
from tests.faultproxy import FaultProxy
from tests.helpers import scan_table, unicorn_records, wait_for
from tests.process import ServiceProcess, service_env
from wildrydes_stream.config import Settings
from wildrydes_stream.consumer.lease import Lease
from wildrydes_stream.consumer.leases import LeaseTable
from wildrydes_stream.copy.app import Service
from wildrydes_stream.records.fields import status_time_to_epoch_ms
from wildrydes_stream.records.kpl import MAGIC, UserRecord, aggregate


def encoded(record: dict[str, Any]) -> bytes:
    return json.dumps(record, separators=(",", ":")).encode()


def key_of(record: dict[str, Any]) -> tuple[str, str]:
    return record["Name"], str(status_time_to_epoch_ms(record["StatusTime"]))


def packed(records: list[dict[str, Any]]) -> bytes:
    return aggregate([UserRecord(r["Name"], None, encoded(r)) for r in records])


async def put(kinesis: Any, stream: str, data: list[bytes]) -> list[dict[str, Any]]:
    """One Kinesis record each, in this order, on the one shard."""
    response = await kinesis.put_records(
        StreamName=stream, Records=[{"Data": d, "PartitionKey": "p"} for d in data]
    )
    assert response.get("FailedRecordCount", 0) == 0
    return response["Records"]  # type: ignore[no-any-return]


def table_keys(items: list[dict[str, Any]]) -> set[tuple[str, str]]:
    return {(i["Name"]["S"], i["StatusTime"]["N"]) for i in items}


async def lease_of(dynamodb: Any, settings: Settings) -> Lease:
    [lease] = (await LeaseTable(dynamodb, settings.lease_table_name, "reader").all()).values()
    return lease


async def test_aggregates_mixed_with_plain_and_corrupt_records_are_all_handled(
    one_shard: Settings, kinesis: Any, dynamodb: Any
) -> None:
    readings = unicorn_records([f"unicorn-{i}" for i in range(12)], minutes=50)  # 600
    plain, in_aggregates = readings[:100], readings[100:]
    good_body = packed(in_aggregates[:5])
    wrong_md5 = good_body[:-1] + bytes([good_body[-1] ^ 0xFF])
    garbage = b"\x1a\x05\x08"
    broken = MAGIC + garbage + hashlib.md5(garbage).digest()  # the MD5 is right
    data = [encoded(r) for r in plain[:50]]
    data += [packed(in_aggregates[i : i + 100]) for i in range(0, 500, 100)]
    data += [wrong_md5, broken]
    data += [encoded(r) for r in plain[50:]]
    await put(kinesis, one_shard.stream_name, data)

    async with Service(one_shard) as service:
        await service.run_burst()
        aggregates = service.metrics.registry.get_sample_value("wildrydes_kpl_aggregates_total")
    assert aggregates == 5

    assert table_keys(await scan_table(dynamodb, one_shard.table_name)) == {
        key_of(r) for r in readings
    }
    letters = file_entries(Path(one_shard.deadletter_file))
    reasons = [letter["reason"] for letter in letters]
    assert len(reasons) == 2
    assert reasons[0] == "KPL aggregate whose MD5 does not match its content"
    assert reasons[1].startswith("KPL aggregate with a broken protobuf")
    lease = await lease_of(dynamodb, one_shard)
    assert lease.subsequence == 0  # the last record is a plain one


async def test_a_kcl_checkpoint_inside_an_aggregate_resumes_after_its_sub_record(
    one_shard: Settings, kinesis: Any, dynamodb: Any
) -> None:
    readings = unicorn_records(["Shadowfax"], minutes=20)
    [result] = await put(kinesis, one_shard.stream_name, [packed(readings)])
    # As KCL leaves a lease when it stopped after user record 9 of the aggregate.
    await LeaseTable(dynamodb, one_shard.lease_table_name, "kcl").ensure_table()
    await dynamodb.put_item(
        TableName=one_shard.lease_table_name,
        Item={
            "leaseKey": {"S": result["ShardId"]},
            "leaseCounter": {"N": "7"},
            "checkpoint": {"S": result["SequenceNumber"]},
            "checkpointSubSequenceNumber": {"N": "9"},
            "ownerSwitchesSinceCheckpoint": {"N": "0"},
        },
    )

    async with Service(one_shard) as service:
        await service.run_burst()

    written = table_keys(await scan_table(dynamodb, one_shard.table_name))
    assert written == {key_of(r) for r in readings[10:]}
    lease = await lease_of(dynamodb, one_shard)
    assert (lease.checkpoint, lease.subsequence) == (result["SequenceNumber"], 19)


async def test_after_a_kill_inside_an_aggregate_the_restart_writes_the_rest_and_no_more(
    one_shard: Settings,
    kinesis: Any,
    dynamodb: Any,
    aws_env: dict[str, str],
    dynamodb_proxy: FaultProxy,
) -> None:
    readings = unicorn_records([f"unicorn-{i}" for i in range(10)], minutes=60)  # 600
    [result] = await put(kinesis, one_shard.stream_name, [packed(readings)])
    await LeaseTable(dynamodb, one_shard.lease_table_name, "r").ensure_table()
    # Slow batches, written one at a time: checkpoints land inside the aggregate.
    dynamodb_proxy.delay("BatchWriteItem", 0.05)
    slow = service_env(
        one_shard,
        {**aws_env, "AWS_ENDPOINT_URL_DYNAMODB": dynamodb_proxy.endpoint},
        writers=1,
        worker_id="victim",
    )
    victim = await ServiceProcess.start(slow, "run")
    try:

        async def checkpointed_inside() -> bool:
            leases = await LeaseTable(dynamodb, one_shard.lease_table_name, "r").all()
            lease = next(iter(leases.values()), None)
            return lease is not None and lease.checkpoint.isdigit() and lease.subsequence > 50

        await wait_for(checkpointed_inside, timeout=60)
        victim.send(signal.SIGKILL)
        await victim.wait(timeout=10)
    finally:
        await victim.close()
    lease = await lease_of(dynamodb, one_shard)
    assert lease.checkpoint == result["SequenceNumber"]
    done = lease.subsequence
    assert 50 < done < len(readings) - 1, "killed after the aggregate was done"

    dynamodb_proxy.clear()
    # The same worker id, as a restarted process on the same host: it takes its lease at once.
    async with Service(dataclasses.replace(one_shard, worker_id="victim")) as service:
        await service.run_burst()

    assert table_keys(await scan_table(dynamodb, one_shard.table_name)) == {
        key_of(r) for r in readings
    }
    writes = dynamodb_proxy.item_writes
    # What the checkpoint covered was not written again; the rest was written at least once.
    assert all(writes[key_of(r)] == 1 for r in readings[: done + 1])
    assert all(writes[key_of(r)] >= 1 for r in readings[done + 1 :])
