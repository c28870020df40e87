"""`run` in read_mode `fanout` against kinesis-local's real SubscribeToShard.

kinesis-local (tests/kinesislocal.py) differs from the tests' own fan-out server in what a real
implementation may do: no `initial-response` event, records polled and pushed once a second, no
ChildShards; it registers the stream consumer itself (CREATING, then ACTIVE). The service runs
as a child process (`python -m wildrydes_stream run`), Kinesis calls to kinesis-local (its plain
port: HTTP/1.1 for the JSON API, HTTP/2 with prior knowledge for SubscribeToShard), DynamoDB to
dynalite.
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from aiobotocore.session import get_session

from tests.conftest import Emulators
from tests.helpers import put_records, scan_table, unicorn_records
from tests.kinesislocal import kinesis_local
from tests.process import ServiceProcess, service_env
from tests.test_process import item_keys, keys_of, metric_total, wait_written
from wildrydes_stream.admin.provision import ensure_stream, ensure_table
from wildrydes_stream.config import Settings

pytestmark = [pytest.mark.slow]

UNICORNS = ("Shadowfax", "Rocinante", "Bucephalus")


@pytest.fixture(scope="module")
def kinesis_local_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with kinesis_local(tmp_path_factory.mktemp("kinesis-local")) as endpoint:
        yield endpoint


@pytest.fixture
async def local_kinesis(kinesis_local_endpoint: str, aws_env: dict[str, str]) -> AsyncIterator[Any]:
    async with get_session().create_client(
        "kinesis", region_name="us-east-1", endpoint_url=kinesis_local_endpoint
    ) as client:
        yield client


async def test_run_in_fanout_mode_writes_every_record_put_through_kinesis_local(
    settings: Settings,
    emulators: Emulators,
    kinesis_local_endpoint: str,
    local_kinesis: Any,
    dynamodb: Any,
) -> None:
    settings = settings.replace(
        read_mode="fanout",
        fanout_endpoint_url=kinesis_local_endpoint,
        fanout_consumer_name="wildrydes-test",
    )
    await ensure_stream(local_kinesis, settings.stream_name, 2)
    await ensure_table(dynamodb, settings)
    records = unicorn_records(UNICORNS, minutes=20)
    before, after = records[: len(records) // 2], records[len(records) // 2 :]
    await put_records(local_kinesis, settings.stream_name, before)

    env = service_env(
        settings,
        {**emulators.environ(), "AWS_ENDPOINT_URL_KINESIS": kinesis_local_endpoint},
    )
    service = await ServiceProcess.start(env, "run")
    try:
        await service.started()
        await wait_written(service, len(before), timeout=60)
        # Records put while subscribed are pushed too (kinesis-local polls once a second).
        await put_records(local_kinesis, settings.stream_name, after)
        await wait_written(service, len(records), timeout=60)

        items = await scan_table(dynamodb, settings.table_name)
        assert item_keys(items) == keys_of(records)
        status, text = await service.get("/metrics")
        assert status == 200
        # Read by subscription: one a shard at least.
        assert metric_total(text, "wildrydes_fanout_subscriptions_total") >= 2
        assert metric_total(text, "wildrydes_records_read_total") >= len(records)

        # The service registered its stream consumer on the stream, and it is ACTIVE.
        summary = await local_kinesis.describe_stream_summary(StreamName=settings.stream_name)
        arn = summary["StreamDescriptionSummary"]["StreamARN"]
        consumer = await local_kinesis.describe_stream_consumer(
            StreamARN=arn, ConsumerName="wildrydes-test"
        )
        assert consumer["ConsumerDescription"]["ConsumerStatus"] == "ACTIVE"

        service.send(signal.SIGTERM)
        assert await service.wait(timeout=settings.shutdown_grace_seconds + 5) == 0, service.stderr
    finally:
        await service.close()
