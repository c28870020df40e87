"""`status` and `reset` against live services on the emulators."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.copy.test_faults import make_records
from tests.helpers import holds, put_records, wait_for
from tests.process import run_to_exit, service_env
from wildrydes_stream.admin.reset import Target, reset
from wildrydes_stream.admin.status import status
from wildrydes_stream.config import Settings
from wildrydes_stream.consumer.leases import LeaseTable
from wildrydes_stream.copy.app import Service
from wildrydes_stream.errors import WildrydesError


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

    report = await status(kinesis, dynamodb, quick)

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
        await reset(dynamodb, quick, None, target, force=False)

    changes = await reset(dynamodb, quick, None, target, force=True)

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

    changes = await reset(
        dynamodb, quick, ["shardId-000000000001"], Target.parse("2020-01-01T00:00:00"), force=False
    )

    assert changes[0].startswith("shardId-000000000001: ")
    assert changes[0].endswith("-> AT_TIMESTAMP")
    lease = await LeaseTable(dynamodb, quick.lease_table_name, "reader").get("shardId-000000000001")
    assert lease is not None
    assert (lease.checkpoint, lease.owner) == ("AT_TIMESTAMP", None)
    assert lease.starting_ms == 1577836800000
