"""`wildrydes-stream produce`, the workshop's producer: its record format and flags, a fleet,
simulated time, clean stops, retries, and the per-second unicorn model behind it."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import os
import random
import re
import signal
import socket
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.faultproxy import KINESIS_THROTTLED, FaultProxy
from tests.helpers import holds, wait_for
from tests.process import PYTHON, bare_env, run_to_exit
from wildrydes_stream.admin.provision import ensure_stream
from wildrydes_stream.cli import build_parser, main
from wildrydes_stream.produce.model import Reading, Unicorn
from wildrydes_stream.records.kpl import deaggregate
from wildrydes_stream.records.routing import hash_key

FIELDS = [
    "Distance",
    "HealthPoints",
    "Latitude",
    "Longitude",
    "MagicPoints",
    "Name",
    "StatusTime",
]
STATUS_TIME = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\.\d{3}$")
SUMMARY = re.compile(r"^put (\d+) records on (\S+) in [\d.]+ s, (\d+) retries$")

_streams = itertools.count()


async def new_stream(kinesis: Any, shards: int = 1) -> str:
    name = f"produce-{os.getpid()}-{next(_streams)}"
    await ensure_stream(kinesis, name, shards)
    return name


async def read_stream(kinesis: Any, stream: str) -> list[dict[str, Any]]:
    """Every record on the stream, shard by shard from TRIM_HORIZON, in shard order."""
    records: list[dict[str, Any]] = []
    shards = (await kinesis.list_shards(StreamName=stream))["Shards"]
    for shard in shards:
        iterator = (
            await kinesis.get_shard_iterator(
                StreamName=stream, ShardId=shard["ShardId"], ShardIteratorType="TRIM_HORIZON"
            )
        )["ShardIterator"]
        while iterator:
            page = await kinesis.get_records(ShardIterator=iterator)
            records.extend(page["Records"])
            if not page["Records"] and page.get("MillisBehindLatest", 0) == 0:
                break
            iterator = page.get("NextShardIterator")
    return records


def summary(stdout: str) -> tuple[int, str, int]:
    """(records put, stream, retries) from the producer's last line."""
    match = SUMMARY.match(stdout.strip().splitlines()[-1])
    assert match is not None, stdout
    return int(match.group(1)), match.group(2), int(match.group(3))


def parse_time(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=UTC)


# --- the record format, read back from kinesalite -----------------------------------------


async def test_records_have_the_workshop_producers_format(
    kinesis: Any, aws_env: dict[str, str]
) -> None:
    stream = await new_stream(kinesis)
    before = datetime.now(UTC).replace(microsecond=0)
    code, stdout, stderr = await run_to_exit(
        bare_env(**aws_env), "produce", "-name", "Rocinante", "-stream", stream,
        "--count", "3", "--speed", "20",
    )  # fmt: skip
    after = datetime.now(UTC)

    assert code == 0, stderr
    assert stdout.startswith("...\n"), stdout  # a dot per record, then the summary
    assert summary(stdout) == (3, stream, 0)
    records = await read_stream(kinesis, stream)
    assert len(records) == 3
    for record in records:
        data: bytes = record["Data"]
        assert data.endswith(b"}\n"), data
        assert data.count(b"\n") == 1, data
        value = json.loads(data)
        assert list(value) == FIELDS
        assert record["PartitionKey"] == "Rocinante" == value["Name"]
        assert isinstance(value["Distance"], int | float)
        assert not isinstance(value["Distance"], bool)
        for points in ("HealthPoints", "MagicPoints"):
            assert type(value[points]) is int
        assert type(value["Latitude"]) is float
        assert type(value["Longitude"]) is float
        assert -90 <= value["Latitude"] <= 90
        assert -180 <= value["Longitude"] <= 180
        assert STATUS_TIME.match(value["StatusTime"]), value
        # UTC, starting now.
        assert before <= parse_time(value["StatusTime"]) <= after + timedelta(seconds=3)


# --- flags --------------------------------------------------------------------------------


@pytest.mark.parametrize("dashes", ["-", "--"])
def test_flags_parse_as_the_go_producers(dashes: str) -> None:
    args = build_parser().parse_args(
        ["produce", f"{dashes}name", "Rocinante", f"{dashes}stream", "s",
         f"{dashes}region", "eu-west-1"]
    )  # fmt: skip

    assert (args.name, args.stream, args.region) == ("Rocinante", "s", "eu-west-1")


def test_flag_defaults_are_the_go_producers() -> None:
    args = build_parser().parse_args(["produce"])

    assert (args.name, args.stream, args.region) == ("Shadowfax", "wildrydes", None)
    assert (args.unicorns, args.speed, args.count, args.duration) == (1, 1.0, None, None)


@pytest.mark.parametrize("bad", [["--unicorns", "0"], ["--speed", "-1"], ["--count", "x"]])
def test_bad_arguments_exit_2_with_one_error_line(
    bad: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["produce", *bad])

    assert exit_.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1
    assert bad[0] in errors[0]


async def test_region_flag_wins_over_the_environment_and_a_missing_stream_is_one_line(
    aws_env: dict[str, str],
) -> None:
    env = bare_env(**{**aws_env, "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"})
    code, stdout, stderr = await run_to_exit(
        env, "produce", "-region", "eu-west-1", "-stream", "no-such-stream", "--count", "1"
    )

    assert code == 1
    # The message names the region the client used: the flag's, not the environment's.
    assert stderr.strip() == (
        "wildrydes-stream: stream no-such-stream not found in eu-west-1: "
        "create it, or name another with -stream"
    )
    assert stdout == ""


async def test_without_any_region_it_says_how_to_set_one(
    aws_env: dict[str, str], tmp_path: Path
) -> None:
    env = {key: value for key, value in aws_env.items() if "REGION" not in key}
    env["AWS_CONFIG_FILE"] = str(tmp_path / "no-config")
    code, _, stderr = await run_to_exit(bare_env(**env), "produce", "--count", "1")

    assert code == 2
    assert len(stderr.strip().splitlines()) == 1
    assert "no AWS region" in stderr


async def test_an_endpoint_it_cannot_connect_to_fails_at_once_as_run_does(
    aws_env: dict[str, str], tmp_path: Path
) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{probe.getsockname()[1]}"
    env = bare_env(**{**aws_env, "AWS_ENDPOINT_URL_KINESIS": endpoint})
    started = time.monotonic()

    # No --count or --duration: before, it retried until Ctrl-C and then exited 0.
    code, stdout, stderr = await run_to_exit(env, "produce", timeout=20)

    assert time.monotonic() - started < 15
    assert (code, stdout) == (1, "")
    [line] = stderr.splitlines()
    assert line.startswith(f"wildrydes-stream: cannot connect to {endpoint}/"), line
    run_env = {**env, "WILDRYDES_HTTP_PORT": "0", "WILDRYDES_HTTP_HOST": "127.0.0.1"}
    run_env["WILDRYDES_DEADLETTER_FILE"] = str(tmp_path / "deadletter.jsonl")
    assert (await run_to_exit(run_env, "run"))[::2] == (1, stderr)


async def test_a_reader_that_goes_away_stops_it_quietly_and_no_reading_is_put_twice(
    kinesis: Any, aws_env: dict[str, str]
) -> None:
    """`produce | head -c 3`: the dots cannot be printed any more. That is no failed put:
    before, it retried the same reading for ever, putting it again each time."""
    stream = await new_stream(kinesis)
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first dot
    try:
        done = await asyncio.to_thread(
            subprocess.run,
            [PYTHON, "-m", "wildrydes_stream", "produce", "-stream", stream, "--count", "5"],
            env=bare_env(**aws_env),
            stdout=write,
            stderr=subprocess.PIPE,
            timeout=30,
            check=False,
        )
    finally:
        os.close(write)

    assert (done.returncode, done.stderr.decode()) == (0, "")
    times = [json.loads(r["Data"])["StatusTime"] for r in await read_stream(kinesis, stream)]
    assert 1 <= len(times) <= 5
    assert len(set(times)) == len(times)


# --- fleets, simulated time, stopping -----------------------------------------------------


async def test_a_fleet_of_three_puts_every_name(kinesis: Any, aws_env: dict[str, str]) -> None:
    stream = await new_stream(kinesis, shards=2)
    code, stdout, stderr = await run_to_exit(
        bare_env(**aws_env), "produce", "--stream", stream, "--unicorns", "3",
        "--count", "6", "--speed", "50",
    )  # fmt: skip

    assert code == 0, stderr
    assert summary(stdout)[0] == 6
    records = await read_stream(kinesis, stream)
    values = [json.loads(r["Data"]) for r in records]
    assert sorted(v["Name"] for v in values) == sorted(["Shadowfax", "Rocinante", "Bucephalus"] * 2)
    assert all(r["PartitionKey"] == v["Name"] for r, v in zip(records, values, strict=True))
    # One reading per unicorn and simulated second.
    assert len({(v["Name"], v["StatusTime"]) for v in values}) == 6


async def test_speed_runs_simulated_time_faster_than_wall_time(
    kinesis: Any, aws_env: dict[str, str]
) -> None:
    stream = await new_stream(kinesis)
    started = time.monotonic()
    code, stdout, stderr = await run_to_exit(
        bare_env(**aws_env), "produce", "--stream", stream, "--count", "61",
        "--speed", "30", "--quiet", timeout=60,
    )  # fmt: skip
    elapsed = time.monotonic() - started

    assert code == 0, stderr
    assert stdout.count("\n") == 1  # --quiet: the summary line alone, no dots
    assert summary(stdout)[0] == 61
    records = await read_stream(kinesis, stream)
    times = sorted(parse_time(json.loads(r["Data"])["StatusTime"]) for r in records)
    assert [(t - times[0]).total_seconds() for t in times] == [float(s) for s in range(61)]
    # 60 simulated seconds in about 2 real ones (plus the interpreter's start).
    assert elapsed < 30, elapsed


async def test_duration_stops_the_producer_by_itself(kinesis: Any, aws_env: dict[str, str]) -> None:
    stream = await new_stream(kinesis)
    code, stdout, stderr = await run_to_exit(
        bare_env(**aws_env), "produce", "--stream", stream, "--duration", "1",
        "--speed", "10", "--quiet",
    )  # fmt: skip

    assert code == 0, stderr
    put = summary(stdout)[0]
    assert put > 0
    assert len(await read_stream(kinesis, stream)) == put


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
async def test_a_signal_stops_cleanly_with_the_summary(
    signum: signal.Signals, kinesis: Any, aws_env: dict[str, str]
) -> None:
    stream = await new_stream(kinesis)
    # Dots come without newlines, so stdout is read as it arrives, not line by line.
    child = await asyncio.create_subprocess_exec(
        PYTHON, "-m", "wildrydes_stream", "produce", "-stream", stream, "--speed", "5",
        env=bare_env(**aws_env), stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert child.stdout is not None
    assert child.stderr is not None
    out = bytearray()
    reader = asyncio.create_task(_read_into(child.stdout, out))
    try:
        await wait_for(holds(lambda: out.count(b".") >= 3 or reader.done()), timeout=30)
        assert not reader.done(), f"producer exited early: {await child.stderr.read()!r}"
        child.send_signal(signum)
        code = await asyncio.wait_for(child.wait(), 15)
        await reader
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
    stderr = (await child.stderr.read()).decode()

    assert code == 0, stderr
    dots, last = out.decode().splitlines()
    assert set(dots) == {"."}
    put = summary(last)[0]
    assert put == len(dots) >= 3
    assert len(await read_stream(kinesis, stream)) == put


async def _read_into(stream: asyncio.StreamReader, out: bytearray) -> None:
    while chunk := await stream.read(1024):
        out.extend(chunk)


# --- retries ------------------------------------------------------------------------------


async def test_throttled_put_records_still_put_every_record_exactly_once(
    kinesis: Any, aws_env: dict[str, str], kinesis_proxy: FaultProxy
) -> None:
    stream = await new_stream(kinesis, shards=2)
    kinesis_proxy.fail("PutRecords", KINESIS_THROTTLED, times=3)  # whole calls refused
    kinesis_proxy.fail_entries(times=3)  # then calls with half their records throttled
    env = bare_env(**{**aws_env, "AWS_ENDPOINT_URL_KINESIS": kinesis_proxy.endpoint})
    code, stdout, stderr = await run_to_exit(
        env, "produce", "--stream", stream, "--unicorns", "3", "--count", "12",
        "--speed", "50", "--quiet",
    )  # fmt: skip

    assert code == 0, stderr
    assert kinesis_proxy.injected["PutRecords"] == 6
    put, _, retries = summary(stdout)
    assert (put, retries) == (12, 6)  # every refused call or entry was sent again, once
    values = [json.loads(r["Data"]) for r in await read_stream(kinesis, stream)]
    keys = [(v["Name"], v["StatusTime"]) for v in values]
    assert len(keys) == 12
    assert len(set(keys)) == 12  # exactly once each


async def test_a_throttled_single_unicorn_put_record_is_retried(
    kinesis: Any, aws_env: dict[str, str], kinesis_proxy: FaultProxy
) -> None:
    stream = await new_stream(kinesis)
    kinesis_proxy.fail("PutRecord", KINESIS_THROTTLED, times=2)
    env = bare_env(**{**aws_env, "AWS_ENDPOINT_URL_KINESIS": kinesis_proxy.endpoint})
    code, stdout, stderr = await run_to_exit(
        env, "produce", "-stream", stream, "--count", "3", "--speed", "50", "--quiet"
    )

    assert code == 0, stderr
    assert kinesis_proxy.injected["PutRecord"] == 2
    assert kinesis_proxy.calls["PutRecords"] == 0  # one unicorn: PutRecord, as the original
    assert summary(stdout) == (3, stream, 2)
    values = [json.loads(r["Data"]) for r in await read_stream(kinesis, stream)]
    assert len({v["StatusTime"] for v in values}) == len(values) == 3


# --- the model ----------------------------------------------------------------------------


def _readings(seed: int, seconds: int) -> list[Reading]:
    unicorn = Unicorn("Shadowfax", random.Random(seed))
    start = datetime(2024, 6, 1, tzinfo=UTC)
    return [unicorn.reading(start + timedelta(seconds=s)) for s in range(seconds)]


def test_points_start_near_150_and_drift_by_at_most_one_a_second() -> None:
    readings = _readings(seed=3, seconds=12 * 3600)

    assert abs(readings[0].magic_points - 150) <= 1
    assert abs(readings[0].health_points - 150) <= 1
    for earlier, later in itertools.pairwise(readings):
        assert abs(later.magic_points - earlier.magic_points) <= 1
        assert abs(later.health_points - earlier.health_points) <= 1


def test_magic_sinks_below_50_and_recovers_over_a_long_run() -> None:
    magic = [r.magic_points for r in _readings(seed=20160212, seconds=6 * 3600)]

    first_low = next(i for i, m in enumerate(magic) if m < 50)
    assert any(m >= 50 for m in magic[first_low:])  # and back again
    assert min(magic) >= 0


def test_the_model_is_deterministic_under_a_seed() -> None:
    assert _readings(seed=5, seconds=600) == _readings(seed=5, seconds=600)
    assert _readings(seed=5, seconds=600) != _readings(seed=6, seconds=600)


def test_position_moves_the_readings_distance_along_one_bearing() -> None:
    readings = _readings(seed=11, seconds=3600)
    for earlier, later in itertools.pairwise(readings):
        step = _haversine(earlier, later)
        assert abs(step - later.distance) < 0.5, (step, later.distance)
    # One great circle: seen from the first reading, every later one lies on the same bearing
    # (from 100 s on, where rounding the coordinates to 6 decimals no longer shows).
    first = _initial_bearing(readings[0], readings[100])
    for later in readings[100:]:
        turn = (_initial_bearing(readings[0], later) - first + 180) % 360 - 180
        assert abs(turn) < 0.01


def test_a_minute_aggregates_sixty_readings_of_the_same_model() -> None:
    start = datetime(2016, 2, 12, tzinfo=UTC)
    minute = Unicorn("Shadowfax", random.Random(9)).minute(start)
    seconds = _readings_from(Unicorn("Shadowfax", random.Random(9)), start, 60)

    assert minute == {
        "Name": "Shadowfax",
        "StatusTime": "2016-02-12 00:00:00.000",
        "Distance": sum(r.distance for r in seconds),
        "MinMagicPoints": min(r.magic_points for r in seconds),
        "MaxMagicPoints": max(r.magic_points for r in seconds),
        "MinHealthPoints": min(r.health_points for r in seconds),
        "MaxHealthPoints": max(r.health_points for r in seconds),
    }


def _readings_from(unicorn: Unicorn, start: datetime, seconds: int) -> list[Reading]:
    return [unicorn.reading(start + timedelta(seconds=s)) for s in range(seconds)]


def _haversine(a: Reading, b: Reading) -> float:
    lat1, lon1, lat2, lon2 = map(math.radians, (a.latitude, a.longitude, b.latitude, b.longitude))
    h = (
        math.sin((lat2 - lat1) / 2) ** 2
        + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
    )
    return 2 * 6_371_000.0 * math.asin(math.sqrt(h))


def _initial_bearing(a: Reading, b: Reading) -> float:
    lat1, lon1, lat2, lon2 = map(math.radians, (a.latitude, a.longitude, b.latitude, b.longitude))
    y = math.sin(lon2 - lon1) * math.cos(lat2)
    x = math.cos(lat1) * math.sin(lat2) - math.sin(lat1) * math.cos(lat2) * math.cos(lon2 - lon1)
    return math.degrees(math.atan2(y, x)) % 360


async def test_kpl_packs_each_shards_readings_into_aggregates_of_at_most_n(
    kinesis: Any, aws_env: dict[str, str]
) -> None:
    stream = await new_stream(kinesis, shards=2)
    code, stdout, stderr = await run_to_exit(
        bare_env(**aws_env), "produce", "--stream", stream, "--unicorns", "40",
        "--count", "120", "--speed", "50", "--kpl", "10", "--quiet",
    )  # fmt: skip

    assert code == 0, stderr
    assert summary(stdout)[0] == 120
    ranges = {
        s["ShardId"]: (
            int(s["HashKeyRange"]["StartingHashKey"]),
            int(s["HashKeyRange"]["EndingHashKey"]),
        )
        for s in (await kinesis.list_shards(StreamName=stream))["Shards"]
    }
    readings = []
    for shard, (low, high) in ranges.items():
        iterator = (
            await kinesis.get_shard_iterator(
                StreamName=stream, ShardId=shard, ShardIteratorType="TRIM_HORIZON"
            )
        )["ShardIterator"]
        page = await kinesis.get_records(ShardIterator=iterator)
        for record in page["Records"]:
            users = deaggregate(record["Data"])
            assert 1 <= len(users) <= 10
            # Every reading of an aggregate belongs to the shard it landed on.
            assert all(low <= hash_key(u.partition_key) <= high for u in users)
            readings += [json.loads(u.data) for u in users]
    assert len(readings) == 120
    assert len({(r["Name"], r["StatusTime"]) for r in readings}) == 120
