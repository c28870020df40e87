"""Replicas sharing a stream: duplicate item writes and pickup time, phase by phase.

    python -m bench.replicas                 # 3 replicas, 8 shards, 200 records/s

kinesalite and dynalite on loopback, a recording proxy in front of dynalite (it counts every
item DynamoDB accepts, by key), and the service as child processes with default settings but
their worker ids. A producer puts records with distinct keys throughout, so any key written
twice is a duplicate. Phases: 3 replicas start together; SIGTERM one; kill -9 one; one comes
back. For each: duplicate writes during it, and seconds until every shard is read again (and,
for starts, until the spread is even). Ends with one JSON line of the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import signal
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from tests.faultproxy import FaultProxy
from tests.replicas_support import Producer, Replicas, Reports, all_read, even, writes_again

from bench.emulated import emulated
from wildrydes_stream.config import Settings


class Drill:
    def __init__(self, args: argparse.Namespace, proxy: FaultProxy, env: dict[str, str]):
        self.args = args
        self.proxy = proxy
        self.replicas = Replicas(env)
        self.rows: list[dict[str, Any]] = []

    async def until(self, condition: Callable[[Reports], bool], timeout: float = 120.0) -> float:
        """Seconds until `condition(reports)` holds (inf after `timeout`)."""
        began = time.monotonic()
        try:
            await self.replicas.until(condition, timeout, interval=0.1)
        except TimeoutError:
            return math.inf
        return time.monotonic() - began

    def even(self, reports: Reports) -> bool:
        return even(reports, self.args.shards)

    def all_read(self, reports: Reports) -> bool:
        return all_read(reports, self.args.shards)

    async def phase(
        self,
        name: str,
        action: Callable[[], Awaitable[None]],
        condition: Callable[[Reports], bool],
        settle: float,
    ) -> None:
        before = Counter(self.proxy.item_writes)
        await action()
        waited = await self.until(condition)
        # Let what was read during the phase be written before counting it.
        await asyncio.sleep(settle)
        duplicates = writes_again(self.proxy.item_writes, before)
        row = {
            "phase": name,
            "duplicate_item_writes": duplicates,
            "seconds_until_all_read": round(waited, 1),
        }
        self.rows.append(row)
        print(f"  {name:38} duplicates {duplicates:>5}   seconds {row['seconds_until_all_read']}")

    async def run(self, kinesis: Any, settings: Settings) -> None:
        args = self.args
        producer = Producer(kinesis, settings.stream_name, args.rate)
        producer.start()
        names = [f"replica-{i}" for i in range(args.replicas)]

        async def start_all() -> None:
            await self.replicas.start(*names)

        await self.phase(f"{args.replicas} replicas start together", start_all, self.even, 5)

        async def sigterm() -> None:
            began = time.monotonic()
            await self.replicas.stop(names[0], signal.SIGTERM)
            print(f"    (drain and exit took {time.monotonic() - began:.1f} s)")

        await self.phase("SIGTERM one replica", sigterm, self.all_read, 5)

        async def sigkill() -> None:
            await self.replicas.stop(names[1], signal.SIGKILL)

        await self.phase("kill -9 one replica", sigkill, self.all_read, 5)

        async def comes_back() -> None:
            await self.replicas.start(names[0])

        await self.phase("a replica comes back (rebalance)", comes_back, self.even, 5)
        await producer.stop()


async def main_async(args: argparse.Namespace) -> int:
    async with emulated(args.shards) as where:
        drill = Drill(args, where.proxy, where.env)
        try:
            await drill.run(where.kinesis, where.settings)
        finally:
            await drill.replicas.close()
    print(json.dumps({"replicas": args.replicas, "shards": args.shards, "phases": drill.rows}))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.replicas", description=__doc__)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--rate", type=float, default=200.0, help="records a second")
    return asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
