"""Leases changing hands: where a shard starts, LATEST never skipping once a lease moves, a lost
lease fenced on the owner's side, and a stop that keeps its leases until it releases them.

Two-replica cases run two `Service` objects in this process with different worker ids; faults
come from a proxy in front of dynalite (the test's own clients talk to dynalite directly).
"""

from __future__ import annotations

import asyncio
import hashlib
import signal
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import pytest

from tests.faultproxy import DYNAMODB_INTERNAL, DYNAMODB_THROTTLED, FaultProxy
from tests.helpers import holds, put_records, scan_table, wait_for
from tests.process import ServiceProcess, service_env
from wildrydes_stream.config import Settings
from wildrydes_stream.consumer.lease import Lease
from wildrydes_stream.consumer.leases import LeaseTable
from wildrydes_stream.copy.app import Service
from wildrydes_stream.records.fields import status_time_to_epoch_ms
from wildrydes_stream.runtime.waiting import wait_or_timeout
from wildrydes_stream.source.shards import Shard, readable_shards, starting_position

if TYPE_CHECKING:
    pass

pytestmark = pytest.mark.timeout(90)

UNICORNS = ("Shadowfax", "Rocinante", "Bucephalus", "Pegasus", "Epona", "Artax")
Key = tuple[str, str]


def records(minutes: range, names: tuple[str, ...] = UNICORNS) -> list[dict[str, Any]]:
    """One aggregate per unicorn and minute of 2016-02-12: distinct keys for distinct ranges."""
    return [
        {
            "Name": name,
            "StatusTime": f"2016-02-12 {minute // 60:02d}:{minute % 60:02d}:00.000",
            "Distance": 1000 + minute,
            "MinMagicPoints": 140,
            "MaxMagicPoints": 150,
            "MinHealthPoints": 141,
            "MaxHealthPoints": 149,
        }
        for minute in minutes
        for name in names
    ]


def keys_of(batch: list[dict[str, Any]]) -> set[Key]:
    return {(r["Name"], str(status_time_to_epoch_ms(r["StatusTime"]))) for r in batch}


async def table_keys(dynamodb: Any, settings: Settings) -> set[Key]:
    items = await scan_table(dynamodb, settings.table_name)
    return {(i["Name"]["S"], i["StatusTime"]["N"]) for i in items}


def owned(service: Service) -> set[str]:
    assert service.supervisor is not None
    return set(service.supervisor.owned)


def read_from(service: Service, shard: str) -> float:
    value = service.metrics.registry.get_sample_value(
        "wildrydes_records_read_total", {"shard": shard}
    )
    return value or 0.0


def written(service: Service, count: int) -> Callable[[], Awaitable[bool]]:
    return holds(lambda: service.metrics.snapshot().written >= count)


def last_per_shard(results: list[dict[str, Any]]) -> dict[str, int]:
    last: dict[str, int] = {}
    for result in results:
        shard, sequence = result["ShardId"], int(result["SequenceNumber"])
        last[shard] = max(last.get(shard, 0), sequence)
    return last


async def lease_of(dynamodb: Any, settings: Settings, shard: str) -> Lease:
    lease = await LeaseTable(dynamodb, settings.lease_table_name, "test-reader").get(shard)
    assert lease is not None
    return lease


async def caught_up(service: Service) -> None:
    """Every owned shard had an empty poll: its iterator exists, later puts come after it."""
    assert service.supervisor is not None
    await asyncio.wait_for(service.supervisor.wait_caught_up(), 30)


def _always(_: Lease) -> bool:
    return True


# --- 1. where a shard without a lease starts ------------------------------------------------

PARENT = Shard("shardId-000000000000", (), closed=True)
CHILDREN = [Shard(f"shardId-00000000000{i}", (PARENT.shard_id,), closed=False) for i in (1, 2)]


def _ids(shards: list[Shard]) -> list[str]:
    return [shard.shard_id for shard in shards]


def test_a_closed_shard_never_read_is_done_at_latest_and_read_otherwise() -> None:
    shards = [PARENT, *CHILDREN]
    assert _ids(readable_shards(shards, (), (), skip_unleased_closed=True)) == _ids(CHILDREN)
    assert _ids(readable_shards(shards, (), ())) == [PARENT.shard_id]
    # Once this consumer holds the parent's lease, it is read to its end whatever the position.
    leased = [PARENT.shard_id]
    assert _ids(readable_shards(shards, (), leased, skip_unleased_closed=True)) == [PARENT.shard_id]


def test_a_parent_without_a_lease_is_done_once_a_child_has_one() -> None:
    # KCL deletes a finished parent's lease: its child's lease is what shows it was read.
    leased = [CHILDREN[0].shard_id]
    assert _ids(readable_shards([PARENT, *CHILDREN], (), leased)) == _ids(CHILDREN)


def test_a_child_starts_at_trim_horizon_only_after_a_parent_this_consumer_read() -> None:
    child = CHILDREN[0]
    assert starting_position(child, [PARENT.shard_id], "LATEST") == "TRIM_HORIZON"
    assert starting_position(child, [], "LATEST") == "LATEST"
    assert starting_position(child, [], "AT_TIMESTAMP") == "AT_TIMESTAMP"
    assert starting_position(PARENT, [], "LATEST") == "LATEST"


async def test_latest_on_a_stream_split_before_start_reads_only_what_is_put_after_start(
    one_shard: Settings, kinesis: Any, dynamodb: Any, running: list[Service]
) -> None:
    settings = one_shard.replace(starting_position="LATEST")
    stream = settings.stream_name
    (parent,) = [s["ShardId"] for s in (await kinesis.list_shards(StreamName=stream))["Shards"]]
    on_parent = records(range(0, 5))
    await put_records(kinesis, stream, on_parent)
    # Split between the unicorns' hash keys so both children receive records.
    hashes = sorted(int(hashlib.md5(n.encode()).hexdigest(), 16) for n in UNICORNS)
    await kinesis.split_shard(
        StreamName=stream, ShardToSplit=parent, NewStartingHashKey=str(hashes[3])
    )

    async def active() -> bool:
        summary = await kinesis.describe_stream_summary(StreamName=stream)
        return bool(summary["StreamDescriptionSummary"]["StreamStatus"] == "ACTIVE")

    await wait_for(active)
    on_children = records(range(5, 10))
    put = await put_records(kinesis, stream, on_children)
    children = {r["ShardId"] for r in put}
    assert len(children) == 2
    assert parent not in children

    service = Service(settings)
    running.append(service)
    await service.start()
    await wait_for(holds(lambda: owned(service) == children))
    await caught_up(service)
    after = records(range(10, 15))
    await put_records(kinesis, stream, after)
    await wait_for(written(service, len(after)))
    await service.stop()

    # The closed parent, never read by this consumer, counts as done at LATEST: its children
    # start at LATEST too, not at TRIM_HORIZON (which would replay what they held before).
    assert await table_keys(dynamodb, settings) == keys_of(after)
    assert service.metrics.snapshot().read == len(after)
    assert service.supervisor is not None
    assert ("start", parent) not in service.supervisor.history


# --- 2. a lease still at LATEST moves without skipping ---------------------------------------


async def test_a_lease_left_at_latest_is_read_by_the_next_owner_from_where_the_first_started(
    one_shard: Settings, kinesis: Any, dynamodb: Any, running: list[Service]
) -> None:
    settings = one_shard.replace(starting_position="LATEST")
    before = records(range(0, 5))
    await put_records(kinesis, settings.stream_name, before)

    first = Service(settings.replace(worker_id="first"))
    running.append(first)
    await first.start()
    await caught_up(first)
    (shard,) = owned(first)
    await first.stop()  # nothing arrived: the lease is released still at LATEST
    left = await lease_of(dynamodb, settings, shard)
    assert (left.checkpoint, left.owner) == ("LATEST", None)

    between = records(range(5, 10))
    await put_records(kinesis, settings.stream_name, between)
    await _next_owner_reads(settings.replace(worker_id="second"), kinesis, dynamodb, between)


async def test_a_lease_at_latest_of_a_killed_owner_is_read_from_where_that_owner_started(
    one_shard: Settings, aws_env: dict[str, str], kinesis: Any, dynamodb: Any
) -> None:
    settings = one_shard.replace(starting_position="LATEST", lease_duration_seconds=1.0)
    before = records(range(0, 5))
    put = await put_records(kinesis, settings.stream_name, before)
    (shard,) = last_per_shard(put)
    victim = await ServiceProcess.start(service_env(settings, aws_env, worker_id="first"), "run")
    try:
        await victim.started()
        await victim.wait_log("reading shard")  # its lease exists: it started
        victim.send(signal.SIGKILL)
        assert await victim.wait(timeout=10) == -signal.SIGKILL
    finally:
        await victim.close()
    left = await lease_of(dynamodb, settings, shard)
    assert (left.checkpoint, left.owner) == ("LATEST", "first")

    between = records(range(5, 10))
    await put_records(kinesis, settings.stream_name, between)
    # Another worker id, as a restarted pod has: it takes the lease once it expires.
    await _next_owner_reads(settings.replace(worker_id="second"), kinesis, dynamodb, between)


async def _next_owner_reads(
    settings: Settings, kinesis: Any, dynamodb: Any, between: list[dict[str, Any]]
) -> None:
    """A new owner of the shard's lease reads `between` (put while the lease moved), then what
    is put while it runs, and nothing else."""
    async with Service(settings) as second:
        await wait_for(written(second, len(between)))
        after = records(range(10, 15))
        await put_records(kinesis, settings.stream_name, after)
        await wait_for(written(second, len(between + after)))
    # Everything put after the first owner started, and nothing from before.
    assert await table_keys(dynamodb, settings) == keys_of(between + after)
    assert second.metrics.snapshot().read == len(between + after)


# --- 3. a lost lease is fenced on the owner's side ------------------------------------------


async def test_a_lease_stolen_while_its_records_are_queued_writes_none_of_them(
    one_shard: Settings,
    kinesis: Any,
    dynamodb: Any,
    dynamodb_proxy: FaultProxy,
    running: list[Service],
) -> None:
    settings = one_shard.replace(worker_id="owner", lease_duration_seconds=1.0, writers=2)
    early, late = records(range(0, 10)), records(range(10, 40))
    put = await put_records(kinesis, settings.stream_name, early)
    (shard,) = last_per_shard(put)
    service = Service(settings)
    running.append(service)
    await service.start()
    supervisor, pool = service.supervisor, service.pool
    assert supervisor is not None
    assert pool is not None
    checkpointed = str(last_per_shard(put)[shard])

    async def early_checkpointed() -> bool:
        return (await lease_of(dynamodb, settings, shard)).checkpoint == checkpointed

    await wait_for(early_checkpointed)

    # Throttle every write, so the late records sit in the writers, then read them all.
    dynamodb_proxy.fail("BatchWriteItem", DYNAMODB_THROTTLED, times=None)
    await put_records(kinesis, settings.stream_name, late)
    await wait_for(holds(lambda: service.metrics.snapshot().read == len(early + late)))
    tenure = supervisor.owned[shard]
    assert pool.depth() > 0 or tenure.progress.in_flight > 0

    # Another worker takes the lease by a conditional write, and keeps it renewed.
    thief = LeaseTable(dynamodb, settings.lease_table_name, "thief")
    stolen = await thief.acquire(shard, (), "TRIM_HORIZON", _always)
    assert stolen is not None
    done = asyncio.Event()

    async def keep_renewed() -> None:
        while not await wait_or_timeout(done, settings.lease_duration_seconds / 3):
            await thief.renew(stolen)

    renewer = asyncio.create_task(keep_renewed())
    try:
        await wait_for(holds(lambda: shard not in supervisor.owned))
        calls = dynamodb_proxy.calls["BatchWriteItem"]
        dynamodb_proxy.clear()  # writes would go through from here on
        await asyncio.wait_for(pool.drain(), 10)  # every queued record dealt with

        assert dynamodb_proxy.calls["BatchWriteItem"] == calls
        assert tenure.progress.fenced
        assert await table_keys(dynamodb, settings) == keys_of(early)
        await asyncio.wait_for(supervisor.checkpoint_all(), 10)
        lease = await lease_of(dynamodb, settings, shard)
        assert (lease.owner, lease.checkpoint) == ("thief", checkpointed)
        assert owned(service) == set()
    finally:
        done.set()
        await renewer


async def test_an_owner_that_cannot_renew_stops_reading_within_the_lease_duration(
    one_shard: Settings,
    kinesis: Any,
    dynamodb: Any,
    dynamodb_proxy: FaultProxy,
    running: list[Service],
) -> None:
    duration = 1.0
    settings = one_shard.replace(lease_duration_seconds=duration)
    service = Service(settings)
    running.append(service)
    await service.start()
    supervisor = service.supervisor
    assert supervisor is not None
    (shard,) = owned(service)
    tenure = supervisor.owned[shard]
    first = records(range(0, 5))
    await put_records(kinesis, settings.stream_name, first)
    await wait_for(written(service, len(first)))

    # Every lease write fails from now on: renewals and checkpoints alike.
    dynamodb_proxy.fail("UpdateItem", DYNAMODB_INTERNAL, times=None)
    failing_since = time.monotonic()
    await wait_for(holds(lambda: shard not in supervisor.owned), timeout=10)
    took = time.monotonic() - failing_since
    assert took <= duration + duration / 3 + 0.5, took
    assert tenure.progress.fenced
    assert tenure.task is not None
    await asyncio.wait({tenure.task}, timeout=5)
    assert tenure.task.done()  # its poller no longer calls GetRecords

    # Once the table answers again the lease, still ours, is taken back and reading goes on.
    dynamodb_proxy.clear()
    second = records(range(5, 10))
    await put_records(kinesis, settings.stream_name, second)
    await wait_for(holds(lambda: shard in supervisor.owned), timeout=30)
    await wait_for(written(service, len(first + second)), timeout=30)
    assert await table_keys(dynamodb, settings) == keys_of(first + second)


# --- 4. a stop keeps its leases until it releases them --------------------------------------


async def test_a_stopping_replica_keeps_its_leases_through_a_long_drain_and_hands_them_over(
    resources: Settings,
    kinesis: Any,
    dynamodb: Any,
    dynamodb_proxy: FaultProxy,
    running: list[Service],
) -> None:
    duration = 1.0
    settings = resources.replace(lease_duration_seconds=duration, writers=1, batch_size=10)
    first = Service(settings.replace(worker_id="first"))
    second = Service(settings.replace(worker_id="second"))
    running.extend([first, second])
    await first.start()
    await second.start()
    await wait_for(holds(lambda: len(owned(first)) == len(owned(second)) == 2))
    mine = owned(first)

    # Slow writes: the first replica's drain outlasts the lease duration several times over.
    dynamodb_proxy.delay("BatchWriteItem", 0.2)
    names = tuple(f"Unicorn{i:02d}" for i in range(20))
    batch = records(range(0, 20), names)
    put = await put_records(kinesis, settings.stream_name, batch)
    last = last_per_shard(put)
    assert mine <= last.keys()
    on_mine = sum(1 for r in put if r["ShardId"] in mine)

    def read_everything() -> bool:
        return sum(read_from(first, shard) for shard in mine) == on_mine

    await wait_for(holds(read_everything))
    assert first.pool is not None
    assert first.pool.depth() > 0

    assert first.supervisor is not None
    tenures = [first.supervisor.owned[shard] for shard in mine]
    stopping = time.monotonic()
    await first.stop()
    drain = time.monotonic() - stopping
    assert first.drained_in_time
    # It held every lease to the end: none was lost (a lost lease fences its tenure).
    assert not any(tenure.progress.fenced for tenure in tenures)

    # The second replica picks the released shards up at the first replica's final
    # checkpoint: their last records, so it reads none of them again. Had it taken them
    # mid-drain (expired), it would have read them again from an earlier checkpoint.
    await wait_for(holds(lambda: len(owned(second)) == 4), timeout=30)
    for shard in mine:
        lease = await lease_of(dynamodb, settings, shard)
        assert (lease.owner, lease.checkpoint) == ("second", str(last[shard])), shard
        assert read_from(second, shard) == 0, shard
    await wait_for(written(second, len(put) - on_mine), timeout=30)
    assert await table_keys(dynamodb, settings) == keys_of(batch)
    assert drain > duration, drain  # long enough for the leases to expire had they not renewed


async def test_a_replica_stopped_before_it_noticed_a_hand_off_hands_the_lease_over(
    one_shard: Settings, kinesis: Any, dynamodb: Any
) -> None:
    # Asked to hand a shard over (KCL 3's checkpointOwner) and stopped before its next look at
    # the lease table, with nothing read since its last checkpoint: its release is refused
    # (the lease names the new owner already), so it finishes the hand-off instead. Left with
    # checkpointOwner set, the shard would go unread for handoff_timeout_seconds.
    settings = one_shard.replace(
        worker_id="giver", lease_poll_interval_seconds=60.0, lease_duration_seconds=60.0
    )
    put = await put_records(kinesis, settings.stream_name, records(range(0, 5)))
    (last,) = last_per_shard(put).values()
    receiver = LeaseTable(dynamodb, settings.lease_table_name, "receiver")
    async with Service(settings) as giver:
        (shard,) = owned(giver)

        async def checkpointed() -> bool:
            return (await lease_of(dynamodb, settings, shard)).checkpoint == str(last)

        await wait_for(checkpointed)
        assert await receiver.hand_over(await lease_of(dynamodb, settings, shard))

    lease = await lease_of(dynamodb, settings, shard)
    assert (lease.owner, lease.checkpoint_owner, lease.checkpoint) == ("receiver", None, str(last))
