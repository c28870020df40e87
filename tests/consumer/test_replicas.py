"""Several service processes on one 8-shard stream, as replicas of a Deployment run.

Each test starts `python -m wildrydes_stream run` children under their own worker ids, with
their DynamoDB calls going through a recording proxy (tests/faultproxy.py): every item the
table accepts is counted by key there, and a producer puts records with distinct keys all
along, so a key written twice is a duplicate write, whatever the replicas' own metrics say.
Which shards a replica reads comes from its /metrics (a shard has a lag series while it is
read there). Every wait is on a condition with a generous timeout; the timings asserted are
the ones docs/how-it-works.md promises, measured from what the test saw happen.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.faultproxy import FaultProxy
from tests.helpers import holds, scan_table, wait_for
from tests.process import run_to_exit, service_env
from tests.replicas_support import Producer, Replicas, Reports, all_read, duplicates, even
from wildrydes_stream.admin.provision import ensure_stream, ensure_table
from wildrydes_stream.config import Settings
from wildrydes_stream.consumer.leases import LeaseTable

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

SHARDS = 8
THREE = ("replica-0", "replica-1", "replica-2")
RATE = 150.0
"""Records a second the producer puts throughout each test."""
RELEASED_PICKUP_SECONDS = 2.0
"""A released lease is read again within about a second (one look at the lease table)."""
EXPIRED_MARGIN_SECONDS = 2.0
"""A dead replica's shards are read again within lease_duration_seconds plus this."""
HANDOFF_TIMEOUT_SECONDS = 30.0
STEP_SECONDS = 15.0
"""How long every shard may go unread after a replica stops in the rolling restart: several
lease looks and a lease duration, and well under HANDOFF_TIMEOUT_SECONDS."""


@pytest.fixture
async def stream(settings: Settings, kinesis: Any, dynamodb: Any) -> Settings:
    """An 8-shard stream and the table; the replicas' settings: the lease table looked at
    every second (the default), a short lease so a dead replica's shards move in seconds."""
    await ensure_stream(kinesis, settings.stream_name, SHARDS)
    await ensure_table(dynamodb, settings)
    return settings.replace(
        lease_duration_seconds=3.0,
        lease_poll_interval_seconds=1.0,
        shard_sync_interval_seconds=10.0,
        idle_poll_interval_seconds=0.25,
        min_poll_interval_seconds=0.2,
        checkpoint_interval_seconds=1.0,
        batch_window_seconds=0.05,
        backoff_max_seconds=1.0,
        shutdown_grace_seconds=20.0,
        handoff_timeout_seconds=HANDOFF_TIMEOUT_SECONDS,
    )


@pytest.fixture
async def replicas(
    stream: Settings, aws_env: dict[str, str], dynamodb_proxy: FaultProxy
) -> AsyncIterator[Replicas]:
    """Service processes on `stream`, their DynamoDB endpoint the recording proxy; all are
    killed and reaped at teardown."""
    env = service_env(stream, {**aws_env, "AWS_ENDPOINT_URL_DYNAMODB": dynamodb_proxy.endpoint})
    group = Replicas(env)
    try:
        yield group
    finally:
        await group.close()


@pytest.fixture
async def producer(stream: Settings, kinesis: Any) -> AsyncIterator[Producer]:
    """RATE records a second with distinct keys, from before the replicas start."""
    producing = Producer(kinesis, stream.stream_name, RATE)
    producing.start()
    try:
        yield producing
    finally:
        await producing.stop()


def spread_evenly(reports: Reports) -> bool:
    return even(reports, SHARDS)


def every_shard_read(reports: Reports) -> bool:
    return all_read(reports, SHARDS)


async def table_keys(dynamodb: Any, settings: Settings) -> set[tuple[str, str]]:
    items = await scan_table(dynamodb, settings.table_name)
    return {(item["Name"]["S"], item["StatusTime"]["N"]) for item in items}


async def assert_nothing_lost(
    producer: Producer, proxy: FaultProxy, dynamodb: Any, settings: Settings
) -> None:
    """Stop producing; every key produced reaches the table."""
    await producer.stop()
    produced = producer.keys()
    assert produced
    await wait_for(holds(lambda: produced.issubset(proxy.item_writes)), timeout=60, interval=0.2)
    assert await table_keys(dynamodb, settings) == produced


def assert_no_duplicates(proxy: FaultProxy) -> None:
    twice = duplicates(proxy.item_writes)
    assert not twice, f"{len(twice)} keys written more than once, e.g. {list(twice.items())[:5]}"


async def handing_over(
    dynamodb: Any, settings: Settings, to: str, among: list[str], timeout: float
) -> str | None:
    """The replica of `among` seen handing a lease over to `to` (KCL 3's checkpointOwner, the
    lease naming `to` as its owner already), looking at the lease table for up to `timeout`
    seconds; None when none was seen."""
    leases = LeaseTable(dynamodb, settings.lease_table_name, "test-reader")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for lease in (await leases.all()).values():
            if lease.owner == to and lease.checkpoint_owner in among:
                return lease.checkpoint_owner
        await asyncio.sleep(0.02)
    return None


def busiest(reports: Reports) -> str:
    """A replica holding the most shards (one of the two with 3 of 8)."""
    return max(sorted(reports), key=lambda name: reports[name].owned)


async def test_three_replicas_started_together_spread_8_shards_3_3_2_without_duplicates(
    stream: Settings,
    replicas: Replicas,
    producer: Producer,
    dynamodb_proxy: FaultProxy,
    dynamodb: Any,
) -> None:
    await replicas.start(*THREE)

    reports = await replicas.until(spread_evenly, timeout=60)

    assert sorted(report.owned for report in reports.values()) == [2, 3, 3]
    await assert_nothing_lost(producer, dynamodb_proxy, dynamodb, stream)
    assert_no_duplicates(dynamodb_proxy)


async def test_sigterm_one_replica_its_shards_are_read_again_at_once_without_duplicates(
    stream: Settings,
    replicas: Replicas,
    producer: Producer,
    dynamodb_proxy: FaultProxy,
    dynamodb: Any,
) -> None:
    await replicas.start(*THREE)
    before = await replicas.until(spread_evenly, timeout=60)
    leaving = busiest(before)

    code = await replicas.stop(leaving, signal.SIGTERM)
    exited = time.monotonic()

    assert code == 0
    stopped = replicas.ended[-1].find_log("stopped")
    assert stopped is not None
    assert stopped["drained"] is True
    after = await replicas.until(every_shard_read, timeout=30)
    picked_up = time.monotonic() - exited
    assert set(after) == set(THREE) - {leaving}
    assert picked_up <= RELEASED_PICKUP_SECONDS, f"{picked_up:.2f}s after it exited"
    await assert_nothing_lost(producer, dynamodb_proxy, dynamodb, stream)
    assert_no_duplicates(dynamodb_proxy)


async def test_kill_9_one_replica_its_shards_are_read_again_once_its_leases_expire(
    stream: Settings,
    replicas: Replicas,
    producer: Producer,
    dynamodb_proxy: FaultProxy,
    dynamodb: Any,
) -> None:
    await replicas.start(*THREE)
    before = await replicas.until(spread_evenly, timeout=60)
    victim = busiest(before)

    code = await replicas.stop(victim, signal.SIGKILL)
    killed = time.monotonic()

    assert code == -signal.SIGKILL
    after = await replicas.until(every_shard_read, timeout=stream.lease_duration_seconds + 30)
    picked_up = time.monotonic() - killed
    assert set(after) == set(THREE) - {victim}
    limit = stream.lease_duration_seconds + EXPIRED_MARGIN_SECONDS
    assert picked_up <= limit, f"{picked_up:.2f}s after the kill (limit {limit}s)"
    # What it read since its last checkpoint is read again (duplicates allowed); nothing lost.
    await assert_nothing_lost(producer, dynamodb_proxy, dynamodb, stream)


async def test_scale_1_to_3_rolling_restart_and_back_to_1_without_duplicates_or_loss(
    stream: Settings,
    replicas: Replicas,
    producer: Producer,
    dynamodb_proxy: FaultProxy,
    dynamodb: Any,
) -> None:
    await replicas.start("a")
    await replicas.until(every_shard_read, timeout=30)

    await replicas.start("b", "c")
    await replicas.until(spread_evenly, timeout=60)

    # A rolling restart as the Deployment does it (maxSurge 1, maxUnavailable 0): a new
    # replica, ready at once, asks the others for shards one at a time; once it reads one, an
    # old one is stopped: the one handing it another if the test sees one (else the busiest),
    # so its free leases come up while that hand-off ends. After each step every shard is read
    # again well within handoff_timeout_seconds: a hand-off left unfinished, or a lease handed
    # over and never read, would leave a shard unread that long.
    old = ["a", "b", "c"]
    for new in ("d", "e", "f"):
        await replicas.start(new)

        def balancing(reports: Reports, new: str = new) -> bool:
            return bool(reports[new].reading)

        await replicas.until(balancing, timeout=30)
        giver = await handing_over(dynamodb, stream, new, old, timeout=5)
        if giver is None:
            reports = await replicas.reports()
            giver = busiest({name: reports[name] for name in old})
        leaving = giver
        old.remove(leaving)
        assert await replicas.stop(leaving) == 0
        await replicas.until(every_shard_read, timeout=STEP_SECONDS)
    reports = await replicas.until(spread_evenly, timeout=60)
    assert set(reports) == {"d", "e", "f"}

    # Scaled down to one: two replicas stopped at once.
    codes = await asyncio.gather(replicas.stop("d"), replicas.stop("e"))
    assert list(codes) == [0, 0]
    reports = await replicas.until(every_shard_read, timeout=STEP_SECONDS)
    assert reports["f"].owned == SHARDS

    await assert_nothing_lost(producer, dynamodb_proxy, dynamodb, stream)
    assert_no_duplicates(dynamodb_proxy)


async def test_status_and_reset_against_live_replicas(
    stream: Settings,
    aws_env: dict[str, str],
    replicas: Replicas,
    producer: Producer,
    dynamodb: Any,
) -> None:
    await replicas.start(*THREE)
    await replicas.until(spread_evenly, timeout=60)
    admin = service_env(stream, aws_env)

    code, stdout, stderr = await run_to_exit(admin, "status", "--json", timeout=60)
    reports = await replicas.reports()

    assert code == 0, stderr
    status = json.loads(stdout)
    assert spread_evenly(reports)
    assert {owner: set(held) for owner, held in status["workers"].items()} == {
        name: set(report.reading) for name, report in reports.items()
    }
    assert {owner: len(held) for owner, held in status["workers"].items()} == {
        name: report.owned for name, report in reports.items()
    }
    assert status["alive"] == sorted(THREE)
    assert len(status["shards"]) == SHARDS
    assert all(row["owner_alive"] is True for row in status["shards"])

    holder = busiest(reports)
    shard = sorted(reports[holder].reading)[0]
    leases = LeaseTable(dynamodb, stream.lease_table_name, "test-reader")

    async def checkpointed() -> bool:
        lease = await leases.get(shard)
        return lease is not None and lease.owner == holder and lease.checkpoint.isdigit()

    await wait_for(checkpointed, timeout=30, interval=0.2)

    code, stdout, stderr = await run_to_exit(
        admin, "reset", "--shard", shard, "--to", "TRIM_HORIZON", timeout=60
    )

    assert code == 1, stdout
    assert "live workers hold" in stderr
    assert f"{shard} ({holder})" in stderr
    kept = await leases.get(shard)
    assert kept is not None
    assert kept.owner == holder
    assert kept.checkpoint.isdigit()

    # With the producer stopped and everything put read, a read from TRIM_HORIZON is told
    # apart: the shard's records are read once more.
    await producer.stop()
    on_shard = sum(1 for where in producer.shard_of.values() if where == shard)
    assert on_shard > 0
    settled = await replicas.until(lambda r: read_of(r, shard) >= on_shard, timeout=30)
    read_before = read_of(settled, shard)
    code, stdout, stderr = await run_to_exit(
        admin, "reset", "--shard", shard, "--to", "TRIM_HORIZON", "--force", timeout=60
    )

    assert code == 0, stderr
    assert stdout.strip().startswith(f"{shard}: ")
    assert stdout.strip().endswith(f"-> TRIM_HORIZON (taken from {holder})")

    # The holder drops the shard; a replica takes it and reads it again from the start.
    def read_again(reports: Reports) -> bool:
        return every_shard_read(reports) and read_of(reports, shard) >= read_before + on_shard

    await replicas.until(read_again, timeout=30)


def read_of(reports: Reports, shard: str) -> float:
    """Records of `shard` the replicas have read, in all."""
    return sum(report.read.get(shard, 0.0) for report in reports.values())
