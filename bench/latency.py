"""Latency from PutRecords acknowledged to the item written, with default and fast polling.

    python -m bench.latency                        # 4 shards, 200 records/s, 30 s a run
    python -m bench.latency --duration 60 --runs low

kinesalite and dynalite on loopback, the recording proxy of the tests in front of dynalite
(it notes when dynalite first answered 200 to a BatchWriteItem holding each item), and the
service as `python -m wildrydes_stream run` in a child process with its default settings but
for `idle_poll_interval_seconds`: 1 s (the default) in the `default` run, `--low-idle-poll`
(0.2 s) in the `low` run. Each run has fresh emulators.

The `fanout` run reads with `read_mode=fanout` from the local SubscribeToShard server of the
tests (tests/fanoutserver.py: HTTP/2 cleartext, real event-stream frames) in this process, fed
by the kinesalite stream (KinesisFeed) and told of every PutRecords as it is acknowledged, so it
pushes at once, as Kinesis does (AWS gives ~70 ms average propagation; the server here adds a
GetRecords on kinesalite). Without records it sends an empty event every
`FANOUT_HEARTBEAT_SECONDS` (5 s, as AWS does at least).

A producer puts `--rate` records a second (ten PutRecords a second, every record a key of its
own; below 10 a second one record a PutRecords, `1 / rate` seconds apart: a sparse stream, whose
fan-out connection goes quiet between records) and notes when each PutRecords returned.
Records put before every shard has had one of its records written are the warm-up and not
counted; then `--duration` seconds of records are measured, and the run waits (with a timeout)
until each of them is written. A record's latency is the time its item was written minus the
time its PutRecords returned; the figures are the 50th, 90th and 99th percentiles and the
largest. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from tests.fanoutserver import FanoutServer, KinesisFeed
from tests.faultproxy import FaultProxy
from tests.process import ServiceProcess
from tests.replicas_support import record

from bench.emulated import emulated
from wildrydes_stream.config import Settings
from wildrydes_stream.records.fields import status_time_to_epoch_ms

RUNS = {"default": Settings().idle_poll_interval_seconds, "low": 0.2, "fanout": 0.0}
"""idle_poll_interval_seconds of each run (the fanout run does not poll)."""
SHARDS = 4
FANOUT_HEARTBEAT_SECONDS = 5.0
"""The fan-out server's empty event on a shard without records (AWS: every ~5 s at most)."""
FANOUT_FALLBACK_POLL_SECONDS = 1.0
"""The feed's GetRecords on kinesalite when not told of a put (it always is, here)."""


@dataclass
class Latency:
    run: str
    idle_poll_interval_seconds: float
    shards: int
    rate: float
    duration: float
    records: int = 0
    """Records measured (put during the measured window)."""
    written: int = 0
    latencies: list[float] = field(default_factory=list, repr=False)

    def percentile(self, p: float) -> float:
        """Nearest rank: the smallest latency at least p% of them are at or below."""
        if not self.latencies:
            return math.nan
        ordered = sorted(self.latencies)
        return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]

    def figures(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "idle_poll_interval_seconds": self.idle_poll_interval_seconds,
            "shards": self.shards,
            "rate": self.rate,
            "duration": self.duration,
            "records": self.records,
            "written": self.written,
            "p50_s": round(self.percentile(50), 3),
            "p90_s": round(self.percentile(90), 3),
            "p99_s": round(self.percentile(99), 3),
            "max_s": round(self.percentile(100), 3),
        }


class Producer:
    """`rate` records a second, ten PutRecords a second (below 10 a second, one record each);
    when each was acknowledged."""

    def __init__(
        self, kinesis: Any, stream: str, rate: float, on_put: Callable[[], None] | None = None
    ) -> None:
        self.kinesis = kinesis
        self.on_put = on_put
        """Called as each PutRecords is acknowledged (the fan-out feed pushes then)."""
        self.stream = stream
        self.per_tick = max(1, round(rate / 10))
        self.interval = 0.1 if rate >= 10 else 1 / rate
        self.keys: list[tuple[str, str]] = []
        """Item key of record n, in the order put."""
        self.acked: dict[tuple[str, str], float] = {}
        """time.monotonic() when the PutRecords of each key returned."""
        self.shard_of: dict[tuple[str, str], str] = {}
        self.stop = asyncio.Event()

    async def run(self) -> None:
        tick = time.monotonic()
        while not self.stop.is_set():
            batch = [record(len(self.keys) + i) for i in range(self.per_tick)]
            entries = [{"Data": json.dumps(r).encode(), "PartitionKey": r["Name"]} for r in batch]
            response = await self.kinesis.put_records(StreamName=self.stream, Records=entries)
            now = time.monotonic()
            if response.get("FailedRecordCount"):
                raise RuntimeError(f"PutRecords failed: {response['Records']}")
            if self.on_put is not None:
                self.on_put()
            for r, result in zip(batch, response["Records"], strict=True):
                key = (r["Name"], str(status_time_to_epoch_ms(r["StatusTime"])))
                self.keys.append(key)
                self.acked[key] = now
                self.shard_of[key] = result["ShardId"]
            tick += self.interval
            await asyncio.sleep(max(0.0, tick - time.monotonic()))


async def wait_until(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not {what} within {timeout:.0f} s")
        await asyncio.sleep(0.05)


async def measure(
    run: str,
    idle_poll_interval_seconds: float,
    shards: int = SHARDS,
    rate: float = 200.0,
    duration: float = 30.0,
) -> Latency:
    """One run on fresh emulators: see the module doc."""
    result = Latency(run, idle_poll_interval_seconds, shards, rate, duration)
    fanout = run == "fanout"
    settings = {} if fanout else {"idle_poll_interval_seconds": idle_poll_interval_seconds}
    async with (
        emulated(shards, **settings) as where,
        fanout_server(where.kinesis, where.settings.stream_name, fanout) as server,
    ):
        proxy: FaultProxy = where.proxy
        env = where.env
        if server is not None:
            env = {
                **env,
                "WILDRYDES_READ_MODE": "fanout",
                "WILDRYDES_FANOUT_ENDPOINT_URL": server.url,
            }
        child = await ServiceProcess.start(env, "run")
        feed = server.feed if server is not None else None
        on_put = feed.notify if isinstance(feed, KinesisFeed) else None
        producer = Producer(where.kinesis, where.settings.stream_name, rate, on_put)
        task: asyncio.Task[None] | None = None
        try:
            await child.started(timeout=60)
            task = asyncio.create_task(producer.run())

            def warm() -> bool:
                if task is not None and task.done():
                    task.result()  # the producer failed: say why
                written = {producer.shard_of[k] for k in list(proxy.first_written)}
                return len(written) >= shards

            await wait_until(warm, 120, "every shard written once")
            first = len(producer.keys)
            await asyncio.sleep(duration)  # the measured window: the producer keeps putting
            last = len(producer.keys)
            producer.stop.set()
            await task
            measured = producer.keys[first:last]

            def all_written() -> bool:
                return all(k in proxy.first_written for k in measured)

            try:
                await wait_until(all_written, 60, "every measured record written")
            except TimeoutError as exc:
                print(f"latency: {exc}", flush=True)
            result.records = len(measured)
            result.latencies = [
                proxy.first_written[k] - producer.acked[k]
                for k in measured
                if k in proxy.first_written
            ]
            result.written = len(result.latencies)
            child.send(signal.SIGTERM)
            await child.wait(timeout=60)
        finally:
            producer.stop.set()
            if task is not None and not task.done():
                task.cancel()
            await child.close()
    f = result.figures()
    missing = result.records - result.written
    how = (
        f"fan-out, {FANOUT_HEARTBEAT_SECONDS:g} s heartbeat"
        if fanout
        else f"idle poll {idle_poll_interval_seconds:g} s"
    )
    print(
        f"latency {run:7} {how}: {result.records} records "
        f"over {duration:g} s, p50 {f['p50_s']:.3f} s, p90 {f['p90_s']:.3f} s, "
        f"p99 {f['p99_s']:.3f} s, max {f['max_s']:.3f} s"
        + (f"; {missing} NOT WRITTEN" if missing else ""),
        flush=True,
    )
    return result


@asynccontextmanager
async def fanout_server(
    kinesis: Any, stream: str, wanted: bool
) -> AsyncIterator[FanoutServer | None]:
    """The local SubscribeToShard server on the kinesalite stream (None unless `wanted`)."""
    if not wanted:
        yield None
        return
    feed = KinesisFeed(kinesis, stream, poll_seconds=FANOUT_FALLBACK_POLL_SECONDS)
    async with FanoutServer(feed, heartbeat_seconds=FANOUT_HEARTBEAT_SECONDS) as server:
        yield server


async def measure_runs(
    runs: Sequence[str], shards: int, rate: float, duration: float, low_idle_poll: float
) -> list[Latency]:
    polls = {**RUNS, "low": low_idle_poll}
    return [await measure(run, polls[run], shards, rate, duration) for run in runs]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.latency", description=__doc__)
    parser.add_argument("--shards", type=int, default=SHARDS)
    parser.add_argument("--rate", type=float, default=200.0, help="records a second")
    parser.add_argument("--duration", type=float, default=30.0, help="measured seconds a run")
    parser.add_argument(
        "--runs", default="default,low,fanout", help="comma-separated, of: default, low, fanout"
    )
    parser.add_argument(
        "--low-idle-poll",
        type=float,
        default=RUNS["low"],
        help="idle_poll_interval_seconds of the low run",
    )
    args = parser.parse_args(argv)
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    for run in runs:
        if run not in RUNS:
            parser.error(f"unknown run {run!r}: one of {', '.join(RUNS)}")
    results = asyncio.run(
        measure_runs(runs, args.shards, args.rate, args.duration, args.low_idle_poll)
    )
    print(json.dumps({r.run: r.figures() for r in results}))
    return 0 if all(r.written == r.records for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
