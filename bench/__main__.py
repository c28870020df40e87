"""`make bench`: throughput and CPU per record beside the original Lambda's logic, then the
service at scale (256 shards in one process) and its latency.

Throughput, on two targets measured in one run:

- canned: a canned-response endpoint in a process of its own (bench/canned.py), so only the
  client's CPU is measured: the ceiling of the service itself.
- emulators: kinesalite + dynalite, a 4-shard stream preloaded with PutRecords, end to end.

Contenders: the service on the lean awsjson data path (`fast`), the service on aiobotocore for
everything (`botocore`), the same with botocore's parameter validation off
(`botocore-novalidate`), and `baseline`: the Lambda ported straight to aiobotocore.

Every run is its own process; CPU is that process's user + system time (time.process_time), so
neither the endpoint's nor the emulators' CPU is counted. On both targets each contender also
runs once against an empty stream, and that start-up CPU (clients, service models, leases) is
subtracted: `records_per_cpu_second` is the steady-state rate (the JSON line keeps both).
Wall-clock rates depend on what else runs on the machine; CPU seconds are the honest figure
on a shared one.

Scale (bench/scale.py, `--skip-scale` to leave out): `python -m wildrydes_stream run` as a child
process with default settings catches up 256 shards of the canned endpoint (40 records of ~1 KB
a shard); its peak RSS (VmHWM) once caught up, then its CPU over a 20 s idle window as a
percentage of one core (utime + stime from /proc), with the GetRecords calls a second the
endpoint saw meanwhile (one a second per shard by default).

Latency (bench/latency.py, `--skip-latency` to leave out): p50 and p99 from PutRecords
acknowledged to the item's BatchWriteItem answered by dynalite (a recording proxy in front of
it), 4 shards, 200 records a second for 30 s, with default polling and again with
`idle_poll_interval_seconds=0.2`; each run on fresh emulators.

Enhanced fan-out (`--skip-fanout` to leave out): the scale run again with `read_mode=fanout`
(256 subscriptions to the local SubscribeToShard server of the tests, tests/fanoutserver.py,
which sends an empty event every 5 s on an idle shard, as AWS does at least), and a latency run
with `read_mode=fanout` on that server fed by the kinesalite stream and told of every put, so it
pushes at once (`scale_256_fanout_idle_core_percent`, `latency_fanout_p99_s`).

`--set` overrides apply to the throughput runs only; scale and latency use the defaults.

KPL (`--kpl N`, 100 by default, 0 to leave out): the service as shipped on the canned endpoint
again, the same records packed into KPL aggregates of N records each
(`kpl_records_per_cpu_second`): what de-aggregation costs a record.

Aggregator (bench/aggregate.py, `--skip-aggregate` to leave out): `aggregate` beside the
workshop's KDA SQL ported straight to aiobotocore (bench/port.py), readings per CPU-second on
the canned endpoint and on kinesalite (200,000 per-second readings of 400 unicorns, 4 shards,
CPU between a tenth and all of them read), whether both put the same windows, and the pods a
fleet needs per 1,000 shards of raw readings. With `--profile DIR` its profile is printed.

State cost (bench/statecost.py, `--skip-state-cost` to leave out): what one aggregator
checkpoint writes to the state table a shard (KB, items, write units) with 100, 1,000 and
5,000 unicorns on it and the one-hour horizon, and what a full copy weighs.

Ends with one JSON line holding every figure (`scale_256_peak_rss_mb`,
`scale_256_idle_core_percent`, `latency_default_p99_s`, ...). The defaults take three to four
minutes on 2 cores: about two for throughput (50,000 records on each target, as the figures
the performance work was measured against),
under one for scale, about one and a half for latency. `--records 100000 --emulator-records
20000` gives steadier throughput figures, `--client fast,null --skip-scale --skip-latency` a
quick look, `--profile DIR` a cProfile per canned run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiobotocore.session import get_session

from bench import aggregate, latency, scale, statecost
from bench.canned import canned_server, canned_stats
from bench.data import SHARDS, aggregates, encode
from wildrydes_stream.admin.provision import ensure_stream, ensure_table
from wildrydes_stream.config import Settings
from wildrydes_stream.local.emulators import Emulator

CONTENDERS = ("baseline", "botocore", "botocore-novalidate", "fast", "null")
DEFAULT_CONTENDERS = ("baseline", "botocore", "botocore-novalidate", "fast")
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass
class Result:
    target: str
    contender: str
    records: int
    written: int
    cpu: float
    """CPU seconds of the run, start-up included."""
    wall: float
    startup_cpu: float | None = None
    """CPU seconds of the same run against an empty stream (canned target only)."""
    batches: int | None = None
    """BatchWriteItem calls (canned target only)."""

    @property
    def items_per_batch(self) -> float | None:
        return self.written / self.batches if self.batches else None

    @property
    def steady_cpu(self) -> float:
        return max(1e-9, self.cpu - (self.startup_cpu or 0.0))

    @property
    def records_per_cpu_second(self) -> float:
        return self.records / self.steady_cpu

    @property
    def cpu_per_100k(self) -> float:
        return self.steady_cpu * 100_000 / self.records

    @property
    def records_per_second(self) -> float:
        return self.records / self.wall


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--records", type=int, default=50_000, help="records on the canned endpoint (0: skip)"
    )
    parser.add_argument(
        "--emulator-records",
        type=int,
        default=50_000,
        help="records preloaded into kinesalite (0: skip the emulators)",
    )
    parser.add_argument(
        "--client",
        default=",".join(DEFAULT_CONTENDERS),
        help=f"comma-separated contenders to run, of: {', '.join(CONTENDERS)} (null: the "
        "service with GetRecords/BatchWriteItem answered in-process, its floor; canned only)",
    )
    parser.add_argument(
        "--page-size", type=int, default=1000, help="records per canned GetRecords page"
    )
    parser.add_argument(
        "--throughput-record-bytes",
        type=int,
        default=0,
        help="pad each canned throughput record to about this many bytes (default: the "
        "aggregates as they are, ~160 B)",
    )
    parser.add_argument(
        "--loop",
        choices=("uvloop", "asyncio"),
        default="uvloop",
        help="event loop of the throughput runs (the service runs on uvloop)",
    )
    parser.add_argument("--limit", type=int, default=10000, help="GetRecords Limit")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SETTING=VALUE",
        help="override a service setting (e.g. queue_size=200000); repeatable",
    )
    parser.add_argument(
        "--profile",
        metavar="DIR",
        help="write a cProfile of each canned run to DIR/<contender>.prof (slows the runs)",
    )
    parser.add_argument("--skip-scale", action="store_true", help="leave out the scale run")
    parser.add_argument(
        "--scale-shards", type=int, default=256, help="shards of the scale run (one process)"
    )
    parser.add_argument(
        "--scale-records", type=int, default=0, help="records of the scale run (0: 40 a shard)"
    )
    parser.add_argument(
        "--record-bytes", type=int, default=1000, help="about this size a record (scale run)"
    )
    parser.add_argument(
        "--idle-seconds", type=float, default=20.0, help="idle window of the scale run"
    )
    parser.add_argument("--skip-latency", action="store_true", help="leave out the latency runs")
    parser.add_argument(
        "--kpl",
        type=int,
        default=100,
        help="records per KPL aggregate in the canned run of KPL aggregates (0 or 1: skip it)",
    )
    parser.add_argument(
        "--skip-aggregate", action="store_true", help="leave out the aggregator's runs"
    )
    parser.add_argument(
        "--readings",
        type=int,
        default=aggregate.READINGS,
        help="per-second readings for the aggregator on the canned endpoint (0: skip)",
    )
    parser.add_argument(
        "--emulator-readings",
        type=int,
        default=aggregate.READINGS,
        help="per-second readings for the aggregator on kinesalite (0: skip)",
    )
    parser.add_argument(
        "--skip-fanout",
        action="store_true",
        help="leave out the enhanced fan-out scale and latency runs",
    )
    parser.add_argument(
        "--skip-state-cost",
        action="store_true",
        help="leave out what an aggregator checkpoint writes at 100, 1,000, 5,000 unicorns",
    )
    parser.add_argument(
        "--latency-seconds", type=float, default=30.0, help="measured seconds a latency run"
    )
    parser.add_argument(
        "--latency-rate", type=float, default=200.0, help="records a second, latency runs"
    )
    args = parser.parse_args(argv)
    contenders = [c.strip() for c in args.client.split(",") if c.strip()]
    for contender in contenders:
        if contender not in CONTENDERS:
            parser.error(f"unknown contender {contender!r}: one of {', '.join(CONTENDERS)}")

    overrides = dict(item.split("=", 1) for item in args.set)
    common = {"limit": args.limit, "settings": overrides, "loop": args.loop}
    results: list[Result] = []
    if args.records > 0:
        results += run_canned(
            contenders,
            args.records,
            args.page_size,
            common,
            args.profile,
            args.throughput_record_bytes,
        )
    if args.records > 0 and args.kpl > 1 and "fast" in contenders:
        # The same records read as KPL aggregates (what de-aggregation costs a record).
        results += run_canned(["fast"], args.records, args.page_size, common, None, kpl=args.kpl)
    if args.emulator_records > 0:
        results += asyncio.run(run_emulators(contenders, args.emulator_records, common))
    ok = all(r.written == r.records for r in results)
    aggregated: list[aggregate.AggResult] = []
    if not args.skip_aggregate and (args.readings > 0 or args.emulator_readings > 0):
        aggregated = aggregate.run(
            args.readings,
            args.emulator_readings,
            limit=args.limit,
            overrides=overrides,
            loop=args.loop,
            profile=args.profile,
        )
        ok = ok and aggregate.ok(aggregated)
    scales: list[scale.Scale] = []
    if not args.skip_scale:
        records = args.scale_records or 40 * args.scale_shards
        for mode in ("polling",) + (() if args.skip_fanout else ("fanout",)):
            try:
                scales.append(
                    asyncio.run(
                        scale.measure(
                            args.scale_shards,
                            records,
                            args.record_bytes,
                            args.idle_seconds,
                            read_mode=mode,
                        )
                    )
                )
            except Exception as exc:  # a figure missing, not the whole bench
                print(f"scale ({mode}): FAILED: {type(exc).__name__}: {exc}", flush=True)
        ok = ok and len(scales) == (1 if args.skip_fanout else 2)
        ok = ok and all(s.caught_up for s in scales)
    latencies: list[latency.Latency] = []
    if not args.skip_latency:
        runs = ["default", "low"] + ([] if args.skip_fanout else ["fanout"])
        try:
            latencies = asyncio.run(
                latency.measure_runs(
                    runs,
                    latency.SHARDS,
                    args.latency_rate,
                    args.latency_seconds,
                    latency.RUNS["low"],
                )
            )
        except Exception as exc:  # a figure missing, not the whole bench
            print(f"latency: FAILED: {type(exc).__name__}: {exc}", flush=True)
        ok = ok and len(latencies) == len(runs) and all(r.written == r.records for r in latencies)
    if results:
        print()
        print_table(results)
    if aggregated:
        print()
        copier = next((r for r in results if (r.target, r.contender) == ("canned", "fast")), None)
        aggregate.print_table(aggregated, copier.records_per_cpu_second if copier else None)
        if args.profile and args.readings > 0:
            print()
            print("Where the aggregator's CPU goes (canned, cProfile, own time):")
            aggregate.print_profile(os.path.join(args.profile, "aggregate-aggregate.prof"))
    for scaled in scales:
        print()
        print_scale(scaled)
    if latencies:
        print()
        print_latency(latencies)
    out = summary(results)
    out.update(aggregate.summary(aggregated))
    if not args.skip_state_cost:
        print()
        print("What an aggregator checkpoint writes to the state table, per shard:")
        for row in statecost.main([]):
            out[f"state_checkpoint_wcu_{row['unicorns']}_unicorns"] = row["checkpoint_write_units"]
            out[f"state_full_copy_wcu_{row['unicorns']}_unicorns"] = row["full_copy_write_units"]
    for scaled in scales:
        out.update(scale_summary(scaled))
    for run in latencies:
        out.update(latency_summary(run))
    print(json.dumps(out))
    return 0 if ok else 1


# The canned endpoint


def run_canned(
    contenders: list[str],
    records: int,
    page_size: int,
    common: dict[str, Any],
    profile: str | None,
    record_bytes: int = 0,
    kpl: int = 0,
) -> list[Result]:
    """`kpl`: the stream holds KPL aggregates of that many records (target `canned-kpl<N>`)."""
    results = []
    target = f"canned-kpl{kpl}" if kpl else "canned"
    with canned_server(records, page_size, record_bytes=record_bytes, kpl=kpl) as endpoint:
        env = endpoints(endpoint, endpoint)
        for n, contender in enumerate(contenders):
            names = {"table": f"items-{n}", "lease_table": f"leases-{n}"}
            common = {**common, "records": records, "page_size": page_size}
            startup = worker(contender, {**names, **common, "stream": "bench-empty"}, env)
            names = {"table": f"items-{n}", "lease_table": f"leases-full-{n}"}
            spec = {**names, **common, "stream": "bench"}
            if profile:
                os.makedirs(profile, exist_ok=True)
                spec["profile"] = os.path.join(profile, f"{contender}.prof")
            run = worker(contender, spec, env)
            stats = canned_stats(endpoint)
            written = stats["written"].get(names["table"], 0)
            result = Result(
                target,
                contender,
                records,
                int(run["written"] if contender == "null" else written),
                run["cpu"],
                run["wall"],
                startup["cpu"],
                int(stats["batches"].get(names["table"], 0)) or None,
            )
            report(result, run)
            results.append(result)
    return results


# The emulators


async def run_emulators(
    contenders: list[str], records: int, common: dict[str, Any]
) -> list[Result]:
    results = []
    with Emulator.start("kinesalite") as kinesalite, Emulator.start("dynalite") as dynalite:
        env = endpoints(kinesalite.endpoint, dynalite.endpoint)
        os.environ.update(env)
        session = get_session()
        async with (
            session.create_client("kinesis") as kinesis,
            session.create_client("dynamodb") as dynamodb,
        ):
            await ensure_stream(kinesis, "bench", SHARDS)
            await ensure_stream(kinesis, "bench-empty", SHARDS)
            started = time.perf_counter()
            await preload(kinesis, "bench", records)
            print(f"preloaded {records} records in {time.perf_counter() - started:.1f}s")
            for n, contender in enumerate(c for c in contenders if c != "null"):
                settings = Settings(table_name=f"items-{n}", deadletter_file="unused")
                await ensure_table(dynamodb, settings)
                spec = {**common, "stream": "bench", "table": f"items-{n}"}
                # Start-up alone (clients, leases, the first empty polls), as on the canned
                # endpoint: subtracted, so the figure is the steady state.
                startup = await asyncio.to_thread(
                    worker,
                    contender,
                    {**spec, "stream": "bench-empty", "lease_table": f"leases-empty-{n}"},
                    env,
                )
                run = await asyncio.to_thread(
                    worker, contender, {**spec, "lease_table": f"leases-{n}"}, env
                )
                written = await count_items(dynamodb, f"items-{n}")
                result = Result(
                    "emulators",
                    contender,
                    records,
                    written,
                    run["cpu"],
                    run["wall"],
                    startup["cpu"],
                )
                report(result, run)
                results.append(result)
    return results


async def preload(kinesis: Any, stream: str, records: int) -> None:
    """PutRecords in batches of 500, four at a time; partition key Name."""
    entries = [{"Data": encode(r), "PartitionKey": r["Name"]} for r in aggregates(records)]
    batches = [entries[i : i + 500] for i in range(0, len(entries), 500)]
    semaphore = asyncio.Semaphore(4)

    async def put(batch: list[dict[str, Any]]) -> None:
        async with semaphore:
            while batch:
                response = await kinesis.put_records(StreamName=stream, Records=batch)
                batch = [
                    e for e, r in zip(batch, response["Records"], strict=True) if "ErrorCode" in r
                ]

    await asyncio.gather(*(put(b) for b in batches))


async def count_items(dynamodb: Any, table: str) -> int:
    count = 0
    paginator = dynamodb.get_paginator("scan")
    async for page in paginator.paginate(TableName=table, Select="COUNT"):
        count += page["Count"]
    return count


# Running one contender


def endpoints(kinesis: str, dynamodb: str) -> dict[str, str]:
    return {
        **CREDENTIALS,
        "AWS_ENDPOINT_URL_KINESIS": kinesis,
        "AWS_ENDPOINT_URL_DYNAMODB": dynamodb,
    }


def worker(contender: str, spec: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    if contender == "baseline":
        spec = {**spec, "mode": "baseline"}
    else:
        spec = {**spec, "mode": "service", "client": contender}
    environ = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    completed = subprocess.run(
        [sys.executable, "-m", "bench.worker", json.dumps(spec)],
        env={**environ, **env},
        stdout=subprocess.PIPE,
        check=True,
        timeout=600,
    )
    result: dict[str, Any] = json.loads(completed.stdout.decode().strip().splitlines()[-1])
    return result


def report(result: Result, run: dict[str, Any]) -> None:
    problems = []
    if result.written != result.records:
        problems.append(f"WRITTEN {result.written} OF {result.records}")
    if run.get("dead_lettered"):
        problems.append(f"{run['dead_lettered']:.0f} dead-lettered")
    if run.get("exit_code"):
        problems.append(f"exit code {run['exit_code']}")
    print(
        f"{result.target:9} {result.contender:19} {result.records:>7} records "
        f"{result.wall:6.2f}s wall {result.cpu:6.2f}s CPU"
        + (f" (start-up {result.startup_cpu:.2f}s)" if result.startup_cpu is not None else "")
        + ("  " + "; ".join(problems) if problems else ""),
        flush=True,
    )


# Output


def print_table(results: list[Result]) -> None:
    baseline = {r.target: r for r in results if r.contender == "baseline"}
    header = (
        f"{'target':13} {'contender':19} {'records':>8} {'records/s':>10} "
        f"{'CPU s/100k':>10} {'records/CPU-s':>13} {'vs baseline':>11} {'items/batch':>11}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        base = baseline.get(r.target)
        ratio = r.records_per_cpu_second / base.records_per_cpu_second if base else None
        print(
            f"{r.target:13} {r.contender:19} {r.records:>8} {r.records_per_second:>10,.0f} "
            f"{r.cpu_per_100k:>10.2f} {r.records_per_cpu_second:>13,.0f} "
            + (f"{ratio:>10.2f}x" if ratio is not None else f"{'':>11}")
            + (f" {r.items_per_batch:>11.1f}" if r.items_per_batch is not None else "")
        )
    print(
        "steady state: the CPU of a run against an empty stream (start-up) subtracted; "
        "emulators' wall time is bound by the emulators."
    )


def print_scale(s: scale.Scale) -> None:
    calls = ", ".join(f"{op} {rate:.1f}/s" for op, rate in sorted(s.idle_calls_per_second.items()))
    fanout = s.read_mode == "fanout"
    how = f", fan-out ({s.heartbeat_seconds:g} s heartbeat)" if fanout else ""
    print(
        f"scale: {s.shards} shards in one process{how}, {s.records} records of "
        f"~{s.record_bytes} B: "
        f"caught up in {s.catch_up_seconds:.1f} s ({s.catch_up_cpu_seconds:.2f} s CPU)"
    )
    print(f"  peak RSS              {s.peak_rss_mb:8.1f} MiB   (target < 300 MB)")
    print(
        f"  idle CPU              {s.idle_core_percent:8.1f} %     of one core over "
        f"{s.idle_seconds:.0f} s (target < {2 if fanout else 5}%)"
    )
    if fanout:
        events = s.idle_calls_per_second.get("SubscribeToShardEvent", 0.0)
        print(f"  idle events pushed    {events:8.1f} /s    ({calls})")
    else:
        print(f"  idle GetRecords       {s.idle_get_records_per_second:8.1f} /s    ({calls})")
    print(f"  RSS at end of idle    {s.idle_rss_mb:8.1f} MiB")


def print_latency(runs: list[latency.Latency]) -> None:
    targets = {"default": "<= 1.2 s", "low": "<= 0.3 s", "fanout": "<= 0.2 s"}
    header = (
        f"{'latency':8} {'idle poll':>9} {'records':>8} {'p50 s':>7} {'p90 s':>7} "
        f"{'p99 s':>7} {'max s':>7}  target p99"
    )
    print(header)
    print("-" * len(header))
    for r in runs:
        print(
            f"{r.run:8} "
            + (f"{'push':>9}" if r.run == "fanout" else f"{r.idle_poll_interval_seconds:>8g}s")
            + f" {r.records:>8} "
            f"{r.percentile(50):>7.3f} {r.percentile(90):>7.3f} {r.percentile(99):>7.3f} "
            f"{r.percentile(100):>7.3f}  {targets.get(r.run, '')}"
            + (f"  {r.records - r.written} NOT WRITTEN" if r.written != r.records else "")
        )
    print(
        f"latency: PutRecords acknowledged -> BatchWriteItem answered by dynalite; "
        f"{runs[0].shards} shards, {runs[0].rate:g} records/s for {runs[0].duration:g} s a run"
        + (
            "; fanout: the local SubscribeToShard server, pushing on put."
            if any(r.run == "fanout" for r in runs)
            else "."
        )
    )


def scale_summary(s: scale.Scale) -> dict[str, Any]:
    fanout = s.read_mode == "fanout"
    prefix = f"scale_{s.shards}" + ("_fanout" if fanout else "")
    calls = "idle_events_per_second" if fanout else "idle_get_records_per_second"
    per_second = (
        s.idle_calls_per_second.get("SubscribeToShardEvent", 0.0)
        if fanout
        else (s.idle_get_records_per_second)
    )
    return {
        f"{prefix}_peak_rss_mb": round(s.peak_rss_mb, 1),
        f"{prefix}_idle_core_percent": round(s.idle_core_percent, 2),
        f"{prefix}_{calls}": round(per_second, 1),
        prefix: s.figures(),
    }


def latency_summary(r: latency.Latency) -> dict[str, Any]:
    prefix = f"latency_{r.run}"
    return {
        f"{prefix}_p50_s": round(r.percentile(50), 3),
        f"{prefix}_p99_s": round(r.percentile(99), 3),
        prefix: r.figures(),
    }


def summary(results: list[Result]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    by = {(r.target, r.contender): r for r in results}
    fast, base = by.get(("canned", "fast")), by.get(("canned", "baseline"))
    if fast is not None:
        out["records_per_cpu_second"] = round(fast.records_per_cpu_second)
    if base is not None:
        out["baseline_records_per_cpu_second"] = round(base.records_per_cpu_second)
    if fast is not None and base is not None:
        out["speedup_vs_baseline"] = round(
            fast.records_per_cpu_second / base.records_per_cpu_second, 2
        )
    kpl = next((r for r in results if r.target.startswith("canned-kpl")), None)
    if kpl is not None:
        out["kpl_records_per_cpu_second"] = round(kpl.records_per_cpu_second)
    for r in results:
        key = f"{r.target}_{r.contender}".replace("-", "_")
        out[key] = {
            "records": r.records,
            "written": r.written,
            "records_per_second": round(r.records_per_second),
            "records_per_cpu_second": round(r.records_per_cpu_second),
            "cpu_seconds_per_100k": round(r.cpu_per_100k, 3),
            "cpu_seconds": round(r.cpu, 3),
            "startup_cpu_seconds": None if r.startup_cpu is None else round(r.startup_cpu, 3),
            "wall_seconds": round(r.wall, 3),
            "items_per_batch": None if r.batches is None else round(r.items_per_batch or 0, 1),
        }
    return out


if __name__ == "__main__":
    sys.exit(main())
