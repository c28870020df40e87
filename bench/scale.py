"""Many shards in one process: peak memory while catching up, then CPU while idle.

    python -m bench.scale                              # 256 shards, 40 records of ~1 KB each
    python -m bench.scale --shards 64 --idle-seconds 10

The canned endpoint (bench/canned.py, a process of its own so its CPU is not counted) serves
`--shards` shards holding `--records` records of about `--record-bytes` each, and takes the
writes. The service runs as `python -m wildrydes_stream run` in a child process with its
default settings (one GetRecords a second per caught-up shard, leases renewed every third of
10 s), only the names, a free HTTP port and the endpoints chosen. Its memory and CPU come from
/proc/<pid>: VmHWM (peak resident set) and utime + stime (all of its threads).

1. Catch-up: from start until every record is written (wildrydes_records_written_total and the
   endpoint's count), every shard is owned and every lease is checkpointed at the last record
   of its shard. Reports the wall time, the CPU seconds and the peak RSS (VmHWM) so far.
2. Idle: nothing more to read; for `--idle-seconds` the service is left alone (no scrape) and
   its CPU over that window is reported as a percentage of one core, with the calls a second
   the endpoint saw meanwhile (GetRecords, lease table reads and writes).

With `--read-mode fanout` the service reads with `read_mode=fanout` from the local
SubscribeToShard server of the tests (tests/fanoutserver.py, HTTP/2 cleartext, real event-stream
frames) run in this process (so its CPU is not counted either), holding the same records as the
canned endpoint; the canned endpoint still answers ListShards, the lease table and the writes.
Idle, the server sends each subscription an empty event every `--heartbeat-seconds` (default
5 s: AWS sends one at least every ~5 s on an idle shard), so 256 shards cost ~51 events a second;
the idle calls a second then count `SubscribeToShard` (subscriptions opened) and
`SubscribeToShardEvent` (events pushed).

Ends with one JSON line of the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tests.fanoutserver import FanoutServer, MemoryFeed, Record
from tests.process import ServiceProcess, service_env
from tests.test_process import metric_total

from bench.canned import Canned, canned_server, canned_stats
from wildrydes_stream.config import Settings

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_DEFAULT_REGION": "us-east-1",
}
TABLE = "items-scale"
LEASE_TABLE = "leases-scale"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
FANOUT_HEARTBEAT_SECONDS = 5.0
"""Empty event a subscription gets without records (AWS: at least every ~5 s)."""


@dataclass
class Scale:
    shards: int
    records: int
    record_bytes: int
    read_mode: str = "polling"
    heartbeat_seconds: float | None = None
    """fanout: the server's empty event on an idle subscription every this many seconds."""
    caught_up: bool = False
    catch_up_seconds: float = 0.0
    """Wall seconds from starting the process to every record written and checkpointed."""
    catch_up_cpu_seconds: float = 0.0
    peak_rss_mb: float = 0.0
    """VmHWM once caught up: start-up and catch-up."""
    idle_seconds: float = 0.0
    idle_cpu_seconds: float = 0.0
    idle_rss_mb: float = 0.0
    """VmRSS at the end of the idle window."""
    idle_peak_rss_mb: float = 0.0
    """VmHWM at the end of the idle window."""
    idle_calls_per_second: dict[str, float] = field(default_factory=dict)
    """Calls a second the endpoint saw during the idle window, by operation."""

    @property
    def idle_core_percent(self) -> float:
        return 100 * self.idle_cpu_seconds / self.idle_seconds if self.idle_seconds else 0.0

    @property
    def idle_get_records_per_second(self) -> float:
        return self.idle_calls_per_second.get("GetRecords", 0.0)

    def figures(self) -> dict[str, Any]:
        out = asdict(self)
        out["idle_core_percent"] = round(self.idle_core_percent, 2)
        out["idle_get_records_per_second"] = round(self.idle_get_records_per_second, 1)
        for name, value in out.items():
            if isinstance(value, float):
                out[name] = round(value, 3)
        out["idle_calls_per_second"] = {
            k: round(v, 1) for k, v in sorted(self.idle_calls_per_second.items())
        }
        return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    # The command name (field 2) is in parentheses and may hold spaces: split after it.
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def memory_mb(pid: int, name: str) -> float:
    """A /proc/<pid>/status memory line (VmHWM, VmRSS) in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return int(line.split()[1]) / 1024
    raise LookupError(f"no {name} in /proc/{pid}/status")


async def wait_for(
    condition: Callable[[], Awaitable[bool]], timeout: float, what: str, interval: float = 0.25
) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not {what} within {timeout:.0f} s")
        await asyncio.sleep(interval)


async def measure(
    shards: int = 256,
    records: int = 10_240,
    record_bytes: int = 1000,
    idle_seconds: float = 20.0,
    timeout: float = 300.0,
    settings: dict[str, str] | None = None,
    read_mode: str = "polling",
    heartbeat_seconds: float = FANOUT_HEARTBEAT_SECONDS,
) -> Scale:
    """Catch up `shards` shards of the canned endpoint, then sit idle: see the module doc."""
    fanout = read_mode == "fanout"
    result = Scale(shards, records, record_bytes, read_mode, heartbeat_seconds if fanout else None)
    server: FanoutServer | None = None
    with (
        tempfile.TemporaryDirectory() as tmp,
        canned_server(records, 1000, shards, record_bytes) as endpoint,
    ):
        if fanout:
            feed = canned_feed(records, shards, record_bytes)
            server = await FanoutServer(feed, heartbeat_seconds=heartbeat_seconds).start()
            settings = {
                **(settings or {}),
                "read_mode": "fanout",
                "fanout_endpoint_url": server.url,
            }
        chosen = Settings(
            stream_name="scale",
            table_name=TABLE,
            lease_table_name=LEASE_TABLE,
            worker_id="scale",
            http_host="127.0.0.1",
            http_port=0,
            deadletter_file=str(Path(tmp) / "deadletter.jsonl"),
        )
        env = service_env(
            chosen,
            {
                **CREDENTIALS,
                "AWS_ENDPOINT_URL_KINESIS": endpoint,
                "AWS_ENDPOINT_URL_DYNAMODB": endpoint,
            },
        )
        env.update({f"WILDRYDES_{k.upper()}": v for k, v in (settings or {}).items()})
        began = time.monotonic()
        child = await ServiceProcess.start(env, "run")
        try:
            await child.started(timeout=60)
            stats: dict[str, Any] = {}

            async def caught_up() -> bool:
                nonlocal stats
                if child.returncode is not None:
                    raise RuntimeError(f"service exited with {child.returncode}:\n{child.stderr}")
                status, text = await child.get("/metrics")
                if status != 200:
                    return False
                if metric_total(text, "wildrydes_records_written_total") < records:
                    return False
                if metric_total(text, "wildrydes_shards_owned") < shards:
                    return False
                stats = await asyncio.to_thread(canned_stats, endpoint)
                return bool(
                    stats["written"].get(TABLE, 0) >= records
                    and stats["at_end"].get(LEASE_TABLE, 0) >= shards
                )

            await wait_for(caught_up, timeout, f"caught up on {shards} shards")
            result.caught_up = True
            result.catch_up_seconds = time.monotonic() - began
            result.catch_up_cpu_seconds = cpu_seconds(child.pid)
            result.peak_rss_mb = memory_mb(child.pid, "VmHWM")
            print(
                f"scale: {shards} shards ({read_mode}), {records} records of {record_bytes} B "
                "caught up in "
                f"{result.catch_up_seconds:.1f} s, {result.catch_up_cpu_seconds:.2f} s CPU, "
                f"peak RSS {result.peak_rss_mb:.0f} MiB",
                flush=True,
            )

            # The idle window: the service is left alone, read only through /proc at both ends.
            before = await asyncio.to_thread(canned_stats, endpoint)
            pushed = fanout_calls(server)
            cpu, start = cpu_seconds(child.pid), time.monotonic()
            await asyncio.sleep(idle_seconds)
            cpu, wall = cpu_seconds(child.pid) - cpu, time.monotonic() - start
            after = await asyncio.to_thread(canned_stats, endpoint)
            for op, n in fanout_calls(server).items():
                before["calls"][op] = pushed[op]
                after["calls"][op] = n
            result.idle_seconds, result.idle_cpu_seconds = wall, cpu
            result.idle_rss_mb = memory_mb(child.pid, "VmRSS")
            result.idle_peak_rss_mb = memory_mb(child.pid, "VmHWM")
            result.idle_calls_per_second = {
                op: (n - before["calls"].get(op, 0)) / wall
                for op, n in after["calls"].items()
                if n > before["calls"].get(op, 0)
            }
            written = after["written"].get(TABLE, 0) - before["written"].get(TABLE, 0)
            calls = ", ".join(
                f"{op} {rate:.1f}/s" for op, rate in sorted(result.idle_calls_per_second.items())
            )
            print(
                f"scale: idle {wall:.1f} s: {cpu:.2f} s CPU = {result.idle_core_percent:.1f}% "
                f"of a core, RSS {result.idle_rss_mb:.0f} MiB; endpoint calls: {calls}"
                + (f"; {written} MORE ITEMS WRITTEN" if written else ""),
                flush=True,
            )
            child.send(signal.SIGTERM)
            await child.wait(timeout=60)
        finally:
            await child.close()
            if server is not None:
                await server.stop()
    return result


def canned_feed(records: int, shards: int, record_bytes: int) -> MemoryFeed:
    """The fan-out server's shards holding what the canned endpoint's do (same records, same
    sequence numbers, so its lease checks hold)."""
    canned = Canned(records, 1000, shards, record_bytes)
    feed = MemoryFeed("scale", shards=0)
    for shard_id, page in zip(canned.shards, canned.pages, strict=True):
        shard = feed.add_shard(shard_id)
        for entry in map(json.loads, page):
            shard.records.append(
                Record(
                    int(entry["SequenceNumber"]),
                    base64.b64decode(entry["Data"]),
                    entry["PartitionKey"],
                    entry["ApproximateArrivalTimestamp"],
                )
            )
    return feed


def fanout_calls(server: FanoutServer | None) -> dict[str, int]:
    """Subscriptions opened and events pushed so far (none without a server)."""
    if server is None:
        return {}
    return {
        "SubscribeToShard": len(server.subscribed),
        "SubscribeToShardEvent": sum(s.events for s in server.subscribed),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__)
    parser.add_argument("--shards", type=int, default=256)
    parser.add_argument(
        "--records", type=int, default=0, help="records in all (default: 40 a shard)"
    )
    parser.add_argument("--record-bytes", type=int, default=1000, help="about this size each")
    parser.add_argument("--idle-seconds", type=float, default=20.0, help="the idle window")
    parser.add_argument("--timeout", type=float, default=300.0, help="longest catch-up")
    parser.add_argument("--read-mode", choices=("polling", "fanout"), default="polling")
    parser.add_argument(
        "--heartbeat-seconds",
        type=float,
        default=FANOUT_HEARTBEAT_SECONDS,
        help="fanout: the server's empty event on an idle subscription every this often",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SETTING=VALUE",
        help="a service setting (e.g. idle_poll_interval_seconds=2); repeatable",
    )
    args = parser.parse_args(argv)
    records = args.records or 40 * args.shards
    settings = dict(item.split("=", 1) for item in args.set)
    result = asyncio.run(
        measure(
            args.shards,
            records,
            args.record_bytes,
            args.idle_seconds,
            args.timeout,
            settings,
            args.read_mode,
            args.heartbeat_seconds,
        )
    )
    print(json.dumps(result.figures()))
    return 0 if result.caught_up else 1


if __name__ == "__main__":
    sys.exit(main())
