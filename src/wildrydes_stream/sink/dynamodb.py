"""Batched DynamoDB writers.

Records are routed by item key to one of several writers, each draining its own bounded queue
in order, one batch in flight at a time: two records with the same key are therefore written in
stream order. Within a batch a later record for a key replaces the earlier one (BatchWriteItem
refuses duplicate keys). Throttling, 5xx and UnprocessedItems are retried with capped backoff;
an item DynamoDB rejects for itself is isolated from its batch and dead-lettered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from typing import Any

from wildrydes_stream.config import Settings
from wildrydes_stream.observability.metrics import Metrics
from wildrydes_stream.records import DeadLetter, Envelope, ItemKey, item_key_of
from wildrydes_stream.retry import backoff_delay, error_code, is_throttle, is_transient
from wildrydes_stream.sink.deadletter import DeadLetters

log = logging.getLogger(__name__)

Batch = dict[ItemKey, list[Envelope]]


class WriterPool:
    """Front of the writers: `put` routes a record to its writer and waits when it is full."""

    def __init__(
        self,
        client: Any,
        settings: Settings,
        deadletters: DeadLetters,
        metrics: Metrics,
        on_failure: Callable[[BaseException], None],
    ) -> None:
        self._on_failure = on_failure
        per_writer = max(1, settings.queue_size // settings.writers)
        self._queues: list[asyncio.Queue[Envelope]] = [
            asyncio.Queue(per_writer) for _ in range(settings.writers)
        ]
        self._writers = [
            BatchWriter(queue, client, settings, deadletters, metrics) for queue in self._queues
        ]
        self._tasks: list[asyncio.Task[None]] = []
        self._metrics = metrics
        metrics.queue_capacity.set(per_writer * settings.writers)
        metrics.queue_depth.set_function(self.depth)

    def depth(self) -> int:
        return sum(queue.qsize() for queue in self._queues)

    async def put(self, envelope: Envelope) -> None:
        # hash() of a tuple of str is fixed for the life of the process, which is all routing
        # needs: one key always goes to the same writer.
        await self._queues[hash(envelope.key) % len(self._queues)].put(envelope)

    def start(self) -> None:
        if not self._tasks:
            self._tasks = [
                asyncio.create_task(writer.run(), name=f"writer-{i}")
                for i, writer in enumerate(self._writers)
            ]
            for task in self._tasks:
                task.add_done_callback(self._check)

    def _check(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self._on_failure(task.exception())  # type: ignore[arg-type]

    async def drain(self) -> None:
        """Wait until everything queued so far is written or dead-lettered."""
        await asyncio.gather(*(queue.join() for queue in self._queues))

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


class BatchWriter:
    def __init__(
        self,
        queue: asyncio.Queue[Envelope],
        client: Any,
        settings: Settings,
        deadletters: DeadLetters,
        metrics: Metrics,
    ) -> None:
        self._queue = queue
        self._client = client
        self._settings = settings
        self._table = settings.table_name
        self._deadletters = deadletters
        self._metrics = metrics

    async def run(self) -> None:
        while True:
            batch, count = await self._collect()
            try:
                await self.write(batch)
            finally:
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

    async def write(self, batch: Batch) -> None:
        """Write every key of the batch (its latest record) or dead-letter it; never raises."""
        pending = {key: envelopes[-1].item for key, envelopes in batch.items()}
        attempt = 0
        while pending:
            batch, pending = _unfenced(batch, pending)
            if not pending:
                return
            started = time.perf_counter()
            try:
                response = await self._client.batch_write_item(
                    RequestItems={
                        self._table: [{"PutRequest": {"Item": item}} for item in pending.values()]
                    }
                )
            except Exception as exc:
                self._observe(started, "error")
                if not is_transient(exc):
                    await self._isolate(batch, pending, exc)
                    return
                self._count_failure("BatchWriteItem", exc)
                attempt += 1
                if self._out_of_retries(attempt):
                    await self._dead_letter(batch, pending, "write retries exhausted", "retries")
                    return
                await self._sleep(attempt)
                continue
            self._observe(started, "ok")
            unprocessed = response.get("UnprocessedItems", {}).get(self._table, [])
            left = {item_key_of(r["PutRequest"]["Item"]) for r in unprocessed}
            self._finish(batch, [key for key in pending if key not in left])
            pending = {key: item for key, item in pending.items() if key in left}
            if pending:
                self._metrics.unprocessed_retried.inc(len(pending))
                attempt += 1
                if self._out_of_retries(attempt):
                    await self._dead_letter(batch, pending, "unprocessed after retries", "retries")
                    return
                await self._sleep(attempt)

    async def _isolate(self, batch: Batch, pending: dict[ItemKey, Any], exc: Exception) -> None:
        """The request was refused as a whole: find the items at fault by writing one by one."""
        reason = f"{error_code(exc) or type(exc).__name__}: {exc}"
        if len(pending) == 1:
            await self._dead_letter(batch, pending, reason, "rejected_by_table")
            return
        log.info("batch refused, writing items one by one", extra={"reason": reason})
        for key in list(pending):
            await self.write({key: batch[key]})

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

    async def _dead_letter(
        self, batch: Batch, pending: dict[ItemKey, Any], reason: str, kind: str
    ) -> None:
        letters = [
            DeadLetter(
                e.data, reason, kind, self._settings.stream_name, e.shard_id, e.sequence, e.arrival
            )
            for key in pending
            for e in batch[key]
        ]
        await self._deadletters.send(letters)
        for key in pending:
            for envelope in batch[key]:
                envelope.tenure.finish(envelope.sequence)

    def _out_of_retries(self, failures: int) -> bool:
        cap = self._settings.max_retry_attempts
        return cap >= 0 and failures > cap

    def _count_failure(self, api: str, exc: Exception) -> None:
        if is_throttle(exc):
            self._metrics.throttles.labels(api).inc()
        else:
            self._metrics.errors.labels(api).inc()
        log.debug("retrying %s", api, extra={"error": str(exc)})

    def _observe(self, started: float, outcome: str) -> None:
        self._metrics.batch_write_seconds.labels(outcome).observe(time.perf_counter() - started)

    async def _sleep(self, attempt: int) -> None:
        s = self._settings
        await asyncio.sleep(backoff_delay(attempt, s.backoff_base_seconds, s.backoff_max_seconds))


def _unfenced(batch: Batch, pending: dict[ItemKey, Any]) -> tuple[Batch, dict[ItemKey, Any]]:
    """Drop the records of lease tenures that ended: the shard's new owner writes them, and an
    old write landing after its newer one would undo it. Cheap when nothing is fenced."""
    if not any(e.tenure.fenced for key in pending for e in batch[key]):
        return batch, pending
    kept: Batch = {}
    for key in pending:
        live = [e for e in batch[key] if not e.tenure.fenced]
        if live:
            kept[key] = live
    return kept, {key: envelopes[-1].item for key, envelopes in kept.items()}
