"""ShardSubscriber against the local fan-out server (tests/fanoutserver.py): HTTP/2 cleartext,
real event-stream frames, faults on request.

Every test reads through the service's own HTTP/2 client, signer and event-stream decoding; the
shard's progress is the real ShardProgress, so "nothing skipped, nothing twice" is checked on
the sequence numbers handed to the sink and on the checkpoint they finish to.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiobotocore.credentials import AioCredentials

from tests.fanoutserver import FanoutServer, MemoryFeed, Script
from tests.helpers import Peak, holds, wait_for
from wildrydes_stream.aws.fanout import FanoutClient
from wildrydes_stream.aws.h2 import STREAM_WINDOW, H2Pool
from wildrydes_stream.config import Settings
from wildrydes_stream.consumer.progress import ShardProgress
from wildrydes_stream.errors import MissingResourceError, RecordError
from wildrydes_stream.observability.metrics import Metrics
from wildrydes_stream.records.envelope import DeadLetter, Envelope, ItemKey
from wildrydes_stream.records.position import position, sequence_of
from wildrydes_stream.runtime.budget import MAX_PAGE_BYTES, ByteBudget
from wildrydes_stream.source.fanout import Fanout, ShardSubscriber
from wildrydes_stream.source.pages import ReaderParts
from wildrydes_stream.source.registration import active_consumer

SHARD = "shardId-000000000000"
CONSUMER = "arn:aws:kinesis:us-east-1:123456789012:stream/fanout-test/consumer/test:1"


def decode(data: bytes) -> tuple[ItemKey, Any]:
    if data.startswith(b"bad"):
        raise RecordError("bad record")
    return ("k", data.decode()[:8]), {}


@dataclass
class Harness:
    server: FanoutServer
    feed: MemoryFeed
    client: FanoutClient
    settings: Settings
    metrics: Metrics = field(default_factory=Metrics)
    budget: ByteBudget = field(default_factory=lambda: ByteBudget(64 * 1024 * 1024))
    read: list[int] = field(default_factory=list)
    letters: list[DeadLetter] = field(default_factory=list)
    sink_open: asyncio.Event = field(default_factory=asyncio.Event)
    stall_seconds: float = 30.0

    def __post_init__(self) -> None:
        self.sink_open.set()

    async def dispatch(self, envelopes: list[Envelope]) -> None:
        await self.sink_open.wait()
        for envelope in envelopes:
            self.read.append(sequence_of(envelope.sequence))
            self.budget.give_back(len(envelope.data))
            envelope.tenure.finish(envelope.sequence)

    async def dead_letters(self, letters: list[DeadLetter]) -> None:
        self.letters.extend(letters)

    def subscriber(self, progress: ShardProgress, shard: str = SHARD) -> ShardSubscriber:
        parts = ReaderParts(
            self.settings,
            self.dispatch,
            self.dead_letters,
            self.metrics,
            asyncio.Event(),
            decode,
            self.budget,
        )
        fanout = Fanout(self.client, CONSUMER, self.stall_seconds)
        return ShardSubscriber(shard, fanout, parts, progress)

    def put(self, count: int, size: int = 32, shard: str = SHARD) -> list[int]:
        return [
            int(self.feed.put(shard, f"r{n:07d}".encode().ljust(size, b"."))) for n in range(count)
        ]

    def subscriptions(self, reason: str) -> float:
        return self.metrics.subscriptions.labels(reason)._value.get()  # type: ignore[no-any-return]


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    feed = MemoryFeed(shards=1)
    async with FanoutServer(feed, heartbeat_seconds=0.2) as server:
        # Connections read as the service's do: quiet ones on the grid.
        pool = H2Pool(server.url, quiet_read_grid=Settings().fanout_quiet_read_grid_seconds)
        client = FanoutClient(server.url, "us-east-1", AioCredentials("test", "test"), pool)
        settings = Settings(backoff_base_seconds=0.01, backoff_max_seconds=0.05)
        try:
            yield Harness(server, feed, client, settings)
        finally:
            await client.close()


async def run_until(subscriber: ShardSubscriber, checkpoint: str, done: Any) -> None:
    """Run the subscriber until `done()` holds, then halt it and wait for its end."""
    task = asyncio.create_task(subscriber.run(checkpoint))
    try:
        await wait_for(holds(done), timeout=20)
    finally:
        subscriber.halt()
        await asyncio.wait_for(task, 10)


async def test_reads_every_record_in_order_and_finishes_the_prefix(harness: Harness) -> None:
    put = harness.put(300)
    progress = ShardProgress(SHARD)
    subscriber = harness.subscriber(progress)
    await run_until(subscriber, "TRIM_HORIZON", lambda: len(harness.read) == 300)
    assert harness.read == put
    assert progress.checkpoint == position(put[-1])
    assert subscriber.caught_up.is_set()
    assert harness.server.subscribed[0].position == {"Type": "TRIM_HORIZON"}
    assert harness.subscriptions("start") == 1


async def test_starts_after_the_checkpoint(harness: Harness) -> None:
    put = harness.put(20)
    subscriber = harness.subscriber(ShardProgress(SHARD))
    await run_until(subscriber, str(put[9]), lambda: len(harness.read) == 10)
    assert harness.read == put[10:]
    assert harness.server.subscribed[0].position == {
        "Type": "AFTER_SEQUENCE_NUMBER",
        "SequenceNumber": str(put[9]),
    }


async def test_stream_without_initial_response_is_read(harness: Harness) -> None:
    """kinesis-local leaves the initial-response event out."""
    harness.server.scripts.append(Script(initial_response=False))
    put = harness.put(5)
    await run_until(harness.subscriber(ShardProgress(SHARD)), "TRIM_HORIZON", lambda: harness.read)
    assert harness.read == put


async def test_records_pushed_while_subscribed_arrive(harness: Harness) -> None:
    subscriber = harness.subscriber(ShardProgress(SHARD))
    task = asyncio.create_task(subscriber.run("LATEST"))
    await wait_for(holds(lambda: harness.server.open_subscriptions == 1))
    await subscriber.caught_up.wait()
    put = harness.put(3)
    await wait_for(holds(lambda: len(harness.read) == 3))
    subscriber.halt()
    await asyncio.wait_for(task, 10)
    assert harness.read == put


async def test_bad_records_are_dead_lettered_and_finished(harness: Harness) -> None:
    good = harness.put(2)
    bad = int(harness.feed.put(SHARD, b"bad!"))
    progress = ShardProgress(SHARD)
    await run_until(harness.subscriber(progress), "TRIM_HORIZON", lambda: harness.letters)
    assert harness.read == good
    assert [sequence_of(letter.sequence) for letter in harness.letters] == [bad]
    assert progress.checkpoint == position(bad)


async def test_child_shards_end_the_shard(harness: Harness) -> None:
    put = harness.put(10)
    harness.feed.close(SHARD, ["shardId-000000000001", "shardId-000000000002"])
    progress = ShardProgress(SHARD)
    subscriber = harness.subscriber(progress)
    await asyncio.wait_for(subscriber.run("TRIM_HORIZON"), 10)  # ends by itself
    assert harness.read == put
    assert progress.ended
    assert subscriber.caught_up.is_set()


async def test_renewed_from_the_last_continuation(harness: Harness) -> None:
    """A subscription ends (as at 5 minutes); the next starts after the last continuation."""
    harness.server.scripts.append(Script(after_events=1, then="end"))
    first = harness.put(5)
    progress = ShardProgress(SHARD)
    subscriber = harness.subscriber(progress)
    task = asyncio.create_task(subscriber.run("TRIM_HORIZON"))
    await wait_for(holds(lambda: len(harness.server.subscribed) == 2))
    second = harness.put(5)
    await wait_for(holds(lambda: len(harness.read) == 10))
    subscriber.halt()
    await asyncio.wait_for(task, 10)
    assert harness.read == first + second
    assert harness.server.subscribed[1].position == {
        "Type": "AFTER_SEQUENCE_NUMBER",
        "SequenceNumber": str(first[-1]),
    }
    assert harness.subscriptions("renewal") == 1


async def test_renewed_when_the_server_ends_it_on_time(harness: Harness) -> None:
    harness.server.lifetime_seconds = 0.3
    put = harness.put(3)
    subscriber = harness.subscriber(ShardProgress(SHARD))
    await run_until(subscriber, "TRIM_HORIZON", lambda: len(harness.server.subscribed) >= 3)
    assert harness.read == put
    assert subscriber.subscriptions >= 3
    for later in harness.server.subscribed[1:]:
        assert later.position == {"Type": "AFTER_SEQUENCE_NUMBER", "SequenceNumber": str(put[-1])}


FAULTS = [
    pytest.param(Script(after_events=2, then="reset"), id="stream-reset"),
    pytest.param(Script(after_events=2, then="exception:ResourceInUseException"), id="in-use"),
    pytest.param(Script(after_events=2, then="exception:InternalFailure"), id="internal"),
    pytest.param(Script(refuse="LimitExceededException"), id="limit-exceeded"),
    pytest.param(Script(refuse="ResourceInUseException"), id="refused-in-use"),
    pytest.param(Script(refuse="ExpiredTokenException"), id="expired-credentials"),
    pytest.param(Script(refuse="ThrottlingException"), id="throttled"),
    pytest.param(Script(after_events=2, then="stall"), id="stalled"),
]


@pytest.mark.parametrize("fault", FAULTS)
async def test_a_failed_subscription_is_retried_from_the_last_continuation(
    harness: Harness, fault: Script
) -> None:
    harness.stall_seconds = 0.5
    harness.server.max_records_per_event = 4
    harness.server.scripts.append(fault)
    put = harness.put(12)
    progress = ShardProgress(SHARD)
    subscriber = harness.subscriber(progress)
    task = asyncio.create_task(subscriber.run("TRIM_HORIZON"))
    await wait_for(holds(lambda: len(harness.read) == 12))
    more = harness.put(3)
    await wait_for(holds(lambda: len(harness.read) == 15))
    subscriber.halt()
    await asyncio.wait_for(task, 10)
    assert harness.read == put + more  # nothing skipped, nothing twice
    assert progress.checkpoint == position(more[-1])
    assert harness.subscriptions("retry") >= 1
    retried = harness.server.subscribed[-1].position
    if fault.refuse:
        assert retried == {"Type": "TRIM_HORIZON"}
    else:  # two events of four records were handed on before the fault
        assert retried == {"Type": "AFTER_SEQUENCE_NUMBER", "SequenceNumber": str(put[7])}


async def test_a_server_paused_by_a_full_sink_is_not_taken_for_stalled(harness: Harness) -> None:
    """The stall watch counts only time spent waiting for the server: with the sink full the
    subscriber stops reading, HTTP/2 flow control silences the server for longer than the
    stall time, and that is back-pressure, not a dead subscription."""
    harness.stall_seconds = 0.3
    harness.server.max_records_per_event = 1
    harness.sink_open.clear()
    put = harness.put(8, size=STREAM_WINDOW // 2)
    subscriber = harness.subscriber(ShardProgress(SHARD))
    task = asyncio.create_task(subscriber.run("TRIM_HORIZON"))
    seen = await _first_subscription(harness)
    await wait_for(holds(lambda: seen.waiting_for_window), timeout=10)
    # Silent for four stall times: a watch that counted this would have resubscribed by now.
    await asyncio.sleep(4 * harness.stall_seconds)
    assert seen.waiting_for_window
    harness.sink_open.set()
    await wait_for(holds(lambda: len(harness.read) == 8))
    subscriber.halt()
    await asyncio.wait_for(task, 10)
    assert harness.read == put
    assert len(harness.server.subscribed) == 1
    assert harness.subscriptions("retry") == 0


async def test_a_reset_connection_is_resubscribed(harness: Harness) -> None:
    put = harness.put(4)
    subscriber = harness.subscriber(ShardProgress(SHARD))
    task = asyncio.create_task(subscriber.run("TRIM_HORIZON"))
    await wait_for(holds(lambda: len(harness.read) == 4))
    harness.server.reset_connections()
    await wait_for(holds(lambda: len(harness.server.subscribed) == 2))
    more = harness.put(4)
    await wait_for(holds(lambda: len(harness.read) == 8))
    subscriber.halt()
    await asyncio.wait_for(task, 10)
    assert harness.read == put + more
    assert harness.server.subscribed[1].position["SequenceNumber"] == str(put[-1])


async def test_halt_and_cancel_end_the_subscription_at_once(harness: Harness) -> None:
    """A halted (handed over) or cancelled (lease lost) reader leaves no stream open."""
    for stop in ("halt", "cancel"):
        subscriber = harness.subscriber(ShardProgress(SHARD))
        task = asyncio.create_task(subscriber.run("LATEST"))
        await wait_for(holds(lambda: harness.server.open_subscriptions == 1))
        if stop == "halt":
            subscriber.halt()
            await asyncio.wait_for(task, 5)
        else:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        await wait_for(holds(lambda: harness.server.open_subscriptions == 0), timeout=5)


async def test_full_sink_stops_the_server_through_flow_control(harness: Harness) -> None:
    """With the sink full the stream is not read: the server waits on its HTTP/2 window, and
    what is held stays within the byte bound plus one event and one stream window."""
    bound = 32 * 1024
    harness.budget = ByteBudget(bound)
    harness.server.max_records_per_event = 10
    harness.sink_open.clear()
    put = harness.put(2000, size=1024)  # 2 MB behind a sink that takes nothing
    subscriber = harness.subscriber(ShardProgress(SHARD))
    task = asyncio.create_task(subscriber.run("TRIM_HORIZON"))
    seen = await _first_subscription(harness)
    await wait_for(holds(lambda: seen.flow_blocked > 0))
    sent = harness.server.bytes_sent
    event = 10 * 1400  # ten records of 1 KiB, base64 in JSON
    assert sent <= bound + event + 2 * STREAM_WINDOW
    assert harness.budget.used <= bound + event
    assert len(harness.read) == 0
    harness.sink_open.set()
    await wait_for(holds(lambda: len(harness.read) == 2000), timeout=30)
    subscriber.halt()
    await asyncio.wait_for(task, 10)
    assert harness.read == put


async def _first_subscription(harness: Harness) -> Any:
    await wait_for(holds(lambda: bool(harness.server.subscribed)))
    return harness.server.subscribed[0]


async def test_consumer_registered_when_missing_and_waited_for_until_active(
    harness: Harness,
) -> None:
    harness.server.activate_after = 3  # CREATING for the first two descriptions
    stream = harness.feed.stream_arn()
    arn = await active_consumer(harness.client, stream, "wildrydes-stream", interval=0.01)
    assert arn in harness.server.consumer_arns()
    assert harness.server.calls == [
        "DescribeStreamConsumer",
        "RegisterStreamConsumer",
        "DescribeStreamConsumer",
        "DescribeStreamConsumer",
        "DescribeStreamConsumer",
    ]
    # A second start finds it: one description, no registration.
    harness.server.calls.clear()
    assert await active_consumer(harness.client, stream, "wildrydes-stream") == arn
    assert harness.server.calls == ["DescribeStreamConsumer"]


async def test_consumer_not_active_in_time_stops_the_start(harness: Harness) -> None:
    harness.server.activate_after = 10**6
    with pytest.raises(MissingResourceError, match="not ACTIVE"):
        await active_consumer(
            harness.client, harness.feed.stream_arn(), "slow", interval=0.01, timeout=0.2
        )


async def test_events_of_10_mib_stay_within_the_byte_bound(harness: Harness) -> None:
    """A message's size is known from its first bytes; the rest is read only once the bound
    has room for it, so records of 10 MiB (events of ~14 MB on the wire) never take the bytes
    held past the bound, and all of them come through once the sink drains."""
    bound = 4 * MAX_PAGE_BYTES + 1024 * 1024  # four events fit, a fifth does not
    harness.budget = budget = ByteBudget(bound)
    peak = Peak(budget)
    # A sink that takes every record and holds its bytes (a queue of records being written).
    held: list[Envelope] = []
    drained = asyncio.Event()
    draining = harness.dispatch

    async def holding(envelopes: list[Envelope]) -> None:
        if drained.is_set():
            await draining(envelopes)
        else:
            held.extend(envelopes)

    harness.dispatch = holding  # type: ignore[method-assign]
    harness.server.max_records_per_event = 1
    put = harness.put(6, size=MAX_PAGE_BYTES)
    subscriber = harness.subscriber(ShardProgress(SHARD))
    task = asyncio.create_task(subscriber.run("TRIM_HORIZON"))
    # Four events held, 1 MiB short of the bound: the fifth's first bytes are in, and the
    # reader waits for room before reading the rest.
    await wait_for(holds(lambda: harness.metrics.memory_waits._value.get() == 1), timeout=30)
    assert len(held) == 4
    assert budget.used == 4 * MAX_PAGE_BYTES
    seen = await _first_subscription(harness)
    await wait_for(holds(lambda: seen.waiting_for_window), timeout=10)
    drained.set()
    await draining(held)
    await wait_for(holds(lambda: len(harness.read) == 6), timeout=60)
    subscriber.halt()
    await asyncio.wait_for(task, 10)
    assert harness.read == put
    assert peak.value <= bound, f"held {peak.value:,} bytes against a bound of {bound:,}"
