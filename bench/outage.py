"""An outage drill: the service under steady load while DynamoDB answers 503 for a while.

    python -m bench.outage                       # 200 records/s, 4 shards, a 90 s outage
    python -m bench.outage --outage 20 --rate 100
    python -m bench.outage --app aggregate       # PutRecords failing under `aggregate` (see
                                                 # bench/outage_aggregate.py)

kinesalite and dynalite on loopback, the fault proxy of the tests in front of dynalite, and
the service as a child process with its default settings. A producer puts `--rate` records a
second (distinct keys) for the warm-up, the outage and the recovery. Then it reports what a
user would check: every record produced in the table, nothing dead-lettered, /healthz
throughout, how long after the outage the service was caught up, and its peak memory. Ends
with one JSON line of the figures; exits 1 if anything is missing or dead-lettered.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from tests.faultproxy import DYNAMODB_UNAVAILABLE, FaultProxy
from tests.process import ServiceProcess
from tests.replicas_support import record
from tests.test_process import metric_total

from bench import outage_aggregate
from bench.emulated import emulated
from wildrydes_stream.config import Settings


def count_lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Drill:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.produced = 0
        self.health_failures = 0
        self.peak_rss = 0.0
        self.figures: dict[str, Any] = {}

    async def produce(self, kinesis: Any, stream: str, seconds: float) -> None:
        """`rate` records a second, put ten times a second."""
        per_tick = max(1, int(self.args.rate / 10))
        deadline = time.monotonic() + seconds
        tick = time.monotonic()
        while time.monotonic() < deadline:
            batch = [record(self.produced + i) for i in range(per_tick)]
            entries = [{"Data": json.dumps(r).encode(), "PartitionKey": r["Name"]} for r in batch]
            response = await kinesis.put_records(StreamName=stream, Records=entries)
            assert response.get("FailedRecordCount", 0) == 0, response
            self.produced += per_tick
            tick += 0.1
            await asyncio.sleep(max(0.0, tick - time.monotonic()))

    async def watch(self, service: ServiceProcess, stop: asyncio.Event) -> None:
        """Liveness and memory, once a second."""
        while not stop.is_set():
            status, _ = await service.get("/healthz")
            self.health_failures += status != 200
            self.peak_rss = max(self.peak_rss, rss_mib(service.pid))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)

    async def items(self, dynamodb: Any, settings: Settings) -> int:
        count = 0
        paginator = dynamodb.get_paginator("scan")
        async for page in paginator.paginate(TableName=settings.table_name, Select="COUNT"):
            count += page["Count"]
        return count

    async def written(self, service: ServiceProcess) -> float:
        _, text = await service.get("/metrics")
        return metric_total(text, "wildrydes_records_written_total")

    async def run(self) -> int:
        async with emulated(self.args.shards, worker_id="drill") as where:
            service = await ServiceProcess.start(where.env, "run")
            try:
                await service.started()
                code = await self.drive(
                    service, where.kinesis, where.dynamodb, where.proxy, where.settings
                )
            finally:
                await service.close()
        print(json.dumps(self.figures))
        return code

    async def drive(
        self,
        service: ServiceProcess,
        kinesis: Any,
        dynamodb: Any,
        proxy: FaultProxy,
        settings: Settings,
    ) -> int:
        args = self.args
        stop = asyncio.Event()
        watcher = asyncio.create_task(self.watch(service, stop))
        producer = asyncio.create_task(
            self.produce(kinesis, settings.stream_name, args.warmup + args.outage + args.after)
        )
        await asyncio.sleep(args.warmup)
        calls = "DynamoDB call" if args.every_call else "BatchWriteItem"
        print(f"outage: every {calls} answered 503 for {args.outage:g} s", flush=True)
        proxy.fail("*" if args.every_call else "BatchWriteItem", DYNAMODB_UNAVAILABLE, times=None)
        await asyncio.sleep(args.outage)
        proxy.clear()
        cleared = time.monotonic()
        written_at_end = await self.written(service)
        print(f"outage over; {self.produced - written_at_end:.0f} records waiting", flush=True)
        await producer
        # Written counts replays too (after leases move, records since the last checkpoint
        # are written again): the table itself says when everything is there.
        while await self.items(dynamodb, settings) < self.produced:
            if time.monotonic() - cleared > args.outage + 300:
                break
            await asyncio.sleep(2.0)
        caught_up = time.monotonic() - cleared
        stop.set()
        await watcher
        _, metrics = await service.get("/metrics")
        items = await self.items(dynamodb, settings)
        dead = count_lines(Path(settings.deadletter_file))
        self.figures = {
            "rate_per_second": args.rate,
            "shards": args.shards,
            "outage_seconds": args.outage,
            "produced": self.produced,
            "in_table": items,
            "missing": self.produced - items,
            "dead_lettered": dead,
            "failed_calls_during_outage": sum(proxy.injected.values()),
            "healthz_failures": self.health_failures,
            "caught_up_seconds_after_outage": round(caught_up, 1),
            "peak_rss_mib": round(self.peak_rss, 1),
            "dead_lettered_metric": metric_total(metrics, "wildrydes_records_dead_lettered_total"),
        }
        for key, value in self.figures.items():
            print(f"  {key:32} {value}")
        return 0 if items == self.produced and dead == 0 else 1


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.outage", description=__doc__)
    parser.add_argument(
        "--app",
        choices=("run", "aggregate"),
        default="run",
        help="run: DynamoDB fails under `run`; aggregate: PutRecords fails under `aggregate`",
    )
    parser.add_argument("--shards", type=int, default=None, help="4 for run, 2 for aggregate")
    parser.add_argument("--warmup", type=float, default=15.0, help="seconds before the outage")
    parser.add_argument(
        "--outage", type=float, default=None, help="seconds of failures (run 90, aggregate 240)"
    )
    parser.add_argument("--after", type=float, default=15.0, help="load after the outage")
    group = parser.add_argument_group("--app run")
    group.add_argument("--rate", type=float, default=200.0, help="records a second")
    group.add_argument(
        "--every-call",
        action="store_true",
        help="fail every DynamoDB call (the lease table too), not only BatchWriteItem",
    )
    outage_aggregate.add_arguments(parser)
    args = parser.parse_args()
    aggregate = args.app == "aggregate"
    if args.shards is None:
        args.shards = 2 if aggregate else 4
    if args.outage is None:
        args.outage = 240.0 if aggregate else 90.0
    drill = outage_aggregate.AggregateDrill(args) if aggregate else Drill(args)
    return asyncio.run(drill.run())


if __name__ == "__main__":
    sys.exit(main())
