"""The aggregator's throughput beside the KDA SQL application ported straight (bench/port.py).

Readings in the workshop producer's format (bench/readings.py: 200,000 per-second readings of
400 unicorns by default) on a 4-shard stream, read by each contender in a process of its own
(bench/aggworker.py), on two targets in one run:

- canned: the canned-response endpoint (bench/canned.py) serves the readings and takes the
  PutRecords, so only the contender's CPU is measured: the ceiling of the code itself.
- emulators: kinesalite holds the readings (preloaded) and the output streams; the service's
  leases and state go to dynalite.

CPU is the contender's own (time.process_time), between a tenth of the readings read and all
of them: start-up, the first polls and the tail are left out for both. Both put the same
windows (a window is closed once its unicorn's latest StatusTime is 60 s past its end): the
table says whether the distinct window records they put are the same.

Scale-out: a shard takes 1,000 records a second, so 1,000 shards of raw readings at their
write limit carry 1,000,000 readings a second; a pod running one process on one core needs
readings-per-CPU-second of them.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import pstats
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from aiobotocore.session import get_session

from bench.canned import canned_server, canned_stats
from bench.readings import UNICORNS, readings
from wildrydes_stream.admin.provision import ensure_stream
from wildrydes_stream.local.emulators import Emulator

CONTENDERS = ("port", "aggregate")
READINGS = 200_000
SHARDS = 4
SOURCE = "raw-readings"
SHARD_WRITE_LIMIT = 1_000
"""Records a second one shard takes."""
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass
class AggResult:
    target: str
    contender: str
    readings: int
    read: int
    put: int
    distinct: int
    digest: str
    cpu: float
    """CPU seconds between a tenth of the readings read and all of them."""
    measured: int
    """Readings read between the two marks."""
    wall: float
    total_cpu: float
    dead_lettered: int = 0

    @property
    def readings_per_cpu_second(self) -> float:
        return self.measured / max(self.cpu, 1e-9)

    @property
    def pods_per_1000_shards(self) -> float:
        return 1000 * SHARD_WRITE_LIMIT / self.readings_per_cpu_second


def run(
    count: int,
    emulator_count: int,
    unicorns: int = UNICORNS,
    limit: int = 10_000,
    overrides: dict[str, str] | None = None,
    loop: str = "uvloop",
    profile: str | None = None,
    contenders: tuple[str, ...] = CONTENDERS,
) -> list[AggResult]:
    common = {"limit": limit, "settings": overrides or {}, "loop": loop}
    results: list[AggResult] = []
    if count > 0:
        results += run_canned(count, unicorns, common, profile, contenders)
    if emulator_count > 0:
        results += asyncio.run(run_emulators(emulator_count, unicorns, common, contenders))
    return results


def run_canned(
    count: int,
    unicorns: int,
    common: dict[str, Any],
    profile: str | None,
    contenders: tuple[str, ...],
) -> list[AggResult]:
    results = []
    with canned_server(0, 10_000, raw_readings=count, unicorns=unicorns) as endpoint:
        env = _endpoints(endpoint, endpoint)
        for n, contender in enumerate(contenders):
            output = f"out-{contender}"
            spec: dict[str, Any] = {
                **common,
                "mode": contender,
                "source": SOURCE,
                "output": output,
                "lease_table": f"leases-agg-{n}",
                "total": count,
            }
            if profile:
                os.makedirs(profile, exist_ok=True)
                spec["profile"] = os.path.join(profile, f"aggregate-{contender}.prof")
            outcome = _worker(spec, env)
            stats = canned_stats(endpoint)
            result = _result("canned", contender, count, outcome)
            result.distinct = stats["put_distinct"].get(output, 0)
            result.digest = stats["put_digest"].get(output, "")
            _report(result)
            results.append(result)
    return results


async def run_emulators(
    count: int, unicorns: int, common: dict[str, Any], contenders: tuple[str, ...]
) -> list[AggResult]:
    results = []
    with Emulator.start("kinesalite") as kinesalite, Emulator.start("dynalite") as dynalite:
        env = _endpoints(kinesalite.endpoint, dynalite.endpoint)
        os.environ.update(env)
        async with get_session().create_client("kinesis") as kinesis:
            await ensure_stream(kinesis, SOURCE, SHARDS)
            started = time.perf_counter()
            await _preload(kinesis, readings(count, unicorns))
            print(f"preloaded {count} readings in {time.perf_counter() - started:.1f}s")
            for n, contender in enumerate(contenders):
                output = f"out-{contender}"
                await ensure_stream(kinesis, output, 1)
                spec = {
                    **common,
                    "mode": contender,
                    "source": SOURCE,
                    "output": output,
                    "lease_table": f"agg-leases-{n}",
                    "total": count,
                }
                outcome = await asyncio.to_thread(_worker, spec, env)
                result = _result("emulators", contender, count, outcome)
                data = await _read_all(kinesis, output)
                result.distinct = len(data)
                result.digest = _digest(data)
                _report(result)
                results.append(result)
    return results


async def _preload(kinesis: Any, entries: list[tuple[str, bytes]]) -> None:
    """PutRecords in batches of 500, four at a time."""
    batches = [
        [{"Data": data, "PartitionKey": name} for name, data in entries[i : i + 500]]
        for i in range(0, len(entries), 500)
    ]
    semaphore = asyncio.Semaphore(4)

    async def put(batch: list[dict[str, Any]]) -> None:
        async with semaphore:
            while batch:
                response = await kinesis.put_records(StreamName=SOURCE, Records=batch)
                batch = [
                    e for e, r in zip(batch, response["Records"], strict=True) if "ErrorCode" in r
                ]

    # In order, four at a time: a unicorn's readings can swap places by a few seconds at most,
    # far less than the 60 s lateness both contenders allow.
    await asyncio.gather(*(put(b) for b in batches))


async def _read_all(kinesis: Any, stream: str) -> set[bytes]:
    data: set[bytes] = set()
    for shard in (await kinesis.list_shards(StreamName=stream))["Shards"]:
        iterator = (
            await kinesis.get_shard_iterator(
                StreamName=stream, ShardId=shard["ShardId"], ShardIteratorType="TRIM_HORIZON"
            )
        )["ShardIterator"]
        while iterator:
            response = await kinesis.get_records(ShardIterator=iterator, Limit=10_000)
            if not response["Records"]:
                break
            data.update(r["Data"] for r in response["Records"])
            iterator = response.get("NextShardIterator")
    return data


def _digest(data: set[bytes]) -> str:
    return hashlib.sha256(b"\n".join(sorted(data))).hexdigest()


def _endpoints(kinesis: str, dynamodb: str) -> dict[str, str]:
    return {
        **CREDENTIALS,
        "AWS_ENDPOINT_URL_KINESIS": kinesis,
        "AWS_ENDPOINT_URL_DYNAMODB": dynamodb,
    }


def _worker(spec: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    completed = subprocess.run(
        [sys.executable, "-m", "bench.aggworker", json.dumps(spec)],
        env={**environ, **env},
        stdout=subprocess.PIPE,
        check=True,
        timeout=900,
    )
    result: dict[str, Any] = json.loads(completed.stdout.decode().strip().splitlines()[-1])
    return result


def _result(target: str, contender: str, count: int, run: dict[str, Any]) -> AggResult:
    if "last" not in run or "first" not in run:
        raise RuntimeError(f"{target} {contender}: read {run.get('read')} of {count} readings")
    return AggResult(
        target,
        contender,
        count,
        run["read"],
        run["put"],
        0,
        "",
        run["last"] - run["first"],
        run["last_read"] - run["first_read"],
        run["wall"],
        run["cpu"],
        run.get("dead_lettered", 0),
    )


def _report(r: AggResult) -> None:
    problems = []
    if r.read != r.readings:
        problems.append(f"READ {r.read} OF {r.readings}")
    if r.dead_lettered:
        problems.append(f"{r.dead_lettered} dead-lettered")
    print(
        f"{r.target:9} {r.contender:10} {r.readings:>7} readings {r.wall:6.2f}s wall "
        f"{r.total_cpu:6.2f}s CPU, {r.cpu:.2f}s of it for {r.measured} readings"
        + ("  " + "; ".join(problems) if problems else ""),
        flush=True,
    )


def ok(results: list[AggResult]) -> bool:
    """Every reading read, and both contenders put the same windows on each target."""
    by_target: dict[str, set[str]] = {}
    for r in results:
        by_target.setdefault(r.target, set()).add(r.digest)
    return all(r.read == r.readings and r.distinct > 0 for r in results) and all(
        len(digests) == 1 for digests in by_target.values()
    )


def print_table(results: list[AggResult], copier: float | None = None) -> None:
    port = {r.target: r for r in results if r.contender == "port"}
    first = results[0]
    print(
        f"aggregator: {first.readings:,} per-second readings, {SHARDS} shards; CPU between a "
        "tenth and all of them read"
    )
    header = (
        f"{'target':9} {'contender':10} {'readings':>8} {'windows':>8} "
        f"{'readings/CPU-s':>14} {'vs port':>8} {'pods/1k shards':>14}  same windows"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        base = port.get(r.target)
        ratio = r.readings_per_cpu_second / base.readings_per_cpu_second if base else None
        same = "" if base is None or base is r else ("yes" if base.digest == r.digest else "NO")
        print(
            f"{r.target:9} {r.contender:10} {r.read:>8} {r.distinct:>8} "
            f"{r.readings_per_cpu_second:>14,.0f} "
            + (f"{ratio:>7.2f}x" if ratio is not None else f"{'':>8}")
            + f" {r.pods_per_1000_shards:>14.1f}  {same}"
        )
    if copier is not None:
        print(f"copier (canned, fast): {copier:,.0f} records per CPU-second, from the table above")
    print(
        f"pods/1k shards: cores to keep up with 1,000 shards written at {SHARD_WRITE_LIMIT:,} "
        "readings a second each (one process, one core a pod, no headroom)."
    )


def summary(results: list[AggResult]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    by = {(r.target, r.contender): r for r in results}
    agg, port = by.get(("canned", "aggregate")), by.get(("canned", "port"))
    if agg is not None:
        out["aggregate_readings_per_cpu_second"] = round(agg.readings_per_cpu_second)
        out["aggregate_pods_per_1000_shards"] = round(agg.pods_per_1000_shards, 1)
    if port is not None:
        out["aggregate_port_readings_per_cpu_second"] = round(port.readings_per_cpu_second)
    if agg is not None and port is not None:
        out["aggregate_speedup_vs_port"] = round(
            agg.readings_per_cpu_second / port.readings_per_cpu_second, 2
        )
    for r in results:
        out[f"aggregate_{r.target}_{r.contender}"] = {
            "readings": r.readings,
            "read": r.read,
            "windows_put": r.put,
            "distinct_windows": r.distinct,
            "readings_per_cpu_second": round(r.readings_per_cpu_second),
            "cpu_seconds_measured": round(r.cpu, 3),
            "readings_measured": r.measured,
            "cpu_seconds": round(r.total_cpu, 3),
            "wall_seconds": round(r.wall, 3),
            "pods_per_1000_shards": round(r.pods_per_1000_shards, 1),
        }
    return out


def print_profile(path: str, top: int = 14) -> None:
    """The costliest functions of a profiled run, by their own time."""
    stats = pstats.Stats(path)
    stats.sort_stats("tottime").print_stats(top)
