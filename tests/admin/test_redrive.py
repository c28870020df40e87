"""`redrive` writes dead-lettered records back into the table, from a file, SQS or S3.

Each source holds good records (their write failed once, as when the table was missing),
a record that is not JSON and one DynamoDB rejects (an item over 400 KB): the good ones end in
the table and leave the source, the two others stay, and a second run is harmless.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.deadletter_support import data_of, file_entries, letter, receive_all, record, s3_objects
from tests.helpers import scan_table
from tests.process import PYTHON, bare_env
from wildrydes_stream.admin.redrive import redrive
from wildrydes_stream.config import Settings
from wildrydes_stream.observability.metrics import Metrics
from wildrydes_stream.records.envelope import DeadLetter
from wildrydes_stream.sink.deadletter import DeadLetters, FileDestination, LetterBatch, Retry
from wildrydes_stream.sink.deadletter_s3 import S3Destination
from wildrydes_stream.sink.deadletter_sqs import SqsDestination
from wildrydes_stream.sink.letters import entry

GOOD = [record("Rocinante", minute) for minute in range(3)]
NOT_JSON = b"still not JSON"
TOO_BIG = record("Huge", 0, Note="y" * 450_000)  # DynamoDB refuses items over 400 KB


def letters(*records: bytes) -> list[DeadLetter]:
    return [letter(data, sequence) for sequence, data in enumerate(records, 1000)]


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
    await destination.send(LetterBatch.of(letters(*GOOD, NOT_JSON, TOO_BIG)))
    # An entry written before the payload was stored once: the text in `data` only.
    older = record("Older", 7)
    old_entry = entry(letter(older, 7), datetime.now(UTC))
    del old_entry["data_base64"]
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
    await deadletters.send(letters(*GOOD, big, NOT_JSON, TOO_BIG))

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
    await destination.send(LetterBatch.of(letters(*GOOD[:2])))
    await destination.send(LetterBatch.of(letters(GOOD[2], NOT_JSON, TOO_BIG)))
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


async def test_redrive_command_prints_one_summary_line_and_exits_1_while_some_fail(
    one_shard: Settings, dynamodb: Any, aws_env: dict[str, str], tmp_path: Path
) -> None:
    path = tmp_path / "deadletter.jsonl"
    await FileDestination(path, Retry(Metrics())).send(LetterBatch.of(letters(GOOD[0], NOT_JSON)))
    env = bare_env(
        **aws_env, WILDRYDES_TABLE_NAME=one_shard.table_name, WILDRYDES_LOG_LEVEL="ERROR"
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
    summary = f"redrive from {path}: 1 records written, 1 failed again (the failed ones stay there)"
    assert lines == [summary]
    assert await names_in_table(dynamodb, one_shard) == keys_of(GOOD[0])
    path.write_text("")  # nothing left: exit 0
    code, lines = await run()
    summary = f"redrive from {path}: 0 records written, 0 failed again (nothing left)"
    assert (code, lines) == (0, [summary])
