"""One measured run in a process of its own: `python -m bench.worker '<json spec>'`.

The endpoints come from the environment (AWS_ENDPOINT_URL_KINESIS / _DYNAMODB), as for the
service. Prints one JSON line: CPU seconds (time.process_time: user + system of this process
only, so the endpoint's or emulators' CPU is not in it), wall seconds and records written.
Everything is imported before the clock starts; client creation and start-up are inside it
(the driver subtracts a zero-record run to separate them).
"""

from __future__ import annotations

import asyncio
import base64
import cProfile
import json
import os
import sys
import tempfile
import time
from collections.abc import Coroutine
from typing import Any

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from prometheus_client import CollectorRegistry

from bench.canned import Canned, make_iterator, parse_iterator
from wildrydes_stream.aws import clients as aws
from wildrydes_stream.aws.clients import AwsClients
from wildrydes_stream.config import ENV_PREFIX, Settings, load_settings
from wildrydes_stream.copy.app import Service
from wildrydes_stream.copy.item import METRIC_FIELDS
from wildrydes_stream.records.fields import status_time_to_epoch_ms
from wildrydes_stream.runtime.heap import settle_heap

CLIENTS = ("fast", "botocore", "botocore-novalidate", "null")


class NullClients(AwsClients):
    """The service's floor: GetRecords and BatchWriteItem answered in-process at no cost.

    GetShardIterator and everything else still go to the (canned) endpoint; GetRecords pages
    come from records decoded before the clock starts. What this costs is the service itself.
    """

    def __init__(self, pages: list[list[dict[str, Any]]], page_size: int) -> None:
        super().__init__(fast=False)
        self._pages = pages
        self._page_size = page_size

    async def __aenter__(self) -> NullClients:
        await super().__aenter__()
        self.kinesis_data = _NullKinesis(self.kinesis, self._pages, self._page_size)
        self.dynamodb_data = _NullDynamoDB(self.dynamodb)
        return self


class _Passthrough:
    def __init__(self, client: Any) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


class _NullKinesis(_Passthrough):
    def __init__(self, client: Any, pages: list[list[dict[str, Any]]], page_size: int) -> None:
        super().__init__(client)
        self._records = pages
        self._page_size = page_size

    async def get_records(self, ShardIterator: str, Limit: int) -> dict[str, Any]:
        stream, index, offset = parse_iterator(ShardIterator)
        records = [] if stream.endswith("-empty") else self._records[index]
        end = min(len(records), offset + min(self._page_size, Limit))
        await asyncio.sleep(0)
        return {
            "Records": records[offset:end],
            "NextShardIterator": make_iterator(stream, index, end),
            "MillisBehindLatest": 0 if end >= len(records) else 60000,
        }


class _NullDynamoDB(_Passthrough):
    async def batch_write_item(self, RequestItems: dict[str, Any]) -> dict[str, Any]:
        await asyncio.sleep(0)
        return {"UnprocessedItems": {}}


def null_pages(records: int) -> list[list[dict[str, Any]]]:
    """The canned endpoint's records, as the fast client would hand them over."""
    pages = Canned(records, 1).pages
    decoded = []
    for shard in pages:
        entries = [json.loads(raw) for raw in shard]
        for entry in entries:
            entry["Data"] = base64.b64decode(entry["Data"])
        decoded.append(entries)
    return decoded


async def run_service(spec: dict[str, Any]) -> dict[str, Any]:
    client = spec["client"]
    if client not in CLIENTS:
        raise SystemExit(f"unknown client {client!r}: one of {', '.join(CLIENTS)}")
    if client == "botocore-novalidate":
        aws.DATA_PATH = aws.DATA_PATH.merge(AioConfig(parameter_validation=False))
    with tempfile.TemporaryDirectory() as tmp:
        settings = bench_settings(spec, os.path.join(tmp, "deadletter.jsonl"))
        pages = null_pages(spec["records"]) if client == "null" else []
        cpu, wall = time.process_time(), time.perf_counter()
        service = Service(settings, CollectorRegistry())
        if client == "null":
            service._clients = NullClients(pages, spec["page_size"])
        elif client != "fast":
            service._clients = AwsClients(fast=False)
        async with service:
            settle_heap()  # as `python -m wildrydes_stream run` does once started
            await service.run_burst()
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    snapshot = service.metrics.snapshot()
    return {
        "cpu": cpu,
        "wall": wall,
        "written": snapshot.written,
        "dead_lettered": snapshot.dead_lettered,
        "exit_code": service.exit_code,
    }


def bench_settings(spec: dict[str, Any], deadletter_file: str) -> Settings:
    """Defaults, except what a benchmark needs, then the `--set` overrides (validated)."""
    overrides: dict[str, str] = spec.get("settings", {})
    parsed = load_settings(environ={f"{ENV_PREFIX}{k.upper()}": v for k, v in overrides.items()})
    changes: dict[str, Any] = {
        "stream_name": spec["stream"],
        "table_name": spec["table"],
        "lease_table_name": spec["lease_table"],
        "worker_id": "bench",
        "http_host": "127.0.0.1",
        "http_port": 0,
        "get_records_limit": spec["limit"],
        # The endpoints take any call rate: poll again at once; end a burst quickly.
        "min_poll_interval_seconds": 0.0,
        "idle_poll_interval_seconds": 0.05,
        "deadletter_file": deadletter_file,
        "log_format": "text",
        "log_level": "WARNING",
    }
    changes.update((name, getattr(parsed, name)) for name in overrides)
    return Settings().replace(**changes)


def lambda_item(record: dict[str, Any]) -> dict[str, Any]:
    """The original Lambda's item: StatusTime as epoch ms, the measurements as numbers."""
    item: dict[str, Any] = {
        "Name": {"S": record["Name"]},
        "StatusTime": {"N": str(status_time_to_epoch_ms(record["StatusTime"]))},
    }
    for field in METRIC_FIELDS:
        item[field] = {"N": str(record[field])}
    return item


async def run_baseline(spec: dict[str, Any]) -> dict[str, Any]:
    """The Lambda ported straight to aiobotocore: shard after shard, default client config.

    Each GetRecords page is one "invocation": parse every record, then write all its 25-item
    chunks at once (the Lambda's Promise.all), ignoring UnprocessedItems as the Lambda did.
    """
    stream, table, limit = spec["stream"], spec["table"], spec["limit"]
    written = 0
    cpu, wall = time.process_time(), time.perf_counter()
    session = get_session()
    async with (
        session.create_client("kinesis") as kinesis,
        session.create_client("dynamodb") as dynamodb,
    ):
        shards = (await kinesis.list_shards(StreamName=stream))["Shards"]
        for shard in shards:
            iterator = (
                await kinesis.get_shard_iterator(
                    StreamName=stream, ShardId=shard["ShardId"], ShardIteratorType="TRIM_HORIZON"
                )
            )["ShardIterator"]
            while iterator:
                response = await kinesis.get_records(ShardIterator=iterator, Limit=limit)
                records = response["Records"]
                if not records and response.get("MillisBehindLatest", 0) == 0:
                    break
                items = [lambda_item(json.loads(r["Data"])) for r in records]
                await asyncio.gather(
                    *(
                        dynamodb.batch_write_item(
                            RequestItems={
                                table: [{"PutRequest": {"Item": i}} for i in items[k : k + 25]]
                            }
                        )
                        for k in range(0, len(items), 25)
                    )
                )
                written += len(items)
                iterator = response.get("NextShardIterator")
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {"cpu": cpu, "wall": wall, "written": written, "dead_lettered": 0, "exit_code": 0}


def _run(main: Coroutine[Any, Any, dict[str, Any]], loop: str = "uvloop") -> dict[str, Any]:
    # The service runs on uvloop in production (cli.py); measured the same way by default.
    if loop == "asyncio":
        return asyncio.run(main)
    import uvloop

    return uvloop.run(main)


def main() -> None:
    spec = json.loads(sys.argv[1])
    run = run_baseline(spec) if spec["mode"] == "baseline" else run_service(spec)
    if spec.get("profile"):
        # cProfile roughly doubles the CPU: its figures are for finding costs, not reporting.
        profiler = cProfile.Profile(time.process_time)
        result = profiler.runcall(_run, run, spec.get("loop", "uvloop"))
        profiler.dump_stats(spec["profile"])
    else:
        result = _run(run, spec.get("loop", "uvloop"))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
