"""`provision` creates what is missing and checks what exists against the settings."""

from __future__ import annotations

from typing import Any

from tests.process import run_to_exit, service_env
from wildrydes_stream.admin.provision import ensure_stream, ensure_table
from wildrydes_stream.config import Settings


async def test_provision_creates_both_and_says_ready(
    settings: Settings, aws_env: dict[str, str], kinesis: Any, dynamodb: Any
) -> None:
    code, stdout, stderr = await run_to_exit(service_env(settings, aws_env), "provision")
    assert code == 0, stderr
    assert "are ready" in stdout
    summary = await kinesis.describe_stream_summary(StreamName=settings.stream_name)
    assert summary["StreamDescriptionSummary"]["OpenShardCount"] == 4


async def test_a_stream_with_another_shard_count_is_reported(
    settings: Settings, aws_env: dict[str, str], kinesis: Any, dynamodb: Any
) -> None:
    await ensure_stream(kinesis, settings.stream_name, 2)
    env = service_env(settings, aws_env)
    code, stdout, stderr = await run_to_exit(env, "provision", "--shards", "4")
    assert code == 1
    assert "are ready" not in stdout
    [line] = [x for x in stderr.splitlines() if "wildrydes-stream:" in x]
    assert f"stream {settings.stream_name} exists with 2 open shards, not 4" in line


async def test_a_table_with_the_wrong_statustime_type_is_reported(
    settings: Settings, aws_env: dict[str, str], kinesis: Any, dynamodb: Any
) -> None:
    await ensure_table(dynamodb, settings.replace(status_time_format="string"))
    code, _, stderr = await run_to_exit(service_env(settings, aws_env), "provision")
    assert code == 1
    [line] = [x for x in stderr.splitlines() if "wildrydes-stream:" in x]
    assert "stores StatusTime as S but status_time_format=epoch_ms writes N" in line


async def test_a_table_with_other_keys_is_reported(
    settings: Settings, aws_env: dict[str, str], kinesis: Any, dynamodb: Any
) -> None:
    await dynamodb.create_table(
        TableName=settings.table_name,
        AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
        KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
        BillingMode="PAY_PER_REQUEST",
    )
    code, _, stderr = await run_to_exit(service_env(settings, aws_env), "provision")
    assert code == 1
    [line] = [x for x in stderr.splitlines() if "wildrydes-stream:" in x]
    assert "must have partition key Name and sort key StatusTime; it has id (HASH)" in line


async def test_zero_shards_is_one_line_and_exit_2(
    settings: Settings, aws_env: dict[str, str]
) -> None:
    code, _, stderr = await run_to_exit(
        service_env(settings, aws_env), "provision", "--shards", "0"
    )
    assert code == 2
    assert stderr.strip().splitlines()[-1].endswith("argument --shards: must be above 0: '0'")
    assert "Traceback" not in stderr


async def test_provision_app_aggregate_creates_both_streams(
    settings: Settings, aws_env: dict[str, str], kinesis: Any
) -> None:
    raw = f"{settings.stream_name}-raw"
    env = service_env(settings.replace(raw_stream_name=raw), aws_env)
    args = ("provision", "--app", "aggregate")
    code, stdout, stderr = await run_to_exit(env, *args, "--shards", "2")
    assert code == 0, stderr
    assert f"streams {raw} and {settings.stream_name} are ready" in stdout
    for name in (raw, settings.stream_name):
        summary = await kinesis.describe_stream_summary(StreamName=name)
        assert summary["StreamDescriptionSummary"]["OpenShardCount"] == 2
    # Asked again with another shard count: the existing stream is reported, not changed.
    code, _, stderr = await run_to_exit(env, *args, "--shards", "3")
    assert code == 1
    assert f"stream {raw} exists with 2 open shards, not 3" in stderr
