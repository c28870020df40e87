"""Checkpoints never stop the service: the state table refusing writes during a reshard leaves
the aggregator running (reported blocked, not ready), retrying every checkpoint, SHARD_END
included, until the writes go through; then the children are read and every window is right.
"""

from __future__ import annotations

from typing import Any

from tests.aggregate.test_aggregate import (
    aggregate_settings,
    aggregating,
    dead_letters,
    metric,
    reference,
    ride,
    wait_output,
)
from tests.aggregate.test_fleet import MIDDLE, minute_of
from tests.faultproxy import DYNAMODB_INTERNAL, STATE_WRITE, FaultProxy
from tests.helpers import holds, put_records, wait_for
from wildrydes_stream.admin.provision import ensure_stream
from wildrydes_stream.config import Settings
from wildrydes_stream.consumer.supervisor import CHECKPOINT_API

NAMES = [f"unicorn-{i:03d}" for i in range(200)]


async def test_a_state_table_outage_through_a_split_blocks_checkpoints_never_the_service(
    settings: Settings, kinesis: Any, dynamodb_proxy: FaultProxy
) -> None:
    s = aggregate_settings(settings, late_horizon_seconds=600.0)
    await ensure_stream(kinesis, s.raw_stream_name, 1)
    await ensure_stream(kinesis, s.stream_name, 1)
    raw = s.raw_stream_name
    put = minute_of(NAMES, 0, range(0, 60, 10), 1) + ride("Shadowfax", range(60), 2)
    async with aggregating(s) as aggregator:
        await put_records(kinesis, raw, put)
        [parent] = [x["ShardId"] for x in (await kinesis.list_shards(StreamName=raw))["Shards"]]
        await wait_for(
            holds(lambda: metric(aggregator, "wildrydes_checkpoints_total", shard=parent) > 0)
        )
        # The state table refuses every write from here on: no checkpoint can be stored.
        dynamodb_proxy.fail(STATE_WRITE, DYNAMODB_INTERNAL, times=None)
        # Readings the parent takes in from now on: its state then differs from any stored,
        # so its SHARD_END too needs a state write (without them, a parent whose last
        # checkpoint came after its last reading could store SHARD_END with none).
        before_split = ride("Rocinante", range(60, 120), 5)
        put += before_split
        await put_records(kinesis, raw, before_split)
        await kinesis.split_shard(
            StreamName=raw, ShardToSplit=parent, NewStartingHashKey=str(MIDDLE)
        )
        later = minute_of(NAMES, 1, range(0, 60, 10), 3)
        put += later
        await put_records(kinesis, raw, later)
        # The parent is read to its end; its SHARD_END cannot be stored and is retried.
        await wait_for(
            holds(
                lambda: metric(aggregator, "wildrydes_checkpoint_failures_total", shard=parent) >= 1
            ),
            timeout=120,  # a failure spends botocore's own retries first
        )
        assert metric(aggregator, "wildrydes_blocked", api=CHECKPOINT_API) == 1
        assert aggregator.exit_code == 0
        assert not aggregator._ready()
        supervisor = aggregator.supervisor
        assert supervisor is not None
        assert parent in supervisor.owned  # still held, still trying

        dynamodb_proxy.clear()
        await wait_output(kinesis, s.stream_name, reference(put), timeout=60)
        await wait_for(holds(lambda: parent not in supervisor.owned), timeout=30)
        await wait_for(
            holds(lambda: metric(aggregator, "wildrydes_blocked", api=CHECKPOINT_API) == 0)
        )
        assert aggregator.exit_code == 0
    assert not dead_letters(s)
