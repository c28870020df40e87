"""Which shards this process reads: discovery, leases, one poller task per owned shard.

A shard is taken only once its parents are done (read to the end, SHARD_END checkpointed).
When a shard ends, its SHARD_END is checkpointed as soon as its last record is finished, and
discovery runs again at once so its children start without waiting for the next interval.

Each take of a lease is a tenure with its own ShardProgress. A tenure ends when the lease is
lost: a renewal or checkpoint finds it taken, a scan shows another owner, or it has not been
renewed for lease_duration_seconds (another worker may take it by then). Its progress is fenced
(queued records are dropped, late acknowledgements count nowhere) and its poller stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from wildrydes_stream.aws.retry import backoff_delay, describe_error, error_code
from wildrydes_stream.config import Settings
from wildrydes_stream.consumer.balancing import lease_to_steal
from wildrydes_stream.consumer.leases import AT_TIMESTAMP, LATEST, SHARD_END, Lease, LeaseTable
from wildrydes_stream.consumer.progress import ShardProgress
from wildrydes_stream.consumer.state import ShardState
from wildrydes_stream.consumer.statestore import StateRef, StateStore
from wildrydes_stream.consumer.tenure import Inheritance, OwnedShard, TenureState
from wildrydes_stream.errors import LeaseLostError, WildrydesError
from wildrydes_stream.observability.health import BlockedCalls
from wildrydes_stream.observability.logs import RetryLog
from wildrydes_stream.observability.metrics import Metrics
from wildrydes_stream.runtime.budget import ByteBudget
from wildrydes_stream.runtime.waiting import wait_or_timeout
from wildrydes_stream.sink.deadletter import DeadLetters
from wildrydes_stream.source.poller import Decode, Dispatch, ShardPoller
from wildrydes_stream.source.shards import (
    Shard,
    list_shards,
    readable_shards,
    starting_position,
)

log = logging.getLogger(__name__)


TAKEN = "lease taken by another worker"
CHECKPOINT_API = "Checkpoint"
"""The name checkpoint failures are reported under (wildrydes_blocked{api})."""
AT_SEQUENCE = "AT_SEQUENCE_NUMBER:"
"""Prefix of a position read from (not after) a sequence number."""


def _stale_since(owned: OwnedShard) -> float:
    """Since when the shard's stored checkpoint has been behind what was read: now when it
    covers everything (a quiet shard is not stale), else the last checkpoint written."""
    progress = owned.progress
    done = progress.checkpoint
    if progress.in_flight == 0 and (done is None or owned.lease.checkpoint == str(done)):
        return time.monotonic()
    return owned.checkpointed_at


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
    ) -> None:
        self._kinesis = kinesis
        self._decode = decode
        self._state = state
        self._store = store
        self._settle = settle
        """Waits until what the sink holds is out (a hand-off's last checkpoint follows)."""
        self._blocked_checkpoints: set[str] = set()
        """Shards whose last checkpoint failed (not for a lost lease)."""
        self._background: set[asyncio.Task[Any]] = set()
        """Pruning of the state table: best effort, never awaited by a shard."""
        self._blocked = blocked
        self._budget = budget or ByteBudget(settings.max_buffered_bytes)
        self._on_failure = on_failure
        self._leases = leases
        self._settings = settings
        self._dispatch = dispatch
        self._deadletters = deadletters
        self._metrics = metrics
        self._stopping = stopping
        self._wake = asyncio.Event()
        self._retry_log = RetryLog(log)
        self.owned: dict[str, OwnedShard] = {}
        self._shards: list[Shard] = []
        self._assigning = asyncio.Lock()
        self._renewing: set[str] = set()
        """Workers whose lease counters were seen to move: known to be alive."""
        self._hand_offs: dict[str, float] = {}
        """Shards being handed to this worker: since when (our clock)."""
        self.synced = asyncio.Event()
        """Set after the first discovery: every readable shard has a poller."""
        self._seen: dict[str, tuple[int, float]] = {}
        """Other workers' leases: shard -> (counter, when we first saw that counter)."""
        self.history: list[tuple[str, str]] = []
        """(event, shard id) in the order they happened: "start" and "end" (for diagnostics)."""
        metrics.watch_checkpoint_age(
            lambda: [(s.shard_id, _stale_since(s)) for s in list(self.owned.values())]
        )

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
        self._shards = await list_shards(self._kinesis, self._settings.stream_name)

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
        shards = self._shards
        held = dict(self.owned)
        leases = await self._leases.all()
        for known in leases.values():
            self._note(known)
            if known.checkpoint_owner is None:
                self._hand_offs.pop(known.shard_id, None)
        self._drop_taken(held, leases)
        started: list[str] = []
        finished = {shard_id for shard_id, lease in leases.items() if lease.at_shard_end}
        await self._forget_trimmed(finished - {shard.shard_id for shard in shards})
        self._check_positions(leases)
        await self._note_children(shards, leases)
        configured = self._settings.starting_position
        readable = readable_shards(
            shards, finished, leases.keys(), skip_unleased_closed=configured == LATEST
        )
        budget = self._budget_of_takes(readable, leases)
        taken = 0
        for shard in readable:
            if shard.shard_id in self.owned or self._stopping.is_set():
                continue
            scanned = leases.get(shard.shard_id)
            # A lease naming this worker (handed over to it, or held before a restart) is read
            # whatever the budget: nobody else takes it while this worker is alive.
            ours = scanned is not None and scanned.owner == self._leases.owner
            if not ours and taken >= budget:
                continue
            if scanned is not None and self._held_by_other(scanned):
                continue  # a live worker has it: no need to read it again
            initial = starting_position(shard, leases.keys(), configured)
            lease = await self._leases.acquire(
                shard.shard_id, shard.parents, initial, self._takeable, shard.hash_range
            )
            if lease is None or lease.at_shard_end:
                continue
            parents = tuple((p, leases[p].state_ref) for p in shard.parents if p in leases)
            self._start(lease, parents, shard.hash_range)
            started.append(shard.shard_id)
            taken += not ours
        # Balancing only once every readable shard has a live owner: while some are free,
        # taking those is the way to an even spread.
        claimed = [leases.get(shard.shard_id) for shard in readable]
        if all(lease is not None and self._is_live(lease) for lease in claimed):
            await self._ask_for_one([lease for lease in claimed if lease is not None])
        self._metrics.shards_owned.set(len(self.owned))
        self.synced.set()
        return started

    def _budget_of_takes(self, readable: list[Shard], leases: dict[str, Lease]) -> int:
        """How many more shards to take now: up to the fair share among the live workers, and
        no more than doubling what is held (one while holding none). Replicas starting a
        little apart then see each other in the table before one has taken everything, and
        split the shards without stealing; a lone worker holds all of them after a few looks
        (1, 2, 4, ... a `lease_poll_interval_seconds` apart)."""
        me = self._leases.owner
        others = {
            lease.owner
            for lease in leases.values()
            if lease.owner and lease.owner != me and not self._expired(lease)
        }
        share = math.ceil(len(readable) / (len(others) + 1))
        held = len(self.owned)
        return max(0, min(share - held, max(1, held)))

    def _drop_taken(self, held: dict[str, OwnedShard], scanned: dict[str, Lease]) -> None:
        """Shards held before the scan whose lease now names another owner (or none) were
        taken: stop them now rather than at the next renewal."""
        me = self._leases.owner
        for shard_id, owned in held.items():
            lease = scanned.get(shard_id)
            if lease is not None and lease.owner != me:
                if lease.checkpoint_owner == me:
                    self._begin_hand_off(owned)
                else:
                    self._drop(owned, TAKEN)

    async def _forget_trimmed(self, shard_ids: set[str]) -> None:
        """Delete the leases of finished shards Kinesis no longer lists (trimmed after the
        stream's retention), as KCL does, so the lease table does not grow with every reshard.
        Their children treat an unlisted parent as done, so nothing waits on these leases."""
        for shard_id in sorted(shard_ids):
            if await self._leases.delete_finished(shard_id):
                self._seen.pop(shard_id, None)
                if self._store is not None:
                    await self._store.prune(shard_id, None)
                log.info("deleted the lease of a trimmed shard", extra={"shard": shard_id})

    async def _ask_for_one(self, candidates: list[Lease]) -> None:
        """Ask a worker holding more than its share for one lease, if we hold less; it is read
        here once that worker has handed it over."""
        if self._stopping.is_set():
            return
        me = self._leases.owner
        # What we took earlier in this round is ours, whatever the scan said.
        current = [
            dataclasses.replace(lease, owner=me) if lease.shard_id in self.owned else lease
            for lease in candidates
        ]
        # Leases already in a hand-off are spoken for.
        current = [lease for lease in current if lease.checkpoint_owner is None]

        # A hand-off is asked only of a worker seen renewing: a dead one would never answer,
        # and its leases become free once they expire anyway.
        def gone(lease: Lease) -> bool:
            owner = lease.owner
            return self._expired(lease) or (owner != me and owner not in self._renewing)

        victim = lease_to_steal(current, me, gone)
        if victim is None or not await self._leases.hand_over(victim):
            return
        # The owner hands it over at its next look (it finishes what it read, checkpoints
        # exactly there, clears checkpointOwner); the lease is read here from then on.
        log.info(
            "asked for a lease to balance", extra={"shard": victim.shard_id, "from": victim.owner}
        )

    def _is_live(self, lease: Lease) -> bool:
        """Held by this worker or by one still renewing it."""
        if lease.shard_id in self.owned:
            return True
        return lease.owner is not None and not self._expired(lease)

    def _held_by_other(self, lease: Lease) -> bool:
        owner = lease.owner
        return owner is not None and owner != self._leases.owner and not self._expired(lease)

    def _expired(self, lease: Lease) -> bool:
        seen = self._seen.get(lease.shard_id)
        if seen is None or seen[0] != lease.counter:
            return False
        return time.monotonic() - seen[1] >= self._settings.lease_duration_seconds

    def _note(self, lease: Lease) -> None:
        seen = self._seen.get(lease.shard_id)
        if seen is None or seen[0] != lease.counter:
            if seen is not None and lease.owner:
                self._renewing.add(lease.owner)  # its counter moved under our eyes
            self._seen[lease.shard_id] = (lease.counter, time.monotonic())

    def _takeable(self, lease: Lease) -> bool:
        """Unowned, ours (a restart under the same worker id), or expired.

        Expiry is judged as KCL does, by our own clock: the owner renews by moving the counter,
        so a counter that has not moved for lease_duration_seconds means the owner is gone.
        """
        if lease.checkpoint_owner is not None and not self._hand_off_over(lease):
            return False  # its previous owner is still finishing: nobody reads it yet
        if lease.owner is None or lease.owner == self._leases.owner:
            return True
        self._note(lease)
        expired = self._expired(lease)
        if expired:
            log.info(
                "taking expired lease",
                extra={"shard": lease.shard_id, "previous_owner": lease.owner},
            )
        return expired

    def _hand_off_over(self, lease: Lease) -> bool:
        """A hand-off is given up on after handoff_timeout_seconds (KCL's 30 s): the old
        owner died or hung; the new one reads from the last checkpoint."""
        began = self._hand_offs.setdefault(lease.shard_id, time.monotonic())
        over = time.monotonic() - began >= self._settings.handoff_timeout_seconds
        if over:
            log.warning(
                "hand-off not finished in time, taking the lease",
                extra={"shard": lease.shard_id, "previous_owner": lease.checkpoint_owner},
            )
        return over

    async def renew_all(self) -> None:
        """Show the owned leases are alive, all at once and each call bounded, so one hung
        call holds up neither the others nor the next round; drop the shards whose lease was
        taken. A lease that cannot be renewed expires through its watchdog."""
        owned = list(self.owned.values())
        await asyncio.gather(*(self._renew(one) for one in owned))

    async def _renew(self, owned: OwnedShard) -> None:
        if self.owned.get(owned.shard_id) is not owned or owned.handing_off:
            return
        try:
            async with asyncio.timeout(self._settings.lease_duration_seconds / 3):
                await self._leases.renew(owned.lease)
        except LeaseLostError:
            await self._lost(owned)
        except Exception as exc:  # the write goes on, shielded; the watchdog keeps the time
            self._retry_log.failed("lease renewal", exc, shard=owned.shard_id)

    async def _lost(self, owned: OwnedShard) -> None:
        """Our write was refused: a hand-off asked of us, or the lease taken."""
        lease = await self._leases.get(owned.shard_id)
        if lease is not None and lease.checkpoint_owner == self._leases.owner:
            self._begin_hand_off(owned)
        else:
            self._drop(owned, TAKEN)

    def _begin_hand_off(self, owned: OwnedShard) -> None:
        if owned.handing_off or owned.progress.fenced:
            return
        owned.handing_off = True
        if owned.watchdog is not None:
            owned.watchdog.cancel()
        log.info("handing shard over", extra={"shard": owned.shard_id})
        owned.hand_off = asyncio.create_task(
            self._hand_off(owned), name=f"hand-off-{owned.shard_id}"
        )

    async def _hand_off(self, owned: OwnedShard) -> None:
        """Stop reading, let what was read be written, checkpoint exactly there and clear
        checkpointOwner: the new owner starts right after it, so nothing is written twice.
        Bounded: past half the lease duration the tenure is dropped instead (the new owner
        then takes the lease after handoff_timeout_seconds, from the last checkpoint)."""
        owned.poller.halt()
        try:
            async with asyncio.timeout(self._settings.lease_duration_seconds / 2):
                if owned.task is not None:
                    await asyncio.shield(owned.task)
                await owned.progress.drained.wait()
                if self._settle is not None:
                    await self._settle()  # what the sink holds of it is out first
                await owned.restored.wait()
                done = owned.progress.checkpoint
                value = str(done) if done is not None else owned.lease.checkpoint
                async with owned.checkpointing:
                    ref = owned.lease.state_ref
                    if owned.state is not None:
                        ref = await owned.state.prepare(done)
                    await self._leases.checkpoint_handed(owned.lease, value, ref)
                    self._committed(owned)
        except (TimeoutError, LeaseLostError, asyncio.CancelledError) as exc:
            self._drop(owned, f"hand-off not finished ({type(exc).__name__})")
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        except Exception as exc:
            self._retry_log.failed("hand-off", exc, shard=owned.shard_id)
            self._drop(owned, "hand-off failed")
            return
        self.history.append(("handed over", owned.shard_id))
        owned.progress.fence()  # nothing of this tenure counts any more
        self._forget(owned)
        self._let_go(owned)
        log.info("handed shard over", extra={"shard": owned.shard_id})
        self._wake.set()

    def _watch(self, owned: OwnedShard) -> None:
        """Arm the watchdog for lease_duration_seconds after the last confirmed write: other
        workers may take the lease once its counter has not moved for that long, so by then
        this one must have stopped writing the shard."""
        left = owned.lease.confirmed_at + self._settings.lease_duration_seconds - time.monotonic()
        owned.watchdog = asyncio.get_running_loop().call_later(max(0.0, left), self._expire, owned)

    def _expire(self, owned: OwnedShard) -> None:
        if self.owned.get(owned.shard_id) is not owned:
            return
        if owned.handing_off:
            return  # the hand-off is bounded by itself
        if owned.lease.confirmed_at + self._settings.lease_duration_seconds > time.monotonic():
            self._watch(owned)  # renewed since the watchdog was armed
            return
        self._drop(owned, "lease not renewed for lease_duration_seconds")

    def _check_positions(self, leases: dict[str, Lease]) -> None:
        """A lease KCL left at the sentinel AT_TIMESTAMP carries no time: without one configured
        it cannot be read, which must be one line at start, not a failure inside a shard."""
        if self._settings.starting_datetime() is not None:
            return
        for lease in leases.values():
            if lease.checkpoint == AT_TIMESTAMP and lease.starting_ms is None:
                raise WildrydesError(
                    f"lease {lease.shard_id} in {self._leases.table_name} is at AT_TIMESTAMP "
                    "with no time: set starting_timestamp (WILDRYDES_STARTING_TIMESTAMP)"
                )

    async def _note_children(self, shards: list[Shard], leases: dict[str, Lease]) -> None:
        """Finished shards' leases get their children's ids (KCL's `childShardIds`)."""
        children: dict[str, list[str]] = {}
        for shard in shards:
            for parent in shard.parents:
                children.setdefault(parent, []).append(shard.shard_id)
        for shard_id, lease in leases.items():
            listed = children.get(shard_id)
            if lease.at_shard_end and listed and set(listed) != set(lease.children):
                await self._leases.note_children(shard_id, listed)

    def _position(self, lease: Lease) -> tuple[str, datetime | None]:
        """Where the poller starts: the checkpoint, or for a lease still at LATEST or
        AT_TIMESTAMP, the moment the lease started at. A LATEST whose moment this tenure just
        recorded is read as LATEST (the same moment, and always answerable at the tip)."""
        if lease.subsequence > 0 and lease.checkpoint.isdigit():
            # KCL stopped inside a KPL-aggregated record: read that record again, whole
            # (this service does not split KPL records, so nothing of it is skipped).
            return AT_SEQUENCE + lease.checkpoint, None
        if not lease.at_moment or lease.starting_ms is None:
            return lease.checkpoint, None
        since = datetime.fromtimestamp(lease.starting_ms / 1000, UTC)
        if lease.checkpoint == LATEST and not lease.starting_inherited:
            return LATEST, since
        return AT_TIMESTAMP, since

    def _start(
        self,
        lease: Lease,
        parents: tuple[tuple[str, str | None], ...] = (),
        hash_range: tuple[str, str] = ("", ""),
    ) -> None:
        """Read the shard from its lease's checkpoint, with the application's state as of that
        checkpoint (or, for a child not yet checkpointed, its parents' last states, only the
        entries its hash range holds)."""
        progress = ShardProgress(lease.shard_id)
        poller = ShardPoller(
            lease.shard_id,
            self._kinesis,
            self._settings,
            progress,
            self._dispatch,
            self._deadletters.send,
            self._metrics,
            self._stopping,
            self._decode,
            self._budget,
            self._blocked,
        )
        owned = OwnedShard(lease, progress, poller)
        if self._state is not None and self._store is not None:
            owned.state = TenureState(lease.shard_id, self._state, self._store)
            own = StateRef.decode(lease.state_ref)
            inherit = own is None and not lease.checkpoint.isdigit()
            owned.inheritance = Inheritance(
                own,
                tuple((p, StateRef.decode(ref)) for p, ref in parents) if inherit else (),
                hash_range,
            )
        position, since = self._position(lease)
        owned.task = asyncio.create_task(
            self._process(owned, position, since), name=f"shard-{lease.shard_id}"
        )
        self.owned[lease.shard_id] = owned
        self._watch(owned)
        self.history.append(("start", lease.shard_id))
        log.info("reading shard", extra={"shard": lease.shard_id, "from": position})

    async def _restore(self, owned: OwnedShard) -> None:
        """Load the tenure's state, retrying (with backoff) whatever fails for as long as the
        lease is held: a shard is never read without the state its records build on."""
        attempt = 0
        while owned.state is not None:
            try:
                await owned.state.restore(owned.inheritance)
                break
            except Exception as exc:
                attempt += 1
                self._retry_log.failed("state restore", exc, shard=owned.shard_id)
                await asyncio.sleep(self._backoff(attempt))
        owned.restored.set()

    async def _process(self, owned: OwnedShard, position: str, since: datetime | None) -> None:
        try:
            await self._restore(owned)
            await owned.poller.run(position, since)
            if not owned.progress.ended:
                return  # stopping or fenced: the final checkpoint happens in checkpoint_all
            await owned.progress.drained.wait()
            await self._checkpoint_until_done(owned, SHARD_END, None)
            self._forget(owned)
            self.history.append(("end", owned.shard_id))
            self._let_go(owned)
            self._wake.set()
        except LeaseLostError:
            self._drop(owned, TAKEN)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("shard task failed", extra={"shard": owned.shard_id})
            self._on_failure(exc)

    async def _checkpoint_until_done(self, owned: OwnedShard, value: str, upto: int | None) -> None:
        """A checkpoint that must be written (SHARD_END: the children wait for it): retried
        with backoff through any fault but a lost lease, for as long as it lasts."""
        attempt = 0
        while True:
            try:
                await self._checkpoint(owned, value, upto)
                return
            except LeaseLostError:
                raise
            except Exception as exc:
                attempt += 1
                self._checkpoint_failed(owned, exc)
                await asyncio.sleep(self._backoff(attempt))

    def _backoff(self, attempt: int) -> float:
        """Between tries of a state restore or a checkpoint that must be written."""
        return backoff_delay(attempt, self._settings.backoff_base_seconds, 5.0)

    def _drop(self, owned: OwnedShard, reason: str) -> None:
        """End a tenure whose lease is lost: fence its progress so its queued records are
        dropped and late acknowledgements count nowhere, and stop its poller."""
        if owned.progress.fenced:
            return
        # Another worker taking a lease is how replicas balance: INFO. Not renewing our own in
        # time means the table or the network is in trouble: WARNING.
        level = logging.INFO if reason == TAKEN else logging.WARNING
        log.log(level, "no longer reading shard: %s", reason, extra={"shard": owned.shard_id})
        owned.progress.fence()
        self._forget(owned)
        self._let_go(owned)
        if owned.task is not None and owned.task is not asyncio.current_task():
            owned.task.cancel()

    def _forget(self, owned: OwnedShard) -> None:
        if owned.state is not None:
            owned.state.forget()

    async def _checkpoint(self, owned: OwnedShard, value: str, upto: int | None) -> None:
        """Write the state as of `upto` to the state table, then the checkpoint naming it."""
        async with owned.checkpointing:
            if owned.progress.fenced:
                raise LeaseLostError(owned.shard_id)  # what it finished is not ours to store
            if owned.lease.at_shard_end:
                # Queued behind SHARD_END: the lease keeps it, so no state may be committed
                # (a full copy's pruning would delete the segments the children load).
                return
            ref = await owned.state.prepare(upto) if owned.state is not None else None
            await self._leases.checkpoint(owned.lease, value, ref)
            self._committed(owned)
        owned.checkpointed_at = time.monotonic()
        self._metrics.checkpoints.labels(owned.shard_id).inc()
        self._unblock(owned.shard_id)

    def _unblock(self, shard_id: str) -> None:
        """The shard's checkpoints no longer fail (written, or the shard let go)."""
        if shard_id not in self._blocked_checkpoints:
            return
        self._blocked_checkpoints.discard(shard_id)
        if not self._blocked_checkpoints and self._blocked is not None:
            self._blocked.succeeded(CHECKPOINT_API)

    def _committed(self, owned: OwnedShard) -> None:
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

    def _checkpoint_failed(self, owned: OwnedShard, exc: BaseException) -> None:
        """A checkpoint failed for a reason that is not a lost lease: it is retried at the next
        round; reported as blocked (metric, readiness, a rate-limited line) while it lasts."""
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

    async def checkpoint_all(self, final: bool = False) -> None:
        """Store each owned shard's finished prefix where it moved since the last checkpoint
        (`final`: also where only the state moved, puts acknowledged since, so the next owner
        does not repeat them). A shard whose checkpoint fails is retried at the next round;
        the others go on."""
        for owned in list(self.owned.values()):
            if owned.handing_off or not owned.restored.is_set():
                continue  # a hand-off's last checkpoint is its own
            done = owned.progress.checkpoint
            if done is None and final and owned.lease.checkpoint.isdigit():
                done = int(owned.lease.checkpoint)
            if done is None or (owned.lease.checkpoint == str(done) and not final):
                continue
            if owned.lease.at_shard_end:
                continue
            try:
                await self._checkpoint(owned, str(done), done)
            except LeaseLostError:
                await self._lost(owned)
            except Exception as exc:
                self._checkpoint_failed(owned, exc)

    def halt_all(self) -> None:
        """The service stops: every poller ends its loop now, even mid-pause."""
        for owned in list(self.owned.values()):
            owned.poller.halt()

    async def wait_shard_tasks(self) -> None:
        tasks = [o.task for o in list(self.owned.values()) if o.task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)

    async def cancel_shard_tasks(self) -> None:
        tasks = [o.task for o in list(self.owned.values()) if o.task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def release_all(self) -> None:
        """Release every lease held. One being handed over is handed over instead, to its end:
        also one whose release is refused because a hand-off was asked of this worker and not
        noticed yet (else its new owner would wait handoff_timeout_seconds for it)."""
        for owned in list(self.owned.values()):
            try:
                if not owned.handing_off and not await self._leases.release(owned.lease):
                    await self._lost(owned)
                if owned.hand_off is not None:
                    await owned.hand_off
            except Exception:
                log.exception("could not release lease", extra={"shard": owned.shard_id})
            self._forget(owned)
            self._let_go(owned)

    def _let_go(self, owned: OwnedShard) -> None:
        """Forget a shard no longer read here, and its lag series: a stale lag left behind by
        a shard that ended or moved to another replica would keep a lag alert firing. Only
        this tenure: a later take of the same shard stays."""
        if owned.watchdog is not None:
            owned.watchdog.cancel()
        if self.owned.get(owned.shard_id) is not owned:
            return
        del self.owned[owned.shard_id]
        self._metrics.shards_owned.set(len(self.owned))
        for series in (
            self._metrics.behind_latest,
            self._metrics.checkpoints,
            self._metrics.checkpoint_failures,
        ):
            with contextlib.suppress(KeyError):
                series.remove(owned.shard_id)
        self._unblock(owned.shard_id)

    def all_caught_up(self) -> bool:
        return all(o.poller.caught_up.is_set() for o in list(self.owned.values()))

    async def wait_caught_up(self) -> None:
        """Every owned shard had an empty poll or ended (burst runs)."""
        await asyncio.gather(*(o.poller.caught_up.wait() for o in list(self.owned.values())))

    async def settle(self) -> None:
        """Wait for shards read to their end to checkpoint SHARD_END (burst runs)."""
        ended = [o.task for o in list(self.owned.values()) if o.progress.ended and o.task]
        await asyncio.gather(*ended, return_exceptions=True)
