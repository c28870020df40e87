"""Leases: one owner per shard, conditional checkpoints, hand-over between workers."""

from __future__ import annotations

from typing import Any

import pytest

from tests.helpers import put_records, scan_table, unicorn_records, wait_for
from wildrydes_stream.checkpoint.leases import LeaseTable
from wildrydes_stream.config import Settings
from wildrydes_stream.errors import LeaseLostError
from wildrydes_stream.service import Service

pytestmark = pytest.mark.usefixtures("shadowfax_available")


def _always(_: object) -> bool:
    return True


async def test_a_checkpoint_fails_once_another_worker_took_the_lease(
    settings: Settings, dynamodb: Any
) -> None:
    first = LeaseTable(dynamodb, settings.lease_table_name, "first")
    second = LeaseTable(dynamodb, settings.lease_table_name, "second")
    await first.ensure_table()
    mine = await first.acquire("shardId-0", (), "TRIM_HORIZON", _always)
    assert mine is not None
    await first.checkpoint(mine, "100")
    theirs = await second.acquire("shardId-0", (), "TRIM_HORIZON", _always)
    assert theirs is not None

    with pytest.raises(LeaseLostError):
        await first.checkpoint(mine, "200")

    stored = await first.get("shardId-0")
    assert stored is not None
    assert (stored.owner, stored.checkpoint, stored.owner_switches) == ("second", "100", 1)


async def test_a_held_lease_is_not_taken_and_a_released_one_is(
    resources: Settings, kinesis: Any, dynamodb: Any
) -> None:
    first_records = unicorn_records(("Shadowfax", "Rocinante"), minutes=100)
    later_records = unicorn_records(("Epona", "Artax"), minutes=100)
    await put_records(kinesis, resources.stream_name, first_records)
    first = Service(resources.replace(worker_id="first"))
    second = Service(resources.replace(worker_id="second"))

    await first.start()
    try:
        await second.start()
        assert first.supervisor is not None
        assert second.supervisor is not None
        assert len(first.supervisor.owned) == 4
        assert second.supervisor.owned == {}
        await wait_for(lambda: _count(dynamodb, resources, len(first_records)))
    finally:
        await first.stop()
    try:
        await wait_for(lambda: _owns(second, 4))
        await put_records(kinesis, resources.stream_name, later_records)
        await wait_for(lambda: _count(dynamodb, resources, len(first_records + later_records)))
        # The second worker started from the first one's checkpoints, not from the start.
        assert second.metrics.snapshot().read == len(later_records)
    finally:
        await second.stop()


async def test_an_expired_lease_is_taken_over(
    resources: Settings, kinesis: Any, dynamodb: Any
) -> None:
    settings = resources.replace(worker_id="survivor", lease_duration_seconds=0.5)
    records = unicorn_records(("Pegasus",), minutes=50)
    await put_records(kinesis, settings.stream_name, records)
    ghost = LeaseTable(dynamodb, settings.lease_table_name, "ghost")
    await ghost.ensure_table()
    shards = (await kinesis.list_shards(StreamName=settings.stream_name))["Shards"]
    for shard in shards:
        await ghost.acquire(shard["ShardId"], (), "TRIM_HORIZON", _always)

    async with Service(settings) as survivor:
        assert survivor.supervisor is not None
        assert survivor.supervisor.owned == {}  # held by the ghost, not yet expired
        await wait_for(lambda: _owns(survivor, len(shards)))
        await wait_for(lambda: _count(dynamodb, settings, len(records)))


async def _owns(service: Service, shards: int) -> bool:
    assert service.supervisor is not None
    return len(service.supervisor.owned) == shards


async def _count(dynamodb: Any, settings: Settings, expected: int) -> bool:
    return len(await scan_table(dynamodb, settings.table_name)) == expected
