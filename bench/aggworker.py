"""One measured aggregator run in a process of its own: `python -m bench.aggworker '<spec>'`.

Modes: `port` (bench/port.py, the KDA SQL ported straight) and `aggregate` (the service's
Aggregator, as `wildrydes-stream aggregate` runs it, until caught up). The endpoints come from
the environment (AWS_ENDPOINT_URL_KINESIS / _DYNAMODB). Both note their CPU seconds
(time.process_time: this process only) when a tenth of the readings and when all of them have
been read; the figure is the readings between the two marks over the CPU between them, so
start-up, the first polls and the tail after the last reading are out of it for both.
Prints one JSON line.
"""

from __future__ import annotations

import asyncio
import cProfile
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from typing import Any

from prometheus_client import CollectorRegistry

from bench.port import clock, run_port
from wildrydes_stream.aggregate.app import Aggregator, WindowSink
from wildrydes_stream.config import ENV_PREFIX, Settings, load_settings
from wildrydes_stream.records.envelope import Envelope
from wildrydes_stream.runtime.heap import settle_heap


async def port(spec: dict[str, Any]) -> dict[str, Any]:
    marks: dict[str, float] = {}
    wall = time.perf_counter()
    counts = await run_port(
        spec["source"], spec["output"], spec["limit"], clock(spec["total"], marks)
    )
    return {**marks, **counts, "wall": time.perf_counter() - wall, "cpu": time.process_time()}


async def aggregate(spec: dict[str, Any]) -> dict[str, Any]:
    marks: dict[str, float] = {}
    on_read = clock(spec["total"], marks)
    read = 0
    put_many = WindowSink.put_many

    async def counted(self: WindowSink, envelopes: list[Envelope]) -> None:
        # After the page is merged, as the poller counts a page read once dispatched.
        nonlocal read
        await put_many(self, envelopes)
        read += len(envelopes)
        on_read(read)

    WindowSink.put_many = counted  # type: ignore[method-assign]
    registry = CollectorRegistry()
    wall = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        aggregator = Aggregator(settings(spec, os.path.join(tmp, "deadletter.jsonl")), registry)
        async with aggregator:
            settle_heap()  # as `python -m wildrydes_stream aggregate` does once started
            await aggregator.run_burst()
    wall = time.perf_counter() - wall

    def sample(name: str) -> int:
        return int(registry.get_sample_value(f"wildrydes_{name}") or 0)

    return {
        **marks,
        "read": read,
        "put": sample("aggregate_records_put_total"),
        "duplicates": sample("aggregate_duplicate_readings_total"),
        "dead_lettered": sum(
            int(m.value)
            for family in registry.collect()
            if family.name == "wildrydes_records_dead_lettered"
            for m in family.samples
            if m.name.endswith("_total")
        ),
        "exit_code": aggregator.exit_code,
        "wall": wall,
        "cpu": time.process_time(),
    }


def settings(spec: dict[str, Any], deadletter_file: str) -> Settings:
    """Defaults, except what a benchmark needs, then the `--set` overrides (validated)."""
    overrides: dict[str, str] = spec.get("settings", {})
    parsed = load_settings(environ={f"{ENV_PREFIX}{k.upper()}": v for k, v in overrides.items()})
    changes: dict[str, Any] = {
        "raw_stream_name": spec["source"],
        "stream_name": spec["output"],
        "aggregate_lease_table_name": spec["lease_table"],
        "worker_id": "bench",
        "http_host": "127.0.0.1",
        "http_port": 0,
        "get_records_limit": spec["limit"],
        # The endpoints take any call rate: poll again at once; end a burst quickly.
        "min_poll_interval_seconds": 0.0,
        "idle_poll_interval_seconds": 0.05,
        "deadletter_file": deadletter_file,
        "log_format": "text",
        "log_level": "WARNING",
    }
    if spec.get("profile"):
        # cProfile slows the event loop enough for a renewal to miss its deadline.
        changes["lease_duration_seconds"] = 120.0
    changes.update((name, getattr(parsed, name)) for name in overrides)
    return Settings().replace(**changes)


MODES: dict[str, Callable[[dict[str, Any]], Coroutine[Any, Any, dict[str, Any]]]] = {
    "port": port,
    "aggregate": aggregate,
}


def _run(main: Coroutine[Any, Any, dict[str, Any]], loop: str) -> dict[str, Any]:
    if loop == "asyncio":
        return asyncio.run(main)
    import uvloop

    return uvloop.run(main)


def main() -> None:
    spec = json.loads(sys.argv[1])
    run = MODES[spec["mode"]](spec)
    loop = spec.get("loop", "uvloop")
    if spec.get("profile"):
        # cProfile roughly doubles the CPU: its figures are for finding costs, not reporting.
        profiler = cProfile.Profile(time.process_time)
        result = profiler.runcall(_run, run, loop)
        profiler.dump_stats(spec["profile"])
    else:
        result = _run(run, loop)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
