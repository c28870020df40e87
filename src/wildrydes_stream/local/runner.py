"""`wildrydes-stream local`: emulators, the fleet and the service, all on this machine.

Starts kinesalite and dynalite on free loopback ports, creates a stream and the table, runs the
simulated fleet and the service, and prints a live summary. With `--duration` it stops the fleet
after that long, waits for the service to write everything, and checks every produced record
is in the table: exit 0 only if none is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import dataclass
from typing import Any

from aiobotocore.session import get_session

from wildrydes_stream.cli import install_signal_handlers
from wildrydes_stream.config import Settings
from wildrydes_stream.local.emulators import Emulator
from wildrydes_stream.local.fleet import Fleet
from wildrydes_stream.local.summary import Counts, LiveSummary, Stage
from wildrydes_stream.provision import provision
from wildrydes_stream.records import status_time_to_epoch_ms
from wildrydes_stream.service import Service

SUMMARY_EVERY = 2.0
DRAIN_TIMEOUT = 120.0


@dataclass(frozen=True)
class LocalOptions:
    duration: float | None
    shards: int
    unicorns: int
    rate: float


async def run_local(settings: Settings, options: LocalOptions) -> int:
    with Emulator.start("kinesalite") as kinesalite, Emulator.start("dynalite") as dynalite:
        os.environ.update(
            {
                "AWS_ENDPOINT_URL_KINESIS": kinesalite.endpoint,
                "AWS_ENDPOINT_URL_DYNAMODB": dynalite.endpoint,
                "AWS_ACCESS_KEY_ID": "local",
                "AWS_SECRET_ACCESS_KEY": "local",
            }
        )
        os.environ.setdefault("AWS_DEFAULT_REGION", os.environ.get("AWS_REGION", "us-east-1"))
        print(f"kinesalite on {kinesalite.endpoint}, dynalite on {dynalite.endpoint}")
        session = get_session()
        async with (
            session.create_client("kinesis") as kinesis,
            session.create_client("dynamodb") as dynamodb,
        ):
            await provision(kinesis, dynamodb, settings, options.shards)
            code = await _run(settings, options, kinesis, dynamodb)
    print("emulators stopped")
    return code


async def _run(settings: Settings, options: LocalOptions, kinesis: Any, dynamodb: Any) -> int:
    fleet = Fleet(kinesis, settings.stream_name, options.unicorns, options.rate)
    stop_fleet = asyncio.Event()
    service = Service(settings)
    install_signal_handlers(stop_fleet.set)
    async with service:
        assert service.http is not None
        print(
            f"service up: metrics on http://127.0.0.1:{service.http.port}/metrics; "
            + (f"running {options.duration:.0f}s" if options.duration else "Ctrl-C stops")
        )
        fleet_task = asyncio.create_task(fleet.run(stop_fleet))
        live = _live_summary(service, fleet)
        summary = asyncio.create_task(live.run())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop_fleet.wait(), options.duration)
        stop_fleet.set()
        await fleet_task
        summary.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await summary
        print(f"fleet stopped after {len(fleet.produced)} records; waiting for the service")
        drained = await _wait_written(service, len(fleet.produced))
        live.show()
        live.end()
    print(f"service stopped ({'drained' if service.drained_in_time else 'not drained'})")
    missing = await _missing(dynamodb, settings.table_name, fleet.produced)
    if missing or not drained:
        print(
            f"FAILED: {len(missing)} of {len(fleet.produced)} records missing from "
            f"{settings.table_name}"
        )
        return 1
    print(f"OK: all {len(fleet.produced)} records are in {settings.table_name}")
    return 0


async def _wait_written(service: Service, produced: int) -> bool:
    deadline = time.monotonic() + DRAIN_TIMEOUT
    while service.metrics.snapshot().finished < produced:
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.1)
    return True


def _live_summary(service: Service, fleet: Fleet) -> LiveSummary:
    def produced() -> Counts:
        return {"produced": len(fleet.produced)}

    def copied() -> Counts:
        now = service.metrics.snapshot()
        return {
            "read": now.read,
            "written": now.written,
            "dead-lettered": now.dead_lettered,
            "queued": now.queued,
            "lag_s": now.max_behind_seconds,
        }

    return LiveSummary(
        [
            Stage("fleet", produced, rated=("produced",)),
            Stage("copy", copied, rated=("read", "written")),
        ]
    )


async def _missing(dynamodb: Any, table: str, produced: set[tuple[str, int]]) -> set[Any]:
    found: set[tuple[str, int]] = set()
    paginator = dynamodb.get_paginator("scan")
    async for page in paginator.paginate(
        TableName=table,
        ConsistentRead=True,
        ProjectionExpression="#n, StatusTime",
        ExpressionAttributeNames={"#n": "Name"},
    ):
        for item in page["Items"]:
            status = item["StatusTime"]
            epoch = int(status["N"]) if "N" in status else status_time_to_epoch_ms(status["S"])
            found.add((item["Name"]["S"], epoch))
    return produced - found
