"""The shards this worker reads, each from the take of its lease to letting it go.

Each take of a lease is a tenure (consumer/tenure.py) with its own ShardProgress and poller. A
tenure ends when its shard is read to the end (SHARD_END checkpointed, then the supervisor is
woken so the children start at once), when it is handed over, or when the lease is lost: a
renewal or checkpoint finds it taken, a scan shows another owner, or it has not been renewed for
lease_duration_seconds (another worker may take it by then). A lost tenure is fenced (queued
records are dropped, late acknowledgements count nowhere) and its poller stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from wildrydes_stream.aws.retry import backoff_delay
from wildrydes_stream.config import Settings
from wildrydes_stream.consumer.checkpointer import Checkpointer
from wildrydes_stream.consumer.handoff import finish_and_hand_over
from wildrydes_stream.consumer.lease import AT_TIMESTAMP, LATEST, Lease
from wildrydes_stream.consumer.leases import LeaseTable
from wildrydes_stream.consumer.progress import ShardProgress
from wildrydes_stream.consumer.state import ShardState
from wildrydes_stream.consumer.statestore import StateRef, StateStore
from wildrydes_stream.consumer.tenure import Inheritance, OwnedShard, TenureState
from wildrydes_stream.errors import LeaseLostError
from wildrydes_stream.observability.health import BlockedCalls
from wildrydes_stream.observability.logs import RetryLog
from wildrydes_stream.observability.metrics import Metrics
from wildrydes_stream.runtime.budget import ByteBudget
from wildrydes_stream.sink.deadletter import DeadLetters
from wildrydes_stream.source.fanout import Fanout, ShardSubscriber
from wildrydes_stream.source.poller import Decode, Dispatch, ReaderParts, ShardPoller

log = logging.getLogger(__name__)

TAKEN = "lease taken by another worker"
AT_SEQUENCE = "AT_SEQUENCE_NUMBER:"
"""Prefix of a position read from (not after) a sequence number."""


@dataclass(frozen=True, slots=True)
class Reading:
    """What every shard's poller is built from."""

    kinesis: Any
    settings: Settings
    dispatch: Dispatch
    deadletters: DeadLetters
    metrics: Metrics
    stopping: asyncio.Event
    decode: Decode
    budget: ByteBudget
    blocked: BlockedCalls | None
    fanout: Fanout | None = None
    """Set in read_mode `fanout`: shards are read by subscription, not polled."""


def due_on_grid(deadline: float, grid: float) -> float:
    """The last point of a `grid`-second grid at or before `deadline`."""
    return math.floor(deadline / grid) * grid


def start_position(lease: Lease) -> tuple[str, datetime | None, int | None]:
    """Where the poller starts, and through which position the records there are done.

    At a checkpointed sequence number, as KCL does: AT that record, skipping the user records up
    to the checkpoint's position (so a restart inside a KPL aggregate resumes after its last
    finished sub-record, and a plain record at the checkpoint is skipped whole). For a lease
    still at LATEST or AT_TIMESTAMP, the moment the lease started at; a LATEST whose moment
    this tenure just recorded is read as LATEST (the same moment, and always answerable at
    the tip)."""
    at = lease.position
    if at is not None:
        return AT_SEQUENCE + lease.checkpoint, None, at
    if not lease.at_moment or lease.starting_ms is None:
        return lease.checkpoint, None, None
    since = datetime.fromtimestamp(lease.starting_ms / 1000, UTC)
    if lease.checkpoint == LATEST and not lease.starting_inherited:
        return LATEST, since, None
    return AT_TIMESTAMP, since, None


def stale_since(owned: OwnedShard) -> float:
    """Since when the shard's stored checkpoint has been behind what was read: now when it
    covers everything (a quiet shard is not stale), else the last checkpoint written."""
    progress = owned.progress
    done = progress.checkpoint
    if progress.in_flight == 0 and (done is None or owned.lease.position == done):
        return time.monotonic()
    return owned.checkpointed_at


class OwnedShards:
    def __init__(
        self,
        reading: Reading,
        leases: LeaseTable,
        on_failure: Callable[[BaseException], None],
        wake: asyncio.Event,
        state: ShardState | None = None,
        store: StateStore | None = None,
        settle: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._reading = reading
        self._settings = reading.settings
        self._metrics = reading.metrics
        self._leases = leases
        self._on_failure = on_failure
        self._wake = wake
        """Set when a shard ends or is handed over: discovery and assignment run at once."""
        self._state = state
        self._store = store
        self._settle = settle
        """Waits until what the sink holds is out (a hand-off's last checkpoint follows)."""
        self._retry_log = RetryLog(log)
        self._watch_grid = reading.settings.lease_duration_seconds / 20
        self.checkpointer = Checkpointer(
            leases, store, reading.metrics, reading.blocked, self._backoff
        )
        self.by_id: dict[str, OwnedShard] = {}
        self.history: list[tuple[str, str]] = []
        """(event, shard id) in the order they happened: "start", "end", "handed over"."""
        reading.metrics.watch_checkpoint_age(
            lambda: [(s.shard_id, stale_since(s)) for s in list(self.by_id.values())]
        )

    def _backoff(self, attempt: int) -> float:
        """Between tries of a state restore or a checkpoint that must be written."""
        return backoff_delay(attempt, self._settings.backoff_base_seconds, 5.0)

    def start(
        self,
        lease: Lease,
        parents: tuple[tuple[str, str | None], ...] = (),
        hash_range: tuple[str, str] = ("", ""),
    ) -> None:
        """Read the shard from its lease's checkpoint, with the application's state as of that
        checkpoint (or, for a child not yet checkpointed, its parents' last states, only the
        entries its hash range holds)."""
        progress = ShardProgress(lease.shard_id)
        poller = self._reader(lease.shard_id, progress, hash_range)
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
        position, since, skip_through = start_position(lease)
        owned.task = asyncio.create_task(
            self._process(owned, position, since, skip_through), name=f"shard-{lease.shard_id}"
        )
        self.by_id[lease.shard_id] = owned
        self._watch(owned)
        self.history.append(("start", lease.shard_id))
        log.info("reading shard", extra={"shard": lease.shard_id, "from": position})

    def _reader(
        self, shard_id: str, progress: ShardProgress, hash_range: tuple[str, str]
    ) -> ShardPoller | ShardSubscriber:
        """The shard's reader in the configured read_mode (both have the same interface)."""
        r = self._reading
        parts = ReaderParts(
            r.settings,
            r.dispatch,
            r.deadletters.send,
            r.metrics,
            r.stopping,
            r.decode,
            r.budget,
            r.blocked,
        )
        if r.fanout is not None:
            return ShardSubscriber(shard_id, r.fanout, parts, progress, hash_range)
        return ShardPoller(shard_id, r.kinesis, parts, progress, hash_range)

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

    async def _process(
        self, owned: OwnedShard, position: str, since: datetime | None, skip_through: int | None
    ) -> None:
        try:
            await self._restore(owned)
            await owned.poller.run(position, since, skip_through)
            if not owned.progress.ended:
                return  # stopping or fenced: the final checkpoint happens in checkpoint_all
            await owned.progress.drained.wait()
            await self.checkpointer.write_shard_end(owned)
            self._forget(owned)
            self.history.append(("end", owned.shard_id))
            self.let_go(owned)
            self._wake.set()
        except LeaseLostError:
            self.drop(owned, TAKEN)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("shard task failed", extra={"shard": owned.shard_id})
            self._on_failure(exc)

    def drop(self, owned: OwnedShard, reason: str) -> None:
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
        self.let_go(owned)
        if owned.task is not None and owned.task is not asyncio.current_task():
            owned.task.cancel()

    def _forget(self, owned: OwnedShard) -> None:
        if owned.state is not None:
            owned.state.forget()

    def let_go(self, owned: OwnedShard) -> None:
        """Forget a shard no longer read here, and its lag series: a stale lag left behind by
        a shard that ended or moved to another replica would keep a lag alert firing. Only
        this tenure: a later take of the same shard stays."""
        if owned.watchdog is not None:
            owned.watchdog.cancel()
        if self.by_id.get(owned.shard_id) is not owned:
            return
        del self.by_id[owned.shard_id]
        self._metrics.shards_owned.set(len(self.by_id))
        for series in (
            self._metrics.behind_latest,
            self._metrics.checkpoints,
            self._metrics.checkpoint_failures,
        ):
            with contextlib.suppress(KeyError):
                series.remove(owned.shard_id)
        self.checkpointer.unblock(owned.shard_id)

    def _watch(self, owned: OwnedShard) -> None:
        """Arm the watchdog for lease_duration_seconds after the last confirmed write: other
        workers may take the lease once its counter has not moved for that long, so by then
        this one must have stopped writing the shard.

        The deadline is brought forward to a grid of a twentieth of the lease duration: the
        leases renewed in one round (confirmed a few milliseconds apart) then fall due
        together, one wake-up of the loop for them all instead of one a lease, which with
        hundreds of idle shards was a wake-up every few milliseconds. Early is the safe side."""
        loop = asyncio.get_running_loop()
        deadline = due_on_grid(loop.time() + self._lease_left(owned), self._watch_grid)
        owned.watchdog = loop.call_at(deadline, self._expire, owned)

    def _lease_left(self, owned: OwnedShard) -> float:
        """Seconds until other workers may take the lease (from our last confirmed write)."""
        return owned.lease.confirmed_at + self._settings.lease_duration_seconds - time.monotonic()

    def _expire(self, owned: OwnedShard) -> None:
        if self.by_id.get(owned.shard_id) is not owned:
            return
        if owned.handing_off:
            return  # the hand-off is bounded by itself
        if self._lease_left(owned) >= self._watch_grid:
            self._watch(owned)  # renewed since the watchdog was armed
            return
        self.drop(owned, "lease not renewed for lease_duration_seconds")

    async def renew_all(self) -> None:
        """Show the owned leases are alive, all at once and the round bounded, so one hung
        call holds up neither the others nor the next round; drop the shards whose lease was
        taken. A lease that cannot be renewed expires through its watchdog.

        One task a lease and one wait for them all: with hundreds of idle shards a round of
        renewals is most of what the service does, and a timeout and a shield a lease cost
        as much again as the write's own Python."""
        round_: list[tuple[OwnedShard, asyncio.Task[None]]] = []
        for owned in list(self.by_id.values()):
            if owned.handing_off:
                continue
            task = self._leases.start_renewal(owned.lease)
            if task is not None:
                round_.append((owned, task))
        if not round_:
            return
        # Not cancelled at the timeout: a write abandoned half way may have moved the counter
        # in the table but not in the lease. It goes on; the watchdog keeps the time.
        await asyncio.wait(
            [task for _, task in round_], timeout=self._settings.lease_duration_seconds / 3
        )
        lost: list[OwnedShard] = []
        for owned, task in round_:
            if not task.done():
                self._retry_log.failed("lease renewal", TimeoutError(), shard=owned.shard_id)
            elif task.cancelled() or (exc := task.exception()) is None:
                continue
            elif isinstance(exc, LeaseLostError):
                if self.by_id.get(owned.shard_id) is owned:
                    lost.append(owned)
            else:
                self._retry_log.failed("lease renewal", exc, shard=owned.shard_id)
        # Each looks at its lease again (a hand-off asked of us, or taken): at once, as a
        # rebalance may take many in one round.
        await asyncio.gather(*(self.lost(owned) for owned in lost))

    async def lost(self, owned: OwnedShard) -> None:
        """Our write was refused: a hand-off asked of us, or the lease taken."""
        lease = await self._leases.get(owned.shard_id)
        if lease is not None and lease.checkpoint_owner == self._leases.owner:
            self.begin_hand_off(owned)
        else:
            self.drop(owned, TAKEN)

    def begin_hand_off(self, owned: OwnedShard) -> None:
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
        """Bounded at half the lease duration: past that the tenure is dropped instead."""
        try:
            async with asyncio.timeout(self._settings.lease_duration_seconds / 2):
                await finish_and_hand_over(owned, self._leases, self.checkpointer, self._settle)
        except (TimeoutError, LeaseLostError, asyncio.CancelledError) as exc:
            self.drop(owned, f"hand-off not finished ({type(exc).__name__})")
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        except Exception as exc:
            self._retry_log.failed("hand-off", exc, shard=owned.shard_id)
            self.drop(owned, "hand-off failed")
            return
        self.history.append(("handed over", owned.shard_id))
        owned.progress.fence()  # nothing of this tenure counts any more
        self._forget(owned)
        self.let_go(owned)
        log.info("handed shard over", extra={"shard": owned.shard_id})
        self._wake.set()

    async def checkpoint_all(self, final: bool = False) -> None:
        """Store each owned shard's finished prefix where it moved since the last checkpoint
        (`final`: also where only the state moved, puts acknowledged since, so the next owner
        does not repeat them). A shard whose checkpoint fails is retried at the next round;
        the others go on."""
        for owned in list(self.by_id.values()):
            if owned.handing_off or not owned.restored.is_set():
                continue  # a hand-off's last checkpoint is its own
            done = owned.progress.checkpoint
            if done is None and final:
                done = owned.lease.position
            if done is None or (owned.lease.position == done and not final):
                continue
            if owned.lease.at_shard_end:
                continue
            try:
                await self.checkpointer.write(owned, done)
            except LeaseLostError:
                await self.lost(owned)
            except Exception as exc:
                self.checkpointer.failed(owned, exc)

    async def release_all(self) -> None:
        """Release every lease held. One being handed over is handed over instead, to its end:
        also one whose release is refused because a hand-off was asked of this worker and not
        noticed yet (else its new owner would wait handoff_timeout_seconds for it)."""
        for owned in list(self.by_id.values()):
            try:
                if not owned.handing_off and not await self._leases.release(owned.lease):
                    await self.lost(owned)
                if owned.hand_off is not None:
                    await owned.hand_off
            except Exception:
                log.exception("could not release lease", extra={"shard": owned.shard_id})
            self._forget(owned)
            self.let_go(owned)

    def halt_all(self) -> None:
        """The service stops: every poller ends its loop now, even mid-pause."""
        for owned in list(self.by_id.values()):
            owned.poller.halt()

    def _tasks(self) -> list[asyncio.Task[None]]:
        return [o.task for o in list(self.by_id.values()) if o.task is not None]

    async def wait_tasks(self) -> None:
        await asyncio.gather(*self._tasks(), return_exceptions=True)

    async def cancel_tasks(self) -> None:
        tasks = self._tasks()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def all_caught_up(self) -> bool:
        return all(o.poller.caught_up.is_set() for o in list(self.by_id.values()))

    async def wait_caught_up(self) -> None:
        """Every owned shard had an empty poll or ended (burst runs)."""
        await asyncio.gather(*(o.poller.caught_up.wait() for o in list(self.by_id.values())))

    async def settle(self) -> None:
        """Wait for shards read to their end to checkpoint SHARD_END (burst runs)."""
        ended = [o.task for o in list(self.by_id.values()) if o.progress.ended and o.task]
        await asyncio.gather(*ended, return_exceptions=True)
