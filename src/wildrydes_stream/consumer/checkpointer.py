"""Writing one tenure's checkpoint: its state to the state table, then the lease naming it.

A checkpoint that fails for any reason but a lost lease never stops the service: it is retried
(at the next round, or at once with backoff for SHARD_END, which the children wait for), and
reported as blocked (`wildrydes_blocked{api="Checkpoint"}`, readiness, one rate-limited line)
for as long as it lasts. After a full copy of the state, the items it replaced are pruned in
the background.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from wildrydes_stream.aws.retry import describe_error, error_code
from wildrydes_stream.consumer.lease import SHARD_END
from wildrydes_stream.consumer.leases import LeaseTable
from wildrydes_stream.consumer.statestore import StateRef, StateStore
from wildrydes_stream.consumer.tenure import OwnedShard
from wildrydes_stream.errors import LeaseLostError
from wildrydes_stream.observability.health import BlockedCalls
from wildrydes_stream.observability.logs import RetryLog
from wildrydes_stream.observability.metrics import Metrics
from wildrydes_stream.records.position import sequence_of, sub_of

log = logging.getLogger(__name__)

CHECKPOINT_API = "Checkpoint"
"""The name checkpoint failures are reported under (wildrydes_blocked{api})."""


class Checkpointer:
    def __init__(
        self,
        leases: LeaseTable,
        store: StateStore | None,
        metrics: Metrics,
        blocked: BlockedCalls | None,
        backoff: Callable[[int], float],
    ) -> None:
        self._leases = leases
        self._store = store
        self._metrics = metrics
        self._blocked = blocked
        self._backoff = backoff
        self._retry_log = RetryLog(log)
        self._blocked_checkpoints: set[str] = set()
        """Shards whose last checkpoint failed (not for a lost lease)."""
        self._background: set[asyncio.Task[Any]] = set()
        """Pruning of the state table: best effort, never awaited by a shard."""

    async def write(self, owned: OwnedShard, upto: int) -> None:
        """Checkpoint at position `upto` (records/position.py): every user record up to it is
        finished."""
        await self._write(owned, str(sequence_of(upto)), sub_of(upto), upto)

    async def write_shard_end(self, owned: OwnedShard) -> None:
        """SHARD_END, which the children wait for: retried with backoff through any fault but
        a lost lease, for as long as it lasts."""
        attempt = 0
        while True:
            try:
                await self._write(owned, SHARD_END, 0, None)
                return
            except LeaseLostError:
                raise
            except Exception as exc:
                attempt += 1
                self.failed(owned, exc)
                await asyncio.sleep(self._backoff(attempt))

    async def _write(self, owned: OwnedShard, value: str, sub: int, upto: int | None) -> None:
        """Write the state as of `upto` to the state table, then the checkpoint naming it."""
        async with owned.checkpointing:
            if owned.progress.fenced:
                raise LeaseLostError(owned.shard_id)  # what it finished is not ours to store
            if owned.lease.at_shard_end:
                # SHARD_END was written while this one waited: nothing may move, and nothing
                # be prepared or pruned (a full copy would delete the segments SHARD_END's
                # state names, which the children are about to load).
                return
            ref = await owned.state.prepare(upto) if owned.state is not None else None
            await self._leases.checkpoint(owned.lease, value, ref, sub)
            self.committed(owned)
        owned.checkpointed_at = time.monotonic()
        self._metrics.checkpoints.labels(owned.shard_id).inc()
        self.unblock(owned.shard_id)

    def committed(self, owned: OwnedShard) -> None:
        """A checkpoint naming the tenure's prepared state was written."""
        if owned.state is None:
            return
        replaced = owned.state.committed()
        if replaced is not None:  # a full copy: nothing older is needed any more
            task = asyncio.create_task(self._prune(owned.shard_id, replaced), name="state-prune")
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _prune(self, shard_id: str, ref: StateRef) -> None:
        """Delete the state items a full copy replaced; what fails stays until the next one."""
        assert self._store is not None
        try:
            await self._store.prune(shard_id, ref)
        except Exception as exc:
            self._retry_log.failed("state table pruning", exc, shard=shard_id)

    def failed(self, owned: OwnedShard, exc: BaseException) -> None:
        """A checkpoint failed for a reason that is not a lost lease: reported as blocked
        (metric, readiness, a rate-limited line) while it lasts."""
        self._blocked_checkpoints.add(owned.shard_id)
        self._metrics.checkpoint_failures.labels(owned.shard_id).inc()
        if self._blocked is not None:
            self._blocked.failed(
                CHECKPOINT_API,
                error_code(exc) or type(exc).__name__,
                f"checkpoints of {len(self._blocked_checkpoints)} shard(s) failing "
                f"({describe_error(exc)}); records are processed and checkpointed once the "
                f"lease table {self._leases.table_name} and its -state table take writes again",
            )
        else:
            self._retry_log.failed("checkpoint", exc, shard=owned.shard_id)

    def unblock(self, shard_id: str) -> None:
        """The shard's checkpoints no longer fail (written, or the shard let go)."""
        if shard_id not in self._blocked_checkpoints:
            return
        self._blocked_checkpoints.discard(shard_id)
        if not self._blocked_checkpoints and self._blocked is not None:
            self._blocked.succeeded(CHECKPOINT_API)
