"""Leases: one owner per shard, conditional checkpoints, expiry, and shards spread over workers."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.faultproxy import DYNAMODB_INTERNAL, DYNAMODB_THROTTLED, FaultProxy
from tests.helpers import holds, put_records, scan_table, unicorn_records, wait_for
from wildrydes_stream.config import Settings
from wildrydes_stream.consumer.balancing import fair_share, lease_to_steal
from wildrydes_stream.consumer.lease import Lease
from wildrydes_stream.consumer.leases import LeaseTable
from wildrydes_stream.copy.app import Service
from wildrydes_stream.errors import LeaseLostError


def _always(_: object) -> bool:
    return True


def _never(_: object) -> bool:
    return False


def _leases(*owners: str | None) -> list[Lease]:
    return [Lease(f"shardId-{i:012}", "TRIM_HORIZON", owner, 1) for i, owner in enumerate(owners)]


def test_a_worker_below_its_share_steals_from_the_busiest_one() -> None:
    leases = _leases("a", "a", "a", "a", "b")
    assert fair_share(leases, "c", _never) == 2  # ceil(5 / 3 live workers)
    victim = lease_to_steal(leases, "c", _never)
    assert victim is not None
    assert victim.owner == "a"


def test_no_lease_is_stolen_once_the_spread_is_fair() -> None:
    assert lease_to_steal(_leases("a", "a", "b", "b"), "b", _never) is None
    # b holds one of three, below its share of two, but a holds no more than its share:
    # taking one would only make a the one below, and the lease would swap back and forth.
    assert lease_to_steal(_leases("a", "a", "b"), "b", _never) is None
    assert lease_to_steal(_leases("a", "a", "a"), "b", _never) is not None


def test_expired_owners_are_not_counted_as_workers() -> None:
    leases = _leases("dead", "dead", "a", "a")

    def dead(lease: Lease) -> bool:
        return lease.owner == "dead"

    assert fair_share(leases, "b", dead) == 2  # a and b alive
    assert lease_to_steal(leases, "b", dead) is None  # a holds exactly its share


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


async def test_two_workers_split_the_shards_and_one_takes_all_when_the_other_stops(
    resources: Settings, kinesis: Any, dynamodb: Any
) -> None:
    first_records = unicorn_records(("Shadowfax", "Rocinante", "Pegasus"), minutes=100)
    later_records = unicorn_records(("Epona", "Artax"), minutes=100)
    await put_records(kinesis, resources.stream_name, first_records)
    first = Service(resources.replace(worker_id="first"))
    second = Service(resources.replace(worker_id="second"))

    await first.start()
    try:
        await second.start()
        # The worker a lease was taken from notices at its next renewal or checkpoint.
        await wait_for(lambda: _split_evenly(first, second), timeout=30)
        # A replica exports lag only for the shards it reads: a stale series for a shard that
        # moved away would hold a lag alert up.
        assert _lag_series(first) <= _owned(first)
        assert _lag_series(second) <= _owned(second)
        await wait_for(lambda: _count(dynamodb, resources, len(first_records)))
    finally:
        await first.stop()
    try:
        await wait_for(lambda: _owns(second, 4))
        await put_records(kinesis, resources.stream_name, later_records)
        await wait_for(lambda: _count(dynamodb, resources, len(first_records + later_records)))
    finally:
        await second.stop()
    leases = await LeaseTable(dynamodb, resources.lease_table_name, "reader").all()
    assert all(lease.owner is None for lease in leases.values())


async def test_a_renewed_lease_is_not_taken_until_it_is_released(
    one_shard: Settings, dynamodb: Any
) -> None:
    settings = one_shard
    fast_expiry = settings.replace(lease_duration_seconds=0.3)
    reader = LeaseTable(dynamodb, settings.lease_table_name, "reader")
    async with Service(fast_expiry.replace(worker_id="holder")) as holder:
        (shard,) = _owned(holder)
        first_counter = await _counter(reader, shard)
        async with Service(fast_expiry.replace(worker_id="waiter")) as waiter:
            # Five lease durations of renewals go by without the waiter taking the lease.
            await wait_for(lambda: _counter_above(reader, shard, first_counter + 15))
            assert _owned(waiter) == set()
            await holder.stop()
            await wait_for(lambda: _owns(waiter, 1))


async def test_an_expired_lease_is_taken_over(
    one_shard: Settings, kinesis: Any, dynamodb: Any
) -> None:
    settings = one_shard.replace(worker_id="survivor", lease_duration_seconds=0.5)
    records = unicorn_records(("Pegasus",), minutes=50)
    await put_records(kinesis, settings.stream_name, records)
    ghost = LeaseTable(dynamodb, settings.lease_table_name, "ghost")
    await ghost.ensure_table()
    (shard,) = (await kinesis.list_shards(StreamName=settings.stream_name))["Shards"]
    await ghost.acquire(shard["ShardId"], (), "TRIM_HORIZON", _always)

    async with Service(settings) as survivor:
        assert _owned(survivor) == set()  # held by the ghost, not yet expired
        await wait_for(lambda: _owns(survivor, 1))
        await wait_for(lambda: _count(dynamodb, settings, len(records)))


async def test_a_lease_handed_over_is_read_even_once_its_new_owner_took_its_share_of_free_ones(
    resources: Settings, kinesis: Any, dynamodb: Any
) -> None:
    # A finished hand-off leaves the lease naming its new owner, who reads it at its next
    # look. Meanwhile free leases may have come up (a replica stopped): taking those must not
    # use up the share so that the lease handed over is never read (nobody else takes it, it
    # names a live worker). In shard order: 0 held by a live worker, 1 and 2 free, 3 handed
    # over to "w"; w's share is 2 of the 4.
    settings = resources.replace(worker_id="w", lease_duration_seconds=60.0)
    listed = await kinesis.list_shards(StreamName=settings.stream_name)
    shards = sorted(shard["ShardId"] for shard in listed["Shards"])
    other = LeaseTable(dynamodb, settings.lease_table_name, "other")
    await other.ensure_table()
    assert await other.acquire(shards[0], (), "TRIM_HORIZON", _always) is not None
    handed = LeaseTable(dynamodb, settings.lease_table_name, "w")
    assert await handed.acquire(shards[3], (), "TRIM_HORIZON", _always) is not None

    async with Service(settings) as w:
        await wait_for(holds(lambda: shards[3] in _owned(w)), timeout=10)
        await wait_for(holds(lambda: len(_owned(w)) == 2), timeout=10)
        assert shards[0] not in _owned(w)


async def _split_evenly(first: Service, second: Service) -> bool:
    mine, theirs = _owned(first), _owned(second)
    return len(mine) == len(theirs) == 2 and mine.isdisjoint(theirs)


def _lag_series(service: Service) -> set[str]:
    return {
        sample.labels["shard"]
        for family in service.metrics.behind_latest.collect()
        for sample in family.samples
    }


def _owned(service: Service) -> set[str]:
    assert service.supervisor is not None
    return set(service.supervisor.owned)


async def _owns(service: Service, shards: int) -> bool:
    return len(_owned(service)) == shards


async def _count(dynamodb: Any, settings: Settings, expected: int) -> bool:
    return len(await scan_table(dynamodb, settings.table_name)) == expected


async def _counter(table: LeaseTable, shard: str) -> int:
    lease = await table.get(shard)
    assert lease is not None
    return lease.counter


async def _counter_above(table: LeaseTable, shard: str, value: int) -> bool:
    return await _counter(table, shard) > value


async def test_the_leases_of_trimmed_shards_are_deleted_and_no_others(
    resources: Settings, dynamodb: Any
) -> None:
    other = LeaseTable(dynamodb, resources.lease_table_name, "previous-worker")
    await other.ensure_table()
    # A finished shard Kinesis no longer lists, and one still in flight elsewhere.
    for shard_id, checkpoint in (("shardId-trimmed", "SHARD_END"), ("shardId-unlisted", "42")):
        lease = await other.acquire(shard_id, (), "TRIM_HORIZON", _always)
        assert lease is not None
        await other.checkpoint(lease, checkpoint)
        await other.release(lease)

    async with Service(resources) as service:
        await service.run_burst()

    leases = await other.all()
    assert "shardId-trimmed" not in leases
    assert leases["shardId-unlisted"].checkpoint == "42"
    assert len(leases) == 5  # the stream's four shards and the unlisted one


async def test_replicas_started_together_spread_evenly_without_taking_from_each_other(
    settings: Settings, kinesis: Any, dynamodb: Any, running: list[Service]
) -> None:
    from wildrydes_stream.admin.provision import ensure_stream, ensure_table

    await ensure_stream(kinesis, settings.stream_name, 8)
    await ensure_table(dynamodb, settings)
    # The production pace of lease-table looks: replicas see each other within one.
    paced = settings.replace(lease_poll_interval_seconds=1.0)
    services = [Service(paced.replace(worker_id=f"replica-{i}")) for i in range(3)]
    running.extend(services)
    await asyncio.gather(*(service.start() for service in services))

    def spread() -> list[int]:
        return sorted(len(s.supervisor.owned) for s in services if s.supervisor)

    await wait_for(holds(lambda: spread() == [2, 3, 3]), timeout=20)
    # Each shard was started once in all: nobody took a lease from another to balance.
    starts = [e for s in services if s.supervisor for e in s.supervisor.history]
    assert sorted(shard for event, shard in starts if event == "start") == sorted(
        {shard for _, shard in starts}
    )
    assert len(starts) == 8


async def test_a_rebalance_hands_shards_over_without_writing_anything_twice(
    resources: Settings,
    dynamodb_proxy: Any,
    kinesis: Any,
    dynamodb: Any,
    running: list[Service],
) -> None:
    from tests.copy.test_faults import make_records

    first = Service(resources.replace(worker_id="first"))
    running.append(first)
    await first.start()
    await wait_for(holds(lambda: first.supervisor is not None and len(first.supervisor.owned) == 4))
    records = make_records(1200)
    stop = asyncio.Event()

    async def produce() -> None:
        for start in range(0, len(records), 40):
            await put_records(kinesis, resources.stream_name, records[start : start + 40])
            if stop.is_set():
                return
            await asyncio.sleep(0.05)  # a steady producer, not a wait for a result

    producer = asyncio.create_task(produce())
    await wait_for(holds(lambda: first.metrics.snapshot().written >= 200))
    second = Service(resources.replace(worker_id="second"))
    running.append(second)
    await second.start()

    def spread() -> list[int]:
        return sorted(len(s.supervisor.owned) for s in (first, second) if s.supervisor)

    await wait_for(holds(lambda: spread() == [2, 2]), timeout=20)
    await producer
    await wait_for(
        holds(
            lambda: (
                first.metrics.snapshot().written + second.metrics.snapshot().written >= len(records)
            )
        ),
        timeout=30,
    )
    assert first.supervisor is not None
    handed = [shard for event, shard in first.supervisor.history if event == "handed over"]
    assert len(handed) == 2
    # Counted at the DynamoDB endpoint: every item exactly once, through the hand-offs.
    assert len(dynamodb_proxy.item_writes) == len(records)
    assert max(dynamodb_proxy.item_writes.values()) == 1


async def test_lease_renewals_ride_out_throttling_and_5xx_without_losing_the_lease(
    one_shard: Settings, dynamodb_proxy: FaultProxy, dynamodb: Any
) -> None:
    # Renewals go over the lean client, which has no botocore retries of its own: four
    # failures in a row would be four beats without a renewal, past this lease duration, and
    # the holder would stop reading its own shard.
    settings = one_shard.replace(lease_duration_seconds=3.0, worker_id="holder")
    reader = LeaseTable(dynamodb, settings.lease_table_name, "reader")
    async with Service(settings) as holder:
        (shard,) = _owned(holder)
        before = await _counter(reader, shard)
        dynamodb_proxy.fail("UpdateItem", DYNAMODB_THROTTLED, times=2)
        dynamodb_proxy.fail("UpdateItem", DYNAMODB_INTERNAL, times=2)
        await wait_for(lambda: _counter_above(reader, shard, before + 4), timeout=20)
        assert dynamodb_proxy.injected["UpdateItem"] == 4
        assert holder.supervisor is not None
        assert holder.supervisor.history == [("start", shard)]  # never dropped, never retaken
        assert _owned(holder) == {shard}
