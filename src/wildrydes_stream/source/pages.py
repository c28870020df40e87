"""What every way of reading a shard shares: handling a page of records, pausing, halting and
backing off.

A page (a GetRecords answer, or a SubscribeToShard event) is held in the byte bound, registered
with the shard's progress in order (all of it, before any record can finish), decoded, and
handed to the writers (waiting when their queues are full); records that cannot be decoded go to
the dead-letter destination. The polling reader (poller.py) and the fan-out reader (fanout.py)
differ only in how pages arrive.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from wildrydes_stream.aws.retry import (
    BLOCKING_FAULTS,
    backoff_delay,
    describe_error,
    error_code,
    fault_of,
)
from wildrydes_stream.config import Settings, application_of, stream_setting
from wildrydes_stream.errors import RecordError
from wildrydes_stream.observability.health import BlockedCalls
from wildrydes_stream.observability.metrics import Metrics
from wildrydes_stream.records.envelope import DeadLetter, Envelope, ItemKey
from wildrydes_stream.runtime.budget import ByteBudget
from wildrydes_stream.runtime.waiting import wait_or_timeout
from wildrydes_stream.source.unpack import UserRecords, unpack

log = logging.getLogger(__name__)

COALESCE_FRACTION = 0.25
"""Idle pauses end on a grid of this fraction of the pause (within half a step of what was
asked, so on average the pause is what was asked), bounded by the two below."""
COALESCE_MIN_SECONDS = 0.05
COALESCE_MAX_SECONDS = 0.25


def coalesce_grid(seconds: float) -> float:
    """The grid a coalesced pause of `seconds` ends on: 0.25 s for the default 1 s idle pause
    (idle shards fall on four wake-ups a second), 0.05 s for 0.2 s."""
    return min(COALESCE_MAX_SECONDS, max(COALESCE_MIN_SECONDS, seconds * COALESCE_FRACTION))


# Bytes a record is assumed to hold until a shard's first page says otherwise: generous, so a
# first page of large records cannot overshoot the byte bound by much.
FIRST_RECORD_SIZE_GUESS = 64 * 1024

Decode = Callable[[bytes], tuple[ItemKey, Any]]
"""A record's data -> its routing key and payload; RecordError when the record is bad."""
Dispatch = Callable[[list[Envelope]], Awaitable[None]]
"""Hands a page's decoded records to the sink (its `put_many`), which takes over their bytes
in the byte bound from the call on; waits while the sink is full."""


SendDeadLetters = Callable[[list[DeadLetter]], Awaitable[None]]
"""Returns once the dead-letter destinations hold the entries."""


class Progress(Protocol):
    """What the poller tells the shard's checkpoint tracker."""

    @property
    def fenced(self) -> bool: ...
    def register(self, sequence: int) -> None: ...
    def register_many(self, sequences: list[int]) -> None: ...
    def finish(self, sequence: int) -> None: ...
    def end(self) -> None: ...


@dataclass(frozen=True, slots=True)
class ReaderParts:
    """What every shard reader of a consumer shares, whichever way it reads."""

    settings: Settings
    dispatch: Dispatch
    send_dead_letters: SendDeadLetters
    metrics: Metrics
    stopping: asyncio.Event
    """Set when the service stops (a stop also halts every reader)."""
    decode: Decode
    budget: ByteBudget | None = None
    blocked: BlockedCalls | None = None


class ShardReader:
    """One shard's reading in one tenure: the part that does not depend on how pages arrive."""

    def __init__(
        self,
        shard_id: str,
        parts: ReaderParts,
        progress: Progress,
        hash_range: tuple[str, str] = ("", ""),
    ) -> None:
        settings, metrics = parts.settings, parts.metrics
        self.shard_id = shard_id
        self._hash_range = (
            (int(hash_range[0]), int(hash_range[1])) if hash_range[0] and hash_range[1] else None
        )
        """The shard's hash key range, to count KPL sub-records packed for another shard."""
        self._skip_through: int | None = None
        """Position of the checkpoint read from: user records at or before it are done."""
        self._decode = parts.decode
        self._blocked = parts.blocked or BlockedCalls(
            metrics, settings.blocked_log_interval_seconds
        )
        self._settings = settings
        self._progress = progress
        self._dispatch = parts.dispatch
        self._send_dead_letters = parts.send_dead_letters
        self._metrics = metrics
        # This shard's series, looked up once: a label lookup per poll is a lock and a dict
        # walk, and idle shards poll every second. A tenure's series are removed when it ends
        # (its reader is done by then); the next tenure looks them up anew.
        self._behind_latest = metrics.behind_latest.labels(shard_id)
        self._behind_shown = -1
        """The MillisBehindLatest last set on the gauge: an idle shard's is 0 every time, and
        setting a gauge takes its lock."""
        self._records_read = metrics.records_read.labels(shard_id)
        self._stopping = parts.stopping
        self._budget = parts.budget or ByteBudget(settings.max_buffered_bytes)
        self._record_size = float(FIRST_RECORD_SIZE_GUESS)
        """Average bytes a record of this shard, from the pages read (for the byte bound)."""
        self._last_read: str | None = None
        """Sequence number of the last record handed on."""
        self._since: datetime | None = None
        self._halted = asyncio.Event()
        self._sleeper: asyncio.Future[None] | None = None
        """The pause in progress, which `halt` ends early."""
        self.caught_up = asyncio.Event()
        """Set once the shard was found caught up (nothing new, not behind), for burst runs."""

    def _quitting(self) -> bool:
        return self._stopping.is_set() or self._halted.is_set()

    async def _wait_for_room(self) -> bool:
        """Until one more page fits in the byte bound (counted in the metrics when it does not
        at once); False when stopping or halted meanwhile."""
        budget = self._budget
        if not budget.room.is_set():
            self._metrics.memory_waits.inc()
            # Each waiter looks again when woken: another may have taken the room first.
            # `halt` ends the wait as it ends a pause (a stop halts every reader).
            while not budget.room.is_set() and not self._quitting():
                self._sleeper = waiter = budget.waiter()
                try:
                    await waiter
                finally:
                    self._sleeper = None
            if self._quitting() and budget.room.is_set():
                budget.wake_waiters()  # the turn this reader was woken for goes to another
        return not self._quitting()

    def halt(self) -> None:
        """Read no more (the lease is being handed over, or the service stops): the page
        being dispatched is finished, then the loop ends without ending the shard."""
        self._halted.set()
        sleeper = self._sleeper
        if sleeper is not None and not sleeper.done():
            sleeper.set_result(None)

    async def _pause(self, seconds: float, *, coalesce: bool = False) -> bool:
        """Sleep between calls, cut short by `halt`; True when the loop is to end.

        A bare timer future, not a wait on the stopping and halted events: an idle shard
        pauses once a second, and waiting on two events with a timeout (three tasks, their
        cancellation) cost ten times the timer. A stop halts every poller (the supervisor's
        `halt_all`), so the stopping event need not be awaited here.

        `coalesce` (the idle pause): the wake-up is rounded to the nearest point of a grid of
        a quarter of the pause (`coalesce_grid`), so on average the pause is what was asked,
        a shard that stays idle stays on the grid (a call every `seconds`), and idle shards
        wake in the same turn of the loop, send their calls together and mostly get their
        answers in one poll of the sockets. Each turn of the loop that wakes from idle costs
        this machine 110-200 µs of CPU (`python -m bench.wakeups`): at the default 1 s pause
        256 idle shards wake the loop 4 times a second instead of 20 with a 50 ms grid. The
        poller's minimum interval between calls still holds: it is waited for before every
        call."""
        if self._quitting():
            return True
        if seconds > 0:
            loop = asyncio.get_running_loop()
            self._sleeper = sleeper = loop.create_future()
            when = loop.time() + seconds
            if coalesce:
                grid = coalesce_grid(seconds)
                when = round(when / grid) * grid
            timer = loop.call_at(when, _wake, sleeper)
            try:
                await sleeper
            finally:
                timer.cancel()
                self._sleeper = None
        return self._quitting()

    def _show_behind(self, behind: int) -> None:
        if behind != self._behind_shown:
            self._behind_shown = behind
            self._behind_latest.set(behind / 1000)

    def _hold_page(self, records: list[dict[str, Any]], reserved: int) -> int:
        """Swap the page's reservation for its real size (returned), and learn the shard's
        record size."""
        size = sum(len(record["Data"]) for record in records)
        self._budget.give_back(reserved)
        self._budget.take(size)
        if records:
            # Weighted towards the latest page, with 1 KiB as the least (small records).
            self._record_size = max(1024.0, 0.5 * self._record_size + 0.5 * size / len(records))
        return size

    async def _handle(self, records: list[dict[str, Any]], size: int) -> None:
        """Register, decode and dispatch a page in order. The bytes of the records handed to
        the sink are the sink's to give back; the rest (bad records, KPL framing, skipped
        records, or the whole page when cancelled before the hand-over) are given back here."""
        kept = size
        try:
            users = unpack(records, self._hash_range, self._skip_through)
            envelopes, bad = self._decode_page(records, users)
            # The sink owns the good records' bytes from the call on, whatever happens in it.
            kept = size - sum(len(envelope.data) for envelope in envelopes)
            if envelopes:
                await self._dispatch(envelopes)
        finally:
            self._budget.give_back(kept)
        self._skip_through = None
        self._last_read = records[-1]["SequenceNumber"]
        self._records_read.inc(len(users.positions))
        if users.aggregates:
            self._metrics.kpl_aggregates.inc(users.aggregates)
        if users.outside_shard:
            self._metrics.kpl_outside_shard.inc(users.outside_shard)
        if bad:
            await self._send_dead_letters(bad)
            for letter in bad:
                self._progress.finish(letter.sequence)

    def _decode_page(
        self, records: list[dict[str, Any]], users: UserRecords
    ) -> tuple[list[Envelope], list[DeadLetter]]:
        """The page's user records registered with the shard's progress (all of them, in
        order, before any can finish), decoded into envelopes and dead letters."""
        settings, progress, shard_id, decode = (
            self._settings,
            self._progress,
            self.shard_id,
            self._decode,
        )
        progress.register_many(users.positions)
        arrivals = [_arrival(record) for record in records]
        refused = users.refused
        envelopes: list[Envelope] = []
        bad: list[DeadLetter] = []
        for index, (data, at, source) in enumerate(
            zip(users.data, users.positions, users.source, strict=True)
        ):
            arrival = arrivals[source]
            try:
                if refused and index in refused:
                    raise RecordError(refused[index])
                key, item = decode(data)
            except RecordError as exc:
                bad.append(
                    DeadLetter(
                        data,
                        str(exc),
                        "invalid_record",
                        settings.stream_name,
                        shard_id,
                        at,
                        arrival,
                    )
                )
                continue
            envelopes.append(Envelope(shard_id, at, key, item, arrival, data, progress))
        return envelopes, bad

    async def _back_off(
        self, api: str, exc: BaseException, attempt: int, position: str | None = None
    ) -> int:
        fault = fault_of(exc)
        if fault == "throttle":
            self._metrics.throttles.labels(api).inc()
        else:
            self._metrics.errors.labels(api).inc()
        if fault in BLOCKING_FAULTS:
            self._blocked.failed(
                api, fault, f"{describe_error(exc)} -> {self._remedy(api, exc, position)}"
            )
        else:
            log.debug("retrying %s", api, extra={"shard": self.shard_id, "error": str(exc)})
        s = self._settings
        await wait_or_timeout(
            self._stopping, backoff_delay(attempt, s.backoff_base_seconds, s.backoff_max_seconds)
        )
        return attempt + 1

    def _remedy(self, api: str, exc: BaseException, position: str | None) -> str:
        s = self._settings
        if position is not None and error_code(exc) == "InvalidArgumentException":
            # Kinesis refuses where the lease says to start (a sequence number of no or another
            # shard, a future time): no policy fixes that, moving the checkpoint does.
            app = " --app aggregate" if application_of(s) == "aggregate" else ""
            checkpoint = position.removeprefix("AT_SEQUENCE_NUMBER:")
            return (
                f"the checkpoint of {self.shard_id} in lease table {s.lease_table_name} "
                f"({checkpoint}) cannot be read from: move it with `wildrydes-stream reset{app} "
                f"--shard {self.shard_id} --to TRIM_HORIZON` (or LATEST, a time, a sequence "
                "number of the shard)"
            )
        return (
            f"check kinesis:{api} on stream {s.stream_name} ({stream_setting(s)}, the role's "
            "policy)"
        )


def _wake(sleeper: asyncio.Future[None]) -> None:
    if not sleeper.done():
        sleeper.set_result(None)


def _arrival(record: dict[str, Any]) -> float:
    arrival = record.get("ApproximateArrivalTimestamp")
    return arrival if type(arrival) is float else _epoch(arrival)


def _epoch(value: datetime | float | None) -> float:
    if value is None:
        return time.time()
    if isinstance(value, datetime):
        return value.timestamp()
    return float(value)
