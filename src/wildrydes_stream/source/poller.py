"""One shard's GetRecords loop.

At most one call per `min_poll_interval_seconds` (Kinesis allows five a second per shard); polls
again at once while behind, otherwise waits the idle interval. An expired iterator is renewed
after the last record read; throttling and transient errors back off with jitter. Each record is
registered with the shard's progress in order, decoded, and handed to the writers (waiting when
their queues are full); records that cannot be decoded go to the dead-letter destination.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, Protocol

from botocore.exceptions import ClientError

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
from wildrydes_stream.runtime.waiting import wait_any, wait_or_timeout

log = logging.getLogger(__name__)

# Bytes a record is assumed to hold until a shard's first page says otherwise: generous, so a
# first page of large records cannot overshoot the byte bound by much.
FIRST_RECORD_SIZE_GUESS = 64 * 1024
# The Limit of a poll after one that found the shard caught up: at least this, twice what that
# poll read. A page's bytes are reserved in the byte bound before the call, so 256 idle shards
# asking for the full 10,000 records each would hold the bound between them and queue behind
# each other for nothing; a shard that is behind again asks for the full page at once.
CAUGHT_UP_LIMIT = 200

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


class ShardPoller:
    def __init__(
        self,
        shard_id: str,
        client: Any,
        settings: Settings,
        progress: Progress,
        dispatch: Dispatch,
        send_dead_letters: SendDeadLetters,
        metrics: Metrics,
        stopping: asyncio.Event,
        decode: Decode,
        budget: ByteBudget | None = None,
        blocked: BlockedCalls | None = None,
    ) -> None:
        self.shard_id = shard_id
        self._decode = decode
        self._blocked = blocked or BlockedCalls(metrics, settings.blocked_log_interval_seconds)
        self._client = client
        self._settings = settings
        self._progress = progress
        self._dispatch = dispatch
        self._send_dead_letters = send_dead_letters
        self._metrics = metrics
        self._stopping = stopping
        self._budget = budget or ByteBudget(settings.max_buffered_bytes)
        self._record_size = float(FIRST_RECORD_SIZE_GUESS)
        """Average bytes a record of this shard, from the pages read (for the byte bound)."""
        self._last_read: str | None = None
        self._since: datetime | None = None
        self._halted = asyncio.Event()
        self._page_cap: int | None = None
        """The Limit of the next poll when the last one found the shard caught up."""
        self._sleeper: asyncio.Future[None] | None = None
        """The pause in progress, which `halt` ends early."""
        self.caught_up = asyncio.Event()
        """Set once a poll found nothing new and the shard is not behind (for burst runs)."""

    async def run(self, checkpoint: str, since: datetime | None = None) -> None:
        """Read from just after `checkpoint` until stopped or the shard's end.

        `since`: for a checkpoint still at LATEST or AT_TIMESTAMP, the moment the lease started
        at. AT_TIMESTAMP reads from it; so does an iterator renewed before the first record
        under LATEST, as a new LATEST would skip what arrived in between."""
        self._since = since
        try:
            await self._read(checkpoint)
        except _Stopped:
            return

    async def _read(self, checkpoint: str) -> None:
        iterator: str | None = await self._iterator(checkpoint)
        last_call = 0.0
        attempt = 0
        # A fenced tenure (lease lost) reads nothing more: the shard's new owner reads it.
        while iterator is not None and not self._quitting() and not self._progress.fenced:
            pause = self._settings.min_poll_interval_seconds - (time.monotonic() - last_call)
            if await self._pause(pause):
                break
            limit = await self._room_for_a_page()
            if limit == 0:
                break
            last_call = time.monotonic()
            reserved = int(limit * self._record_size)
            self._budget.take(reserved)
            try:
                response = await self._client.get_records(ShardIterator=iterator, Limit=limit)
            except ClientError as exc:
                self._budget.give_back(reserved)
                if error_code(exc) == "ExpiredIteratorException":
                    log.info("iterator expired, renewing", extra={"shard": self.shard_id})
                    iterator = await self._iterator(self._last_read or self._again(checkpoint))
                    continue
                attempt = await self._back_off("GetRecords", exc, attempt)
                continue
            except BaseException as exc:
                self._budget.give_back(reserved)
                if not isinstance(exc, Exception):
                    raise
                attempt = await self._back_off("GetRecords", exc, attempt)
                continue
            attempt = 0
            self._blocked.succeeded("GetRecords")
            records = response.get("Records", [])
            size = self._hold_page(records, reserved)
            if records:
                await self._handle(records, size)
            behind = int(response.get("MillisBehindLatest", 0))
            self._metrics.behind_latest.labels(self.shard_id).set(behind / 1000)
            iterator = response.get("NextShardIterator")
            if iterator is None:
                break
            if behind > 0 or len(records) >= limit:
                self._page_cap = None
                continue
            self._page_cap = max(CAUGHT_UP_LIMIT, 2 * len(records))
            if not records:
                self.caught_up.set()
            idle = self._settings.idle_poll_interval_seconds
            if await self._pause(idle):
                break
        if iterator is None:
            log.info("shard read to its end", extra={"shard": self.shard_id})
            self._progress.end()
            self.caught_up.set()

    def _quitting(self) -> bool:
        return self._stopping.is_set() or self._halted.is_set()

    def halt(self) -> None:
        """Read no more (the lease is being handed over, or the service stops): the page
        being dispatched is finished, then the loop ends without ending the shard."""
        self._halted.set()
        sleeper = self._sleeper
        if sleeper is not None and not sleeper.done():
            sleeper.set_result(None)

    async def _pause(self, seconds: float) -> bool:
        """Sleep between polls, cut short by `halt`; True when the loop is to end.

        A bare timer future, not a wait on the stopping and halted events: an idle shard
        pauses once a second, and waiting on two events with a timeout (three tasks, their
        cancellation) cost ten times the timer. A stop halts every poller (the supervisor's
        `halt_all`), so the stopping event need not be awaited here."""
        if self._quitting():
            return True
        if seconds > 0:
            loop = asyncio.get_running_loop()
            self._sleeper = sleeper = loop.create_future()
            timer = loop.call_later(seconds, _wake, sleeper)
            try:
                await sleeper
            finally:
                timer.cancel()
                self._sleeper = None
        return self._quitting()

    async def _room_for_a_page(self) -> int:
        """The Limit of the next GetRecords: as many records as fit in the byte bound, after
        waiting while nothing does; 0 when stopping."""
        budget = self._budget
        await wait_any(budget.room, self._stopping, self._halted)
        if self._quitting():
            return 0
        most = self._settings.get_records_limit
        if self._page_cap is not None:
            most = min(most, self._page_cap)
        return budget.limit_for(self._record_size, most)

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
        the sink are the sink's to give back; the rest (bad records, or the whole page when
        cancelled before the hand-over) are given back here."""
        kept = size
        try:
            envelopes, bad = self._decode_page(records)
            # The sink owns the good records' bytes from the call on, whatever happens in it.
            kept = sum(len(letter.data) for letter in bad)
            if envelopes:
                await self._dispatch(envelopes)
        finally:
            self._budget.give_back(kept)
        self._last_read = records[-1]["SequenceNumber"]
        self._metrics.records_read.labels(self.shard_id).inc(len(records))
        if bad:
            await self._send_dead_letters(bad)
            for letter in bad:
                self._progress.finish(letter.sequence)

    def _decode_page(
        self, records: list[dict[str, Any]]
    ) -> tuple[list[Envelope], list[DeadLetter]]:
        """The page's records registered with the shard's progress (all of them, in order,
        before any can finish), decoded into envelopes and dead letters."""
        settings, progress, shard_id, decode = (
            self._settings,
            self._progress,
            self.shard_id,
            self._decode,
        )
        sequences = [int(record["SequenceNumber"]) for record in records]
        progress.register_many(sequences)
        envelopes: list[Envelope] = []
        bad: list[DeadLetter] = []
        for record, sequence in zip(records, sequences, strict=True):
            data: bytes = record["Data"]
            arrival = record.get("ApproximateArrivalTimestamp")
            if type(arrival) is not float:
                arrival = _epoch(arrival)
            try:
                key, item = decode(data)
            except RecordError as exc:
                bad.append(
                    DeadLetter(
                        data,
                        str(exc),
                        "invalid_record",
                        settings.stream_name,
                        shard_id,
                        sequence,
                        arrival,
                    )
                )
                continue
            envelopes.append(Envelope(shard_id, sequence, key, item, arrival, data, progress))
        return envelopes, bad

    def _again(self, checkpoint: str) -> str:
        """Where to ask for an iterator again when nothing has been read yet."""
        if checkpoint == "LATEST" and self._since is not None:
            return "AT_TIMESTAMP"
        return checkpoint

    async def _iterator(self, position: str) -> str | None:
        """A shard iterator just after `position` (a sequence number) or at a sentinel."""
        kwargs: dict[str, Any] = {
            "StreamName": self._settings.stream_name,
            "ShardId": self.shard_id,
        }
        if position.isdigit():
            kwargs |= {
                "ShardIteratorType": "AFTER_SEQUENCE_NUMBER",
                "StartingSequenceNumber": position,
            }
        elif position.startswith("AT_SEQUENCE_NUMBER:"):
            kwargs |= {
                "ShardIteratorType": "AT_SEQUENCE_NUMBER",
                "StartingSequenceNumber": position.partition(":")[2],
            }
        elif position == "AT_TIMESTAMP":
            kwargs |= {
                "ShardIteratorType": "AT_TIMESTAMP",
                "Timestamp": self._since or self._settings.starting_datetime(),
            }
        else:
            kwargs["ShardIteratorType"] = position
        attempt = 0
        while True:
            try:
                response = await self._client.get_shard_iterator(**kwargs)
            except Exception as exc:
                # Every fault is retried (a permission fixed, a stream recreated); the blocked
                # ones are reported so an operator sees them.
                where = f"{position} {kwargs['Timestamp']}" if "Timestamp" in kwargs else position
                attempt = await self._back_off("GetShardIterator", exc, attempt, where)
                if self._stopping.is_set():
                    raise _Stopped from None
                continue
            self._blocked.succeeded("GetShardIterator")
            return response.get("ShardIterator")  # type: ignore[no-any-return]

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
            return (
                f"the checkpoint of {self.shard_id} in lease table {s.lease_table_name} "
                f"({position}) cannot be read from: move it with `wildrydes-stream reset{app} "
                f"--shard {self.shard_id} --to TRIM_HORIZON` (or LATEST, a time, a sequence "
                "number of the shard)"
            )
        return (
            f"check kinesis:{api} on stream {s.stream_name} ({stream_setting(s)}, the role's "
            "policy)"
        )


class _Stopped(Exception):
    """Stopping while waiting to retry: leave without reading, and without ending the shard."""


def _wake(sleeper: asyncio.Future[None]) -> None:
    if not sleeper.done():
        sleeper.set_result(None)


def _epoch(value: datetime | float | None) -> float:
    if value is None:
        return time.time()
    if isinstance(value, datetime):
        return value.timestamp()
    return float(value)
