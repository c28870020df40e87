"""Low-magic alerts in `run`: one `firing` per fall below the threshold, one `resolved` per
recovery, delivered at least once (the checkpoint waits for the delivery), and the per-unicorn
state moving with the shard's lease so a restart or a hand-off sends no repeat.

Destinations are real: a webhook on a local aiohttp server, SNS on moto's server read back
through an SQS queue subscribed to the topic.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

import pytest
from aiohttp import web

from tests.helpers import holds, put_records, scan_table, wait_for
from wildrydes_stream.alerts.state import UnicornStates
from wildrydes_stream.config import Settings, load_settings
from wildrydes_stream.consumer.lease import Lease
from wildrydes_stream.consumer.leases import LeaseTable
from wildrydes_stream.consumer.state import StateKey
from wildrydes_stream.consumer.statestore import StateRef, StateStore
from wildrydes_stream.copy.app import Service
from wildrydes_stream.errors import ConfigError, WildrydesError


def aggregates(name: str, magic: list[int], first_minute: int = 0) -> list[dict[str, Any]]:
    """One aggregate a minute for a unicorn, with the given MinMagicPoints."""
    return [
        {
            "Name": name,
            "StatusTime": f"2016-02-12 {m // 60:02d}:{m % 60:02d}:00.000",
            "Distance": 1300,
            "MinMagicPoints": points,
            "MaxMagicPoints": points + 3,
            "MinHealthPoints": 140,
            "MaxHealthPoints": 150,
        }
        for m, points in enumerate(magic, start=first_minute)
    ]


class Webhook:
    """A receiver on 127.0.0.1: keeps every alert it accepts; answers 500 while `failing`."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.refused = 0
        self.failing = False
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        assert request.headers["Idempotency-Key"] == body["id"]
        if self.failing:
            self.refused += 1
            return web.Response(status=500, text="down for maintenance")
        self.received.append(body)
        return web.Response(status=204)

    def summary(self) -> list[tuple[str, str, str]]:
        return [(a["name"], a["state"], a["status_time"]) for a in self.received]


@pytest.fixture
async def webhook() -> AsyncIterator[Webhook]:
    hook = Webhook()
    app = web.Application()
    app.router.add_post("/alerts", hook.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    hook.url = f"http://{host}:{port}/alerts"
    yield hook
    await runner.cleanup()


@pytest.fixture
def alerting(one_shard: Settings, webhook: Webhook) -> Settings:
    return one_shard.replace(alert_webhook_url=webhook.url)


async def run_once(settings: Settings) -> Service:
    service = Service(settings)
    await service.start()
    await service.run_burst()
    return service


async def the_lease(dynamodb: Any, settings: Settings) -> Lease:
    [lease] = (await LeaseTable(dynamodb, settings.lease_table_name, "reader").all()).values()
    return lease


def sample(service: Service, name: str, **labels: str) -> float | None:
    return service.metrics.registry.get_sample_value(name, labels)


# --- what fires when -------------------------------------------------------------------------


async def test_fires_once_per_crossing_and_resolves_once(
    alerting: Settings, webhook: Webhook, kinesis: Any, dynamodb: Any
) -> None:
    magic = [120, 60, 49, 40, 45, 50, 55, 30, 30, 70]
    await put_records(kinesis, alerting.stream_name, aggregates("Shadowfax", magic))
    await run_once(alerting)

    assert webhook.summary() == [
        ("Shadowfax", "firing", "2016-02-12 00:02:00.000"),
        ("Shadowfax", "resolved", "2016-02-12 00:05:00.000"),
        ("Shadowfax", "firing", "2016-02-12 00:07:00.000"),
        ("Shadowfax", "resolved", "2016-02-12 00:09:00.000"),
    ]
    first = webhook.received[0]
    assert first == {
        "id": "Shadowfax:2016-02-12T00:02Z:firing",
        "state": "firing",
        "name": "Shadowfax",
        "status_time": "2016-02-12 00:02:00.000",
        "min_magic_points": 49,
        "threshold": 50,
    }
    assert len({a["id"] for a in webhook.received}) == 4
    # Every record is in the table too, alerts or not.
    assert len(await scan_table(dynamodb, alerting.table_name)) == len(magic)


async def test_nothing_fires_at_or_above_the_threshold(
    alerting: Settings, webhook: Webhook, kinesis: Any, dynamodb: Any
) -> None:
    await put_records(kinesis, alerting.stream_name, aggregates("Rocinante", [50, 50, 51, 200]))
    await put_records(kinesis, alerting.stream_name, aggregates("Bucephalus", [49], 10))
    await run_once(alerting.replace(alert_magic_threshold=49))

    assert webhook.summary() == []
    assert len(await scan_table(dynamodb, alerting.table_name)) == 5


MINUTE = 60_000


def test_the_state_at_a_checkpoint_is_the_state_as_of_that_record() -> None:
    states = UnicornStates(50)
    states.restore("shard", [])
    assert states.evaluate("shard", 10, "Shadowfax", 40, MINUTE) == "firing"
    assert states.evaluate("shard", 20, "Shadowfax", 60, 2 * MINUTE) == "resolved"
    assert states.evaluate("shard", 30, "Bucephalus", 10, MINUTE) == "firing"

    def low(entries: Mapping[StateKey, Any]) -> list[str]:
        return sorted(name for (name, _), value in entries.items() if value["low"])

    at_15 = states.entries("shard", 15)
    assert low(at_15) == ["Shadowfax"]
    # Records after the checkpoint are read again after a crash: from the state at 15 they
    # raise the same alerts as the first time.
    replay = UnicornStates(50)
    replay.restore("shard", [at_15])
    assert replay.evaluate("shard", 20, "Shadowfax", 60, 2 * MINUTE) == "resolved"
    assert low(states.entries("shard", 25)) == []
    assert low(states.entries("shard", None)) == ["Bucephalus"]


def test_windows_out_of_event_time_order_never_re_fire_or_re_resolve() -> None:
    """A late reading re-puts minute M after minute M+1 (or a throttled put lands after the
    next minute's): one dip gives exactly one firing and one resolved."""
    states = UnicornStates(50)
    states.restore("shard", [])
    arrivals = [(1, 100), (2, 40), (3, 45), (2, 40), (4, 60), (3, 45), (2, 40), (5, 70)]
    alerts = [
        states.evaluate("shard", sequence, "Shadowfax", magic, minute * MINUTE)
        for sequence, (minute, magic) in enumerate(arrivals)
    ]
    assert [a for a in alerts if a is not None] == ["firing", "resolved"]


def test_a_child_shard_takes_only_the_unicorns_its_hash_range_holds() -> None:
    """After a split, the child that never sees a low unicorn must not keep it low."""
    from wildrydes_stream.consumer.state import held_by
    from wildrydes_stream.records.routing import hash_key

    states = UnicornStates(50)
    states.restore("parent", [])
    names = [f"unicorn-{i}" for i in range(400)]
    for sequence, name in enumerate(names):
        states.evaluate("parent", sequence, name, 10, MINUTE)
    parent = states.entries("parent", None)
    middle = 2**127
    lower, upper = ("0", str(middle - 1)), (str(middle), str(2**128 - 1))
    for child, hash_range in (("lower", lower), ("upper", upper)):
        states.restore(child, [held_by(hash_range, parent)])
    assert states.low("lower") | states.low("upper") == set(names)
    assert not states.low("lower") & states.low("upper")
    assert all(hash_key(name) < middle for name in states.low("lower"))
    # Merged again: the union, each unicorn once.
    states.restore("merged", [states.entries("lower", None), states.entries("upper", None)])
    assert states.low("merged") == set(names)


# --- destinations ----------------------------------------------------------------------------


async def test_alerts_are_published_to_the_sns_topic(
    one_shard: Settings, kinesis: Any, sns: Any, sqs: Any
) -> None:
    topic = (await sns.create_topic(Name="unicorn-alerts"))["TopicArn"]
    queue = (await sqs.create_queue(QueueName="alert-inbox"))["QueueUrl"]
    attributes = await sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])
    await sns.subscribe(
        TopicArn=topic, Protocol="sqs", Endpoint=attributes["Attributes"]["QueueArn"]
    )
    await put_records(kinesis, one_shard.stream_name, aggregates("Shadowfax", [90, 48, 52]))
    await run_once(one_shard.replace(alert_sns_topic_arn=topic))

    messages: list[dict[str, Any]] = []

    async def both_arrived() -> bool:
        response = await sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10)
        for message in response.get("Messages", []):
            messages.append(json.loads(message["Body"]))
            await sqs.delete_message(QueueUrl=queue, ReceiptHandle=message["ReceiptHandle"])
        return len(messages) >= 2

    await wait_for(both_arrived, timeout=20)
    alerts = [json.loads(m["Message"]) for m in messages]
    assert [(a["name"], a["state"], a["min_magic_points"]) for a in alerts] == [
        ("Shadowfax", "firing", 48),
        ("Shadowfax", "resolved", 52),
    ]
    assert [m["MessageAttributes"]["state"]["Value"] for m in messages] == ["firing", "resolved"]
    assert alerts[0]["id"] == "Shadowfax:2016-02-12T00:01Z:firing"


async def test_start_refuses_a_topic_that_does_not_exist(one_shard: Settings, sns: Any) -> None:
    missing = "arn:aws:sns:us-east-1:123456789012:no-such-topic"
    service = Service(one_shard.replace(alert_sns_topic_arn=missing))
    with pytest.raises(WildrydesError) as caught:
        await service.start()
    message = str(caught.value)
    assert "\n" not in message
    assert "alert_sns_topic_arn" in message
    assert missing in message


@pytest.mark.parametrize(
    ("variable", "value", "setting"),
    [
        ("WILDRYDES_ALERT_WEBHOOK_URL", "ftp://alerts.example.com/hook", "alert_webhook_url"),
        ("WILDRYDES_ALERT_WEBHOOK_URL", "alerts.example.com/hook", "alert_webhook_url"),
        ("WILDRYDES_ALERT_WEBHOOK_URL", "http://:8080/hook", "alert_webhook_url"),
        ("WILDRYDES_ALERT_SNS_TOPIC_ARN", "unicorn-alerts", "alert_sns_topic_arn"),
    ],
)
def test_malformed_destinations_are_refused_naming_the_setting(
    variable: str, value: str, setting: str
) -> None:
    with pytest.raises(ConfigError, match=setting):
        load_settings(environ={variable: value})
    good = {
        "WILDRYDES_ALERT_WEBHOOK_URL": "https://alerts.example.com:8443/hook",
        "WILDRYDES_ALERT_SNS_TOPIC_ARN": "arn:aws:sns:eu-west-1:123456789012:unicorn-alerts",
    }
    assert getattr(load_settings(environ=good), setting) == good[variable]


# --- at least once ---------------------------------------------------------------------------


async def test_a_failing_webhook_holds_the_checkpoint_until_the_alert_is_delivered(
    alerting: Settings,
    webhook: Webhook,
    kinesis: Any,
    dynamodb: Any,
    running: list[Service],
) -> None:
    webhook.failing = True
    low = await put_records(kinesis, alerting.stream_name, aggregates("Shadowfax", [100, 40]))
    others = aggregates("Rocinante", [120] * 40)
    after = await put_records(kinesis, alerting.stream_name, others)
    alerted = int(low[1]["SequenceNumber"])
    service = Service(alerting)
    running.append(service)
    await service.start()

    # The other records are written meanwhile, and the webhook is retried ...
    async def others_written() -> bool:
        return len(await scan_table(dynamodb, alerting.table_name)) == 2 + len(others)

    await wait_for(others_written)
    refused = webhook.refused
    # (several checkpoint intervals: each retry waits at least backoff_base_seconds)
    await wait_for(holds(lambda: webhook.refused >= refused + 3))
    failures = sample(service, "wildrydes_alert_delivery_failures_total", destination="webhook")
    assert failures is not None
    assert failures >= refused + 3
    # ... but the checkpoint stays just before the record whose alert is not delivered.
    assert (await the_lease(dynamodb, alerting)).checkpoint == low[0]["SequenceNumber"]
    assert int(low[0]["SequenceNumber"]) < alerted

    webhook.failing = False
    last = int(after[-1]["SequenceNumber"])

    async def checkpointed_past_it() -> bool:
        checkpoint = (await the_lease(dynamodb, alerting)).checkpoint
        return checkpoint.isdigit() and int(checkpoint) == last

    await wait_for(checkpointed_past_it)
    assert webhook.summary() == [("Shadowfax", "firing", "2016-02-12 00:01:00.000")]
    assert await stored_low(dynamodb, alerting) == ["Shadowfax"]


async def stored_low(dynamodb: Any, settings: Settings) -> list[str]:
    """The unicorns the lease's stored state says are low."""
    lease = await the_lease(dynamodb, settings)
    store = StateStore(dynamodb, settings.state_table_name)
    entries = await store.load(lease.shard_id, StateRef.decode(lease.state_ref))
    return sorted(name for (name, _), value in entries.items() if value["low"])


@pytest.mark.parametrize("next_worker", ["test-worker", "another-worker"])
async def test_a_restart_or_hand_off_mid_episode_sends_no_repeat(
    alerting: Settings, webhook: Webhook, kinesis: Any, dynamodb: Any, next_worker: str
) -> None:
    await put_records(kinesis, alerting.stream_name, aggregates("Shadowfax", [100, 40, 45]))
    await run_once(alerting)
    assert webhook.summary() == [("Shadowfax", "firing", "2016-02-12 00:01:00.000")]
    assert await stored_low(dynamodb, alerting) == ["Shadowfax"]

    # Still low, then back: the next owner knows the episode is alerted already.
    await put_records(kinesis, alerting.stream_name, aggregates("Shadowfax", [42, 44, 60], 3))
    await run_once(alerting.replace(worker_id=next_worker))
    assert webhook.summary() == [
        ("Shadowfax", "firing", "2016-02-12 00:01:00.000"),
        ("Shadowfax", "resolved", "2016-02-12 00:05:00.000"),
    ]
    assert await stored_low(dynamodb, alerting) == []


# --- metrics ---------------------------------------------------------------------------------


async def test_metrics_count_alerts_by_state_and_destination_and_track_capped_unicorns(
    alerting: Settings,
    webhook: Webhook,
    kinesis: Any,
    running: list[Service],
    caplog: pytest.LogCaptureFixture,
) -> None:
    records = [
        *aggregates("Shadowfax", [60, 45, 55]),
        *aggregates("Rocinante", [70, 71]),
        *aggregates("Bucephalus", [80]),
        *aggregates("Pegasus", [90]),
    ]
    await put_records(kinesis, alerting.stream_name, records)
    service = Service(alerting.replace(alert_max_unicorns_tracked=2))
    running.append(service)
    with caplog.at_level(logging.WARNING):
        await service.start()
        await wait_for(holds(lambda: len(webhook.received) == 2))
        await wait_for(holds(lambda: service.metrics.snapshot().written == len(records)))

    def alerts(state: str, destination: str) -> float | None:
        return sample(service, "wildrydes_alerts_total", state=state, destination=destination)

    for destination in ("log", "webhook"):
        assert alerts("firing", destination) == 1
        assert alerts("resolved", destination) == 1
    assert alerts("firing", "sns") is None  # not configured, not exported
    failures = sample(service, "wildrydes_alert_delivery_failures_total", destination="webhook")
    assert failures == 0  # exported at 0

    def magic(unicorn: str) -> float | None:
        return sample(service, "wildrydes_unicorn_min_magic_points", unicorn=unicorn)

    assert (magic("Shadowfax"), magic("Rocinante")) == (55, 71)
    assert (magic("Bucephalus"), magic("Pegasus")) == (None, None)  # past the cap
    capped = [r for r in caplog.records if "alert_max_unicorns_tracked" in r.getMessage()]
    assert len(capped) == 1
    # The log destination: one line per alert, with the alert's fields.
    logged = [vars(r)["alert"] for r in caplog.records if "alert" in vars(r)]
    assert [alert["state"] for alert in logged] == ["firing"]  # resolved: INFO

    # The series go with the shard: a replica that no longer reads it shows no stale value.
    await service.stop()
    assert magic("Shadowfax") is None
