"""Handing an owned shard to the worker that asked for it (KCL 3's graceful hand-off).

The asker became `leaseOwner` and this worker `checkpointOwner`. This worker stops reading,
lets what it read be written, checkpoints exactly there (state included) and clears
`checkpointOwner`: the new owner starts right after that checkpoint, so nothing is written
twice and nothing waits for the lease to expire.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from wildrydes_stream.consumer.checkpointer import Checkpointer
from wildrydes_stream.consumer.leases import LeaseTable
from wildrydes_stream.consumer.tenure import OwnedShard
from wildrydes_stream.records.position import sequence_of, sub_of


async def finish_and_hand_over(
    owned: OwnedShard,
    leases: LeaseTable,
    checkpointer: Checkpointer,
    settle: Callable[[], Awaitable[None]] | None,
) -> None:
    """Stop reading, wait for what was read to be written, write the last checkpoint.

    Unbounded here: the caller bounds it (past that, the tenure is dropped instead and the new
    owner takes the lease after handoff_timeout_seconds, from the last checkpoint).
    LeaseLostError when the hand-off was given up on meanwhile."""
    owned.poller.halt()
    if owned.task is not None:
        await asyncio.shield(owned.task)
    await owned.progress.drained.wait()
    if settle is not None:
        await settle()  # what the sink holds of it is out first
    await owned.restored.wait()
    done = owned.progress.checkpoint
    value, sub = owned.lease.checkpoint, owned.lease.subsequence
    if done is not None:
        value, sub = str(sequence_of(done)), sub_of(done)
    async with owned.checkpointing:
        ref = owned.lease.state_ref
        if owned.state is not None:
            ref = await owned.state.prepare(done)
        await leases.checkpoint_handed(owned.lease, value, ref, sub)
        checkpointer.committed(owned)
