"""`redrive` sends dead letters back where they were going, from a file, SQS or S3.

Each source holds good records (their write failed once, as when the table was missing),
a record that is not JSON and one DynamoDB rejects (an item over 400 KB): the good ones end in
the table and leave the source, the two others stay, and a second run is harmless. Letters of
`aggregate` go back onto the stream they name instead; a source it cannot send back as a whole
(both applications, a stream the settings do not name) is refused before anything is sent.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.deadletter_support import (
    data_of,
    file_entries,
    letter,
    reading,
    receive_all,
    record,
    s3_objects,
    stream_records,
)
from tests.faultproxy import DYNAMODB_INTERNAL, FaultProxy
from tests.helpers import holds, put_records, scan_table, wait_for
from tests.process import PYTHON, bare_env, service_env
from wildrydes_stream.admin.provision import ensure_stream
from wildrydes_stream.admin.redrive import redrive
from wildrydes_stream.aggregate.app import Aggregator
from wildrydes_stream.config import Settings
from wildrydes_stream.copy.app import Service
from wildrydes_stream.errors import WildrydesError
from wildrydes_stream.observability.metrics import Metrics
from wildrydes_stream.records.envelope import DeadLetter
from wildrydes_stream.sink.deadletter import DeadLetters, FileDestination, LetterBatch, Retry
from wildrydes_stream.sink.deadletter_s3 import S3Destination
from wildrydes_stream.sink.deadletter_sqs import SqsDestination
from wildrydes_stream.sink.letters import entry

GOOD = [record("Rocinante", minute) for minute in range(3)]
NOT_JSON = b"still not JSON"
TOO_BIG = record("Huge", 0, Note="y" * 450_000)  # DynamoDB refuses items over 400 KB


def letters(stream: str, *records: bytes) -> list[DeadLetter]:
    return [letter(data, sequence, stream=stream) for sequence, data in enumerate(records, 1000)]


async def names_in_table(dynamodb: Any, settings: Settings) -> list[tuple[str, str]]:
    items = await scan_table(dynamodb, settings.table_name)
    return sorted((i["Name"]["S"], i["StatusTime"]["N"]) for i in items)


def keys_of(*records: bytes) -> list[tuple[str, str]]:
    keys = []
    for data in records:
        value = json.loads(data)
        minute = int(value["StatusTime"][14:16])
        keys.append((value["Name"], str(1455235200000 + minute * 60_000)))
    return sorted(keys)


async def test_redrive_from_a_file_writes_the_good_records_and_keeps_the_others(
    one_shard: Settings, dynamodb: Any, tmp_path: Path
) -> None:
    path = tmp_path / "deadletter.jsonl"
    destination = FileDestination(path, Retry(Metrics()))
    stream = one_shard.stream_name
    await destination.send(LetterBatch.of(letters(stream, *GOOD, NOT_JSON, TOO_BIG), "run"))
    # An entry written before the payload was stored once: the text in `data` only.
    older = record("Older", 7)
    old_entry = entry(letter(older, 7, stream=stream), datetime.now(UTC), "run")
    del old_entry["data_base64"], old_entry["application"]
    with path.open("a") as handle:
        handle.write(json.dumps({**old_entry, "data": older.decode()}) + "\n")

    report = await redrive(one_shard, str(path), max_retry_attempts=1)

    assert (report.written, report.failed) == (4, 2)
    assert await names_in_table(dynamodb, one_shard) == keys_of(*GOOD, older)
    assert sorted(data_of(e) for e in file_entries(path)) == sorted([NOT_JSON, TOO_BIG])

    again = await redrive(one_shard, str(path), max_retry_attempts=1)

    assert (again.written, again.failed) == (0, 2)
    assert sorted(data_of(e) for e in file_entries(path)) == sorted([NOT_JSON, TOO_BIG])
    assert await names_in_table(dynamodb, one_shard) == keys_of(*GOOD, older)


async def test_redrive_from_sqs_deletes_written_messages_and_fetches_pointed_payloads(
    one_shard: Settings, dynamodb: Any, sqs: Any, queue_url: str, s3: Any, bucket: str
) -> None:
    big = record("Big", 5, Note="z" * 300_000)  # writable, but too large for a message
    retry = Retry(Metrics())
    deadletters = DeadLetters(
        [SqsDestination(sqs, queue_url, retry), S3Destination(s3, f"s3://{bucket}/dl", retry)],
        Metrics(),
    )
    await deadletters.send(letters(one_shard.stream_name, *GOOD, big, NOT_JSON, TOO_BIG))

    report = await redrive(one_shard, queue_url, max_retry_attempts=1)

    assert (report.written, report.failed) == (4, 2)
    assert await names_in_table(dynamodb, one_shard) == keys_of(*GOOD, big)
    attributes = await sqs.get_queue_attributes(
        QueueUrl=queue_url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )
    # The failed ones are left, and visible again at once for the next run.
    assert attributes["Attributes"]["ApproximateNumberOfMessages"] == "2"
    assert attributes["Attributes"]["ApproximateNumberOfMessagesNotVisible"] == "0"

    again = await redrive(one_shard, queue_url, max_retry_attempts=1)

    assert (again.written, again.failed) == (0, 2)
    left = await receive_all(sqs, queue_url)
    assert sorted(m["sequence_number"] for m in left) == ["1004", "1005"]
    assert await names_in_table(dynamodb, one_shard) == keys_of(*GOOD, big)


async def test_redrive_from_s3_deletes_written_objects_and_rewrites_the_others(
    one_shard: Settings, dynamodb: Any, s3: Any, bucket: str
) -> None:
    destination = S3Destination(s3, f"s3://{bucket}/dl", Retry(Metrics()))
    await destination.check()
    stream = one_shard.stream_name
    await destination.send(LetterBatch.of(letters(stream, *GOOD[:2]), "run"))
    await destination.send(LetterBatch.of(letters(stream, GOOD[2], NOT_JSON, TOO_BIG), "run"))
    before = await s3_objects(s3, bucket, "dl/")
    assert len(before) == 2

    report = await redrive(one_shard, f"s3://{bucket}/dl", max_retry_attempts=1)

    assert (report.written, report.failed) == (3, 2)
    assert await names_in_table(dynamodb, one_shard) == keys_of(*GOOD)
    after = await s3_objects(s3, bucket, "dl/")
    (key,) = after  # the fully written object is gone, the other rewritten in place
    assert key in before
    assert sorted(data_of(e) for e in after[key]) == sorted([NOT_JSON, TOO_BIG])

    again = await redrive(one_shard, f"s3://{bucket}/dl", max_retry_attempts=1)

    assert (again.written, again.failed) == (0, 2)
    assert await s3_objects(s3, bucket, "dl/") == after
    await s3.head_object(Bucket=bucket, Key="dl/.wildrydes-stream-write-check")  # untouched


async def test_each_entry_that_cannot_be_sent_says_why_and_lines_that_are_no_letters_stay(
    one_shard: Settings, dynamodb: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "deadletter.jsonl"
    await FileDestination(path, Retry(Metrics())).send(
        LetterBatch.of(letters(one_shard.stream_name, GOOD[0], GOOD[1], GOOD[2]), "run")
    )
    [good, bad_base64, no_data] = file_entries(path)
    bad_base64["data_base64"] = "not base64!"
    del no_data["data_base64"]
    stranger = "2026-11-28 18:04:05 a log line, never a dead letter"
    lines = [json.dumps(good), json.dumps(bad_base64), json.dumps(no_data), stranger]
    path.write_text("".join(f"{line}\n" for line in lines))

    report = await redrive(one_shard, str(path), max_retry_attempts=1)

    assert (report.written, report.failed, report.strangers) == (1, 2, 1)
    assert report.line() == (
        f"redrive from {path}: 1 records written to table {one_shard.table_name}, 2 failed "
        "again, 1 not dead-letter entries (left as they were) (the failed ones stay there)"
    )
    reasons = [getattr(r, "reason", None) for r in caplog.records]
    assert "its data_base64 is not valid base64 (the entry was changed or cut short)" in reasons
    assert any(str(r).startswith("it holds no record data (no data_base64") for r in reasons)
    assert path.read_text().splitlines() == lines[1:]


async def test_a_source_that_is_no_dead_letter_file_is_refused_saying_what_it_is(
    one_shard: Settings, tmp_path: Path
) -> None:
    with pytest.raises(WildrydesError, match=r"is a directory: give the dead-letter file"):
        await redrive(one_shard, str(tmp_path), max_retry_attempts=1)
    notes = tmp_path / "notes.txt"
    notes.write_text("first line\nsecond line\n")
    with pytest.raises(WildrydesError, match=r"holds no dead-letter entries \(2 lines"):
        await redrive(one_shard, str(notes), max_retry_attempts=1)
    assert notes.read_text() == "first line\nsecond line\n"


async def test_a_missing_raw_stream_while_redriving_readings_names_raw_stream_name(
    one_shard: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = one_shard.replace(raw_stream_name=f"{one_shard.stream_name}-never-created")
    path = tmp_path / "deadletter.jsonl"
    batch = LetterBatch.of(letters(settings.raw_stream_name, reading("Shadowfax", 1)), "aggregate")
    await FileDestination(path, Retry(Metrics())).send(batch)

    report = await redrive(settings, str(path), max_retry_attempts=1)

    assert (report.written, report.failed) == (0, 1)
    blocked = [
        r.getMessage() for r in caplog.records if "PutRecords keeps failing" in r.getMessage()
    ]
    assert blocked, caplog.text
    assert blocked[0].endswith(
        f"create stream {settings.raw_stream_name} or set raw_stream_name "
        "(WILDRYDES_RAW_STREAM_NAME)"
    )


async def test_redrive_command_prints_one_summary_line_and_exits_1_while_some_fail(
    one_shard: Settings, dynamodb: Any, aws_env: dict[str, str], tmp_path: Path
) -> None:
    path = tmp_path / "deadletter.jsonl"
    batch = LetterBatch.of(letters(one_shard.stream_name, GOOD[0], NOT_JSON), "run")
    await FileDestination(path, Retry(Metrics())).send(batch)
    env = bare_env(
        **aws_env,
        WILDRYDES_TABLE_NAME=one_shard.table_name,
        WILDRYDES_STREAM_NAME=one_shard.stream_name,
        WILDRYDES_LOG_LEVEL="ERROR",
    )

    async def run() -> tuple[int, list[str]]:
        process = await asyncio.create_subprocess_exec(
            PYTHON, "-m", "wildrydes_stream", "redrive", "--from", str(path),
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(process.communicate(), timeout=60)
        assert process.returncode is not None
        return process.returncode, out.decode().splitlines()

    code, lines = await run()
    assert code == 1
    table = one_shard.table_name
    summary = (
        f"redrive from {path}: 1 records written to table {table}, 1 failed again "
        "(the failed ones stay there)"
    )
    assert lines == [summary]
    assert await names_in_table(dynamodb, one_shard) == keys_of(GOOD[0])
    path.write_text("")  # nothing left: exit 0
    code, lines = await run()
    summary = f"redrive from {path}: 0 records written, 0 failed again (nothing left)"
    assert (code, lines) == (0, [summary])


# --- where each application's letters go ---------------------------------------------------


@pytest.fixture
async def raw(one_shard: Settings, kinesis: Any) -> Settings:
    """`one_shard` (the aggregated stream and the table) with a 1-shard raw stream, and the
    aggregator's lateness and horizon short enough to dead-letter a reading as late."""
    settings = one_shard.replace(
        raw_stream_name=f"{one_shard.stream_name}-raw",
        aggregate_lease_table_name=f"{one_shard.lease_table_name}-aggregate",
        allowed_lateness_seconds=10.0,
        late_horizon_seconds=120.0,
        idle_window_timeout_seconds=1.0,
    )
    await ensure_stream(kinesis, settings.raw_stream_name, 1)
    return settings


async def test_an_aggregators_dead_letters_go_back_onto_the_raw_stream_not_into_the_table(
    raw: Settings, kinesis: Any, dynamodb: Any
) -> None:
    path = Path(raw.deadletter_file)
    ride = [reading("Shadowfax", second) for second in range(60, 240)]
    too_late = reading("Shadowfax", 0)  # 230 s behind the watermark, the horizon is 120 s
    put = await put_records(kinesis, raw.raw_stream_name, [*ride, too_late, NOT_JSON])
    aggregator = Aggregator(raw)
    try:
        await aggregator.start()
        await wait_for(holds(lambda: path.exists() and len(file_entries(path)) == 2))
    finally:
        await aggregator.stop()
    entries = {e["kind"]: e for e in file_entries(path)}
    assert {e["application"] for e in entries.values()} == {"aggregate"}
    assert {e["stream"] for e in entries.values()} == {raw.raw_stream_name}
    assert data_of(entries["late"]) == too_late

    report = await redrive(raw, str(path), max_retry_attempts=1)

    # The late reading is back on the stream it was read from, keyed by its Name, after
    # everything that was there; the table has no per-second row of it.
    assert (report.written, report.failed) == (1, 1)
    on_raw = await stream_records(kinesis, raw.raw_stream_name)
    assert [data for data, _ in on_raw[: len(put)]] == [*ride, too_late, NOT_JSON]
    assert on_raw[len(put) :] == [(too_late, "Shadowfax")]
    assert await scan_table(dynamodb, raw.table_name) == []
    # Still not a reading: it stays, and nothing else does.
    assert [data_of(e) for e in file_entries(path)] == [NOT_JSON]
    assert report.line() == (
        f"redrive from {path}: 1 records written to stream {raw.raw_stream_name}, "
        "1 failed again (the failed ones stay there)"
    )


async def test_the_run_services_dead_letters_name_it_and_go_back_into_the_table(
    one_shard: Settings, dynamodb_proxy: FaultProxy, kinesis: Any, dynamodb: Any
) -> None:
    settings = one_shard.replace(max_retry_attempts=0)
    path = Path(settings.deadletter_file)
    aggregates = [json.loads(data) for data in GOOD]
    await put_records(kinesis, settings.stream_name, aggregates)
    dynamodb_proxy.fail("BatchWriteItem", DYNAMODB_INTERNAL, times=None)
    async with Service(settings) as service:
        await asyncio.wait_for(service.run_burst(), 30)
    entries = file_entries(path)
    assert sorted(data_of(e) for e in entries) == sorted(GOOD)
    assert {(e["application"], e["stream"]) for e in entries} == {("run", settings.stream_name)}
    dynamodb_proxy.clear()

    report = await redrive(settings, str(path), max_retry_attempts=1)

    assert await names_in_table(dynamodb, settings) == keys_of(*GOOD)
    assert file_entries(path) == []
    assert report.line() == (
        f"redrive from {path}: 3 records written to table {settings.table_name}, "
        "0 failed again (nothing left)"
    )


async def test_aggregate_letters_from_s3_go_onto_the_stream_each_names(
    raw: Settings, kinesis: Any, dynamodb: Any, s3: Any, bucket: str
) -> None:
    # A reading dead-lettered by the aggregator, and a window it could not put (its letter
    # names the aggregated stream, where `run` copies it from).
    late = reading("Epona", 5)
    window = record("Epona", 0)
    destination = S3Destination(s3, f"s3://{bucket}/dl", Retry(Metrics()))
    await destination.send(
        LetterBatch.of(
            [
                letter(late, 1, "late", raw.raw_stream_name),
                letter(window, 2, "retries", raw.stream_name),
            ],
            "aggregate",
        )
    )

    report = await redrive(raw, f"s3://{bucket}/dl", max_retry_attempts=1)

    assert await stream_records(kinesis, raw.raw_stream_name) == [(late, "Epona")]
    assert await stream_records(kinesis, raw.stream_name) == [(window, "Epona")]
    assert await scan_table(dynamodb, raw.table_name) == []
    assert await s3_objects(s3, bucket, "dl/") == {}
    assert report.line() == (
        f"redrive from s3://{bucket}/dl: 2 records written (1 to stream {raw.raw_stream_name}, "
        f"1 to stream {raw.stream_name}), 0 failed again (nothing left)"
    )


async def test_an_aggregate_letter_from_sqs_goes_back_onto_the_raw_stream(
    raw: Settings, kinesis: Any, dynamodb: Any, sqs: Any, queue_url: str
) -> None:
    late = reading("Artax", 3)
    retry = Retry(Metrics())
    deadletters = DeadLetters([SqsDestination(sqs, queue_url, retry)], Metrics(), "aggregate")
    await deadletters.send([letter(late, 7, "late", raw.raw_stream_name)])

    report = await redrive(raw, queue_url, max_retry_attempts=1)

    assert (report.written, report.failed) == (1, 0)
    assert await stream_records(kinesis, raw.raw_stream_name) == [(late, "Artax")]
    assert await scan_table(dynamodb, raw.table_name) == []
    assert await receive_all(sqs, queue_url) == []


async def test_entries_without_an_application_go_by_their_stream(
    raw: Settings, kinesis: Any, dynamodb: Any, tmp_path: Path
) -> None:
    # Written before entries named their application: one of the raw stream can only be the
    # aggregator's; any other is the table copy's, as redrive always took them.
    path = tmp_path / "old.jsonl"
    at = datetime.now(UTC)
    old = [
        entry(letter(GOOD[0], 1, stream=raw.stream_name), at, "run"),
        entry(letter(reading("Older", 1), 2, stream=raw.raw_stream_name), at, "aggregate"),
    ]
    for value in old:
        del value["application"]
    path.write_text("".join(json.dumps(value) + "\n" for value in old))

    into_table = await redrive(raw, str(path), max_retry_attempts=1, application="run")

    assert (into_table.written, into_table.failed, into_table.left) == (1, 0, 1)
    assert await names_in_table(dynamodb, raw) == keys_of(GOOD[0])
    assert await stream_records(kinesis, raw.raw_stream_name) == []

    onto_stream = await redrive(raw, str(path), max_retry_attempts=1)

    assert (onto_stream.written, onto_stream.failed, onto_stream.left) == (1, 0, 0)
    assert await stream_records(kinesis, raw.raw_stream_name) == [(reading("Older", 1), "Older")]
    assert await names_in_table(dynamodb, raw) == keys_of(GOOD[0])
    assert file_entries(path) == []


async def test_a_source_with_both_applications_letters_is_refused_until_one_is_chosen(
    raw: Settings, kinesis: Any, dynamodb: Any, aws_env: dict[str, str]
) -> None:
    path = Path(raw.deadletter_file)
    deadletters = {
        application: DeadLetters([FileDestination(path, Retry(Metrics()))], Metrics(), application)
        for application in ("run", "aggregate")
    }
    await deadletters["run"].send(letters(raw.stream_name, *GOOD[:2]))
    await deadletters["aggregate"].send(
        [letter(reading("Bucephalus", 9), 3, "late", raw.raw_stream_name)]
    )
    before = file_entries(path)
    env = service_env(raw, aws_env, log_level="ERROR")

    async def run(*options: str) -> tuple[int, list[str], list[str]]:
        process = await asyncio.create_subprocess_exec(
            PYTHON, "-m", "wildrydes_stream", "redrive", "--from", str(path), *options,
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(process.communicate(), timeout=60)
        assert process.returncode is not None
        return process.returncode, out.decode().splitlines(), err.decode().splitlines()

    code, out, err = await run()

    assert (code, out) == (1, [])
    assert err == [
        f"wildrydes-stream: --from {path} holds dead letters of run (2) and aggregate (1): "
        "nothing was sent; redrive one application's at a time with --application run or "
        "--application aggregate (the others stay)"
    ]
    assert file_entries(path) == before
    assert await scan_table(dynamodb, raw.table_name) == []
    assert await stream_records(kinesis, raw.raw_stream_name) == []

    code, out, _ = await run("--application", "aggregate")

    assert (code, out) == (
        0,
        [
            f"redrive from {path}: 1 records written to stream {raw.raw_stream_name}, "
            "0 failed again, 2 of other applications not sent (the failed and unsent ones stay "
            "there)"
        ],
    )
    assert await stream_records(kinesis, raw.raw_stream_name) == [
        (reading("Bucephalus", 9), "Bucephalus")
    ]
    assert sorted(data_of(e) for e in file_entries(path)) == sorted(GOOD[:2])
    assert await scan_table(dynamodb, raw.table_name) == []

    code, out, _ = await run()  # only run's are left

    assert code == 0
    assert await names_in_table(dynamodb, raw) == keys_of(*GOOD[:2])
    assert file_entries(path) == []


async def test_letters_of_a_stream_the_settings_do_not_name_are_refused(
    raw: Settings, kinesis: Any, dynamodb: Any, tmp_path: Path
) -> None:
    path = tmp_path / "deadletter.jsonl"
    destination = FileDestination(path, Retry(Metrics()))
    await destination.send(LetterBatch.of(letters("elsewhere", GOOD[0]), "run"))
    before = file_entries(path)

    with pytest.raises(WildrydesError) as refused:
        await redrive(raw, str(path), max_retry_attempts=1)

    assert str(refused.value) == (
        f"--from {path} holds run's dead letters of stream 'elsewhere' (1) but stream_name is "
        f"{raw.stream_name!r}: nothing was sent; set stream_name (WILDRYDES_STREAM_NAME) to the "
        "stream they were read from"
    )
    assert file_entries(path) == before
    assert await scan_table(dynamodb, raw.table_name) == []

    raw_letter = letter(reading("Kelpie", 1), 4, "late", "another-raw-stream")
    path.write_text("")
    await destination.send(LetterBatch.of([raw_letter], "aggregate"))

    with pytest.raises(WildrydesError, match="set raw_stream_name \\(WILDRYDES_RAW_STREAM_NAME\\)"):
        await redrive(raw, str(path), max_retry_attempts=1)

    assert await stream_records(kinesis, raw.raw_stream_name) == []
    assert len(file_entries(path)) == 1
