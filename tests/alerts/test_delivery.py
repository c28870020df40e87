"""Alert delivery that no record can block and that keeps its secrets.

A unicorn's name is any JSON string: it travels whole in the alert's JSON, while headers and
SNS FIFO group and deduplication ids carry ASCII tokens derived from it. A destination that
refuses one alert for itself (a webhook's 400, SNS's InvalidParameter) has the record
dead-lettered, and the shard moves on. The webhook URL, whose path may be a secret, shows up in
logs, errors and `settings --effective` as scheme and host only.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from botocore.exceptions import ClientError

from tests.alerts.test_alerts import Webhook, aggregates, sample, the_lease
from tests.deadletter_support import data_of, file_entries
from tests.helpers import holds, put_records, scan_table, wait_for
from wildrydes_stream.alerts.destinations import (
    TOKEN_LENGTH,
    Alert,
    AlertRefused,
    LogDestination,
    SnsDestination,
    WebhookDestination,
    WebhookError,
    ascii_token,
)
from wildrydes_stream.cli import main
from wildrydes_stream.config import Settings, load_settings
from wildrydes_stream.copy.app import Service
from wildrydes_stream.errors import ConfigError
from wildrydes_stream.observability.logs import JsonFormatter, TextFormatter

# What AWS documents for an SNS FIFO MessageGroupId (and MessageDeduplicationId): up to 128
# characters of a-z, A-Z, 0-9 and !"#$%&'()*+,-./:;<=>?@[\]^_`{|}~. moto does not check it.
AWS_GROUP_ID = re.compile(r"[A-Za-z0-9!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~]{1,128}")

AWKWARD_NAMES = ["a\r\nb", "Épona", "Silver Blaze", "Line\nBreak", "U" * 300]


class Receiver(Webhook):
    """The tests' webhook, keeping each alert's headers too, and answering 400 to the alerts
    of the unicorns in `refuse` (as a receiver that validates what it is sent would)."""

    def __init__(self) -> None:
        super().__init__()
        self.keys: list[str] = []
        self.refuse: set[str] = set()
        self.refusals: list[dict[str, Any]] = []

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        if self.failing:
            self.refused += 1
            return web.Response(status=500, text="down for maintenance")
        if body["name"] in self.refuse:
            self.refusals.append(body)
            return web.Response(status=400, text="invalid_payload: name not allowed\r\n")
        self.keys.append(request.headers["Idempotency-Key"])
        self.received.append(body)
        return web.Response(status=204)


async def serve(receiver: Receiver, path: str) -> web.AppRunner:
    app = web.Application()
    app.router.add_post(path.partition("?")[0], receiver.handle)
    runner = web.AppRunner(app, access_log=None)  # the receiver's log is not the service's
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    receiver.url = f"http://{host}:{port}{path}"
    return runner


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    hook = Receiver()
    runner = await serve(hook, "/alerts")
    yield hook
    await runner.cleanup()


SECRET_PATH = "/services/T0AAA/B0BBB/s3cr3t-t0k3n?sig=abc123"


@pytest.fixture
async def secret_receiver() -> AsyncIterator[Receiver]:
    """A receiver whose URL carries a secret in its path and query, like Slack's."""
    hook = Receiver()
    runner = await serve(hook, SECRET_PATH)
    yield hook
    await runner.cleanup()


async def checkpointed_at(dynamodb: Any, settings: Settings, sequence: str) -> bool:
    checkpoint = (await the_lease(dynamodb, settings)).checkpoint
    return checkpoint.isdigit() and int(checkpoint) == int(sequence)


def alert(name: str, state: str = "firing") -> Alert:
    return Alert(name, "2016-02-12 00:01:00.000", 1455235260000, 40, 50, state)  # type: ignore[arg-type]


# --- any name --------------------------------------------------------------------------------


async def test_names_with_line_breaks_and_any_script_are_delivered_and_others_keep_flowing(
    one_shard: Settings,
    receiver: Receiver,
    kinesis: Any,
    dynamodb: Any,
    running: list[Service],
) -> None:
    settings = one_shard.replace(alert_webhook_url=receiver.url)
    records = []
    for i, name in enumerate([*AWKWARD_NAMES, "Shadowfax"]):
        records += aggregates(name, [100, 40, 60], 3 * i)
    # A 300-character name is no partition key: key these records by their time instead.
    results = await put_records(kinesis, settings.stream_name, records, key="StatusTime")
    service = Service(settings)
    running.append(service)
    await service.start()

    await wait_for(lambda: checkpointed_at(dynamodb, settings, results[-1]["SequenceNumber"]))
    names = [*AWKWARD_NAMES, "Shadowfax"]
    assert [(a["name"], a["state"]) for a in receiver.received] == [
        (name, state) for name in names for state in ("firing", "resolved")
    ]
    assert len(await scan_table(dynamodb, settings.table_name)) == len(records)
    # The header: the id for a plain name, else an ASCII token, one per alert.
    assert len(set(receiver.keys)) == len(receiver.keys)
    for key, body in zip(receiver.keys, receiver.received, strict=True):
        assert AWS_GROUP_ID.fullmatch(key), key
        assert (key == body["id"]) == (body["name"] == "Shadowfax")


def test_tokens_are_what_aws_and_http_accept_readable_and_distinct_per_name() -> None:
    names = [*AWKWARD_NAMES, "Shadowfax", "独角兽", "\ud800", "a~b", "a b", "a_b", "x" * 128]
    names += ["é" * 100_000, "Silver_Blaze~" + ascii_token("Silver Blaze", TOKEN_LENGTH)[13:]]
    tokens = [ascii_token(name, TOKEN_LENGTH) for name in names]
    assert all(AWS_GROUP_ID.fullmatch(token) for token in tokens), tokens
    assert len(set(tokens)) == len(names)  # no two unicorns share a FIFO group or a key
    assert tokens == [ascii_token(name, TOKEN_LENGTH) for name in names]  # stable
    assert ascii_token("Shadowfax", TOKEN_LENGTH) == "Shadowfax"
    assert ascii_token("x" * 128, TOKEN_LENGTH) == "x" * 128
    assert ascii_token("Épona", TOKEN_LENGTH).startswith("Epona~")
    assert ascii_token("Silver Blaze", TOKEN_LENGTH).startswith("Silver_Blaze~")

    for name in names:
        one = alert(name)
        for token in (one.group_id, one.deduplication_id, one.key):
            assert AWS_GROUP_ID.fullmatch(token), (name[:20], token)
        assert json.loads(one.json().encode())["name"] == name  # whole, even a lone surrogate
    assert alert("Shadowfax").key == alert("Shadowfax").id == "Shadowfax:2016-02-12T00:01Z:firing"


async def test_the_log_line_of_an_alert_escapes_line_breaks(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO):
        await LogDestination().deliver(alert("Fake\r\nERROR injected"))
    [record] = caplog.records
    assert record.getMessage() == "unicorn low on magic: Fake\\r\\nERROR injected"
    assert record.alert["name"] == "Fake\r\nERROR injected"  # type: ignore[attr-defined]


async def test_a_fifo_topic_gets_group_ids_aws_accepts_for_any_name(
    one_shard: Settings, kinesis: Any, sns: Any, sqs: Any
) -> None:
    topic = (
        await sns.create_topic(
            Name="unicorn-alerts.fifo",
            Attributes={"FifoTopic": "true", "ContentBasedDeduplication": "false"},
        )
    )["TopicArn"]
    queue = (
        await sqs.create_queue(QueueName="alert-inbox.fifo", Attributes={"FifoQueue": "true"})
    )["QueueUrl"]
    attributes = await sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])
    await sns.subscribe(
        TopicArn=topic,
        Protocol="sqs",
        Endpoint=attributes["Attributes"]["QueueArn"],
        Attributes={"RawMessageDelivery": "true"},
    )
    names = ["Silver Blaze", "Épona", "Shadowfax"]
    records = [r for i, n in enumerate(names) for r in aggregates(n, [90, 45], 2 * i)]
    await put_records(kinesis, one_shard.stream_name, records)
    service = Service(one_shard.replace(alert_sns_topic_arn=topic))
    await service.start()
    await service.run_burst()

    received: list[tuple[str, dict[str, Any]]] = []

    async def all_arrived() -> bool:
        response = await sqs.receive_message(
            QueueUrl=queue, MaxNumberOfMessages=10, MessageSystemAttributeNames=["All"]
        )
        for message in response.get("Messages", []):
            received.append((message["Attributes"]["MessageGroupId"], json.loads(message["Body"])))
            await sqs.delete_message(QueueUrl=queue, ReceiptHandle=message["ReceiptHandle"])
        return len(received) >= len(names)

    await wait_for(all_arrived, timeout=20)
    assert sorted(body["name"] for _, body in received) == sorted(names)
    groups = {body["name"]: group for group, body in received}
    # moto takes any group id; AWS refuses a space or a non-ASCII letter.
    assert all(AWS_GROUP_ID.fullmatch(group) for group in groups.values()), groups
    assert groups["Shadowfax"] == "Shadowfax"
    assert len(set(groups.values())) == len(names)


# --- refused alerts --------------------------------------------------------------------------


async def test_an_alert_the_webhook_refuses_is_dead_lettered_and_the_shard_moves_on(
    one_shard: Settings,
    receiver: Receiver,
    kinesis: Any,
    dynamodb: Any,
    running: list[Service],
) -> None:
    settings = one_shard.replace(alert_webhook_url=receiver.url)
    receiver.refuse = {"Bucephalus"}
    before = await put_records(kinesis, settings.stream_name, aggregates("Shadowfax", [90, 45]))
    refused = await put_records(kinesis, settings.stream_name, aggregates("Bucephalus", [30], 2))
    after = aggregates("Rocinante", [80, 20, 70], 3) + aggregates("Shadowfax", [60], 6)
    later = await put_records(kinesis, settings.stream_name, after)
    service = Service(settings)
    running.append(service)
    await service.start()

    await wait_for(lambda: checkpointed_at(dynamodb, settings, later[-1]["SequenceNumber"]))
    assert [(a["name"], a["state"]) for a in receiver.received] == [
        ("Shadowfax", "firing"),
        ("Rocinante", "firing"),
        ("Rocinante", "resolved"),
        ("Shadowfax", "resolved"),
    ]
    assert [a["name"] for a in receiver.refusals] == ["Bucephalus"]  # asked once, not retried
    assert len(await scan_table(dynamodb, settings.table_name)) == 3 + len(after)

    assert settings.deadletter_file
    [entry] = file_entries(Path(settings.deadletter_file))
    assert entry["kind"] == "alert_refused"
    assert entry["sequence_number"] == refused[0]["SequenceNumber"]
    assert entry["shard_id"] == before[0]["ShardId"]
    assert entry["stream"] == settings.stream_name
    assert json.loads(data_of(entry))["Name"] == "Bucephalus"
    assert entry["reason"].startswith("low-magic alert (firing) refused by webhook: HTTP 400")
    assert "invalid_payload" in entry["reason"]
    assert "/alerts" not in entry["reason"]

    def refusals(destination: str) -> float | None:
        return sample(service, "wildrydes_alerts_refused_total", destination=destination)

    assert refusals("webhook") == 1
    assert refusals("log") == 0
    assert sample(service, "wildrydes_records_dead_lettered_total", reason="alert_refused") == 1
    failures = sample(service, "wildrydes_alert_delivery_failures_total", destination="webhook")
    assert failures == 0


async def test_an_alert_sns_refuses_is_dead_lettered(
    one_shard: Settings, kinesis: Any, dynamodb: Any, sns: Any, running: list[Service]
) -> None:
    topic = (await sns.create_topic(Name="unicorn-alerts"))["TopicArn"]
    # A name SNS cannot carry: the alert's JSON is over its 256 KiB message limit. (The table
    # refuses it too, a key being at most 2 KiB: the record is dead-lettered for each.)
    huge = aggregates("Z" * 270_000, [20])
    records = aggregates("Shadowfax", [45]) + huge + aggregates("Shadowfax", [70], 2)
    results = await put_records(kinesis, one_shard.stream_name, records, key="StatusTime")
    service = Service(one_shard.replace(alert_sns_topic_arn=topic))
    running.append(service)
    await service.start()

    await wait_for(lambda: checkpointed_at(dynamodb, one_shard, results[-1]["SequenceNumber"]))
    assert one_shard.deadletter_file
    entries = file_entries(Path(one_shard.deadletter_file))
    assert sorted(e["kind"] for e in entries) == ["alert_refused", "rejected_by_table"]
    [entry] = [e for e in entries if e["kind"] == "alert_refused"]
    assert entry["sequence_number"] == results[1]["SequenceNumber"]
    assert entry["reason"].startswith("low-magic alert (firing) refused by sns: InvalidParameter")
    assert len(await scan_table(dynamodb, one_shard.table_name)) == 2
    assert sample(service, "wildrydes_alerts_refused_total", destination="sns") == 1
    assert sample(service, "wildrydes_alerts_total", state="resolved", destination="sns") == 1


class FakeSns:
    def __init__(self, code: str, status: int) -> None:
        self.error: dict[str, Any] = {
            "Error": {"Code": code, "Message": "nope"},
            "ResponseMetadata": {"HTTPStatusCode": status},
        }

    async def publish(self, **_: Any) -> None:
        raise ClientError(self.error, "Publish")


@pytest.mark.parametrize(
    ("code", "status", "refused"),
    [
        ("InvalidParameter", 400, True),
        ("ParameterValueInvalid", 400, True),
        ("ValidationException", 400, True),
        ("AuthorizationError", 403, False),
        ("NotFound", 404, False),
        ("Throttling", 400, False),
        ("KMSThrottling", 400, False),
        ("InternalError", 500, False),
    ],
)
async def test_only_what_sns_refuses_for_the_request_itself_is_not_retried(
    code: str, status: int, refused: bool
) -> None:
    destination = SnsDestination(FakeSns(code, status), "arn:aws:sns:us-east-1:123456789012:t")
    with pytest.raises(AlertRefused if refused else ClientError):
        await destination.deliver(alert("Shadowfax"))


@pytest.mark.parametrize(
    ("status", "refused"),
    [
        *[(400, True), (413, True), (422, True), (401, False), (403, False), (404, False)],
        *[(408, False), (429, False), (500, False), (503, False), (302, False)],
    ],
)
async def test_only_a_4xx_about_the_alert_is_a_refusal_of_the_webhook(
    status: int, refused: bool
) -> None:
    async def answer(request: web.Request) -> web.Response:
        return web.Response(status=status, headers={"Location": "/elsewhere"})

    app = web.Application()
    app.router.add_post("/hook", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    destination = WebhookDestination(f"http://{host}:{port}/hook")
    try:
        with pytest.raises(AlertRefused if refused else WebhookError) as caught:
            await destination.deliver(alert("Shadowfax"))
        assert "/hook" not in str(caught.value)
    finally:
        await destination.close()
        await runner.cleanup()


# --- secrets ---------------------------------------------------------------------------------


async def test_a_failing_webhook_logs_no_part_of_its_secret_path_even_at_debug(
    one_shard: Settings,
    secret_receiver: Receiver,
    kinesis: Any,
    running: list[Service],
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = one_shard.replace(alert_webhook_url=secret_receiver.url)
    secret_receiver.failing = True
    secret_receiver.refuse = {"Bucephalus"}
    await put_records(kinesis, settings.stream_name, aggregates("Bucephalus", [30]))
    await put_records(kinesis, settings.stream_name, aggregates("Shadowfax", [40]))
    service = Service(settings)
    running.append(service)
    with caplog.at_level(logging.DEBUG):
        await service.start()
        await wait_for(holds(lambda: secret_receiver.refused >= 3))
        secret_receiver.failing = False  # now it refuses Bucephalus's alert: a dead letter
        await wait_for(holds(lambda: len(secret_receiver.received) == 1))
        await service.stop()

    lines = [
        formatter.format(record)
        for record in caplog.records
        for formatter in (JsonFormatter(), TextFormatter())
    ]
    host = secret_receiver.url.split("/services")[0]
    assert any(f"HTTP 500 from {host}/…" in line for line in lines)
    assert any("refused by webhook: HTTP 400" in line for line in lines)
    for secret in ("s3cr3t", "T0AAA", "/services", "sig=abc123"):
        assert not [line for line in lines if secret in line], secret
    # Start-up errors name the URL the same way: a malformed one shows no path either.
    with pytest.raises(ConfigError) as caught:
        load_settings(environ={"WILDRYDES_ALERT_WEBHOOK_URL": "hooks.example.com" + SECRET_PATH})
    assert "s3cr3t" not in str(caught.value)
    assert "hooks.example.com/…" in str(caught.value)
    assert "s3cr3t" not in repr(settings)


def test_settings_effective_shows_the_webhook_url_by_scheme_and_host(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for key in list(os.environ):
        if key.startswith("WILDRYDES_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("WILDRYDES_ALERT_WEBHOOK_URL", "https://hooks.example.com" + SECRET_PATH)
    assert main(["settings", "--effective"]) == 0
    out = capsys.readouterr().out
    [line] = [line for line in out.splitlines() if "alert_webhook_url" in line]
    assert line.startswith('# alert_webhook_url = "https://hooks.example.com/…"  # environment')
    assert "s3cr3t" not in out
    assert "/services" not in out
    assert "batch_size = 25  # default" in out.splitlines()
