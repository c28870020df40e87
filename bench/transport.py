"""Client CPU per data-path call: the awsjson client on aiohttp against it on http1.Http1Pool.

`python -m bench.transport` starts the canned endpoint (bench/canned.py) in a process of its
own and, in this process, times an empty GetRecords and a 25-item BatchWriteItem on both
transports, in alternating rounds so that both see the same machine. The figure is this
process's CPU (time.process_time: user + system) per call, the median of the rounds; the
endpoint's CPU is not in it. `--concurrency N` runs N callers at once (as N shard pollers or
N sink writers would), each making its share of the calls.

Ends with one JSON line holding every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

from aiobotocore.session import get_session

from bench.__main__ import endpoints
from bench.canned import canned_server
from wildrydes_stream.aws.clients import DATA_PATH
from wildrydes_stream.aws.lean import DynamoDBData, KinesisData

TRANSPORTS = ("aiohttp", "http1")


def batch() -> list[dict[str, Any]]:
    return [
        {
            "PutRequest": {
                "Item": {
                    "Name": {"S": f"Unicorn{i}"},
                    "StatusTime": {"N": str(1455235200000 + i * 1000)},
                    "Latitude": {"N": "40.7128"},
                    "Longitude": {"N": "-74.0060"},
                    "Distance": {"N": "1317"},
                    "MagicPoints": {"N": "146"},
                    "HealthPoints": {"N": "150"},
                }
            }
        }
        for i in range(25)
    ]


async def cpu_per_call(call: Callable[[], Awaitable[Any]], calls: int, concurrency: int) -> float:
    """CPU µs per call, `calls` calls made by `concurrency` callers."""

    async def caller(n: int) -> None:
        for _ in range(n):
            await call()

    share = calls // concurrency
    start = time.process_time()
    if concurrency == 1:
        await caller(calls)
    else:
        await asyncio.gather(*(caller(share) for _ in range(concurrency)))
    return (time.process_time() - start) / (share * concurrency) * 1e6


async def measure(calls: int, rounds: int, concurrency: int) -> dict[str, dict[str, float]]:
    session = get_session()
    credentials = await session.get_credentials()
    region = "us-east-1"
    async with (
        session.create_client("kinesis", region_name=region, config=DATA_PATH) as kinesis,
        session.create_client("dynamodb", region_name=region, config=DATA_PATH) as dynamodb,
    ):
        iterator = (
            await kinesis.get_shard_iterator(
                StreamName="transport-empty",
                ShardId="shardId-000000000000",
                ShardIteratorType="LATEST",
            )
        )["ShardIterator"]
        items = {"items-transport": batch()}
        samples: dict[str, dict[str, list[float]]] = {
            name: {"get_records": [], "batch_write_item": []} for name in TRANSPORTS
        }
        async with AsyncExitStack() as stack:
            clients = {
                name: (
                    await stack.enter_async_context(
                        KinesisData(kinesis, credentials, http1=name == "http1")
                    ),
                    await stack.enter_async_context(
                        DynamoDBData(dynamodb, credentials, http1=name == "http1")
                    ),
                )
                for name in TRANSPORTS
            }
            # A proxy in the environment would put both on aiohttp: make sure of what is timed.
            assert all(c._pool is not None for c in clients["http1"])
            assert all(c._pool is None for c in clients["aiohttp"])
            for k, d in clients.values():  # warm up: connections, caches
                for _ in range(200):
                    await k.get_records(ShardIterator=iterator, Limit=100)
                    assert await d.batch_write_item(RequestItems=items) == {"UnprocessedItems": {}}
            for _ in range(rounds):
                for name, (k, d) in clients.items():

                    def get(k: KinesisData = k) -> Awaitable[Any]:
                        return k.get_records(ShardIterator=iterator, Limit=100)

                    def put(d: DynamoDBData = d) -> Awaitable[Any]:
                        return d.batch_write_item(RequestItems=items)

                    by_call = samples[name]
                    by_call["get_records"].append(await cpu_per_call(get, calls, concurrency))
                    by_call["batch_write_item"].append(await cpu_per_call(put, calls, concurrency))
    return {
        name: {call: statistics.median(values) for call, values in by_call.items()}
        for name, by_call in samples.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=5000, help="calls a round (default 5000)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    parser.add_argument("--concurrency", type=int, default=1, help="callers at once (default 1)")
    args = parser.parse_args()
    with canned_server(1000, 1000) as endpoint:
        os.environ.update(endpoints(endpoint, endpoint))
        for key in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
            os.environ.pop(key, None)
        try:
            import uvloop
        except ImportError:
            figures = asyncio.run(measure(args.calls, args.rounds, args.concurrency))
        else:
            figures = uvloop.run(measure(args.calls, args.rounds, args.concurrency))
    print(
        f"client CPU µs per call (median of {args.rounds} rounds of {args.calls} calls, "
        f"concurrency {args.concurrency})"
    )
    print(f"{'call':<28}{'aiohttp':>10}{'http1':>10}{'saved':>8}")
    for call, label in (
        ("get_records", "GetRecords (empty)"),
        ("batch_write_item", "BatchWriteItem (25 items)"),
    ):
        before, after = figures["aiohttp"][call], figures["http1"][call]
        print(f"{label:<28}{before:>10.1f}{after:>10.1f}{1 - after / before:>8.0%}")
    print(json.dumps({"concurrency": args.concurrency, "us_per_call": figures}))


if __name__ == "__main__":
    main()
