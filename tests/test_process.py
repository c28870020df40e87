"""The real service as a child process: signals, restarts, bad settings, HTTP, --help.

Each test starts `python -m wildrydes_stream run` (with this interpreter) configured only by
WILDRYDES_* variables and the emulator endpoints, reads its JSON log lines on stderr and waits on
conditions (log lines, HTTP answers, table contents, lease checkpoints), never on a fixed sleep.
"""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Emulators, ReadMode
from tests.helpers import put_records, scan_table, unicorn_day, unicorn_records, wait_for
from tests.process import (
    PYTHON,
    ServiceProcess,
    StallingProxy,
    bare_env,
    run_to_exit,
    service_env,
)
from wildrydes_stream.admin.provision import ensure_stream
from wildrydes_stream.config import Settings
from wildrydes_stream.consumer.lease import Lease
from wildrydes_stream.consumer.leases import LeaseTable
from wildrydes_stream.records.fields import status_time_to_epoch_ms

pytestmark = [pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
UNICORNS = ("Shadowfax", "Rocinante", "Bucephalus", "Pegasus", "Epona", "Artax")

Spawn = Callable[[dict[str, str]], Awaitable[ServiceProcess]]


@pytest.fixture
async def spawn() -> AsyncIterator[Spawn]:
    """Start `python -m wildrydes_stream run`; every child is killed and reaped at teardown."""
    children: list[ServiceProcess] = []

    async def start(env: dict[str, str]) -> ServiceProcess:
        child = await ServiceProcess.start(env, "run")
        children.append(child)
        return child

    yield start
    for child in children:
        await child.close()


def last_sequence_per_shard(results: list[dict[str, Any]]) -> dict[str, int]:
    last: dict[str, int] = {}
    for result in results:
        shard, sequence = result["ShardId"], int(result["SequenceNumber"])
        last[shard] = max(last.get(shard, 0), sequence)
    return last


async def leases_of(dynamodb: Any, settings: Settings) -> dict[str, Lease]:
    return await LeaseTable(dynamodb, settings.lease_table_name, "test-reader").all()


def item_keys(items: list[dict[str, Any]]) -> set[tuple[str, str]]:
    return {(i["Name"]["S"], i["StatusTime"]["N"]) for i in items}


def keys_of(records: list[dict[str, Any]]) -> set[tuple[str, str]]:
    return {(r["Name"], str(status_time_to_epoch_ms(r["StatusTime"]))) for r in records}


async def wait_written(service: ServiceProcess, count: int, timeout: float = 30.0) -> None:
    """Until the service's /metrics counts `count` records written (cheap to poll, unlike a
    scan of the table, which slows the emulator the service writes to); callers then check
    the table itself."""

    async def written() -> bool:
        status, text = await service.get("/metrics")
        return status == 200 and metric_total(text, "wildrydes_records_written_total") >= count

    await wait_for(written, timeout=timeout)


def metric_total(text: str, sample: str) -> float:
    """Sum of every sample called `sample` (all label values) in a /metrics page."""
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == sample
    )


def documented_metrics() -> list[tuple[str, str]]:
    """(name, type) of every row of the metric tables of `run` in docs/operating.md (those of
    both services and those of `run` only)."""
    text = (ROOT / "docs" / "operating.md").read_text()
    rows = []
    for block in ("core", "run"):
        section = text.split(f"<!-- metrics:{block} -->", 1)[1].split("<!-- /metrics:", 1)[0]
        rows += re.findall(r"^\| `(wildrydes_\w+)` \| (\w+) \|", section, flags=re.MULTILINE)
    assert len(rows) >= 20, "the metric tables of docs/operating.md were not found"
    return rows


# 1. SIGTERM: drain, final checkpoint, release, exit 0.


async def test_sigterm_drains_checkpoints_the_last_record_releases_leases_and_exits_0(
    resources: Settings,
    aws_env: dict[str, str],
    kinesis: Any,
    dynamodb: Any,
    spawn: Spawn,
    read_mode: ReadMode,
) -> None:
    resources = await read_mode.apply(resources)
    records = unicorn_records(UNICORNS, minutes=50)
    last = last_sequence_per_shard(await put_records(kinesis, resources.stream_name, records))
    # No periodic checkpoint during the test: whatever is stored was stored by the stop.
    env = service_env(resources, aws_env, checkpoint_interval_seconds=3600.0)
    service = await spawn(env)
    await service.started()
    assert service.find_log("service started")["event_loop"] == "uvloop"  # type: ignore[index]

    await wait_written(service, len(records))
    items = await scan_table(dynamodb, resources.table_name)
    assert item_keys(items) == keys_of(records)
    before = await leases_of(dynamodb, resources)
    assert len(before) == 4
    assert all(lease.owner == resources.worker_id for lease in before.values())
    assert all(lease.checkpoint == "TRIM_HORIZON" for lease in before.values())

    service.send(signal.SIGTERM)
    sent = time.monotonic()
    code = await service.wait(timeout=resources.shutdown_grace_seconds + 5)
    assert code == 0, service.stderr
    assert time.monotonic() - sent < resources.shutdown_grace_seconds
    stopped = service.find_log("stopped")
    assert stopped is not None
    assert stopped["drained"] is True

    after = await leases_of(dynamodb, resources)
    assert set(after) == set(before)
    for shard, sequence in last.items():
        assert after[shard].checkpoint == str(sequence), shard
    assert all(lease.owner is None for lease in after.values())


# 2. SIGKILL mid-stream, more records, restart: resumes from the checkpoint, loses nothing.


async def test_restart_after_sigkill_resumes_from_the_checkpoint_and_loses_nothing(
    resources: Settings,
    aws_env: dict[str, str],
    kinesis: Any,
    dynamodb: Any,
    spawn: Spawn,
    read_mode: ReadMode,
) -> None:
    resources = await read_mode.apply(resources)
    day = unicorn_day()
    first = [{**r, "Name": name} for name in UNICORNS for r in day[:100]]
    second = [{**r, "Name": name} for name in UNICORNS for r in day[100:150]]
    results = await put_records(kinesis, resources.stream_name, first)
    shards_with_data = set(last_sequence_per_shard(results))

    # Slow reading (10 records a call, 10 calls a second per shard) so the kill lands mid-stream;
    # by subscription, as slow: 10 records an event, 10 events a second.
    read_mode.slow(records_per_event=10, interval_seconds=0.1)
    slow = service_env(
        resources,
        aws_env,
        worker_id="first",
        get_records_limit=10,
        min_poll_interval_seconds=0.1,
    )
    victim = await spawn(slow)
    await victim.started()

    async def every_shard_checkpointed() -> bool:
        leases = await leases_of(dynamodb, resources)
        return all(
            shard in leases and leases[shard].checkpoint.isdigit() for shard in shards_with_data
        )

    await wait_for(every_shard_checkpointed, timeout=30)
    victim.send(signal.SIGKILL)
    assert await victim.wait(timeout=10) == -signal.SIGKILL
    assert victim.find_log("stopping: draining in-flight records") is None

    checkpoints = {
        s: int(lease.checkpoint)
        for s, lease in (await leases_of(dynamodb, resources)).items()
        if lease.checkpoint.isdigit()
    }
    last = last_sequence_per_shard(results)
    assert any(checkpoints[s] < last[s] for s in shards_with_data), "killed after the end"
    assert all(lease.owner == "first" for lease in (await leases_of(dynamodb, resources)).values())

    results += await put_records(kinesis, resources.stream_name, second)
    # Records the restart must read: those after its shard's checkpoint, nothing before it.
    after_checkpoint = sum(
        1 for r in results if int(r["SequenceNumber"]) > checkpoints.get(r["ShardId"], -1)
    )
    total = len(first) + len(second)
    assert 0 < after_checkpoint < total

    # Another worker id, as a restarted pod has: it takes the dead worker's leases once they
    # expire (kept short here), from their checkpoints.
    fast = service_env(resources, aws_env, worker_id="second", lease_duration_seconds=1.0)
    read_mode.slow(records_per_event=1000, interval_seconds=0.0)  # back to full speed
    survivor = await spawn(fast)
    await survivor.started()

    await wait_written(survivor, after_checkpoint)
    items = await scan_table(dynamodb, resources.table_name)
    assert item_keys(items) == keys_of(first + second)

    status, metrics = await survivor.get("/metrics")
    assert status == 200
    assert metric_total(metrics, "wildrydes_records_read_total") == after_checkpoint


# 3. A bad setting: exit 2, one line naming it, no traceback.


@pytest.mark.parametrize(
    ("variables", "toml", "names"),
    [
        ({"WILDRYDES_BATCH_SIZE": "abc"}, None, ("WILDRYDES_BATCH_SIZE", "abc")),
        ({"WILDRYDES_BATCH_SIZE": "30"}, None, ("WILDRYDES_BATCH_SIZE", "30", "1..25")),
        (
            {"WILDRYDES_STARTING_POSITION": "SIDEWAYS"},
            None,
            ("WILDRYDES_STARTING_POSITION", "SIDEWAYS", "TRIM_HORIZON"),
        ),
        ({}, "batch_sise = 10\n", ("batch_sise", "settings.toml")),
        ({}, "batch_size = 30\n", ("batch_size", "settings.toml")),
        ({"WILDRYDES_BATCH_SIZE": "10"}, "queue_size = 'big'\n", ("queue_size", "big")),
    ],
    ids=[
        "env-not-a-number",
        "env-out-of-range",
        "env-not-a-choice",
        "file-unknown-key",
        "file-out-of-range",
        "file-wrong-type",
    ],
)
async def test_a_bad_setting_exits_2_with_one_line_naming_it(
    tmp_path: Path, variables: dict[str, str], toml: str | None, names: tuple[str, ...]
) -> None:
    args = ["run"]
    if toml is not None:
        config = tmp_path / "settings.toml"
        config.write_text(toml)
        args = ["--config", str(config), "run"]
    code, stdout, stderr = await run_to_exit(bare_env(**variables), *args)
    assert code == 2, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("wildrydes-stream: ")
    for name in names:
        assert name in lines[0]
    assert "Traceback" not in stderr
    assert stdout == ""


# 4. A missing stream or table: one line naming which, non-zero exit.


async def test_missing_stream_is_one_line_naming_the_stream(
    settings: Settings, aws_env: dict[str, str]
) -> None:
    code, _, stderr = await run_to_exit(service_env(settings, aws_env), "run")
    assert code != 0
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert "stream" in lines[0]
    assert repr(settings.stream_name) in lines[0]
    assert settings.table_name not in lines[0]
    assert "Traceback" not in stderr


async def test_missing_table_is_one_line_naming_the_table(
    settings: Settings, aws_env: dict[str, str], kinesis: Any
) -> None:
    await ensure_stream(kinesis, settings.stream_name, 1)
    code, _, stderr = await run_to_exit(service_env(settings, aws_env), "run")
    assert code != 0
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert "table" in lines[0]
    assert repr(settings.table_name) in lines[0]
    assert settings.stream_name not in lines[0]
    assert "Traceback" not in stderr


async def test_unreachable_endpoint_is_one_line_not_a_traceback(
    settings: Settings, aws_env: dict[str, str]
) -> None:
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    env = service_env(settings, {**aws_env, "AWS_ENDPOINT_URL_KINESIS": f"http://127.0.0.1:{port}"})
    code, _, stderr = await run_to_exit(env, "run")
    assert code == 1
    assert stderr.splitlines() == [stderr.strip()], stderr
    assert f"127.0.0.1:{port}" in stderr
    assert "Traceback" not in stderr


async def test_metrics_port_in_use_is_one_line_naming_the_setting(
    resources: Settings, aws_env: dict[str, str]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = service_env(resources, aws_env, http_host="127.0.0.1", http_port=port)
        code, _, stderr = await run_to_exit(env, "run")
    assert code == 1
    assert stderr.splitlines() == [stderr.strip()], stderr
    assert f"127.0.0.1:{port}" in stderr
    assert "WILDRYDES_HTTP_PORT" in stderr


async def test_unwritable_dead_letter_file_is_one_line_naming_the_setting(
    resources: Settings, aws_env: dict[str, str], tmp_path: Path
) -> None:
    missing_dir = tmp_path / "no-such-dir" / "deadletter.jsonl"
    env = service_env(resources, aws_env, deadletter_file=str(missing_dir))
    code, _, stderr = await run_to_exit(env, "run")
    assert code == 2  # a setting that cannot work (docs/operating.md, "Exit codes")
    assert stderr.splitlines() == [stderr.strip()], stderr
    assert str(missing_dir) in stderr
    assert "WILDRYDES_DEADLETTER_FILE" in stderr


# 5. /readyz, /healthz and /metrics from the running process.


async def test_the_process_serves_readyz_healthz_and_the_documented_metrics(
    resources: Settings, aws_env: dict[str, str], kinesis: Any, dynamodb: Any, spawn: Spawn
) -> None:
    records = unicorn_records(UNICORNS[:2], minutes=20)
    await put_records(kinesis, resources.stream_name, records)
    # On the standard event loop (the event_loop setting); the other tests run on uvloop.
    service = await spawn(service_env(resources, aws_env, event_loop="asyncio"))
    await service.started()
    assert service.find_log("service started")["event_loop"] == "asyncio"  # type: ignore[index]

    async def ready() -> bool:
        return (await service.get("/readyz"))[0] == 200

    await wait_for(ready, timeout=10)
    assert await service.get("/healthz") == (200, "ok\n")

    await wait_written(service, len(records))
    assert len(await scan_table(dynamodb, resources.table_name)) == len(records)
    status, text = await service.get("/metrics")
    assert status == 200
    families = {family.name: family for family in text_string_to_metric_families(text)}
    for name, kind in documented_metrics():
        # The text format names a counter's family without `_total`, its samples with it.
        family = families.get(name) or families.get(name.removesuffix("_total"))
        assert family is not None, f"{name} (in docs/operating.md) is not served at /metrics"
        assert family.type == kind, name
    assert metric_total(text, "wildrydes_records_read_total") == len(records)
    assert metric_total(text, "wildrydes_shards_owned") == 4


# 6. A second signal during a slow drain exits at once, non-zero.


async def test_a_second_signal_during_a_drain_exits_at_once_non_zero(
    resources: Settings,
    aws_env: dict[str, str],
    emulators: Emulators,
    kinesis: Any,
    spawn: Spawn,
) -> None:
    await put_records(kinesis, resources.stream_name, unicorn_records(UNICORNS[:2], minutes=10))
    async with StallingProxy(emulators.dynamodb.endpoint, {"BatchWriteItem"}) as proxy:
        grace = 60.0
        env = service_env(resources, aws_env, shutdown_grace_seconds=grace)
        env["AWS_ENDPOINT_URL_DYNAMODB"] = proxy.endpoint  # writes hang; the rest goes through
        service = await spawn(env)
        await service.started()
        await asyncio.wait_for(proxy.stalled.wait(), timeout=30)

        service.send(signal.SIGTERM)
        await service.wait_log("stopping: draining in-flight records", timeout=10)
        # Still draining: alive, not ready any more, but live.
        assert (await service.get("/readyz"))[0] == 503
        assert (await service.get("/healthz"))[0] == 200
        assert service.returncode is None

        service.send(signal.SIGINT)
        sent = time.monotonic()
        code = await service.wait(timeout=10)
        assert code == 128 + signal.SIGINT, service.stderr
        assert time.monotonic() - sent < 5
        assert service.find_log("second signal received, exiting at once") is not None
        assert service.find_log("stopped") is None


# 7. --help of the module and of the installed command.


@pytest.mark.parametrize(
    ("command", "usage"),
    [
        ([PYTHON, "-m", "wildrydes_stream", "--help"], "usage: wildrydes-stream"),
        (
            [str(Path(PYTHON).parent / "wildrydes-stream"), "run", "--help"],
            "usage: wildrydes-stream run",
        ),
    ],
    ids=["python-m", "console-script-run"],
)
def test_help_exits_0(command: list[str], usage: str) -> None:
    assert Path(command[0]).exists(), f"{command[0]} is not installed"
    done = subprocess.run(
        command, env=bare_env(), capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(usage)
    assert done.stderr == ""
