"""A checkpoint that was waiting while SHARD_END was written stores nothing.

The lease write of a prefix checkpoint queued behind SHARD_END is skipped (it must not move the
lease back); its state must not be written and committed either. Committed, a full copy would
have its older segments pruned: the very segments the SHARD_END lease names, so the children
could never load their parent's state and would never be read.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any, Literal

from tests.aggregate.pipeline_support import MIDDLE, T0
from tests.aggregate.test_aggregate import aggregate_settings, aggregating, reading
from tests.helpers import holds, put_records, wait_for
from wildrydes_stream.admin.provision import ensure_stream
from wildrydes_stream.config import Settings
from wildrydes_stream.consumer.leases import LeaseTable
from wildrydes_stream.consumer.statestore import MAX_SEGMENTS, StateRef, StateStore
from wildrydes_stream.records.position import position


class _CountingLock(asyncio.Lock):
    """A lock that says how many are waiting for it."""

    waiting = 0

    async def acquire(self) -> Literal[True]:
        self.waiting += 1
        try:
            return await super().acquire()
        finally:
            self.waiting -= 1


async def test_a_checkpoint_queued_behind_shard_end_leaves_the_parents_state_whole(
    settings: Settings, kinesis: Any, dynamodb: Any
) -> None:
    # No periodic checkpoints: the test makes each one itself.
    s = aggregate_settings(settings, checkpoint_interval_seconds=3600.0)
    await ensure_stream(kinesis, s.raw_stream_name, 1)
    await ensure_stream(kinesis, s.stream_name, 1)
    raw = s.raw_stream_name
    [parent] = [x["ShardId"] for x in (await kinesis.list_shards(StreamName=raw))["Shards"]]
    async with aggregating(s) as aggregator:
        supervisor = aggregator.supervisor
        assert supervisor is not None
        await wait_for(holds(lambda: parent in supervisor.owned))
        owned = supervisor.owned[parent]
        # One segment a checkpoint: SHARD_END writes the last one a reference may name, so a
        # checkpoint after it would write a full copy (and prune what it replaces).
        for second in range(MAX_SEGMENTS - 1):
            [put] = await put_records(
                kinesis, raw, [reading("Shadowfax", T0 + timedelta(seconds=second), 1, 100, 100)]
            )
            sequence = position(int(put["SequenceNumber"]))
            await wait_for(holds(lambda: owned.progress.checkpoint == sequence))  # noqa: B023
            await supervisor.checkpoint_all()
        # One more reading, finished and not checkpointed: a periodic checkpoint has work.
        [put] = await put_records(
            kinesis, raw, [reading("Shadowfax", T0 + timedelta(seconds=59), 1, 100, 100)]
        )
        sequence = position(int(put["SequenceNumber"]))
        await wait_for(holds(lambda: owned.progress.checkpoint == sequence))
        lock = _CountingLock()
        owned.checkpointing = lock
        await lock.acquire()
        await kinesis.split_shard(
            StreamName=raw, ShardToSplit=parent, NewStartingHashKey=str(MIDDLE)
        )
        # The parent is read to its end: its SHARD_END waits for the lock, then a periodic
        # checkpoint behind it.
        await wait_for(holds(lambda: lock.waiting == 1), timeout=30)
        periodic = asyncio.create_task(supervisor.checkpoint_all())
        await wait_for(holds(lambda: lock.waiting == 2))
        lock.release()
        await periodic
        await wait_for(holds(lambda: parent not in supervisor.owned))
        await wait_for(
            holds(lambda: not supervisor.shards.checkpointer._background)
        )  # a prune, if any, is done

    lease = (await LeaseTable(dynamodb, s.aggregate_lease_table_name, "r").all())[parent]
    assert lease.checkpoint == "SHARD_END"
    ref = StateRef.decode(lease.state_ref)
    assert ref is not None
    assert len(ref.segments) == MAX_SEGMENTS
    store = StateStore(
        dynamodb, s.replace(lease_table_name=s.aggregate_lease_table_name).state_table_name
    )
    entries = await store.load(parent, ref)  # every segment the lease names is there
    assert ("Shadowfax", "u") in entries
