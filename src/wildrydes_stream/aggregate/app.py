"""`aggregate`: the consumer that turns raw readings into per-minute windows on a stream.

    poller -> WindowSink.put_many -> ShardWindows (per unicorn) -> StreamWriter (PutRecords)
                                          ^ idle timers                 | acknowledges puts

The raw stream is read with the consumer core under its own lease table. A reading is done
(and may be checkpointed) once merged into its window; the windows are the core's per-shard
state (`Aggregation` implements ShardState), stored with each checkpoint in the state table,
so a restart, a hand-off or a reshard puts every window with exactly the values its readings
give. See windows.py for the rules (event time per unicorn, duplicates, late readings).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from botocore.exceptions import ClientError
from prometheus_client import CollectorRegistry

from wildrydes_stream.aggregate.metrics import AggregateMetrics
from wildrydes_stream.aggregate.readings import Reading, decode_reading
from wildrydes_stream.aggregate.windows import Emission, ShardWindows
from wildrydes_stream.aws.clients import AwsClients
from wildrydes_stream.config import Settings
from wildrydes_stream.consumer.core import Consumer, Wiring
from wildrydes_stream.consumer.state import Changes, Entries, ShardState, StateKey
from wildrydes_stream.errors import MissingResourceError
from wildrydes_stream.records.envelope import DeadLetter, Envelope, ItemKey, Tenure
from wildrydes_stream.runtime.budget import ByteBudget
from wildrydes_stream.sink.deadletter import DeadLetters
from wildrydes_stream.sink.kinesis import API as PUT_API
from wildrydes_stream.sink.kinesis import StreamRecord, StreamWriter

log = logging.getLogger(__name__)


class Aggregation:
    """The windows of every owned shard, their idle timers and their metrics; the per-shard
    state the core saves with each checkpoint and hands to the next tenure."""

    def __init__(self, settings: Settings) -> None:
        self._window_ms = settings.window_seconds * 1000
        self._lateness_ms = round(settings.allowed_lateness_seconds * 1000)
        self._horizon_ms = round(settings.late_horizon_seconds * 1000)
        self._idle_timeout = settings.idle_window_timeout_seconds
        self.shards: dict[str, ShardWindows] = {}
        self._last_seen: dict[tuple[str, str], float] = {}
        self._timers: dict[tuple[str, str], asyncio.TimerHandle] = {}
        self._put_idle: list[StreamWriter] = []
        self.metrics: AggregateMetrics | None = None
        self._budget: ByteBudget | None = None

    def attach(self, metrics: AggregateMetrics, writer: StreamWriter, budget: ByteBudget) -> None:
        """Where idle windows go, what is counted and the byte budget windows not yet put are
        charged to (known once the core builds the sink)."""
        self.metrics = metrics
        self._put_idle = [writer]
        self._budget = budget
        metrics.windows_open.set_function(lambda: sum(len(s.open) for s in self.shards.values()))
        metrics.window_bytes.set_function(self.held_bytes)
        metrics.buffered_bytes.set_function(lambda: budget.used)
        metrics.watch_watermarks(self._watermarks)

    def held_bytes(self) -> int:
        """Bytes the windows not yet put hold in the byte budget."""
        return sum(windows.held for windows in list(self.shards.values()))

    def _watermarks(self) -> list[tuple[str, float]]:
        return [
            (shard_id, windows.watermark_ms / 1000)
            for shard_id, windows in list(self.shards.items())
            if windows.watermark_ms is not None
        ]

    # --- ShardState ---------------------------------------------------------------------

    def changes(self, shard_id: str, upto: int | None) -> Changes:
        # The windows run at or ahead of the checkpoint: what is read again after a restart
        # is a duplicate of what they hold (windows.py), so `upto` needs no folding here.
        windows = self.shards.get(shard_id)
        return {} if windows is None else windows.changes()

    def entries(self, shard_id: str, upto: int | None) -> Entries:
        windows = self.shards.get(shard_id)
        return {} if windows is None else windows.entries()

    def restore(self, shard_id: str, parts: Sequence[Mapping[StateKey, Any]]) -> None:
        self.forget(shard_id)
        windows = ShardWindows(
            shard_id, self._window_ms, self._lateness_ms, self._horizon_ms, self._budget
        )
        self.shards[shard_id] = windows
        due = windows.restore(parts)
        # Windows whose put was not acknowledged before: due ones go out now, the others when
        # their unicorn speaks again or falls silent.
        for name in {name for name, _ in windows.open}:
            self._seen(shard_id, name)
        if due:
            self.count(due)
            for writer in self._put_idle:
                writer.submit_nowait([self.record(e) for e in due])

    def forget(self, shard_id: str) -> None:
        windows = self.shards.pop(shard_id, None)
        if windows is not None:
            windows.release_all()
        for key in [k for k in self._timers if k[0] == shard_id]:
            self._timers.pop(key).cancel()
            self._last_seen.pop(key, None)

    # --- readings -----------------------------------------------------------------------

    def add_page(self, envelopes: list[Envelope]) -> tuple[list[Envelope], list[Emission]]:
        """Merge a page's readings in order, each acknowledged once merged; returns the
        refused ones (to dead-letter, then acknowledge) and the windows now due. Readings of
        a fenced tenure or of a shard no longer held here are skipped.

        Runs without a pause, so a page sees one tenure state and one moment: the fence is
        checked once per tenure and the unicorns' idle clocks are set once per page."""
        refused: list[Envelope] = []
        emissions: list[Emission] = []
        metrics = self.metrics
        spoke: dict[str, set[str]] = {}
        tenure: Tenure | None = None
        fenced = True
        shard_id = ""
        windows: ShardWindows | None = None
        names: set[str] = set()
        for envelope in envelopes:
            if envelope.tenure is not tenure:
                tenure = envelope.tenure
                fenced = tenure.fenced
            if fenced:
                continue
            if envelope.shard_id != shard_id or windows is None:
                shard_id = envelope.shard_id
                windows = self.shards.get(shard_id)
                if windows is None:
                    continue
                names = spoke.setdefault(shard_id, set())
            # Envelope.item is typed for the table copy; this application's decode made a
            # Reading (an annotation, not typing.cast: no call per reading).
            reading: Reading = envelope.item  # type: ignore[assignment]
            added = windows.add(reading, envelope.arrival)
            if added.duplicate:
                if metrics is not None:
                    metrics.duplicate_readings.inc()
            elif added.refused:
                if metrics is not None:
                    metrics.late_readings.labels("dead_lettered").inc()
                refused.append(envelope)
                continue
            else:
                if added.late and metrics is not None:
                    metrics.late_readings.labels("merged").inc()
                names.add(reading.name)
                if added.emissions:
                    emissions += added.emissions
            tenure.finish(envelope.sequence)
        if spoke:
            now = time.monotonic()
            for shard, spoken in spoke.items():
                for name in spoken:
                    self._seen(shard, name, now)
        self.count(emissions)
        return refused, emissions

    def count(self, emissions: Sequence[Emission]) -> None:
        if self.metrics is not None and emissions:
            self.metrics.windows_emitted.inc(len(emissions))
            again = sum(1 for e in emissions if e.again)
            if again:
                self.metrics.windows_reemitted.inc(again)

    def _seen(self, shard_id: str, name: str, now: float | None = None) -> None:
        """Note the unicorn spoke; arm its idle timer if none is armed. The timer re-arms
        itself for the time left rather than being moved on every reading."""
        key = (shard_id, name)
        self._last_seen[key] = time.monotonic() if now is None else now
        if key not in self._timers:
            loop = asyncio.get_running_loop()
            self._timers[key] = loop.call_later(self._idle_timeout, self._idle, key)

    def _idle(self, key: tuple[str, str]) -> None:
        self._timers.pop(key, None)
        shard_id, name = key
        windows = self.shards.get(shard_id)
        if windows is None:
            return
        left = self._last_seen.get(key, 0.0) + self._idle_timeout - time.monotonic()
        if left > 0:
            self._timers[key] = asyncio.get_running_loop().call_later(left, self._idle, key)
            return
        self._last_seen.pop(key, None)
        emissions = windows.idle(name)
        if emissions:
            log.debug("unicorn silent, putting its open windows", extra={"unicorn": name})
            self.count(emissions)
            for writer in self._put_idle:
                writer.submit_nowait([self.record(e) for e in emissions])

    def record(self, emission: Emission) -> StreamRecord:
        windows = self.shards.get(emission.shard_id)
        return StreamRecord(
            key=f"{emission.shard_id}/{emission.name}/{emission.start_ms}",
            partition_key=emission.name,
            data=encode_window(emission),
            shard_id=emission.shard_id,
            tenure=_PutAck(self, windows, emission) if windows is not None else None,
            sequences=[emission.version],
            arrival=emission.arrival,
        )


class _PutAck:
    """Where the stream writer acknowledges a window's put (the `Tenure` of its record): the
    window is marked put at the version the record carried. A put for windows no longer held
    here (the shard moved on) is dropped: the new owner puts the window itself."""

    __slots__ = ("_aggregation", "_emission", "_windows")

    def __init__(self, aggregation: Aggregation, windows: ShardWindows, emission: Emission):
        self._aggregation = aggregation
        self._windows = windows
        self._emission = emission

    @property
    def fenced(self) -> bool:
        return self._aggregation.shards.get(self._emission.shard_id) is not self._windows

    def finish(self, sequence: int) -> None:
        e = self._emission
        self._windows.acknowledged(e.name, e.start_ms, sequence)


def encode_window(emission: Emission) -> bytes:
    """The record `run` reads: compact JSON, fields in the workshop's order."""
    v = emission.values
    start = datetime.fromtimestamp(emission.start_ms // 1000, UTC)
    status_time = f"{start:%Y-%m-%d %H:%M:%S}.{emission.start_ms % 1000:03d}"
    return (
        f'{{"Name":{json.dumps(emission.name)},"StatusTime":"{status_time}",'
        f'"Distance":{number(v.distance)},'
        f'"MinMagicPoints":{number(v.min_magic)},"MaxMagicPoints":{number(v.max_magic)},'
        f'"MinHealthPoints":{number(v.min_health)},"MaxHealthPoints":{number(v.max_health)}}}'
    ).encode()


def number(value: int | Decimal) -> str:
    """JSON number text: whole values without a decimal point, others without an exponent."""
    if isinstance(value, int) or value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


class WindowSink:
    """The core's sink: readings into windows, due windows to the stream writer."""

    def __init__(
        self,
        aggregation: Aggregation,
        writer: StreamWriter,
        deadletters: DeadLetters,
        budget: ByteBudget,
        stream: str,
    ) -> None:
        self._aggregation = aggregation
        self._writer = writer
        self._deadletters = deadletters
        self._budget = budget
        self._stream = stream

    def start(self) -> None:
        self._writer.start()

    async def put_many(self, envelopes: list[Envelope]) -> None:
        """Merge a page's readings in order; each is done once merged (or dead-lettered, the
        refused ones of the page in one batch). Due windows go to the writer, which waits
        while `queue_size` window records are queued: a slow or failing output stream holds
        the pollers back, never grows memory."""
        # Windows keep aggregates, not readings: the records' bytes leave the byte bound now,
        # and the windows are charged to it until put (memory.py).
        self._budget.give_back(sum([len(envelope.data) for envelope in envelopes]))
        refused, emissions = self._aggregation.add_page(envelopes)
        if refused:
            await self._deadletters.send([self._late(envelope) for envelope in refused])
            for envelope in refused:
                envelope.tenure.finish(envelope.sequence)
        if emissions:
            await self._writer.submit([self._aggregation.record(e) for e in emissions])

    def _late(self, envelope: Envelope) -> DeadLetter:
        return DeadLetter(
            envelope.data,
            "more than late_horizon_seconds behind its unicorn's watermark",
            "late",
            self._stream,
            envelope.shard_id,
            envelope.sequence,
            envelope.arrival,
        )

    async def drain(self) -> None:
        """Put what is due; windows still open stay open (the checkpointed state holds
        them, marked unput)."""
        await self._writer.drain()

    async def stop(self) -> None:
        await self._writer.stop()


class WindowAggregation:
    """The Application: readings in, windows out on `stream_name`."""

    name = "aggregate"

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.aggregation = Aggregation(settings)
        self.state: ShardState | None = self.aggregation
        self.writer: StreamWriter | None = None

    def decode(self, data: bytes) -> tuple[ItemKey, Reading]:
        return decode_reading(data)

    async def check(self, clients: AwsClients) -> None:
        stream = self._settings.stream_name
        try:
            await clients.kinesis.describe_stream_summary(StreamName=stream)
        except ClientError as exc:
            if exc.response["Error"]["Code"] == "ResourceNotFoundException":
                raise MissingResourceError(
                    f"output Kinesis stream {stream!r} does not exist: create it or set "
                    "stream_name (WILDRYDES_STREAM_NAME)"
                ) from None
            raise

    def sink(self, wiring: Wiring) -> WindowSink:
        metrics = AggregateMetrics(wiring.metrics)
        s = wiring.settings
        self.writer = StreamWriter(
            wiring.clients.kinesis,
            self._settings.stream_name,
            s,
            wiring.deadletters,
            wiring.metrics,
            wiring.blocked,
            wiring.on_failure,
            on_put=metrics.records_put.inc,
        )
        wiring.metrics.queue_capacity.set(s.queue_size)
        wiring.metrics.queue_depth.set_function(self.writer.depth)
        self.aggregation.attach(metrics, self.writer, wiring.budget)
        return WindowSink(
            self.aggregation, self.writer, wiring.deadletters, wiring.budget, s.stream_name
        )


def consumer_settings(settings: Settings) -> Settings:
    """The core reads the raw stream under the aggregator's own lease table (and, in `fanout`
    mode, through its own stream consumer)."""
    return settings.replace(
        stream_name=settings.raw_stream_name,
        lease_table_name=settings.aggregate_lease_table_name,
        fanout_consumer_name=settings.aggregate_fanout_consumer_name,
    )


class Aggregator(Consumer):
    """The `aggregate` service: the consumer core with the window aggregation."""

    def __init__(self, settings: Settings, registry: CollectorRegistry | None = None) -> None:
        self.windows = WindowAggregation(settings)
        super().__init__(consumer_settings(settings), self.windows, registry)
        self.metrics.for_stream_output(PUT_API)  # from the first scrape on, no table series
        self.output_stream = settings.stream_name

    def endpoints(self) -> dict[str, str]:
        # It reads the raw stream and puts on the aggregated one; it writes no table.
        s = self.settings
        return {
            "stream": s.stream_name,
            "output_stream": self.output_stream,
            "lease_table": s.lease_table_name,
        }
