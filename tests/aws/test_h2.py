"""The HTTP/2 client's quiet read grid, against the local fan-out server (HTTP/2 cleartext, real
event-stream frames): idle subscriptions' empty events are taken a grid point at a time, and a
connection carrying records reads at once."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiobotocore.credentials import AioCredentials

from tests.aws.test_http1 import self_signed
from tests.fanoutserver import FanoutServer, MemoryFeed
from wildrydes_stream.aws import fanout
from wildrydes_stream.aws.fanout import FanoutClient, Subscription
from wildrydes_stream.aws.h2 import H2Pool

CONSUMER = "arn:aws:kinesis:us-east-1:123456789012:stream/fanout-test/consumer/test:1"
GRID = 0.4
"""Wide enough that a held read is told from a prompt one on a loaded machine."""
SHARDS = 4


def distinct_moments(times: list[float], apart: float = 0.01) -> int:
    """How many separate moments `times` fall in (closer than `apart` counts as one)."""
    moments = 0
    last = float("-inf")
    for moment in sorted(times):
        if moment - last > apart:
            moments += 1
        last = moment
    return moments


async def subscribed(
    server: FanoutServer, grid: float, tls: ssl.SSLContext | None = None
) -> AsyncIterator[list[Subscription]]:
    client = FanoutClient(
        server.url,
        "us-east-1",
        AioCredentials("test", "test"),
        H2Pool(server.url, ssl_context=tls, quiet_read_grid=grid),
    )
    subscriptions = [
        await client.subscribe(CONSUMER, f"shardId-{n:012d}", {"Type": "TRIM_HORIZON"})
        for n in range(SHARDS)
    ]
    try:
        yield subscriptions
    finally:
        for subscription in subscriptions:
            subscription.close()
        await client.close()


async def arrivals(subscriptions: list[Subscription], seconds: float) -> list[float]:
    """Loop times at which each event came out of a subscription, for `seconds`."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    seen: list[float] = []

    async def read(subscription: Subscription) -> None:
        while loop.time() < end:
            await subscription.next_event()
            seen.append(loop.time())

    tasks = [asyncio.create_task(read(s)) for s in subscriptions]
    await asyncio.sleep(seconds)
    await stop(tasks)
    return seen


async def stop(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


@pytest.mark.parametrize("grid", [0.0, GRID], ids=["no grid", "grid"])
async def test_a_quiet_connection_takes_what_came_in_meanwhile_at_the_next_grid_point(
    grid: float,
) -> None:
    seconds = 2.0
    async with FanoutServer(MemoryFeed(shards=SHARDS), heartbeat_seconds=0.03) as server:
        async for subscriptions in subscribed(server, grid):
            seen = await arrivals(subscriptions, seconds)
    # Four subscriptions with an empty event every 30 ms each: ~260 events in all.
    assert len(seen) >= 100, len(seen)
    moments = distinct_moments(seen)
    if grid:
        # One read a grid point (and the first, before any was held).
        assert moments <= seconds / grid + 2, moments
    else:
        assert moments > 3 * (seconds / GRID + 2), moments  # the bound above means something


async def test_a_connection_carrying_records_reads_them_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fanout, "PROMPT_AFTER_RECORDS_SECONDS", 1.0)
    feed = MemoryFeed(shards=SHARDS)
    shard = "shardId-000000000000"
    loop = asyncio.get_running_loop()
    async with FanoutServer(feed, heartbeat_seconds=0.03) as server:
        async for subscriptions in subscribed(server, GRID):

            async def put_and_time(subscription: Subscription = subscriptions[0]) -> float:
                feed.put(shard, b"reading")
                put_at = loop.time()
                event: dict[str, Any] | None = None
                while not (event and event.get("Records")):
                    event = await subscription.next_event()
                return loop.time() - put_at

            # Quiet so far: the first records wait for the grid point at most.
            assert await put_and_time() <= GRID + 0.2
            # From then on records are read as they come, not a grid point at a time.
            latencies = []
            for _ in range(12):
                await asyncio.sleep(0.05)
                latencies.append(await put_and_time())
            assert max(latencies) < GRID / 2, latencies
            # A second after the last records the connection is quiet again: held reads.
            await asyncio.sleep(1.2)
            seconds = 1.2
            seen = await arrivals(subscriptions, seconds)
    assert len(seen) >= 100, len(seen)
    moments = distinct_moments(seen)
    assert moments <= seconds / GRID + 2, moments


async def tls_buffered_while_held(tmp_path: Path) -> tuple[int, list[list[int]]]:
    """Over TLS, empty events every 30 ms on each subscription, read for 2 s: how many were
    read, and for each time the connection was held the TLS transport's read buffer (bytes
    taken off the socket, not yet handed on) sampled every 10 ms."""
    cert, key = self_signed(tmp_path)
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    served.load_cert_chain(cert, key)
    trusting = ssl.create_default_context(cafile=cert)
    loop = asyncio.get_running_loop()
    events = 0
    holds: list[list[int]] = []

    async def read(subscription: Subscription) -> None:
        nonlocal events
        while True:
            await subscription.next_event()
            events += 1

    feed = MemoryFeed(shards=SHARDS)
    async with FanoutServer(feed, heartbeat_seconds=0.03, tls=served) as server:
        async for subscriptions in subscribed(server, GRID, trusting):
            connection = subscriptions[0].response._connection
            transport: Any = connection._transport
            tasks = [asyncio.create_task(read(s)) for s in subscriptions]
            end = loop.time() + 2.0
            by_slot: dict[int, list[int]] = {}
            while loop.time() < end:
                await asyncio.sleep(0.01)
                now = loop.time()
                # Between two grid points, leaving out the moments right after one (the
                # release, the read of what waited, the hold again).
                if connection.held and now % GRID > 0.05:
                    by_slot.setdefault(int(now // GRID), []).append(
                        transport.get_read_buffer_size()
                    )
            holds = list(by_slot.values())
            await stop(tasks)
    return events, holds


async def test_a_held_tls_connection_leaves_its_socket_alone(tmp_path: Path) -> None:
    events, holds = await tls_buffered_while_held(tmp_path)
    assert events >= 100, events
    samples = [size for hold in holds for size in hold]
    assert len(samples) >= 20, holds  # held most of the time
    # While held nothing more is taken off the socket (what was read before the hold stays
    # in the buffer): the events wait in the kernel and wake nothing.
    assert all(len(set(hold)) == 1 for hold in holds), holds


def test_a_held_tls_connection_leaves_its_socket_alone_on_uvloop(tmp_path: Path) -> None:
    uvloop = pytest.importorskip("uvloop")
    uvloop.run(test_a_held_tls_connection_leaves_its_socket_alone(tmp_path))
