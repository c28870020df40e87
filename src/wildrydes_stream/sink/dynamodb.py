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
from collections.abc import Callable
from typing import Any

from wildrydes_stream.background import BackgroundTasks
from wildrydes_stream.buffering import ByteBudget
from wildrydes_stream.config import Settings
from wildrydes_stream.observability.health import BlockedCalls
from wildrydes_stream.observability.metrics import Metrics
from wildrydes_stream.records import DeadLetter, Envelope, ItemKey, item_key_of
from wildrydes_stream.retry import (
    BLOCKING_FAULTS,
    Fault,
    backoff_delay,
    describe_error,
    fault_of,
)
from wildrydes_stream.sink.deadletter import DeadLetters
from wildrydes_stream.sink.pacing import AdaptiveConcurrency, WriteUnitBudget

log = logging.getLogger(__name__)

Batch = dict[ItemKey, list[Envelope]]
API = "BatchWriteItem"


class WriterPool:
    """Front of the writers: `put` routes a record to its writer and waits when it is full."""

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
        per_writer = max(1, settings.queue_size // settings.writers)
        self._queues: list[asyncio.Queue[Envelope]] = [
            asyncio.Queue(per_writer) for _ in range(settings.writers)
        ]
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
        )
        self._writers = [BatchWriter(queue, shared) for queue in self._queues]
        self._tasks = BackgroundTasks(on_failure)
        metrics.queue_capacity.set(per_writer * settings.writers)
        metrics.queue_depth.set_function(self.depth)
        metrics.write_concurrency_limit.set_function(lambda: int(self.concurrency.limit))

    def depth(self) -> int:
        return sum(queue.qsize() for queue in self._queues)

    async def put(self, envelope: Envelope) -> None:
        # hash() of a tuple of str is fixed for the life of the process, which is all routing
        # needs: one key always goes to the same writer.
        await self._queues[hash(envelope.key) % len(self._queues)].put(envelope)

    def start(self) -> None:
        if not self._tasks.started:
            for i, writer in enumerate(self._writers):
                self._tasks.spawn(writer.run(), f"writer-{i}")

    async def drain(self) -> None:
        """Wait until everything queued so far is written or dead-lettered."""
        await asyncio.gather(*(queue.join() for queue in self._queues))

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
    ) -> None:
        self.client = client
        self.settings = settings
        self.deadletters = deadletters
        self.metrics = metrics
        self.blocked = blocked
        self.concurrency = concurrency
        self.units = units
        self.budget = budget


class BatchWriter:
    def __init__(self, queue: asyncio.Queue[Envelope], shared: _Shared) -> None:
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
                for _ in range(count):
                    self._queue.task_done()

    async def _collect(self) -> tuple[Batch, int]:
        """Up to batch_size distinct keys, or what arrived before the batching window closed."""
        queue = self._queue
        first = await queue.get()
        batch: Batch = {first.key: [first]}
        count = 1
        deadline = time.monotonic() + self._settings.batch_window_seconds
        while len(batch) < self._settings.batch_size:
            try:
                envelope = queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    envelope = await asyncio.wait_for(queue.get(), remaining)
                except TimeoutError:
                    break
            count += 1
            batch.setdefault(envelope.key, []).append(envelope)
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
