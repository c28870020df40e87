"""A Kinesis stream writer: PutRecords in batches, with the DynamoDB writer's retry semantics.

A record is dead-lettered only for a fault of its own (Kinesis refuses the request for what it
carries: a batch refused as a whole is sent record by record to find the one at fault). Every
other fault (throttled entries and calls, 5xx, network, permissions, credentials, a missing
stream) is retried with capped backoff for as long as it lasts, unless a cap the user set
(`max_retry_attempts`, `max_record_age_seconds`) is passed; the ones an operator must fix are
reported through BlockedCalls. One batch is in flight at a time and a batch carries one record
per key (the latest, which acknowledges what the earlier ones would have): two puts of a key
land in the order they were made.

`submit` waits while `queue_size` records are queued (back-pressure on whoever produces them);
`submit_nowait` is for timers, which cannot wait.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from wildrydes_stream.aws.retry import (
    BLOCKING_FAULTS,
    PERMISSION_CODES,
    THROTTLING_CODES,
    Fault,
    backoff_delay,
    describe_error,
    fault_of,
)
from wildrydes_stream.config import Settings
from wildrydes_stream.observability.health import BlockedCalls
from wildrydes_stream.observability.metrics import Metrics
from wildrydes_stream.records.envelope import DeadLetter, Tenure
from wildrydes_stream.runtime.background import BackgroundTasks
from wildrydes_stream.sink.deadletter import DeadLetters

log = logging.getLogger(__name__)

API: Final = "PutRecords"
MAX_RECORDS: Final = 500
MAX_BYTES: Final = 5 * 1024 * 1024


@dataclass(slots=True)
class StreamRecord:
    key: str
    """Records with the same key replace each other: only the latest queued one is put."""
    partition_key: str
    data: bytes
    shard_id: str
    """Source shard of what the record acknowledges (for dead letters)."""
    tenure: Tenure | None
    sequences: list[int] = field(default_factory=list)
    """Source records acknowledged on the tenure once this record is on the stream."""
    arrival: float = 0.0
    """Kinesis arrival of the oldest source record (for max_record_age_seconds)."""

    def absorb(self, earlier: StreamRecord) -> None:
        """Replace `earlier` (same key): acknowledge its sources too."""
        self.sequences = earlier.sequences + self.sequences
        self.arrival = min(self.arrival, earlier.arrival)

    @property
    def fenced(self) -> bool:
        return self.tenure is not None and self.tenure.fenced

    def finish(self) -> None:
        if self.tenure is not None:
            for sequence in self.sequences:
                self.tenure.finish(sequence)


class StreamWriter:
    def __init__(
        self,
        client: Any,
        stream: str,
        settings: Settings,
        deadletters: DeadLetters,
        metrics: Metrics,
        blocked: BlockedCalls,
        on_failure: Callable[[BaseException], None],
        on_put: Callable[[int], None] | None = None,
    ) -> None:
        self._client = client
        self._stream = stream
        self._settings = settings
        self._deadletters = deadletters
        self._metrics = metrics
        self._blocked = blocked
        self._on_put = on_put
        self._queue: deque[StreamRecord] = deque()
        self._bound = settings.queue_size
        self._ready = asyncio.Event()
        """Set while something is queued."""
        self._room = asyncio.Event()
        self._room.set()
        self._idle = asyncio.Event()
        """Set while nothing is queued or in flight."""
        self._idle.set()
        self._tasks = BackgroundTasks(on_failure)
        metrics.blocked.labels(API).set(0)
        metrics.throttles.labels(API)
        metrics.errors.labels(API)

    def depth(self) -> int:
        return len(self._queue)

    async def submit(self, records: list[StreamRecord]) -> None:
        """Queue records, waiting first while the queue is at its bound."""
        if records:
            await self._room.wait()
            self.submit_nowait(records)

    def submit_nowait(self, records: list[StreamRecord]) -> None:
        if not records:
            return
        self._queue.extend(records)
        self._ready.set()
        self._idle.clear()
        if len(self._queue) >= self._bound:
            self._room.clear()

    def start(self) -> None:
        if not self._tasks.started:
            self._tasks.spawn(self._run(), "stream-writer")

    async def drain(self) -> None:
        """Until everything queued so far is put or dead-lettered."""
        await self._idle.wait()

    async def stop(self) -> None:
        await self._tasks.cancel()

    async def _run(self) -> None:
        while True:
            await self._ready.wait()
            batch = self._take()
            await self.write(batch)
            if not self._queue:
                self._ready.clear()
                self._idle.set()

    def _take(self) -> list[StreamRecord]:
        """Up to 500 records (5 MiB), one per key: a later record replaces an earlier one."""
        batch: dict[str, StreamRecord] = {}
        size = 0
        queue = self._queue
        while queue and len(batch) < MAX_RECORDS:
            record = queue[0]
            grown = size + len(record.data) + len(record.partition_key)
            if batch and grown > MAX_BYTES:
                break
            queue.popleft()
            earlier = batch.pop(record.key, None)
            # Another tenure's record of the key was fenced when this one began: dropped.
            if earlier is not None and earlier.tenure is record.tenure:
                record.absorb(earlier)
            batch[record.key] = record
            size = grown
        if len(queue) < self._bound:
            self._room.set()
        return list(batch.values())

    async def write(self, batch: list[StreamRecord]) -> None:
        """Put every record of the batch or dead-letter it; never raises but for cancellation."""
        failures = 0
        last_error = ""
        while True:
            if failures:
                await self._sleep(failures)
                batch = await self._past_age_cap(batch, last_error)
            batch = [r for r in batch if not r.fenced]  # the shard's new owner puts them
            if not batch:
                return
            if self._out_of_retries(failures):
                reason = f"put failed {failures} times: {last_error}"
                await self._dead_letter(batch, reason, "retries")
                return
            try:
                response = await self._client.put_records(
                    StreamName=self._stream,
                    Records=[{"Data": r.data, "PartitionKey": r.partition_key} for r in batch],
                )
            except Exception as exc:
                fault = fault_of(exc)
                if fault == "item":
                    await self._isolate(batch, exc)
                    return
                if fault not in BLOCKING_FAULTS:
                    self._blocked.succeeded(API)
                failures += 1
                last_error = describe_error(exc)
                self._count_failure(fault, last_error)
                continue
            self._blocked.succeeded(API)
            left: list[StreamRecord] = []
            put = 0
            code = ""
            for record, result in zip(batch, response["Records"], strict=True):
                if "ErrorCode" not in result:
                    record.finish()
                    put += 1
                    continue
                left.append(record)
                code = str(result["ErrorCode"])
                last_error = f"{code}: {result.get('ErrorMessage', '')}"
            if put and self._on_put is not None:
                self._on_put(put)
            if not left:
                return
            failures += 1
            self._count_failure(_entry_fault(code), last_error)
            batch = left

    async def _isolate(self, batch: list[StreamRecord], exc: Exception) -> None:
        reason = describe_error(exc)
        if len(batch) == 1:
            await self._dead_letter(batch, reason, "rejected_by_stream")
            return
        log.info("PutRecords refused, putting records one by one", extra={"reason": reason})
        for record in batch:
            await self.write([record])

    async def _past_age_cap(self, batch: list[StreamRecord], last_error: str) -> list[StreamRecord]:
        cap = self._settings.max_record_age_seconds
        if cap < 0:
            return batch
        now = time.time()
        expired = [r for r in batch if now - r.arrival > cap]
        if expired:
            reason = f"older than max_record_age_seconds ({cap:g}) while puts fail: {last_error}"
            await self._dead_letter(expired, reason, "record_age")
        return [r for r in batch if now - r.arrival <= cap]

    async def _dead_letter(self, batch: list[StreamRecord], reason: str, kind: str) -> None:
        """One entry per record (the record that could not be put, with the last source
        sequence it stands for), then its sources count as finished."""
        letters = [
            DeadLetter(
                r.data,
                reason,
                kind,
                self._stream,
                r.shard_id,
                r.sequences[-1] if r.sequences else 0,
                r.arrival,
            )
            for r in batch
        ]
        await self._deadletters.send(letters)
        for record in batch:
            record.finish()

    def _out_of_retries(self, failures: int) -> bool:
        cap = self._settings.max_retry_attempts
        return cap >= 0 and failures > cap

    def _count_failure(self, fault: Fault, error: str) -> None:
        if fault == "throttle":
            self._metrics.throttles.labels(API).inc()
        else:
            self._metrics.errors.labels(API).inc()
        if fault in BLOCKING_FAULTS:
            self._blocked.failed(API, fault, f"{error} -> {self._advice(fault)}")
        else:
            log.debug("retrying %s", API, extra={"error": error})

    def _advice(self, fault: Fault) -> str:
        stream = self._stream
        if fault == "permission":
            return f"grant kinesis:PutRecords on stream {stream} to the service's role"
        if fault == "credentials":
            return "check the AWS credentials (IRSA role, AWS_* variables) and the clock"
        if fault == "missing":
            # `redrive` puts readings back onto the raw stream with this writer too.
            raw = stream == self._settings.raw_stream_name
            setting = "raw_stream_name" if raw else "stream_name"
            return f"create stream {stream} or set {setting} (WILDRYDES_{setting.upper()})"
        return "records are held and retried; nothing is dead-lettered for it"

    async def _sleep(self, failures: int) -> None:
        s = self._settings
        await asyncio.sleep(backoff_delay(failures, s.backoff_base_seconds, s.backoff_max_seconds))


def _entry_fault(code: str) -> Fault:
    """A PutRecords entry's ErrorCode: throttled, a KMS key an operator must fix, or
    InternalFailure (transient)."""
    if code in THROTTLING_CODES:
        return "throttle"
    if code in PERMISSION_CODES:
        return "permission"
    if code == "KMSNotFoundException":
        return "missing"
    if code.startswith("KMS"):
        return "permission"
    return "transient"
