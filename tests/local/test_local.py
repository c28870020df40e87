"""The `local` command (what `make local` runs) and the simulated fleet behind it."""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import time
from datetime import UTC, datetime

import pytest

from tests.helpers import holds, wait_for
from tests.process import ServiceProcess, bare_env, run_to_exit
from wildrydes_stream.local.fleet import Unicorn


def test_a_unicorn_minute_follows_the_workshop_producer_model() -> None:
    unicorn = Unicorn("Shadowfax", random.Random(7))
    start = datetime(2016, 2, 12, tzinfo=UTC)
    first, second = unicorn.minute(start), unicorn.minute(start)

    assert first["StatusTime"] == "2016-02-12 00:00:00.000"
    for minute in (first, second):
        # Distance: 60 seconds of the per-run base in [100, 199] plus 0..19 each second.
        assert 60 * unicorn.base <= minute["Distance"] <= 60 * (unicorn.base + 19)
        assert 100 <= unicorn.base <= 199
        # Points start at 150 and move by at most one a second.
        for low, high in (
            ("MinMagicPoints", "MaxMagicPoints"),
            ("MinHealthPoints", "MaxHealthPoints"),
        ):
            assert 150 - 120 <= minute[low] <= minute[high] <= 150 + 120
            assert minute[high] - minute[low] <= 60
    # The walk goes on from where the last minute left it.
    assert abs(second["MinMagicPoints"] - first["MinMagicPoints"]) <= 120


@pytest.mark.parametrize("kpl", ["1", "5"], ids=["plain", "kpl"])
async def test_local_runs_the_whole_pipeline_and_checks_every_minute_in_the_table(kpl: str) -> None:
    env = bare_env(WILDRYDES_HTTP_PORT="0", WILDRYDES_HTTP_HOST="127.0.0.1")
    # At 600 simulated seconds a real one, 4 s hold 40 simulated minutes of 3 unicorns:
    # raw readings -> aggregate -> wildrydes-aggregated -> run -> the table, with alerts. With
    # --kpl the fleet packs its readings into KPL aggregates, which aggregate splits.
    code, stdout, stderr = await run_to_exit(
        env, "local", "--duration", "4", "--unicorns", "12", "--speed", "600", "--kpl", kpl,
        timeout=120,
    )  # fmt: skip

    assert code == 0, stderr
    produced = re.search(r"fleet stopped after (\d+) readings", stdout)
    assert produced is not None, stdout
    readings = int(produced.group(1))
    assert readings > 0
    ok = re.search(
        r"OK: all (\d+) unicorn-minutes of (\d+) readings are in UnicornSensorData "
        r"with the right values",
        stdout,
    )
    assert ok is not None, stdout
    assert ok.group(2) == produced.group(1)
    # Every reading falls in one of the minutes checked (at most 60 a unicorn-minute).
    assert int(ok.group(1)) * 60 >= readings
    # The live summary shows every stage.
    for stage in ("fleet: readings", "aggregate: read", "run: read", "alerts: received"):
        assert stage in stdout, stage
    for stopped in ("aggregate stopped (drained)", "run stopped (drained)", "emulators stopped"):
        assert stopped in stdout, stopped


async def test_ctrl_c_stops_local_cleanly_and_quickly() -> None:
    # Ctrl-C reaches the whole foreground process group: the emulators must not die first.
    env = bare_env(WILDRYDES_HTTP_PORT="0", WILDRYDES_HTTP_HOST="127.0.0.1")
    local = await ServiceProcess.start(env, "local", "--unicorns", "2", own_group=True)
    try:
        await wait_for(holds(lambda: "fleet: readings" in local.stdout), timeout=60)
        os.killpg(local.pid, signal.SIGINT)
        sent = time.monotonic()
        code = await local.wait(timeout=30)
        took = time.monotonic() - sent
    finally:
        await local.close()
    assert code == 0, local.stderr
    assert took < 10, took
    assert "OK: all" in local.stdout, local.stdout
    assert "Traceback" not in local.stderr, local.stderr


async def test_the_emulators_end_with_local_however_it_ends() -> None:
    # A second Ctrl-C (or kill -9) ends `local` at once, without stopping its emulators:
    # they must notice and go too, rather than linger in their own session.
    env = bare_env(WILDRYDES_HTTP_PORT="0", WILDRYDES_HTTP_HOST="127.0.0.1")
    local = await ServiceProcess.start(env, "local", "--unicorns", "1", own_group=True)
    try:
        await wait_for(holds(lambda: "kinesalite on" in local.stdout), timeout=60)
        ports = [int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", local.stdout)[:2]]
        assert len(ports) == 2, local.stdout
        local.send(signal.SIGKILL)
        await local.wait(timeout=10)

        async def both_gone() -> bool:
            for port in ports:
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                except OSError:
                    continue
                writer.close()
                await writer.wait_closed()
                return False
            return True

        await wait_for(both_gone, timeout=10)
    finally:
        await local.close()
