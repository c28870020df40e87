"""The aggregator's outage drill: a fleet's readings while PutRecords to the output stream fails.

    python -m bench.outage --app aggregate        # 1,000 unicorns at 2x event time, 240 s outage
    python -m bench.outage --app aggregate --max-buffered-bytes 67108864 --outage 900

kinesalite and dynalite on loopback, the fault proxy of the tests in front of kinesalite (every
Kinesis call of the aggregator goes through it) and `aggregate` as a child process. A fleet of
`--unicorns` puts one reading a second each on the raw stream, `--speed` event seconds a wall
second, through the warm-up, the outage and the recovery. During the outage every PutRecords is
answered 503 (or throttled). Twice a second the drill samples the child's VmRSS and VmHWM, the
readings it has read, its GetRecords calls, and the bytes its budget accounts
(`wildrydes_aggregate_buffered_bytes`, of which windows not yet put:
`wildrydes_aggregate_window_bytes`). It reports whether and when the pollers paused, the
accounted bytes against `max_buffered_bytes`, RSS before, during and after the pause, and once
everything is put, checks every window on the output stream against the aggregate of the
readings produced. Ends with one JSON line of the figures; exits 1 if a window is missing or
wrong, or anything was dead-lettered.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from tests.aggregate.test_aggregate import latest
from tests.faultproxy import KINESIS_THROTTLED, AwsError, FaultProxy
from tests.process import ServiceProcess, service_env
from tests.test_process import metric_total

from bench.emulated import CREDENTIALS, emulated
from wildrydes_stream.admin.provision import ensure_stream
from wildrydes_stream.config import Settings
from wildrydes_stream.produce.model import NAMES, Unicorn, status_time

KINESIS_UNAVAILABLE = AwsError(503, "ServiceUnavailable", "Service Unavailable")
T0 = datetime(2026, 1, 5, 8, 0, tzinfo=UTC)
"""Event time of the fleet's first reading."""
MIB = 1024 * 1024


class Fleet:
    """The unicorns, their readings on the raw stream, and what each window must come out as."""

    def __init__(self, count: int) -> None:
        names = [f"{NAMES[i % len(NAMES)]}-{i:04d}" for i in range(count)]
        self.unicorns = [Unicorn(name, random.Random(i)) for i, name in enumerate(names)]
        self.produced = 0
        self.seconds = 0
        """Event seconds produced so far."""
        self.windows: dict[tuple[str, str], dict[str, Any]] = {}

    async def run(self, kinesis: Any, stream: str, speed: float, stop: asyncio.Event) -> None:
        """One reading a unicorn for each event second, `speed` event seconds a wall second."""
        started = time.monotonic()
        while not stop.is_set():
            at = T0 + timedelta(seconds=self.seconds)
            readings = [unicorn.reading(at) for unicorn in self.unicorns]
            entries = [{"Data": r.encode(), "PartitionKey": r.name} for r in readings]
            for start in range(0, len(entries), 500):
                chunk = entries[start : start + 500]
                response = await kinesis.put_records(StreamName=stream, Records=chunk)
                assert response.get("FailedRecordCount", 0) == 0, response
            for r in readings:
                self._count(r.name, at, r.distance, r.magic_points, r.health_points)
            self.produced += len(readings)
            self.seconds += 1
            ahead = started + self.seconds / speed - time.monotonic()
            if ahead > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), ahead)

    def _count(self, name: str, at: datetime, distance: int, magic: int, health: int) -> None:
        key = (name, status_time(at.replace(second=0)))
        window = self.windows.get(key)
        if window is None:
            self.windows[key] = {
                "Name": name,
                "StatusTime": key[1],
                "Distance": Decimal(distance),
                "MinMagicPoints": magic,
                "MaxMagicPoints": magic,
                "MinHealthPoints": health,
                "MaxHealthPoints": health,
            }
            return
        window["Distance"] += distance
        window["MinMagicPoints"] = min(window["MinMagicPoints"], magic)
        window["MaxMagicPoints"] = max(window["MaxMagicPoints"], magic)
        window["MinHealthPoints"] = min(window["MinHealthPoints"], health)
        window["MaxHealthPoints"] = max(window["MaxHealthPoints"], health)


@dataclass(frozen=True)
class Sample:
    at: float
    """Seconds since the outage began (negative before)."""
    rss: float
    hwm: float
    read: float
    get_records: int
    buffered: float
    window_bytes: float


def memory_mib(pid: int) -> tuple[float, float]:
    """VmRSS and VmHWM of a process, MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields.get("VmRSS", 0.0), fields.get("VmHWM", 0.0)


class AggregateDrill:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.fleet = Fleet(args.unicorns)
        self.samples: list[Sample] = []
        self.outage_began = 0.0
        self.outage_ended = 0.0
        self.produced_at_outage = 0
        self.figures: dict[str, Any] = {}

    async def run(self) -> int:
        args = self.args
        async with emulated(
            args.shards,
            worker_id="drill",
            max_buffered_bytes=args.max_buffered_bytes,
            idle_window_timeout_seconds=args.idle_timeout,
        ) as where:
            s = where.settings
            await ensure_stream(where.kinesis, s.raw_stream_name, args.shards)
            proxy = FaultProxy(where.env["AWS_ENDPOINT_URL_KINESIS"])
            await proxy.start()
            env = service_env(s, {**CREDENTIALS, **_endpoints(where.env, proxy.endpoint)})
            service = await ServiceProcess.start(env, "aggregate")
            try:
                await service.started()
                code = await self.drive(service, where.kinesis, proxy, s)
            finally:
                await service.close()
                await proxy.close()
        print(json.dumps(self.figures))
        return code

    async def drive(
        self, service: ServiceProcess, kinesis: Any, proxy: FaultProxy, s: Settings
    ) -> int:
        args = self.args
        stop_producing, stop_sampling = asyncio.Event(), asyncio.Event()
        self.outage_began = time.monotonic() + args.warmup
        producer = asyncio.create_task(
            self.fleet.run(kinesis, s.raw_stream_name, args.speed, stop_producing)
        )
        sampler = asyncio.create_task(self.sample(service, proxy, stop_sampling))
        await asyncio.sleep(args.warmup)
        self.produced_at_outage = self.fleet.produced
        rate = args.unicorns * args.speed
        print(f"outage: every PutRecords {args.fault} for {args.outage:g} s ", end="", flush=True)
        print(f"({rate:g} readings/s, max_buffered_bytes {args.max_buffered_bytes / MIB:g} MiB)")
        if args.fault == "throttled-entries":
            proxy.fail_entries(times=None, forward=0)
        else:
            error = KINESIS_THROTTLED if args.fault == "throttled" else KINESIS_UNAVAILABLE
            proxy.fail("PutRecords", error, times=None)
        await asyncio.sleep(args.outage)
        proxy.clear()
        self.outage_ended = time.monotonic()
        print(f"outage over; read {self.samples[-1].read:.0f} of {self.fleet.produced} readings")
        await asyncio.sleep(args.after)
        stop_producing.set()
        await producer
        put_all = await self.wait_all_put(service, args.outage + 600)
        stop_sampling.set()
        await sampler
        missing, wrong = await self.check_output(kinesis, s.stream_name)
        dead = _count_lines(Path(s.deadletter_file))
        self.report(s, proxy, put_all, missing, wrong, dead)
        return 0 if put_all and not missing and not wrong and dead == 0 else 1

    async def sample(self, service: ServiceProcess, proxy: FaultProxy, stop: asyncio.Event) -> None:
        while not stop.is_set():
            rss, hwm = memory_mib(service.pid)
            _, text = await service.get("/metrics")
            self.samples.append(
                Sample(
                    time.monotonic() - self.outage_began,
                    rss,
                    hwm,
                    metric_total(text, "wildrydes_records_read_total"),
                    proxy.calls["GetRecords"],
                    metric_total(text, "wildrydes_aggregate_buffered_bytes"),
                    metric_total(text, "wildrydes_aggregate_window_bytes"),
                )
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)

    async def wait_all_put(self, service: ServiceProcess, timeout: float) -> bool:
        """Until every reading produced is read and no window waits for a put."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            last = self.samples[-1] if self.samples else None
            if last is not None and last.read >= self.fleet.produced and last.window_bytes == 0:
                return True
            await asyncio.sleep(1.0)
        return False

    async def check_output(self, kinesis: Any, stream: str) -> tuple[int, int]:
        """Windows absent from the output stream, and windows whose latest record differs."""
        out = await latest(kinesis, stream)
        expected = self.fleet.windows
        missing = sum(1 for key in expected if key not in out)
        wrong = sum(1 for key, window in expected.items() if key in out and out[key] != window)
        return missing, wrong

    def report(
        self, s: Settings, proxy: FaultProxy, put_all: bool, missing: int, wrong: int, dead: int
    ) -> None:
        args = self.args
        outage_length = self.outage_ended - self.outage_began
        during = [x for x in self.samples if 0 <= x.at <= outage_length]
        before = [x for x in self.samples if x.at < 0]
        # Paused: from the first sample whose count of readings read held to the outage's end.
        paused = None
        if during:
            final = during[-1].read
            paused = next(x for x in during if x.read == final)
            if during[-1].at - paused.at < 5.0:
                paused = None  # still reading at the end: the budget never filled
        at_pause = [x for x in during if paused is not None and x.at >= paused.at]
        recovered = [x for x in self.samples if x.at > outage_length and x.window_bytes == 0]
        self.figures = {
            "app": "aggregate",
            "unicorns": args.unicorns,
            "readings_per_second": args.unicorns * args.speed,
            "event_seconds_per_second": args.speed,
            "shards": args.shards,
            "outage_seconds": args.outage,
            "fault": args.fault,
            "failed_puts_during_outage": sum(proxy.injected.values()),
            "produced": self.fleet.produced,
            "produced_at_outage_start": self.produced_at_outage,
            "read_at_outage_start": before[-1].read if before else 0,
            "read_at_outage_end": during[-1].read if during else 0,
            "max_buffered_bytes": s.max_buffered_bytes,
            "accounted_bytes_peak": max((x.buffered for x in self.samples), default=0),
            "window_bytes_peak": max((x.window_bytes for x in self.samples), default=0),
            "pollers_paused": paused is not None,
            "paused_after_seconds": round(paused.at, 1) if paused else None,
            "paused_for_seconds": round(outage_length - paused.at, 1) if paused else None,
            "get_records_while_paused": (at_pause[-1].get_records - at_pause[0].get_records)
            if at_pause
            else None,
            "rss_mib_before_outage": round(before[-1].rss, 1) if before else None,
            "rss_mib_at_pause": round(paused.rss, 1) if paused else None,
            "rss_mib_peak_during_outage": round(max((x.rss for x in during), default=0), 1),
            "rss_growth_while_paused_mib": round(max(x.rss for x in at_pause) - paused.rss, 1)
            if paused
            else None,
            "peak_rss_mib": round(max((x.hwm for x in self.samples), default=0), 1),
            "all_put_seconds_after_outage": round(recovered[0].at - outage_length, 1)
            if recovered and put_all
            else None,
            "windows_expected": len(self.fleet.windows),
            "windows_missing": missing,
            "windows_wrong": wrong,
            "dead_lettered": dead,
        }
        for key, value in self.figures.items():
            print(f"  {key:32} {value}")


def _endpoints(env: dict[str, str], kinesis: str) -> dict[str, str]:
    """The emulators' endpoints of a service environment, Kinesis through the proxy."""
    return {
        "AWS_ENDPOINT_URL_KINESIS": kinesis,
        "AWS_ENDPOINT_URL_DYNAMODB": env["AWS_ENDPOINT_URL_DYNAMODB"],
    }


def _count_lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("--app aggregate")
    group.add_argument("--unicorns", type=int, default=1000)
    group.add_argument(
        "--speed", type=float, default=2.0, help="event seconds a wall second (readings/s/unicorn)"
    )
    group.add_argument(
        "--max-buffered-bytes",
        type=int,
        default=16 * MIB,
        help="the aggregator's max_buffered_bytes (the service's default is 64 MiB)",
    )
    group.add_argument(
        "--fault",
        choices=("unavailable", "throttled", "throttled-entries"),
        default="unavailable",
        help="PutRecords answered 503, refused as throttled, or every entry throttled",
    )
    group.add_argument(
        "--idle-timeout",
        type=float,
        default=10.0,
        help="idle_window_timeout_seconds (puts the last minute once the fleet stops)",
    )
