"""Batched DynamoDB writers.

Records are routed by item key to one of several writers, each draining its own bounded queue
in order, one batch in flight at a time: two records with the same key are therefore written in
stream order. Within a batch a later record for a key replaces the earlier one (BatchWriteItem
refuses duplicate keys).

A record is dead-lettered only for a fault of its own: DynamoDB refuses that single item (an
item the table refuses is isolated from its batch by writing the batch item by item). Every
other fault (throttling, UnprocessedItems, 5xx, network, permissions, credentials, a missing
table) is retried with capped backoff for as long as it lasts: the writer holds its batch, the
queues fill, the pollers stop reading and the checkpoint stays put, until the fault ends or a
cap the user set (`max_retry_attempts`, `max_record_age_seconds`) is passed.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from wildrydes_stream.aws.retry import (
    BLOCKING_FAULTS,
    Fault,
    backoff_delay,
    describe_error,
    fault_of,
)
from wildrydes_stream.config import Settings
from wildrydes_stream.observability.health import BlockedCalls
from wildrydes_stream.observability.metrics import Metrics
from wildrydes_stream.records.envelope import DeadLetter, Envelope, ItemKey, item_key_of
from wildrydes_stream.runtime.background import BackgroundTasks
from wildrydes_stream.runtime.budget import ByteBudget
from wildrydes_stream.runtime.waiting import wait_or_timeout
from wildrydes_stream.sink.deadletter import DeadLetters
from wildrydes_stream.sink.pacing import AdaptiveConcurrency, WriteUnitBudget

log = logging.getLogger(__name__)

Batch = dict[ItemKey, list[Envelope]]
API = "BatchWriteItem"


class WriterQueue:
    """One writer's records in arrival order. Its bound is the pool's to keep (`put_many`
    waits for room); `unfinished` counts records queued and not yet written, for `drain`."""

    __slots__ = ("idle", "ready", "records", "unfinished")

    def __init__(self) -> None:
        self.records: deque[Envelope] = deque()
        self.ready = asyncio.Event()
        """Set while records are queued."""
        self.unfinished = 0
        self.idle = asyncio.Event()
        """Set while nothing is queued or being written."""
        self.idle.set()

    def extend(self, envelopes: list[Envelope]) -> None:
        self.records.extend(envelopes)
        self.unfinished += len(envelopes)
        self.ready.set()
        self.idle.clear()

    def done(self, count: int) -> None:
        """`count` records taken from this queue are written or dead-lettered."""
        self.unfinished -= count
        if self.unfinished <= 0:
            self.unfinished = 0
            self.idle.set()


class WriterPool:
    """Front of the writers: `put_many` routes records to their writers and waits when full.

    Records are handed over a page at a time: one wait for room and one append per writer,
    not one awaited queue put per record (which cost more than decoding the record)."""

    def __init__(
        self,
        client: Any,
        settings: Settings,
        deadletters: DeadLetters,
        metrics: Metrics,
        on_failure: Callable[[BaseException], None],
        *,
        blocked: BlockedCalls | None = None,
        budget: ByteBudget | None = None,
    ) -> None:
        self._per_writer = max(1, settings.queue_size // settings.writers)
        self._queues = [WriterQueue() for _ in range(settings.writers)]
        self._room = asyncio.Event()
        """Set when a writer took records from its queue: a waiting `put_many` looks again."""
        self._budget = budget
        self.blocked = blocked or BlockedCalls(metrics, settings.blocked_log_interval_seconds)
        self.concurrency = AdaptiveConcurrency(settings.writers)
        shared = _Shared(
            client,
            settings,
            deadletters,
            metrics,
            self.blocked,
            self.concurrency,
            WriteUnitBudget(settings.max_write_units_per_second),
            budget,
            self._took,
        )
        self._writers = [BatchWriter(queue, shared) for queue in self._queues]
        self._tasks = BackgroundTasks(on_failure)
        metrics.queue_capacity.set(self._per_writer * settings.writers)
        metrics.queue_depth.set_function(self.depth)
        metrics.write_concurrency_limit.set_function(lambda: int(self.concurrency.limit))

    def depth(self) -> int:
        return sum(len(queue.records) for queue in self._queues)

    async def put(self, envelope: Envelope) -> None:
        await self.put_many([envelope])

    async def put_many(self, envelopes: list[Envelope]) -> None:
        """Queue records (each behind the earlier ones of its key), taking over their bytes in
        the byte bound: as many at once as a writer's queue has room for, waiting for room
        for the rest. If cancelled while waiting, the bytes of what it did not queue are
        given back."""
        queues = self._queues
        if len(queues) == 1:
            groups = [(queues[0], envelopes)]
        else:
            by_writer: dict[int, list[Envelope]] = {}
            count = len(queues)
            for envelope in envelopes:
                # hash() of a tuple of str is fixed for the life of the process, which is all
                # routing needs: one key always goes to the same writer.
                index = hash(envelope.key) % count
                group = by_writer.get(index)
                if group is None:
                    by_writer[index] = [envelope]
                else:
                    group.append(envelope)
            groups = [(queues[index], group) for index, group in by_writer.items()]
        # What is left of each writer's share: every writer is given what fits before any
        # wait, so one slow writer does not keep the others idle.
        left = [(queue, group, 0) for queue, group in groups]
        try:
            while True:
                waiting = []
                for queue, group, start in left:
                    room = self._per_writer - len(queue.records)
                    if room > 0:
                        queue.extend(group[start : start + room])
                        start += room
                    if start < len(group):
                        waiting.append((queue, group, start))
                left = waiting
                if not left:
                    return
                self._room.clear()
                await self._room.wait()
        except BaseException:
            self._give_back(*(group[start:] for _, group, start in left))
            raise

    def _give_back(self, *groups: list[Envelope]) -> None:
        if self._budget is not None:
            self._budget.give_back(sum(len(e.data) for group in groups for e in group))

    def _took(self, queue: WriterQueue) -> None:
        if len(queue.records) < self._per_writer:
            self._room.set()

    def start(self) -> None:
        if not self._tasks.started:
            for i, writer in enumerate(self._writers):
                self._tasks.spawn(writer.run(), f"writer-{i}")

    async def drain(self) -> None:
        """Wait until everything queued so far is written or dead-lettered."""
        await asyncio.gather(*(queue.idle.wait() for queue in self._queues))

    async def stop(self) -> None:
        await self._tasks.cancel()


class _Shared:
    """What every writer of a pool uses: the client, settings and the pacing state."""

    def __init__(
        self,
        client: Any,
        settings: Settings,
        deadletters: DeadLetters,
        metrics: Metrics,
        blocked: BlockedCalls,
        concurrency: AdaptiveConcurrency,
        units: WriteUnitBudget,
        budget: ByteBudget | None,
        took: Callable[[WriterQueue], None],
    ) -> None:
        self.client = client
        self.settings = settings
        self.deadletters = deadletters
        self.metrics = metrics
        self.blocked = blocked
        self.concurrency = concurrency
        self.units = units
        self.budget = budget
        self.took = took
        """Called after a writer took records from its queue (there may be room now)."""


class BatchWriter:
    def __init__(self, queue: WriterQueue, shared: _Shared) -> None:
        self._queue = queue
        self._shared = shared
        self._settings = shared.settings
        self._table = shared.settings.table_name
        self._metrics = shared.metrics

    async def run(self) -> None:
        while True:
            batch, count = await self._collect()
            try:
                await self.write(batch)
            finally:
                self._release(batch)
                self._queue.done(count)

    async def _collect(self) -> tuple[Batch, int]:
        """Up to batch_size distinct keys, or what arrived before the batching window closed
        (counted from the first record taken)."""
        queue = self._queue
        records = queue.records
        while not records:
            queue.ready.clear()
            await queue.ready.wait()
        size = self._settings.batch_size
        batch: Batch = {}
        count = 0
        deadline = 0.0
        while True:
            while records and len(batch) < size:
                envelope = records.popleft()
                count += 1
                same_key = batch.get(envelope.key)
                if same_key is None:
                    batch[envelope.key] = [envelope]
                else:
                    same_key.append(envelope)
            if len(batch) >= size:
                break
            if not deadline:
                deadline = time.monotonic() + self._settings.batch_window_seconds
            remaining = deadline - time.monotonic()
            queue.ready.clear()
            if remaining <= 0 or not await wait_or_timeout(queue.ready, remaining):
                break
        if not records:
            queue.ready.clear()
        self._shared.took(queue)
        return batch, count

    def _release(self, batch: Batch) -> None:
        """The batch's records leave memory: give their bytes back to the budget."""
        budget = self._shared.budget
        if budget is not None:
            budget.give_back(sum(len(e.data) for envelopes in batch.values() for e in envelopes))

    async def write(self, batch: Batch) -> None:
        """Write every key of the batch (its latest record) or dead-letter it; never raises
        but for cancellation. Retries whatever is not the items' own fault until it is written
        or past a cap the user set."""
        failures = 0
        last_error = ""
        while True:
            if failures:
                await self._sleep(failures)
                batch = await self._past_age_cap(_unfenced(batch), last_error)
            if not batch:
                return
            if self._out_of_retries(failures):
                await self._dead_letter(
                    batch, f"write failed {failures} times: {last_error}", "retries"
                )
                return
            batch, outcome = await self._call(batch)
            if isinstance(outcome, BaseException):
                fault = fault_of(outcome)
                if fault == "item":
                    await self._isolate(batch, outcome)
                    return
                failures += 1
                last_error = describe_error(outcome)
                self._count_failure(outcome, fault)
                continue
            left = outcome
            self._finish(batch, [key for key in batch if key not in left])
            batch = {key: envelopes for key, envelopes in batch.items() if key in left}
            if batch:
                self._metrics.unprocessed_retried.inc(len(batch))
                failures += 1
                last_error = f"{len(batch)} items returned unprocessed (throttled)"

    async def _call(self, batch: Batch) -> tuple[Batch, set[ItemKey] | Exception]:
        """One BatchWriteItem of the batch's records still owned when the call is made: those
        records, and the keys handed back unprocessed or the error the call failed with."""
        shared = self._shared
        if shared.units.rate > 0:  # the units are counted only when there is a budget
            await shared.units.spend(_write_units(batch))
        async with shared.concurrency.slot() as window:
            # Checked last thing before sending: the lease may have moved while this waited.
            batch = _unfenced(batch)
            if not batch:
                return batch, set()
            pending = [{"PutRequest": {"Item": es[-1].item}} for es in batch.values()]
            started = time.perf_counter()
            try:
                response = await shared.client.batch_write_item(RequestItems={self._table: pending})
            except Exception as exc:
                self._observe(started, "error")
                fault = fault_of(exc)
                if fault == "throttle":
                    shared.concurrency.throttled(window)
                if fault not in BLOCKING_FAULTS:
                    # Throttling, 5xx, the items' own fault: the API itself is reachable.
                    shared.blocked.succeeded(API)
                return batch, exc
        self._observe(started, "ok")
        shared.blocked.succeeded(API)
        unprocessed = response.get("UnprocessedItems", {}).get(self._table, [])
        if unprocessed:
            shared.concurrency.throttled(window)
        else:
            shared.concurrency.succeeded()
        return batch, {item_key_of(r["PutRequest"]["Item"]) for r in unprocessed}

    async def _isolate(self, batch: Batch, exc: Exception) -> None:
        """The request was refused for what it carried: find the items at fault by writing one
        by one (each of those retried as any write is)."""
        reason = describe_error(exc)
        if len(batch) == 1:
            await self._dead_letter(batch, reason, "rejected_by_table")
            return
        log.info("batch refused, writing items one by one", extra={"reason": reason})
        for key, envelopes in batch.items():
            await self.write({key: envelopes})

    async def _past_age_cap(self, batch: Batch, last_error: str) -> Batch:
        """Dead-letter the keys whose oldest record is older than max_record_age_seconds."""
        cap = self._settings.max_record_age_seconds
        if cap < 0:
            return batch
        now = time.time()
        expired = {k: es for k, es in batch.items() if now - min(e.arrival for e in es) > cap}
        if not expired:
            return batch
        reason = f"older than max_record_age_seconds ({cap:g}) while writes fail: {last_error}"
        await self._dead_letter(expired, reason, "record_age")
        return {k: es for k, es in batch.items() if k not in expired}

    def _finish(self, batch: Batch, keys: list[ItemKey]) -> None:
        if not keys:
            return
        written = 0
        oldest = math.inf
        for key in keys:
            for envelope in batch[key]:
                envelope.tenure.finish(envelope.sequence)
                oldest = min(oldest, envelope.arrival)
                written += 1
        # One observation per acknowledged write, for its oldest record: the latency that
        # matters for lag, at a fraction of the cost of one observation per record.
        self._metrics.end_to_end_seconds.observe(max(0.0, time.time() - oldest))
        self._metrics.records_written.inc(written)

    async def _dead_letter(self, batch: Batch, reason: str, kind: str) -> None:
        s = self._settings
        letters = [
            DeadLetter(e.data, reason, kind, s.stream_name, e.shard_id, e.sequence, e.arrival)
            for envelopes in batch.values()
            for e in envelopes
        ]
        await self._shared.deadletters.send(letters)
        for envelopes in batch.values():
            for envelope in envelopes:
                envelope.tenure.finish(envelope.sequence)

    def _out_of_retries(self, failures: int) -> bool:
        cap = self._settings.max_retry_attempts
        return cap >= 0 and failures > cap

    def _count_failure(self, exc: Exception, fault: Fault) -> None:
        metrics = self._metrics
        if fault == "throttle":
            metrics.throttles.labels(API).inc()
        else:
            metrics.errors.labels(API).inc()
        if fault in BLOCKING_FAULTS:
            self._shared.blocked.failed(API, fault, self._advice(exc, fault))
        else:
            log.debug("retrying %s", API, extra={"error": describe_error(exc)})

    def _advice(self, exc: Exception, fault: Fault) -> str:
        """What failed and what to change, in one line."""
        table, error = self._table, describe_error(exc)
        if fault == "permission":
            todo = (
                f"grant dynamodb:BatchWriteItem on table {table} to the service's role "
                "(config/iam/policy.json)"
            )
        elif fault == "credentials":
            todo = (
                "check the AWS credentials (IRSA role, AWS_* variables) and the clock; "
                "records are held until writes succeed"
            )
        elif fault == "missing":
            todo = f"create table {table} or set table_name (WILDRYDES_TABLE_NAME)"
        else:
            todo = "records are held and retried; nothing is dead-lettered for it"
        return f"{error} -> {todo}"

    def _observe(self, started: float, outcome: str) -> None:
        self._metrics.batch_write_seconds.labels(outcome).observe(time.perf_counter() - started)

    async def _sleep(self, failures: int) -> None:
        s = self._settings
        await asyncio.sleep(backoff_delay(failures, s.backoff_base_seconds, s.backoff_max_seconds))


def _write_units(batch: Batch) -> int:
    """Write capacity units of a batch: one per started KiB of each item, estimated from the
    record's JSON (within a few bytes of DynamoDB's own count of names and values)."""
    return sum(len(envelopes[-1].data) // 1024 + 1 for envelopes in batch.values())


def _unfenced(batch: Batch) -> Batch:
    """Drop the records of lease tenures that ended: the shard's new owner writes them, and an
    old write landing after its newer one would undo it. Cheap when nothing is fenced."""
    if not any(e.tenure.fenced for envelopes in batch.values() for e in envelopes):
        return batch
    kept: Batch = {}
    for key, envelopes in batch.items():
        live = [e for e in envelopes if not e.tenure.fenced]
        if live:
            kept[key] = live
    return kept
