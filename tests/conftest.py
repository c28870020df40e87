"""Fixtures: kinesalite and dynalite started once per run on free loopback ports.

Every test gets its own stream, table and lease table (unique names), so tests never see each
other's data while sharing the two emulator processes.
"""

from __future__ import annotations

import itertools
import os
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.fanoutserver import FanoutServer, KinesisFeed
from tests.faultproxy import FaultProxy
from tests.helpers import SHADOWFAX, client
from wildrydes_stream.admin.provision import ensure_stream, ensure_table
from wildrydes_stream.config import Settings
from wildrydes_stream.copy.app import Service
from wildrydes_stream.local.emulators import Emulator

_names = itertools.count()


@dataclass(frozen=True)
class Emulators:
    kinesis: Emulator
    dynamodb: Emulator

    def environ(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL_KINESIS": self.kinesis.endpoint,
            "AWS_ENDPOINT_URL_DYNAMODB": self.dynamodb.endpoint,
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
        }


@pytest.fixture(scope="session")
def emulators() -> Iterator[Emulators]:
    # Every test makes its own stream and none is deleted: lift kinesalite's account shard cap.
    kinesalite = Emulator.start("kinesalite", shard_limit=100_000)
    with kinesalite as kinesis, Emulator.start("dynalite") as dynamodb:
        yield Emulators(kinesis, dynamodb)


@pytest.fixture
def aws_env(emulators: Emulators, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Point botocore at the emulators through the SDK's standard variables."""
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    for key, value in emulators.environ().items():
        monkeypatch.setenv(key, value)
    return emulators.environ()


@pytest.fixture
def settings(tmp_path: Path, aws_env: dict[str, str]) -> Settings:
    n = next(_names)
    pid = os.getpid()
    return Settings(
        stream_name=f"stream-{pid}-{n}",
        table_name=f"table-{pid}-{n}",
        lease_table_name=f"leases-{pid}-{n}",
        worker_id="test-worker",
        http_host="127.0.0.1",
        http_port=0,
        idle_poll_interval_seconds=0.05,
        min_poll_interval_seconds=0.0,
        shard_sync_interval_seconds=0.2,
        lease_poll_interval_seconds=0.1,
        checkpoint_interval_seconds=0.1,
        batch_window_seconds=0.01,
        backoff_base_seconds=0.01,
        backoff_max_seconds=0.2,
        shutdown_grace_seconds=10.0,
        deadletter_file=str(tmp_path / "deadletter.jsonl"),
        log_format="text",
    )


@pytest.fixture
async def kinesis(aws_env: dict[str, str]) -> AsyncIterator[Any]:
    async with client("kinesis") as c:
        yield c


@pytest.fixture
async def dynamodb(aws_env: dict[str, str]) -> AsyncIterator[Any]:
    async with client("dynamodb") as c:
        yield c


@pytest.fixture
async def resources(settings: Settings, kinesis: Any, dynamodb: Any) -> Settings:
    """A 4-shard stream and the item table, created for this test."""
    await ensure_stream(kinesis, settings.stream_name, 4)
    await ensure_table(dynamodb, settings)
    return settings


@pytest.fixture
async def one_shard(settings: Settings, kinesis: Any, dynamodb: Any) -> Settings:
    """A 1-shard stream and the item table, so every record of a test is on one shard."""
    await ensure_stream(kinesis, settings.stream_name, 1)
    await ensure_table(dynamodb, settings)
    return settings


@pytest.fixture(scope="session")
def shadowfax_available() -> None:
    if not SHADOWFAX.exists():
        pytest.skip(f"workshop data not found at {SHADOWFAX} (set WILDRYDES_SHARED_DATA)")


# The `kinesis` and `dynamodb` fixtures are requested first so the test's own clients keep
# talking to the emulators directly: only the service, created later, goes through the proxy.
@asynccontextmanager
async def _proxy_for(
    upstream: str, variable: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[FaultProxy]:
    proxy = FaultProxy(upstream)
    await proxy.start()
    monkeypatch.setenv(variable, proxy.endpoint)
    try:
        yield proxy
    finally:
        await proxy.close()


@pytest.fixture
async def dynamodb_proxy(
    emulators: Emulators, kinesis: Any, dynamodb: Any, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[FaultProxy]:
    endpoint = emulators.dynamodb.endpoint
    async with _proxy_for(endpoint, "AWS_ENDPOINT_URL_DYNAMODB", monkeypatch) as proxy:
        yield proxy


@pytest.fixture
async def kinesis_proxy(
    emulators: Emulators, kinesis: Any, dynamodb: Any, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[FaultProxy]:
    endpoint = emulators.kinesis.endpoint
    async with _proxy_for(endpoint, "AWS_ENDPOINT_URL_KINESIS", monkeypatch) as proxy:
        yield proxy


# --- moto's server (real SQS, S3 and SNS protocols): dead letters, redrive, alerts -----------


@pytest.fixture
def moto_endpoint(aws_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """One moto server for this test, SQS, S3 and SNS pointed at it through the SDK's
    variables."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    # moto keeps its state in this process, across servers: start each test from nothing.
    reset = urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")
    with urllib.request.urlopen(reset, timeout=10):
        pass
    monkeypatch.setenv("AWS_ENDPOINT_URL_SQS", endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL_SNS", endpoint)
    yield endpoint
    server.stop()


@pytest.fixture
async def sqs(moto_endpoint: str) -> AsyncIterator[Any]:
    async with client("sqs") as c:
        yield c


@pytest.fixture
async def s3(moto_endpoint: str) -> AsyncIterator[Any]:
    async with client("s3") as c:
        yield c


@pytest.fixture
async def sns(moto_endpoint: str) -> AsyncIterator[Any]:
    async with client("sns") as c:
        yield c


@pytest.fixture
async def queue_url(sqs: Any) -> str:
    return str((await sqs.create_queue(QueueName="wildrydes-deadletter"))["QueueUrl"])


@pytest.fixture
async def bucket(s3: Any) -> str:
    await s3.create_bucket(Bucket="wildrydes-deadletter")
    return "wildrydes-deadletter"


@pytest.fixture
async def running() -> AsyncIterator[list[Service]]:
    """Services started by a test are stopped even when the test fails half way."""
    services: list[Service] = []
    yield services
    for service in services:
        await service.stop()


class ReadMode:
    """One of the read modes a test runs in: `apply` turns the test's settings to it (in
    `fanout`, through a local fan-out server reading the test's kinesalite stream)."""

    def __init__(self, mode: str, kinesis: Any) -> None:
        self.mode = mode
        self._kinesis = kinesis
        self.servers: list[FanoutServer] = []

    async def apply(self, settings: Settings, stream: str | None = None) -> Settings:
        if self.mode == "polling":
            return settings
        feed = KinesisFeed(self._kinesis, stream or settings.stream_name)
        server = await FanoutServer(feed, heartbeat_seconds=0.5).start()
        self.servers.append(server)
        return settings.replace(read_mode="fanout", fanout_endpoint_url=server.url)

    def slow(self, records_per_event: int, interval_seconds: float) -> None:
        """Fan-out servers push at most `records_per_event` records every `interval_seconds`
        a shard (as `get_records_limit` and `min_poll_interval_seconds` slow polling)."""
        for server in self.servers:
            server.max_records_per_event = records_per_event
            server.event_interval_seconds = interval_seconds


@pytest.fixture(params=["polling", "fanout"])
async def read_mode(request: pytest.FixtureRequest, kinesis: Any) -> AsyncIterator[ReadMode]:
    mode = ReadMode(request.param, kinesis)
    try:
        yield mode
    finally:
        for server in mode.servers:
            await server.stop()
    for server in mode.servers:  # the test did read by subscription
        assert server.subscribed, "fanout mode, but no SubscribeToShard reached the server"
