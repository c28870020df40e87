"""Dead letters in S3 (moto's server): one object per batch, records of any size."""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.deadletter_support import data_of, receive_all, s3_objects
from tests.helpers import put_records
from wildrydes_stream.config import Settings
from wildrydes_stream.copy.app import Service
from wildrydes_stream.errors import WildrydesError

KEY = re.compile(r"dead/letters/\d{4}/\d{2}/\d{2}/\d{2}/\d{8}T\d{6}\.\d{6}Z-[0-9a-f]{32}\.jsonl")


async def test_a_large_dead_letter_lands_whole_in_s3_and_the_sqs_message_points_at_it(
    one_shard: Settings, s3: Any, bucket: str, sqs: Any, queue_url: str, kinesis: Any
) -> None:
    settings = one_shard.replace(
        deadletter_queue_url=queue_url, deadletter_s3_uri=f"s3://{bucket}/dead/letters/"
    )
    large, small = b"x" * 300_000, b"small and not JSON"
    results = await put_records(kinesis, settings.stream_name, [large, small])

    async with Service(settings) as service:
        await service.run_burst()

    objects = await s3_objects(s3, bucket, "dead/letters/")
    assert objects
    assert all(KEY.fullmatch(key) for key in objects), list(objects)
    lines = {
        (f"s3://{bucket}/{key}", number): entry
        for key, entries in objects.items()
        for number, entry in enumerate(entries, 1)
    }
    assert sorted(data_of(e) for e in lines.values()) == sorted([large, small])

    messages = {m["sequence_number"]: m for m in await receive_all(sqs, queue_url)}
    pointer = messages[results[0]["SequenceNumber"]]
    assert "data_base64" not in pointer
    target = lines[pointer["data_s3_uri"], pointer["data_s3_line"]]
    assert data_of(target) == large
    assert target["sequence_number"] == pointer["sequence_number"]
    assert pointer["reason"] == target["reason"]  # nothing omitted: the reason says no such thing
    assert data_of(messages[results[1]["SequenceNumber"]]) == small  # small ones stay inline
    # The start-up write check left its marker under the prefix.
    marker = await s3.head_object(Bucket=bucket, Key="dead/letters/.wildrydes-stream-write-check")
    assert marker["ContentLength"] > 0


async def test_s3_alone_keeps_every_dead_letter(
    one_shard: Settings, s3: Any, bucket: str, kinesis: Any
) -> None:
    settings = one_shard.replace(deadletter_file="", deadletter_s3_uri=f"s3://{bucket}")
    bad = [b"bad %d" % i for i in range(30)]
    await put_records(kinesis, settings.stream_name, bad)

    async with Service(settings) as service:
        await service.run_burst()

    objects = await s3_objects(s3, bucket)
    assert sorted(data_of(e) for entries in objects.values() for e in entries) == sorted(bad)
    assert service.metrics.snapshot().dead_lettered == len(bad)


@pytest.mark.parametrize("uri", ["s3://no-such-bucket/dead", "s3://"])
async def test_an_unwritable_bucket_fails_at_start_naming_the_setting(
    one_shard: Settings, s3: Any, bucket: str, uri: str
) -> None:
    settings = one_shard.replace(deadletter_s3_uri=uri)

    with pytest.raises(WildrydesError) as failure:
        await Service(settings).start()

    message = str(failure.value)
    assert "deadletter_s3_uri" in message
    assert "\n" not in message
