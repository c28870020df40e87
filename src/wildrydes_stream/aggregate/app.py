"""`aggregate`: the consumer that turns raw readings into per-minute windows on a stream.

    poller -> WindowSink.put -> ShardWindows (windows, watermark) -> StreamWriter (PutRecords)
                                     ^ idle timers                      | acks the readings

The raw stream is read with the consumer core under its own lease table. A reading is
acknowledged (and so may be checkpointed) only once a put of its window holds it; the windows
as of each checkpoint are stored with it (`Aggregation` is the core's ShardState), so a restart
puts every window again with exactly the values it would have had. See windows.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from datetime import UTC, datetime
from decimal import Decimal
from typing import cast

from botocore.exceptions import ClientError
from prometheus_client import CollectorRegistry

from wildrydes_stream.aggregate.metrics import AggregateMetrics
from wildrydes_stream.aggregate.readings import Reading, decode_reading
from wildrydes_stream.aggregate.windows import Added, Emission, ShardWindows
from wildrydes_stream.aws.clients import AwsClients
from wildrydes_stream.config import Settings
from wildrydes_stream.consumer.core import Consumer, Wiring
from wildrydes_stream.errors import MissingResourceError
from wildrydes_stream.records.envelope import DeadLetter, Envelope, ItemKey
from wildrydes_stream.runtime.budget import ByteBudget
from wildrydes_stream.sink.deadletter import DeadLetters
from wildrydes_stream.sink.kinesis import StreamRecord, StreamWriter
from wildrydes_stream.source.poller import ShardState

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

    def attach(self, metrics: AggregateMetrics, writer: StreamWriter) -> None:
        """Where idle windows go and what is counted (known once the core builds the sink)."""
        self.metrics = metrics
        self._put_idle = [writer]
        metrics.windows_open.set_function(lambda: sum(len(s.open) for s in self.shards.values()))
        metrics.watch_watermarks(self._watermarks)

    def _watermarks(self) -> list[tuple[str, float]]:
        return [
            (shard_id, windows.watermark_ms / 1000)
            for shard_id, windows in list(self.shards.items())
            if windows.watermark_ms is not None
        ]

    # --- ShardState ---------------------------------------------------------------------

    def snapshot(self, shard_id: str, upto: int | None) -> bytes | None:
        windows = self.shards.get(shard_id)
        return None if windows is None else windows.snapshot(upto)

    def restore(self, shard_id: str, states: list[bytes]) -> None:
        self.forget(shard_id)
        windows = ShardWindows(shard_id, self._window_ms, self._lateness_ms, self._horizon_ms)
        windows.restore(states)
        self.shards[shard_id] = windows

    def forget(self, shard_id: str) -> None:
        self.shards.pop(shard_id, None)
        for key in [k for k in self._timers if k[0] == shard_id]:
            self._timers.pop(key).cancel()
            self._last_seen.pop(key, None)

    # --- readings -----------------------------------------------------------------------

    def add(self, envelope: Envelope) -> Added | None:
        """Merge a reading into its window; None when its shard is no longer held here."""
        windows = self.shards.get(envelope.shard_id)
        if windows is None:
            return None
        # Envelope.item is typed for the table copy; this application's decode made a Reading.
        reading = cast(Reading, envelope.item)
        windows.tenure = envelope.tenure
        added = windows.add(envelope.sequence, reading, envelope.arrival)
        if added.late and self.metrics is not None:
            outcome = "dead_lettered" if added.refused else "merged"
            self.metrics.late_readings.labels(outcome).inc()
        if not added.refused:
            self._seen(envelope.shard_id, reading.name)
        self.count(added.emissions)
        return added

    def count(self, emissions: list[Emission]) -> None:
        if self.metrics is not None and emissions:
            self.metrics.windows_emitted.inc(len(emissions))
            again = sum(1 for e in emissions if e.again)
            if again:
                self.metrics.windows_reemitted.inc(again)

    def _seen(self, shard_id: str, name: str) -> None:
        """Note the unicorn spoke; arm its idle timer if none is armed. The timer re-arms
        itself for the time left rather than being moved on every reading."""
        key = (shard_id, name)
        self._last_seen[key] = time.monotonic()
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
        return StreamRecord(
            key=f"{emission.shard_id}/{emission.name}/{emission.start_ms}",
            partition_key=emission.name,
            data=encode_window(emission),
            shard_id=emission.shard_id,
            tenure=emission.tenure,
            sequences=emission.sequences,
            arrival=emission.arrival,
        )


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


def number(value: Decimal) -> str:
    """JSON number text: whole values without a decimal point, others without an exponent."""
    if value == value.to_integral_value():
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
        # Windows keep the values, not the records: their bytes leave the byte bound now, so
        # readings waiting for their window never stop the pollers (which would stop the
        # watermark that closes the windows).
        self._budget.give_back(sum(len(envelope.data) for envelope in envelopes))
        for envelope in envelopes:
            await self._put(envelope)

    async def _put(self, envelope: Envelope) -> None:
        if envelope.tenure.fenced:
            return
        added = self._aggregation.add(envelope)
        if added is None:
            return
        if added.refused:
            await self._deadletters.send([self._late(envelope)])
            envelope.tenure.finish(envelope.sequence)
            return
        await self._writer.submit([self._aggregation.record(e) for e in added.emissions])

    def _late(self, envelope: Envelope) -> DeadLetter:
        return DeadLetter(
            envelope.data,
            "more than late_horizon_seconds behind the shard's watermark",
            "late",
            self._stream,
            envelope.shard_id,
            envelope.sequence,
            envelope.arrival,
        )

    async def drain(self) -> None:
        """Put what is due; windows still open stay open (their readings are not
        checkpointed, and are read again after a restart)."""
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
        self.aggregation.attach(metrics, self.writer)
        return WindowSink(
            self.aggregation, self.writer, wiring.deadletters, wiring.budget, s.stream_name
        )


def consumer_settings(settings: Settings) -> Settings:
    """The core reads the raw stream under the aggregator's own lease table."""
    return settings.replace(
        stream_name=settings.raw_stream_name,
        lease_table_name=settings.aggregate_lease_table_name,
    )


class Aggregator(Consumer):
    """The `aggregate` service: the consumer core with the window aggregation."""

    def __init__(self, settings: Settings, registry: CollectorRegistry | None = None) -> None:
        self.windows = WindowAggregation(settings)
        super().__init__(consumer_settings(settings), self.windows, registry)
        self.output_stream = settings.stream_name
