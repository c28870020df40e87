"""The alert stage of `run`: evaluate each record in shard order, deliver alerts at least once.

    poller -> AlertingSink.put -> evaluate (UnicornStates) -> table writers (WriterPool)
                                                   └─ alert ─> bounded alert queue -> delivery

A record that raises an alert is acknowledged to its shard only once both its table write and
its alert delivery are done (`_Both` wraps its tenure), so a checkpoint never passes an alert
that was not delivered: after a crash the record is read again and its alert sent again, with
the same id. Alerts are delivered by one task, in order (a unicorn's `resolved` never overtakes
its `firing`), from a queue of their own: a failing destination is retried with capped backoff
and counted, and holds up the table writes of other records only once that queue is full.

A destination that refuses one alert for itself (`AlertRefused`: a webhook's 400, SNS's
InvalidParameter) would refuse it forever, and every later alert would wait behind it: the
record is dead-lettered instead (kind `alert_refused`, the reason naming the destination and
its answer), counted, and acknowledged, and delivery moves on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation

from wildrydes_stream.alerts.destinations import (
    SETTING_OF,
    Alert,
    AlertRefused,
    Destination,
    printable,
)
from wildrydes_stream.alerts.metrics import AlertMetrics
from wildrydes_stream.alerts.state import UnicornStates
from wildrydes_stream.aws.retry import backoff_delay, error_code
from wildrydes_stream.config import Settings
from wildrydes_stream.records.envelope import DeadLetter, Envelope, Tenure
from wildrydes_stream.records.fields import status_time_to_epoch_ms
from wildrydes_stream.runtime.background import BackgroundTasks
from wildrydes_stream.sink.deadletter import DeadLetters
from wildrydes_stream.sink.dynamodb import WriterPool

log = logging.getLogger(__name__)

REFUSED_KIND = "alert_refused"
"""Dead-letter kind (metric label) of a record whose alert a destination refused."""


class _Both:
    """The tenure of a record with an alert: the original is told once both the table write
    and the alert delivery finished (each calls `finish` once)."""

    __slots__ = ("_left", "_tenure")

    def __init__(self, tenure: Tenure) -> None:
        self._tenure = tenure
        self._left = 2

    @property
    def fenced(self) -> bool:
        return self._tenure.fenced

    def finish(self, sequence: int) -> None:
        self._left -= 1
        if self._left == 0:
            self._tenure.finish(sequence)


@dataclass(frozen=True, slots=True)
class _Pending:
    alert: Alert
    tenure: Tenure
    sequence: int
    shard_id: str
    data: bytes
    """The record, for the dead letter should a destination refuse the alert."""
    arrival: float


class AlertStage:
    """Evaluates records against the per-unicorn state and delivers the alerts."""

    def __init__(
        self,
        states: UnicornStates,
        destinations: list[Destination],
        metrics: AlertMetrics,
        settings: Settings,
        on_failure: Callable[[BaseException], None],
        deadletters: DeadLetters,
    ) -> None:
        self._states = states
        self._destinations = destinations
        self._metrics = metrics
        self._settings = settings
        self._deadletters = deadletters
        self._epoch_ms = settings.status_time_format == "epoch_ms"
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue(settings.alert_queue_size)
        self._tasks = BackgroundTasks(on_failure)
        self._last_logged: dict[str, float] = {}
        states.on_forget = metrics.forget_shard
        metrics.queued.set_function(self._queue.qsize)

    def evaluate(self, envelope: Envelope) -> Alert | None:
        """The alert this record raises, if any; updates the unicorn's state and gauge."""
        magic = _magic(envelope)
        if magic is None:
            return None
        name = envelope.key[0]
        self._metrics.saw(envelope.shard_id, name, float(magic))
        value = envelope.item["StatusTime"]
        epoch_ms = int(value["N"]) if self._epoch_ms else status_time_to_epoch_ms(value["S"])
        state = self._states.evaluate(envelope.shard_id, envelope.sequence, name, magic, epoch_ms)
        if state is None:
            return None
        if self._epoch_ms:
            moment = datetime.fromtimestamp(epoch_ms // 1000, UTC)
            status_time = f"{moment:%Y-%m-%d %H:%M:%S}.{epoch_ms % 1000:03d}"
        else:
            status_time = value["S"]
        return Alert(name, status_time, epoch_ms, magic, self._states.threshold, state)

    async def put(self, alert: Alert, tenure: Tenure, envelope: Envelope) -> None:
        """Queue the alert of `envelope`'s record for delivery, to be acknowledged on `tenure`;
        waits while the queue is full."""
        e = envelope
        await self._queue.put(_Pending(alert, tenure, e.sequence, e.shard_id, e.data, e.arrival))

    def start(self) -> None:
        if not self._tasks.started:
            self._tasks.spawn(self._run(), "alert-delivery")

    async def drain(self) -> None:
        await self._queue.join()

    async def stop(self) -> None:
        await self._tasks.cancel()
        for destination in self._destinations:
            await destination.close()

    async def _run(self) -> None:
        queue = self._queue
        while True:
            pending = await queue.get()
            try:
                # A tenure that ended is not delivered for: the shard's new owner reads the
                # record again (it was not acknowledged) and sends the alert itself.
                if not pending.tenure.fenced:
                    refusals = await asyncio.gather(
                        *(self._deliver(d, pending) for d in self._destinations)
                    )
                    refused = [refusal for refusal in refusals if refusal is not None]
                    if refused and not pending.tenure.fenced:
                        await self._dead_letter(pending, refused)
                    pending.tenure.finish(pending.sequence)
            finally:
                queue.task_done()

    async def _deliver(self, destination: Destination, pending: _Pending) -> str | None:
        """Until delivered (or the tenure ends), with capped backoff between attempts. Returns
        why the destination refused the alert itself (not retried), or None."""
        s = self._settings
        alert = pending.alert
        attempt = 0
        while not pending.tenure.fenced:
            try:
                async with asyncio.timeout(s.alert_delivery_timeout_seconds):
                    await destination.deliver(alert)
            except AlertRefused as exc:
                self._metrics.refused.labels(destination.name).inc()
                return f"{destination.name}: {exc}"
            except Exception as exc:
                attempt += 1
                self._failed(destination.name, exc)
                await asyncio.sleep(
                    backoff_delay(attempt, s.backoff_base_seconds, s.backoff_max_seconds)
                )
                continue
            self._metrics.alerts.labels(alert.state, destination.name).inc()
            return None
        return None

    async def _dead_letter(self, pending: _Pending, refused: list[str]) -> None:
        """The record of a refused alert to the dead-letter destinations (retried there until
        stored), so that it can be acknowledged and its shard move on."""
        reason = f"low-magic alert ({pending.alert.state}) refused by {'; '.join(refused)}"
        letter = DeadLetter(
            pending.data,
            reason,
            REFUSED_KIND,
            self._settings.stream_name,
            pending.shard_id,
            pending.sequence,
            pending.arrival,
        )
        await self._deadletters.send([letter])

    def _failed(self, destination: str, exc: BaseException) -> None:
        self._metrics.failures.labels(destination).inc()
        now = time.monotonic()
        last = self._last_logged.get(destination)
        if last is not None and now - last < self._settings.blocked_log_interval_seconds:
            return
        self._last_logged[destination] = now
        cause = error_code(exc) or type(exc).__name__
        log.warning(
            "alert destination %s failed, retrying until it works (check %s): %s",
            destination,
            SETTING_OF[destination],
            printable(f"{cause}: {exc}", 300),
            extra={"destination": destination},
        )


class AlertingSink:
    """The `run` sink: each record is evaluated in shard order, then written to the table; a
    record with an alert is acknowledged once both its write and its alert are done."""

    def __init__(self, pool: WriterPool, stage: AlertStage) -> None:
        self.pool = pool
        self.stage = stage

    def start(self) -> None:
        self.pool.start()
        self.stage.start()

    async def put_many(self, envelopes: list[Envelope]) -> None:
        """Evaluate the records in order, hand them all to the writers, then queue their
        alerts. The writers take them first so that a cancel while the alert queue is full
        leaves no record whose bytes nobody gives back."""
        stage = self.stage
        alerts: list[tuple[Alert, _Both, Envelope]] = []
        for envelope in envelopes:
            if envelope.tenure.fenced:
                continue  # dropped by the writers, state left alone
            alert = stage.evaluate(envelope)
            if alert is not None:
                envelope.tenure = both = _Both(envelope.tenure)
                alerts.append((alert, both, envelope))
        await self.pool.put_many(envelopes)
        for alert, both, alerted in alerts:
            await stage.put(alert, both, alerted)

    async def drain(self) -> None:
        await asyncio.gather(self.pool.drain(), self.stage.drain())

    async def stop(self) -> None:
        await self.pool.stop()
        await self.stage.stop()


def _magic(envelope: Envelope) -> int | Decimal | None:
    """The record's MinMagicPoints, or None when it has none (nothing to evaluate)."""
    value = envelope.item.get("MinMagicPoints")
    if value is None or "N" not in value:
        return None
    text: str = value["N"]
    try:
        return int(text)  # the common case, and several times cheaper than Decimal
    except ValueError:
        pass
    try:
        return Decimal(text)
    except InvalidOperation:
        return None
