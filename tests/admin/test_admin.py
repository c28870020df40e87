"""`status` and `reset` against live services on the emulators: what they show, what they
move, and the positions `reset` refuses because no worker could start there."""

from __future__ import annotations

import json
from typing import Any

import pytest
from aiobotocore.credentials import AioCredentials

from tests.aggregate.test_aggregate import aggregate_settings
from tests.copy.test_faults import make_records
from tests.helpers import holds, put_records, wait_for
from tests.process import run_to_exit, service_env
from wildrydes_stream.admin.provision import ensure_stream
from wildrydes_stream.admin.reset import Target, reset
from wildrydes_stream.admin.status import status
from wildrydes_stream.aggregate.app import Aggregator
from wildrydes_stream.aws.fanout import FanoutClient
from wildrydes_stream.config import Settings
from wildrydes_stream.consumer.leases import LeaseTable
from wildrydes_stream.copy.app import Service
from wildrydes_stream.errors import ConfigError, WildrydesError

SHARD = "shardId-000000000000"


@pytest.fixture
def quick(resources: Settings) -> Settings:
    # Liveness is judged over a third of the lease duration: keep the commands quick.
    return resources.replace(lease_duration_seconds=1.5)


async def test_status_shows_every_shard_its_live_owner_and_each_worker(
    quick: Settings, kinesis: Any, dynamodb: Any, running: list[Service]
) -> None:
    first = Service(quick.replace(worker_id="first"))
    running.append(first)
    await first.start()
    second = Service(quick.replace(worker_id="second"))
    running.append(second)
    await second.start()
    await wait_for(holds(lambda: len(first.supervisor.owned) == 2), timeout=20)  # type: ignore[union-attr]

    report = await status(kinesis, dynamodb, quick, "run")

    assert [row.state for row in report.shards] == ["open"] * 4
    assert {row.owner for row in report.shards} == {"first", "second"}
    assert all(row.owner_alive for row in report.shards)
    assert report.alive == ["first", "second"]
    assert {owner: len(held) for owner, held in report.workers.items()} == {
        "first": 2,
        "second": 2,
    }


async def test_status_json_from_the_command_line(
    quick: Settings, aws_env: dict[str, str], kinesis: Any, dynamodb: Any
) -> None:
    await put_records(kinesis, quick.stream_name, make_records(20))
    code, stdout, stderr = await run_to_exit(service_env(quick, aws_env), "status", "--json")
    assert code == 0, stderr
    report = json.loads(stdout)
    assert len(report["shards"]) == 4
    # Nobody has read anything: the shards with records say how old the oldest unread is.
    assert any(row["oldest_unread_age_s"] is not None for row in report["shards"])
    assert report["workers"] == {}


async def test_reset_refuses_a_live_owner_and_force_moves_it_safely(
    quick: Settings, kinesis: Any, dynamodb: Any, running: list[Service]
) -> None:
    records = make_records(40)
    await put_records(kinesis, quick.stream_name, records)
    service = Service(quick)
    running.append(service)
    await service.start()
    await wait_for(holds(lambda: service.metrics.snapshot().written == len(records)))
    target = Target.parse("TRIM_HORIZON")

    with pytest.raises(WildrydesError, match="live workers hold"):
        await reset(kinesis, dynamodb, quick, None, target, force=False)

    changes = await reset(kinesis, dynamodb, quick, None, target, force=True)

    assert len(changes) == 4
    assert all("-> TRIM_HORIZON (taken from test-worker)" in change for change in changes)
    # The running owner lets the shards go, takes them again and reads them from the start.
    await wait_for(holds(lambda: service.metrics.snapshot().read == 2 * len(records)), timeout=20)


async def test_reset_of_a_stopped_consumer_replays_from_a_time(
    quick: Settings, kinesis: Any, dynamodb: Any
) -> None:
    records = make_records(12)
    await put_records(kinesis, quick.stream_name, records)
    async with Service(quick) as service:
        await service.run_burst()

    moment = Target.parse("2020-01-01T00:00:00")
    changes = await reset(kinesis, dynamodb, quick, ["shardId-000000000001"], moment, force=False)

    assert changes[0].startswith("shardId-000000000001: ")
    # What was set, with the time (UTC), not the bare sentinel.
    assert changes[0].endswith("-> AT_TIMESTAMP 2020-01-01T00:00:00.000+00:00")
    lease = await LeaseTable(dynamodb, quick.lease_table_name, "reader").get("shardId-000000000001")
    assert lease is not None
    assert (lease.checkpoint, lease.owner) == ("AT_TIMESTAMP", None)
    assert lease.starting_ms == 1577836800000


@pytest.mark.parametrize(
    ("text", "checkpoint"),
    [("latest", "LATEST"), ("Latest", "LATEST"), ("trim_horizon", "TRIM_HORIZON"),
     (" TRIM_HORIZON ", "TRIM_HORIZON")],
)  # fmt: skip
def test_reset_takes_the_keywords_in_any_case(text: str, checkpoint: str) -> None:
    assert Target.parse(text) == Target(checkpoint)


async def test_reset_refuses_a_position_the_shard_cannot_be_read_from_and_moves_nothing(
    quick: Settings, aws_env: dict[str, str], kinesis: Any, dynamodb: Any
) -> None:
    records = make_records(24)
    put = await put_records(kinesis, quick.stream_name, records)
    async with Service(quick) as service:
        await service.run_burst()
    table = LeaseTable(dynamodb, quick.lease_table_name, "reader")
    before = {shard: lease.checkpoint for shard, lease in (await table.all()).items()}
    shard = put[0]["ShardId"]
    mine = [r["SequenceNumber"] for r in put if r["ShardId"] == shard]
    other = next(r for r in put if r["ShardId"] != shard)["SequenceNumber"]
    assert len(mine) >= 2, "the test needs two records on one shard"

    refusals = {
        "12345": f"not a sequence number of {shard}",  # below the shard's range
        other: f"Kinesis refuses it for {shard}",  # in range, but of another shard
        "2999-01-01T00:00:00": "the time is in the future",
    }
    for text, reason in refusals.items():
        with pytest.raises(ConfigError, match=reason):
            await reset(kinesis, dynamodb, quick, [shard], Target.parse(text), force=True)
    env = service_env(quick, aws_env)
    code, stdout, stderr = await run_to_exit(env, "reset", "--shard", shard, "--to", "12345")
    assert (code, stdout) == (2, "")
    [line] = stderr.splitlines()
    assert f"--to 12345: not a sequence number of {shard}" in line

    after = {shard: lease.checkpoint for shard, lease in (await table.all()).items()}
    assert after == before

    # A sequence number of the shard is taken, and reading resumes just after it.
    [change] = await reset(kinesis, dynamodb, quick, [shard], Target.parse(mine[0]), force=False)
    assert change.endswith(f"-> {mine[0]}")
    async with Service(quick) as service:
        await service.run_burst()
        assert service.metrics.snapshot().read == len(mine) - 1


async def test_a_checkpoint_kinesis_refuses_is_named_with_reset_by_the_worker_and_status(
    quick: Settings, kinesis: Any, dynamodb: Any, running: list[Service]
) -> None:
    """Written by hand or by an older version (reset now refuses it): the worker cannot read
    the shard. It must say so, not send the operator to the role's IAM policy."""
    async with Service(quick) as service:
        await service.run_burst()
    await dynamodb.update_item(
        TableName=quick.lease_table_name,
        Key={"leaseKey": {"S": SHARD}},
        UpdateExpression="SET #cp = :cp",
        ExpressionAttributeNames={"#cp": "checkpoint"},
        ExpressionAttributeValues={":cp": {"S": "12345"}},
    )

    service = Service(quick)
    running.append(service)
    await service.start()
    await wait_for(holds(lambda: any("GetShardIterator" in c for c in service.blocked.causes())))

    [cause] = [c for c in service.blocked.causes() if "GetShardIterator" in c]
    assert f"the checkpoint of {SHARD} in lease table {quick.lease_table_name} (12345)" in cause
    assert f"`wildrydes-stream reset --shard {SHARD} --to TRIM_HORIZON`" in cause
    assert "policy" not in cause
    report = await status(kinesis, dynamodb, quick, "run")
    [row] = [row for row in report.shards if row.shard == SHARD]
    assert row.checkpoint == "12345"
    assert row.problem is not None
    assert "Kinesis refuses the checkpoint" in row.problem


async def test_status_and_reset_see_the_aggregators_lease_table_with_app_aggregate(
    quick: Settings, aws_env: dict[str, str], kinesis: Any, dynamodb: Any
) -> None:
    s = aggregate_settings(quick)
    await ensure_stream(kinesis, s.raw_stream_name, 2)
    async with Aggregator(s) as aggregator:
        await aggregator.run_burst()
    env = service_env(s, aws_env)

    code, stdout, stderr = await run_to_exit(env, "status", "--app", "aggregate", "--json")

    assert code == 0, stderr
    report = json.loads(stdout)
    assert report["application"] == "aggregate"
    assert (report["stream"], report["lease_table"]) == (
        s.raw_stream_name,
        s.aggregate_lease_table_name,
    )
    assert [row["checkpoint"] for row in report["shards"]] == ["TRIM_HORIZON"] * 2

    code, stdout, stderr = await run_to_exit(
        env, "reset", "--application", "aggregate", "--all", "--to", "latest"
    )

    assert code == 0, stderr
    assert stdout.splitlines() == [
        "shardId-000000000000: TRIM_HORIZON -> LATEST",
        "shardId-000000000001: TRIM_HORIZON -> LATEST",
    ]
    leases = await LeaseTable(dynamodb, s.aggregate_lease_table_name, "reader").all()
    assert {lease.checkpoint for lease in leases.values()} == {"LATEST"}


async def test_status_names_the_setting_of_a_missing_stream_and_reset_refuses_a_future_time(
    settings: Settings, aws_env: dict[str, str]
) -> None:
    s = aggregate_settings(settings)  # neither stream exists
    env = service_env(s, aws_env)

    code, _, stderr = await run_to_exit(env, "status", "--app", "aggregate")

    assert code == 1
    assert stderr.splitlines() == [
        f"wildrydes-stream: Kinesis stream {s.raw_stream_name!r} does not exist: create it or "
        "set raw_stream_name (WILDRYDES_RAW_STREAM_NAME)"
    ]
    # Refused as given, even with no lease to move (before, "nothing to reset", exit 0).
    code, stdout, stderr = await run_to_exit(env, "reset", "--all", "--to", "2999-01-01T00:00")
    assert (code, stdout) == (2, "")
    assert stderr.splitlines() == [
        "wildrydes-stream: --to 2999-01-01T00:00: the time is in the future, there is nothing "
        "to read from there; give a past time, or LATEST for only what comes next"
    ]


async def test_status_shows_the_fanout_consumer_and_its_state(
    quick: Settings, aws_env: dict[str, str], kinesis: Any, dynamodb: Any, read_mode: Any
) -> None:
    """In `fanout` mode: `not registered` before the first start, ACTIVE with its ARN once
    the service registered it; from the command line too. In `polling` mode against a Kinesis
    without enhanced fan-out (kinesalite), no consumer line and no error."""
    settings = await read_mode.apply(quick)
    env = service_env(settings, aws_env)
    if read_mode.mode == "polling":
        report = await status(kinesis, dynamodb, settings, "run")
        assert report.fanout_consumer is None
        code, stdout, stderr = await run_to_exit(env, "status")
        assert code == 0, stderr
        assert "fan-out consumer" not in stdout
        return
    [server] = read_mode.servers
    client = FanoutClient(server.url, "us-east-1", AioCredentials("test", "test"))
    try:
        before = await status(kinesis, dynamodb, settings, "run", client)
        assert before.fanout_consumer is not None
        assert before.fanout_consumer.state == "not registered"
        assert before.fanout_consumer.in_use

        records = make_records(20)
        await put_records(kinesis, settings.stream_name, records)
        async with Service(settings) as service:
            await wait_for(holds(lambda: service.metrics.snapshot().written == len(records)))
        after = await status(kinesis, dynamodb, settings, "run", client)
    finally:
        await client.close()
    consumer = after.fanout_consumer
    assert consumer is not None
    assert (consumer.name, consumer.state) == (settings.fanout_consumer_name, "ACTIVE")
    assert consumer.arn in server.consumer_arns()

    code, stdout, stderr = await run_to_exit(env, "status")
    assert code == 0, stderr
    assert f"fan-out consumer {settings.fanout_consumer_name}: ACTIVE" in stdout
    assert consumer.arn is not None
    assert consumer.arn in stdout
    assert consumer.created is not None
    assert f"registered {consumer.created}" in stdout
    code, stdout, stderr = await run_to_exit(env, "status", "--json")
    assert json.loads(stdout)["fanout_consumer"]["state"] == "ACTIVE"
