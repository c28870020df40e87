"""Which shards this process reads: the front over discovery, assignment and the owned shards.

- consumer/discovery.py lists the stream's shards and keeps the lease table in step with them;
- consumer/assignment.py decides, from a scan of the lease table, what to take, give up or ask
  for (pure decisions, testable without a table);
- consumer/owned.py runs each owned shard from the take of its lease to letting it go
  (reading, renewals, checkpoints through consumer/checkpointer.py, hand-offs, shutdown).

`ShardSupervisor` ties them to the clock: the lease table is looked at every
`lease_poll_interval_seconds`, the shards listed every `shard_sync_interval_seconds`, and both at
once when a shard ends or is handed over, so children start without waiting for the interval.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from wildrydes_stream.config import Settings
from wildrydes_stream.consumer.assignment import Assignment
from wildrydes_stream.consumer.checkpointer import CHECKPOINT_API
from wildrydes_stream.consumer.discovery import ShardDiscovery
from wildrydes_stream.consumer.lease import Lease
from wildrydes_stream.consumer.leases import LeaseTable
from wildrydes_stream.consumer.owned import TAKEN, OwnedShards, Reading
from wildrydes_stream.consumer.state import ShardState
from wildrydes_stream.consumer.statestore import StateStore
from wildrydes_stream.consumer.tenure import OwnedShard
from wildrydes_stream.observability.health import BlockedCalls
from wildrydes_stream.observability.logs import RetryLog
from wildrydes_stream.observability.metrics import Metrics
from wildrydes_stream.runtime.budget import ByteBudget
from wildrydes_stream.runtime.waiting import wait_or_timeout
from wildrydes_stream.sink.deadletter import DeadLetters
from wildrydes_stream.source.fanout import Fanout
from wildrydes_stream.source.poller import Decode, Dispatch
from wildrydes_stream.source.shards import Shard, starting_position

__all__ = ["CHECKPOINT_API", "ShardSupervisor"]

log = logging.getLogger(__name__)


class ShardSupervisor:
    def __init__(
        self,
        kinesis: Any,
        leases: LeaseTable,
        settings: Settings,
        dispatch: Dispatch,
        deadletters: DeadLetters,
        metrics: Metrics,
        stopping: asyncio.Event,
        on_failure: Callable[[BaseException], None],
        decode: Decode,
        budget: ByteBudget | None = None,
        blocked: BlockedCalls | None = None,
        state: ShardState | None = None,
        store: StateStore | None = None,
        settle: Callable[[], Awaitable[None]] | None = None,
        fanout: Fanout | None = None,
    ) -> None:
        self._leases = leases
        self._settings = settings
        self._metrics = metrics
        self._stopping = stopping
        self._wake = asyncio.Event()
        self._retry_log = RetryLog(log)
        self._assigning = asyncio.Lock()
        self.synced = asyncio.Event()
        """Set after the first discovery: every readable shard has a poller."""
        self.discovery = ShardDiscovery(kinesis, settings, leases, store)
        self.assignment = Assignment(
            leases.owner, settings.lease_duration_seconds, settings.handoff_timeout_seconds
        )
        reading = Reading(
            kinesis,
            settings,
            dispatch,
            deadletters,
            metrics,
            stopping,
            decode,
            budget or ByteBudget(settings.max_buffered_bytes),
            blocked,
            fanout,
        )
        self.shards = OwnedShards(reading, leases, on_failure, self._wake, state, store, settle)

    @property
    def owned(self) -> dict[str, OwnedShard]:
        return self.shards.by_id

    @property
    def history(self) -> list[tuple[str, str]]:
        return self.shards.history

    async def run(self) -> None:
        """Until stopped: look at the lease table every `lease_poll_interval_seconds` (take
        released, expired and unclaimed leases at once, notice taken ones), and list the
        stream's shards every `shard_sync_interval_seconds` or at once when a shard ends."""
        s = self._settings
        next_listing = time.monotonic() + s.shard_sync_interval_seconds
        while not self._stopping.is_set():
            try:
                if self._wake.is_set() or time.monotonic() >= next_listing:
                    self._wake.clear()
                    await self.discover()
                    next_listing = time.monotonic() + s.shard_sync_interval_seconds
                await self.assign()
            except Exception as exc:
                if not self.synced.is_set():
                    raise
                self._retry_log.failed("shard discovery", exc)
            pause = min(s.lease_poll_interval_seconds, next_listing - time.monotonic())
            await wait_or_timeout(self._wake, pause)

    async def sync(self) -> list[str]:
        """List the shards, then take and start what this worker should read."""
        await self.discover()
        return await self.assign()

    async def discover(self) -> None:
        await self.discovery.refresh()

    async def assign(self) -> list[str]:
        """Take and start readable shards up to this worker's fair share; returns those started.

        The share counts the live workers (owners of leases that are renewed) and this one. A
        worker holding nothing takes one lease only, so workers that start together see each
        other in the table at their next look and split the shards without stealing. One
        assignment at a time (the loop and a burst run both assign): two at once could both
        take the same shard and read it twice."""
        async with self._assigning:
            return await self._assign()

    async def _assign(self) -> list[str]:
        decide = self.assignment
        held = dict(self.owned)
        leases = await self._leases.all()
        decide.observe(leases)
        self._stop_taken(held, leases)
        readable, trimmed = await self.discovery.reconcile(leases)
        for shard_id in trimmed:
            decide.forget(shard_id)
        started = await self._take(readable, leases)
        # Balancing only once every readable shard has a live owner: while some are free,
        # taking those is the way to an even spread.
        claimed = [leases.get(shard.shard_id) for shard in readable]
        if all(lease is not None and decide.is_live(lease, self.owned) for lease in claimed):
            await self._ask_for_one([lease for lease in claimed if lease is not None])
        self._metrics.shards_owned.set(len(self.owned))
        self.synced.set()
        return started

    def _stop_taken(self, held: dict[str, OwnedShard], scanned: dict[str, Lease]) -> None:
        """Shards held before the scan whose lease now names another owner (or none) were
        taken (stop now rather than at the next renewal) or asked of us (hand them over)."""
        taken = self.assignment.taken(held, scanned)
        for shard_id in taken.to_hand_over:
            self.shards.begin_hand_off(held[shard_id])
        for shard_id in taken.to_drop:
            self.shards.drop(held[shard_id], TAKEN)

    async def _take(self, readable: list[Shard], leases: dict[str, Lease]) -> list[str]:
        decide = self.assignment
        allowed = decide.takes_allowed(len(readable), leases, len(self.owned))
        started: list[str] = []
        taken = 0
        for shard in readable:
            if shard.shard_id in self.owned or self._stopping.is_set():
                continue
            scanned = leases.get(shard.shard_id)
            # A lease naming this worker (handed over to it, or held before a restart) is read
            # whatever the budget: nobody else takes it while this worker is alive.
            ours = scanned is not None and scanned.owner == self._leases.owner
            if not ours and taken >= allowed:
                continue
            if scanned is not None and decide.held_by_other(scanned):
                continue  # a live worker has it: no need to read it again
            initial = starting_position(shard, leases.keys(), self._settings.starting_position)
            lease = await self._leases.acquire(
                shard.shard_id, shard.parents, initial, decide.takeable, shard.hash_range
            )
            if lease is None or lease.at_shard_end:
                continue
            parents = tuple((p, leases[p].state_ref) for p in shard.parents if p in leases)
            self.shards.start(lease, parents, shard.hash_range)
            started.append(shard.shard_id)
            taken += not ours
        return started

    async def _ask_for_one(self, claimed: list[Lease]) -> None:
        """Ask a worker holding more than its share for one lease, if we hold less; it is read
        here once that worker has handed it over."""
        if self._stopping.is_set():
            return
        victim = self.assignment.lease_to_ask_for(claimed, self.owned)
        if victim is None or not await self._leases.hand_over(victim):
            return
        # The owner hands it over at its next look (it finishes what it read, checkpoints
        # exactly there, clears checkpointOwner); the lease is read here from then on.
        log.info(
            "asked for a lease to balance", extra={"shard": victim.shard_id, "from": victim.owner}
        )

    # The owned shards' operations the service calls (renewal and checkpoint loops, stop).

    async def renew_all(self) -> None:
        await self.shards.renew_all()

    async def checkpoint_all(self, final: bool = False) -> None:
        await self.shards.checkpoint_all(final)

    def halt_all(self) -> None:
        self.shards.halt_all()

    async def wait_shard_tasks(self) -> None:
        await self.shards.wait_tasks()

    async def cancel_shard_tasks(self) -> None:
        await self.shards.cancel_tasks()

    async def release_all(self) -> None:
        await self.shards.release_all()

    def all_caught_up(self) -> bool:
        return self.shards.all_caught_up()

    async def wait_caught_up(self) -> None:
        await self.shards.wait_caught_up()

    async def settle(self) -> None:
        await self.shards.settle()
