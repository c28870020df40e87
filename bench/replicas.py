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
import contextlib
import json
import math
import signal
import sys
import time
from collections import Counter
from typing import Any

from tests.faultproxy import FaultProxy
from tests.process import ServiceProcess
from tests.test_process import metric_total

from bench.emulated import emulated
from bench.outage import record
from wildrydes_stream.config import Settings


class Drill:
    def __init__(self, args: argparse.Namespace, proxy: FaultProxy, env: dict[str, str]):
        self.args = args
        self.proxy = proxy
        self.env = env
        self.replicas: dict[str, ServiceProcess] = {}
        self.produced = 0
        self.rows: list[dict[str, Any]] = []

    async def start(self, name: str) -> None:
        env = {**self.env, "WILDRYDES_WORKER_ID": name}
        child = await ServiceProcess.start(env, "run")
        await child.started()
        self.replicas[name] = child

    async def owned(self) -> dict[str, float]:
        counts = {}
        for name, child in self.replicas.items():
            status, text = await child.get("/metrics")
            if status == 200:
                counts[name] = metric_total(text, "wildrydes_shards_owned")
        return counts

    async def until(self, condition: Any, timeout: float = 120.0) -> float:
        """Seconds until `condition(owned counts)` holds (inf after `timeout`)."""
        began = time.monotonic()
        while time.monotonic() - began < timeout:
            if condition(await self.owned()):
                return time.monotonic() - began
            await asyncio.sleep(0.1)
        return math.inf

    def even(self, counts: dict[str, float]) -> bool:
        shards = self.args.shards
        if sum(counts.values()) != shards or not counts:
            return False
        return max(counts.values()) - min(counts.values()) <= 1

    async def phase(self, name: str, action: Any, condition: Any, settle: float) -> None:
        before = Counter(self.proxy.item_writes)
        seconds = await action()
        waited = await self.until(condition)
        # Let what was read during the phase be written before counting it.
        await asyncio.sleep(settle)
        during = self.proxy.item_writes - before
        duplicates = sum(count - 1 for count in during.values() if count > 1)
        duplicates += sum(1 for key, count in during.items() if count and before.get(key))
        row = {
            "phase": name,
            "duplicate_item_writes": duplicates,
            "seconds_until_all_read": round((seconds or 0) + waited, 1),
        }
        self.rows.append(row)
        print(f"  {name:38} duplicates {duplicates:>5}   seconds {row['seconds_until_all_read']}")

    async def run(self, kinesis: Any, settings: Settings) -> None:
        args = self.args
        stop = asyncio.Event()
        producer = asyncio.create_task(self.produce(kinesis, settings.stream_name, stop))
        names = [f"replica-{i}" for i in range(args.replicas)]

        async def start_all() -> float:
            await asyncio.gather(*(self.start(name) for name in names))
            return 0.0

        await self.phase(f"{args.replicas} replicas start together", start_all, self.even, 5)

        async def sigterm() -> float:
            child = self.replicas.pop(names[0])
            child.send(signal.SIGTERM)
            began = time.monotonic()
            await child.wait(timeout=60)
            print(f"    (drain and exit took {time.monotonic() - began:.1f} s)")
            return 0.0

        await self.phase("SIGTERM one replica", sigterm, self.all_read, 5)

        async def sigkill() -> float:
            child = self.replicas.pop(names[1])
            child.send(signal.SIGKILL)
            await child.wait(timeout=30)
            return 0.0

        await self.phase("kill -9 one replica", sigkill, self.all_read, 5)

        async def comes_back() -> float:
            await self.start(names[0])
            return 0.0

        await self.phase("a replica comes back (rebalance)", comes_back, self.even, 5)
        stop.set()
        await producer
        for child in self.replicas.values():
            await child.close()

    def all_read(self, counts: dict[str, float]) -> bool:
        return bool(sum(counts.values()) == self.args.shards)

    async def produce(self, kinesis: Any, stream: str, stop: asyncio.Event) -> None:
        per_tick = max(1, int(self.args.rate / 10))
        while not stop.is_set():
            batch = [record(self.produced + i) for i in range(per_tick)]
            entries = [{"Data": json.dumps(r).encode(), "PartitionKey": r["Name"]} for r in batch]
            await kinesis.put_records(StreamName=stream, Records=entries)
            self.produced += per_tick
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.1)


async def main_async(args: argparse.Namespace) -> int:
    async with emulated(args.shards) as where:
        drill = Drill(args, where.proxy, where.env)
        try:
            await drill.run(where.kinesis, where.settings)
        finally:
            for child in drill.replicas.values():
                await child.close()
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
