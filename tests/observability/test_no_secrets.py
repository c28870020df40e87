"""No secret reaches the log at any level: `run` and `aggregate` at DEBUG through a proxy that
refuses calls with throttling, expired-token, signature and access errors, and a webhook whose
URL carries its secret in the path. Neither the access key id, the secret key, the session
token, a request signature nor the webhook's path may appear in anything they print."""

from __future__ import annotations

import signal
from typing import Any

import pytest

from tests.aggregate.test_aggregate import aggregate_settings
from tests.faultproxy import (
    DYNAMODB_THROTTLED,
    EXPIRED_TOKEN,
    INVALID_SIGNATURE,
    KINESIS_ACCESS_DENIED,
    KINESIS_THROTTLED,
    FaultProxy,
)
from tests.helpers import put_records, unicorn_records, wait_for
from tests.process import ServiceProcess, service_env
from tests.test_process import metric_total
from wildrydes_stream.admin.provision import ensure_stream
from wildrydes_stream.config import Settings

ACCESS_KEY = "AKIAWILDRYDESSECRET7"
SECRET_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYSECRETKEY"
SESSION_TOKEN = "IQoJb3JpZ2luX2VjEXAMPLESESSIONTOKENVALUE"
WEBHOOK_PATH = "/services/T0000/B0000/XXXXwebhookSECRETpath"
FORBIDDEN = (ACCESS_KEY, SECRET_KEY, SESSION_TOKEN, "Signature=", "XXXXwebhookSECRET")


def faulting(proxy: FaultProxy) -> None:
    # The calls made at start come after a few good ones (a start fails fast on some of these).
    for operation, error, after in (
        ("GetRecords", KINESIS_THROTTLED, 0),
        ("GetShardIterator", KINESIS_ACCESS_DENIED, 3),
        ("ListShards", EXPIRED_TOKEN, 3),
        ("PutRecords", INVALID_SIGNATURE, 0),
        ("BatchWriteItem", DYNAMODB_THROTTLED, 0),
        ("UpdateItem", INVALID_SIGNATURE, 3),
    ):
        proxy.fail(operation, error, times=2, after=after)


def secret_env(aws_env: dict[str, str], **endpoints: str) -> dict[str, str]:
    return {
        **aws_env,
        **endpoints,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_SESSION_TOKEN": SESSION_TOKEN,
    }


async def run_until(child: ServiceProcess, sample: str, count: float) -> None:
    await child.started(timeout=60)

    async def reached() -> bool:
        status, text = await child.get("/metrics")
        return status == 200 and metric_total(text, sample) >= count

    await wait_for(reached, timeout=60)
    child.send(signal.SIGTERM)
    await child.wait(timeout=30)


def assert_clean(child: ServiceProcess) -> None:
    output = child.stderr + child.stdout
    assert '"level": "DEBUG"' in output  # the lowest level was on
    assert "Signature expired" in output or "Rate exceeded" in output  # and faults were logged
    for secret in FORBIDDEN:
        assert secret not in output, f"{secret!r} in the log"


async def test_run_at_debug_logs_no_secret(
    resources: Settings,
    aws_env: dict[str, str],
    kinesis: Any,
    kinesis_proxy: FaultProxy,
    dynamodb_proxy: FaultProxy,
) -> None:
    records = unicorn_records(["Shadowfax", "Rocinante"], minutes=20)
    for record in records[:5]:
        record["MinMagicPoints"] = 10  # low: alerts go to the webhook (which is not there)
    await put_records(kinesis, resources.stream_name, records)
    for proxy in (kinesis_proxy, dynamodb_proxy):
        faulting(proxy)
    env = service_env(
        resources,
        secret_env(
            aws_env,
            AWS_ENDPOINT_URL_KINESIS=kinesis_proxy.endpoint,
            AWS_ENDPOINT_URL_DYNAMODB=dynamodb_proxy.endpoint,
        ),
        log_level="DEBUG",
        alert_webhook_url="http://127.0.0.1:9" + WEBHOOK_PATH,
    )
    child = await ServiceProcess.start(env, "run")
    try:
        await run_until(child, "wildrydes_records_written_total", len(records))
    finally:
        await child.close()
    assert_clean(child)


@pytest.mark.usefixtures("dynamodb")
async def test_aggregate_at_debug_logs_no_secret(
    settings: Settings, aws_env: dict[str, str], kinesis: Any, kinesis_proxy: FaultProxy
) -> None:
    s = aggregate_settings(settings)
    await ensure_stream(kinesis, s.raw_stream_name, 1)
    await ensure_stream(kinesis, s.stream_name, 1)
    readings = [
        {
            "Name": f"unicorn-{i}",
            "StatusTime": f"2016-02-12 00:0{second // 60}:{second % 60:02d}.000",
            "Latitude": 40.0,
            "Longitude": -74.0,
            "Distance": 10,
            "MagicPoints": 100,
            "HealthPoints": 100,
        }
        for i in range(3)
        for second in range(0, 180, 10)
    ]
    await put_records(kinesis, s.raw_stream_name, readings)
    faulting(kinesis_proxy)
    env = service_env(
        s,
        secret_env(aws_env, AWS_ENDPOINT_URL_KINESIS=kinesis_proxy.endpoint),
        log_level="DEBUG",
    )
    child = await ServiceProcess.start(env, "aggregate")
    try:
        await run_until(child, "wildrydes_records_read_total", len(readings))
    finally:
        await child.close()
    assert_clean(child)
