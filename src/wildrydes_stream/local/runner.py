"""`wildrydes-stream local`: the whole Wild Rydes pipeline on this machine.

    simulated unicorns -> wildrydes -> aggregate -> wildrydes-aggregated -> run -> table
                                                                            \\-> alerts

kinesalite and dynalite on free loopback ports (each in a session of its own, so Ctrl-C drains
the services before they go), both streams and the table, the fleet putting raw readings, the
aggregator and the copy with its low-magic alerts posted to a webhook served here and printed
as they arrive, and a live summary per stage. With `--duration` the fleet stops after that long,
the stages drain, and every minute of every unicorn must be in the table with the values the
readings give: exit 0 only then. Ctrl-C (or SIGTERM) does the same early.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

from aiobotocore.session import get_session
from prometheus_client import CollectorRegistry

from wildrydes_stream.admin.provision import ensure_stream, ensure_table
from wildrydes_stream.aggregate.app import Aggregator
from wildrydes_stream.config import Settings
from wildrydes_stream.copy.app import Service
from wildrydes_stream.local.emulators import Emulator
from wildrydes_stream.local.fleet import Expected, RawFleet
from wildrydes_stream.local.summary import Counts, LiveSummary, Stage
from wildrydes_stream.local.webhook import AlertReceiver
from wildrydes_stream.records.fields import status_time_to_epoch_ms
from wildrydes_stream.runtime.signals import install_signal_handlers

DRAIN_TIMEOUT = 120.0


@dataclass(frozen=True)
class LocalOptions:
    duration: float | None
    shards: int
    unicorns: int
    speed: float
    kpl: int = 1
    """Readings per Kinesis record in the KPL's aggregate format (1: plain records)."""


def local_settings(settings: Settings, alerts_url: str, speed: float) -> Settings:
    """Settings for a demo: a minute of a ride ends within seconds of its last reading."""
    return settings.replace(
        alert_webhook_url=alerts_url,
        idle_window_timeout_seconds=max(1.0, 120.0 / speed),
    )


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
            AlertReceiver() as alerts,
        ):
            await ensure_stream(kinesis, settings.raw_stream_name, options.shards)
            await ensure_stream(kinesis, settings.stream_name, options.shards)
            await ensure_table(dynamodb, settings)
            pipeline = local_settings(settings, alerts.url, options.speed)
            code = await _run(pipeline, options, kinesis, dynamodb, alerts)
    print("emulators stopped")
    return code


async def _run(
    settings: Settings, options: LocalOptions, kinesis: Any, dynamodb: Any, alerts: AlertReceiver
) -> int:
    fleet = RawFleet(
        kinesis, settings.raw_stream_name, options.unicorns, options.speed, kpl=options.kpl
    )
    # The webhook receiver prints every alert: the log destination's copy would repeat it.
    logging.getLogger("wildrydes_stream.alerts.log").setLevel(logging.ERROR)
    stop_fleet = asyncio.Event()
    install_signal_handlers(stop_fleet.set)
    # Two services, two registries: each exports its own metrics, as two pods would.
    aggregator = Aggregator(settings.replace(http_port=0), CollectorRegistry())
    if settings.http_port and not port_is_free(settings.http_host, settings.http_port):
        print(f"port {settings.http_port} is taken: run serves its metrics on a free port")
        settings = settings.replace(http_port=0)
    copy = Service(settings, CollectorRegistry())
    async with aggregator, copy:
        assert copy.http is not None
        assert aggregator.http is not None
        print(
            f"aggregate metrics on http://127.0.0.1:{aggregator.http.port}/metrics, run metrics"
            f" on http://127.0.0.1:{copy.http.port}/metrics; "
            + (f"running {options.duration:.0f}s" if options.duration else "Ctrl-C stops")
        )
        fleet_task = asyncio.create_task(fleet.run(stop_fleet))
        live = _live_summary(fleet, aggregator, copy, alerts)
        alerts.before_print = live.release
        summary = asyncio.create_task(live.run())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop_fleet.wait(), options.duration)
        stop_fleet.set()
        await fleet_task
        print(f"fleet stopped after {fleet.expected.readings} readings; waiting for the stages")
        complete = await _wait_complete(dynamodb, settings, fleet.expected)
        summary.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await summary
        live.show()
        live.end()
    print(f"aggregate stopped ({'drained' if aggregator.drained_in_time else 'not drained'})")
    print(f"run stopped ({'drained' if copy.drained_in_time else 'not drained'})")
    wrong = await _differences(dynamodb, settings, fleet.expected)
    minutes = len(fleet.expected.minutes)
    if wrong or not complete:
        print(
            f"FAILED: {len(wrong)} of {minutes} unicorn-minutes missing or wrong in "
            f"{settings.table_name}, e.g. {sorted(wrong)[:3]}"
        )
        return 1
    print(
        f"OK: all {minutes} unicorn-minutes of {fleet.expected.readings} readings are in "
        f"{settings.table_name} with the right values; {len(alerts.received)} alerts"
    )
    return 0


def port_is_free(host: str, port: int) -> bool:
    """Whether a server could listen on host:port now (as aiohttp binds: SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


async def _wait_complete(dynamodb: Any, settings: Settings, expected: Expected) -> bool:
    """Until the table holds every expected minute with its values, or the drain times out."""
    deadline = time.monotonic() + DRAIN_TIMEOUT
    while await _differences(dynamodb, settings, expected):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.5)
    return True


def _live_summary(
    fleet: RawFleet, aggregator: Aggregator, copy: Service, alerts: AlertReceiver
) -> LiveSummary:
    def value(service: Aggregator | Service, name: str) -> float:
        registry = service.metrics.registry
        return sum(
            sample.value
            for family in registry.collect()
            for sample in family.samples
            if sample.name == name
        )

    def produced() -> Counts:
        return {"readings": fleet.expected.readings}

    def aggregated() -> Counts:
        return {
            "read": value(aggregator, "wildrydes_records_read_total"),
            "windows": value(aggregator, "wildrydes_aggregate_windows_emitted_total"),
            "open": value(aggregator, "wildrydes_aggregate_windows_open"),
        }

    def copied() -> Counts:
        now = copy.metrics.snapshot()
        return {
            "read": now.read,
            "written": now.written,
            "dead-lettered": now.dead_lettered,
            "lag_s": now.max_behind_seconds,
        }

    def alerted() -> Counts:
        return {"received": len(alerts.received)}

    return LiveSummary(
        [
            Stage("fleet", produced, rated=("readings",)),
            Stage("aggregate", aggregated, rated=("read",)),
            Stage("run", copied, rated=("written",)),
            Stage("alerts", alerted),
        ]
    )


async def _differences(dynamodb: Any, settings: Settings, expected: Expected) -> set[Any]:
    """Expected unicorn-minutes missing from the table or holding other values."""
    found: dict[tuple[str, int], dict[str, str]] = {}
    paginator = dynamodb.get_paginator("scan")
    async for page in paginator.paginate(TableName=settings.table_name, ConsistentRead=True):
        for item in page["Items"]:
            status = item["StatusTime"]
            epoch = int(status["N"]) if "N" in status else status_time_to_epoch_ms(status["S"])
            values = {k: v["N"] for k, v in item.items() if "N" in v and k != "StatusTime"}
            found[(item["Name"]["S"], epoch)] = values
    wrong = set()
    for (name, start), values in expected.minutes.items():
        key = (name, status_time_to_epoch_ms(start))
        got = found.get(key)
        if got is None or any(got.get(field) != str(v) for field, v in values.items()):
            wrong.add((name, start))
    return wrong
