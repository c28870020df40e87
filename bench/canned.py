"""A canned-response Kinesis + DynamoDB endpoint, so a benchmark measures only the client.

Run as its own process (`python -m bench.canned`; it prints its port) so its CPU is not
counted against the service. One port answers both services (AWS JSON 1.0/1.1, dispatched on
X-Amz-Target), without checking signatures:

- Kinesis: DescribeStreamSummary, ListShards, GetShardIterator and GetRecords. Every stream has
  the same `--shards` shards (default 4) holding the same pre-built records (Shadowfax-shaped
  aggregates, base64 JSON, 56-digit sequence numbers), served in pages of `--page-size` records
  (or the call's Limit, if smaller) with MillisBehindLatest > 0 while more remain; after the
  last record a shard answers an empty page with MillisBehindLatest 0 and an iterator to the
  same spot, like a caught-up open shard. A stream whose name ends in `-empty` has no records
  (to measure start-up alone). With the default 4 shards a unicorn's records are on the shard
  its name hashes to (bench/data.py `shard_of`); with any other number there are at least as
  many unicorns as shards and unicorn u is on shard u mod N, so every shard holds its share.
  `--record-bytes N` pads each record to about N bytes of JSON with a `Note` string of random
  base64, different in every record (0, the default: the bare aggregates, ~170 bytes).
  A stream whose name starts with `raw` holds `--raw-readings` per-second readings of
  `--unicorns` unicorns instead (bench/readings.py), for the aggregator; PutRecords takes any
  records on any stream and keeps them (distinct data only) to compare outputs.
- DynamoDB: DescribeTable (`Name` HASH S + `StatusTime` RANGE N for item tables; tables whose
  name starts with `leases` are lease tables, created by CreateTable), GetItem, PutItem,
  UpdateItem, Scan for the lease tables (in memory, conditions not checked: one worker), and
  BatchWriteItem answering `{"UnprocessedItems":{}}` and counting the items per table; Query
  finds nothing (the aggregator's state table, read only after a restart).
- `GET /_stats` returns {"written": {table: items}, "batches": {table: BatchWriteItem calls},
  "get_records": calls, "records_served": n, "calls": {operation: calls}, "at_end": {lease
  table: leases whose checkpoint is the last record of their shard}, "put": {stream: records
  put}, "put_distinct": {stream: distinct records}, "put_digest": {stream: SHA-256 of the
  distinct records, sorted}}.

`canned_server(...)` runs this module as a child process and yields its endpoint;
`canned_stats(endpoint)` reads `/_stats`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import random
import signal
import socket
import subprocess
import sys
import urllib.request
import zlib
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from aiohttp import web

from bench.data import SEQUENCE_BASE, SHARDS, UNICORNS, aggregates, arrival, encode, shard_of
from bench.readings import START as READINGS_START
from bench.readings import readings
from wildrydes_stream.records.kpl import UserRecord
from wildrydes_stream.records.kpl import aggregate as kpl_aggregate

KINESIS_JSON = "application/x-amz-json-1.1"
DYNAMODB_JSON = "application/x-amz-json-1.0"


class Canned:
    def __init__(
        self,
        records: int,
        page_size: int,
        shards: int = SHARDS,
        record_bytes: int = 0,
        raw_readings: int = 0,
        raw_unicorns: int = 400,
        kpl: int = 0,
    ) -> None:
        self.page_size = page_size
        self.shards = [f"shardId-{i:012d}" for i in range(shards)]
        self.pages: list[list[bytes]] = [[] for _ in self.shards]
        self.last: dict[str, str] = {}
        """Shard id -> sequence number of its last record."""
        unicorns = max(UNICORNS, shards)
        rng = random.Random(11)
        by_shard: list[list[dict[str, Any]]] = [[] for _ in self.shards]
        for n, record in enumerate(aggregates(records, unicorns)):
            shard = shard_of(record) if shards == SHARDS else n % unicorns % shards
            if record_bytes:
                record = padded(record, record_bytes, rng)
            by_shard[shard].append(record)
        # With `kpl`, each Kinesis record is a KPL aggregate of that many records of its shard.
        size = max(1, kpl)
        for shard, held in enumerate(by_shard):
            for first in range(0, len(held), size):
                chunk = held[first : first + size]
                data = (
                    kpl_aggregate([UserRecord(r["Name"], None, encode(r)) for r in chunk])
                    if kpl > 1
                    else encode(chunk[0])
                )
                sequence = SEQUENCE_BASE + (shard << 100) + len(self.pages[shard]) * 2**20
                entry = {
                    "SequenceNumber": str(sequence),
                    "ApproximateArrivalTimestamp": arrival(chunk[0]),
                    "Data": base64.b64encode(data).decode(),
                    "PartitionKey": chunk[0]["Name"],
                }
                self.pages[shard].append(json.dumps(entry, separators=(",", ":")).encode())
                self.last[self.shards[shard]] = entry["SequenceNumber"]
        self.raw_pages: list[list[bytes]] = [[] for _ in self.shards]
        if raw_readings:
            self._fill_raw(raw_readings, raw_unicorns)
        self.put: Counter[str] = Counter()
        self.put_data: dict[str, set[bytes]] = {}
        self.lease_tables: dict[str, dict[str, dict[str, Any]]] = {}
        self.written: Counter[str] = Counter()
        self.batches: Counter[str] = Counter()
        self.get_records = 0
        self.served = 0
        self.calls: Counter[str] = Counter()

    def _fill_raw(self, count: int, unicorns: int) -> None:
        arrival = READINGS_START.timestamp()
        for n, (name, data) in enumerate(readings(count, unicorns)):
            shard = zlib.crc32(name.encode()) % len(self.shards)
            pages = self.raw_pages[shard]
            entry = {
                "SequenceNumber": str(SEQUENCE_BASE + (shard << 100) + len(pages) * 2**20),
                # A reading reaches the stream about half a second after it is taken.
                "ApproximateArrivalTimestamp": round(arrival + n // unicorns + 0.5, 3),
                "Data": base64.b64encode(data).decode(),
                "PartitionKey": name,
            }
            pages.append(json.dumps(entry, separators=(",", ":")).encode())

    async def handle(self, request: web.Request) -> web.Response:
        target = request.headers.get("X-Amz-Target", "")
        prefix, _, operation = target.partition(".")
        self.calls[operation] += 1
        body = json.loads(await request.read() or b"{}")
        if prefix.startswith("Kinesis"):
            content_type = KINESIS_JSON
            handler = getattr(self, f"kinesis_{operation}", None)
        else:
            content_type = DYNAMODB_JSON
            handler = getattr(self, f"dynamodb_{operation}", None)
        if handler is None:
            return _error(content_type, 400, "UnknownOperationException", target)
        try:
            answer = handler(body)
        except _Error as exc:
            return _error(content_type, exc.status, exc.code, exc.message)
        if isinstance(answer, dict):
            answer = json.dumps(answer).encode()
        return web.Response(
            body=answer,
            headers={"Content-Type": content_type, "x-amzn-RequestId": "canned"},
        )

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "written": dict(self.written),
                "batches": dict(self.batches),
                "get_records": self.get_records,
                "records_served": self.served,
                "calls": dict(self.calls),
                "at_end": {
                    table: sum(
                        1
                        for key, lease in leases.items()
                        if key in self.last
                        and lease.get("checkpoint", {}).get("S") == self.last[key]
                    )
                    for table, leases in self.lease_tables.items()
                },
                "put": dict(self.put),
                "put_distinct": {stream: len(data) for stream, data in self.put_data.items()},
                "put_digest": {
                    stream: hashlib.sha256(b"\n".join(sorted(data))).hexdigest()
                    for stream, data in self.put_data.items()
                },
            }
        )

    # Kinesis

    def _records_of(self, stream: str) -> list[list[bytes]]:
        if stream.endswith("-empty"):
            return [[] for _ in self.shards]
        return self.raw_pages if stream.startswith("raw") else self.pages

    def kinesis_DescribeStreamSummary(self, body: dict[str, Any]) -> dict[str, Any]:
        name = body["StreamName"]
        return {
            "StreamDescriptionSummary": {
                "StreamName": name,
                "StreamARN": f"arn:aws:kinesis:us-east-1:123456789012:stream/{name}",
                "StreamStatus": "ACTIVE",
                "StreamModeDetails": {"StreamMode": "PROVISIONED"},
                "RetentionPeriodHours": 24,
                "StreamCreationTimestamp": 1455235200.0,
                "EnhancedMonitoring": [{"ShardLevelMetrics": []}],
                "EncryptionType": "NONE",
                "OpenShardCount": len(self.shards),
                "ConsumerCount": 0,
            }
        }

    def kinesis_ListShards(self, body: dict[str, Any]) -> dict[str, Any]:
        span = 2**128 // len(self.shards)
        return {
            "Shards": [
                {
                    "ShardId": shard,
                    "HashKeyRange": {
                        "StartingHashKey": str(i * span),
                        "EndingHashKey": str(
                            2**128 - 1 if i == len(self.shards) - 1 else (i + 1) * span - 1
                        ),
                    },
                    "SequenceNumberRange": {
                        "StartingSequenceNumber": str(SEQUENCE_BASE + (i << 100))
                    },
                }
                for i, shard in enumerate(self.shards)
            ]
        }

    def kinesis_GetShardIterator(self, body: dict[str, Any]) -> dict[str, Any]:
        shard = body["ShardId"]
        if shard not in self.shards:
            raise _Error(400, "ResourceNotFoundException", f"Shard {shard} not found")
        index = self.shards.index(shard)
        offset = 0
        if body["ShardIteratorType"] == "AFTER_SEQUENCE_NUMBER":
            after = int(body["StartingSequenceNumber"]) - SEQUENCE_BASE - (index << 100)
            offset = after // 2**20 + 1
        return {"ShardIterator": make_iterator(body["StreamName"], index, offset)}

    def kinesis_GetRecords(self, body: dict[str, Any]) -> bytes:
        stream, index, offset = parse_iterator(body["ShardIterator"])
        records = self._records_of(stream)[index]
        end = min(len(records), offset + min(self.page_size, int(body.get("Limit", 10000))))
        behind = 0 if end >= len(records) else 60000 * (1 + (len(records) - end) // 1000)
        self.get_records += 1
        self.served += end - offset
        return b"".join(
            [
                b'{"Records":[',
                b",".join(records[offset:end]),
                b'],"NextShardIterator":"',
                make_iterator(stream, index, end).encode(),
                b'","MillisBehindLatest":',
                str(behind).encode(),
                b"}",
            ]
        )

    def kinesis_PutRecords(self, body: dict[str, Any]) -> dict[str, Any]:
        stream = body["StreamName"]
        kept = self.put_data.setdefault(stream, set())
        for record in body["Records"]:
            kept.add(base64.b64decode(record["Data"]))
        self.put[stream] += len(body["Records"])
        return {
            "FailedRecordCount": 0,
            "Records": [
                {"SequenceNumber": str(SEQUENCE_BASE + n), "ShardId": self.shards[0]}
                for n in range(len(body["Records"]))
            ],
        }

    # DynamoDB

    def dynamodb_DescribeTable(self, body: dict[str, Any]) -> dict[str, Any]:
        name = body["TableName"]
        if name.startswith("leases"):
            if name not in self.lease_tables:
                raise _Error(400, _ddb("ResourceNotFoundException"), f"Table {name} not found")
            keys = [("leaseKey", "HASH", "S")]
        else:
            keys = [("Name", "HASH", "S"), ("StatusTime", "RANGE", "N")]
        return {
            "Table": {
                "TableName": name,
                "TableStatus": "ACTIVE",
                "AttributeDefinitions": [
                    {"AttributeName": k, "AttributeType": t} for k, _, t in keys
                ],
                "KeySchema": [{"AttributeName": k, "KeyType": kind} for k, kind, _ in keys],
                "BillingModeSummary": {"BillingMode": "PAY_PER_REQUEST"},
                "CreationDateTime": 1455235200.0,
                "ItemCount": 0,
                "TableSizeBytes": 0,
            }
        }

    def dynamodb_CreateTable(self, body: dict[str, Any]) -> dict[str, Any]:
        self.lease_tables.setdefault(body["TableName"], {})
        return self.dynamodb_DescribeTable(body)

    def _leases(self, body: dict[str, Any]) -> dict[str, dict[str, Any]]:
        name = body["TableName"]
        if name not in self.lease_tables:
            raise _Error(400, _ddb("ResourceNotFoundException"), f"Table {name} not found")
        return self.lease_tables[name]

    def dynamodb_GetItem(self, body: dict[str, Any]) -> dict[str, Any]:
        item = self._leases(body).get(body["Key"]["leaseKey"]["S"])
        return {"Item": item} if item else {}

    def dynamodb_PutItem(self, body: dict[str, Any]) -> dict[str, Any]:
        item = body["Item"]
        self._leases(body)[item["leaseKey"]["S"]] = item
        return {}

    def dynamodb_UpdateItem(self, body: dict[str, Any]) -> dict[str, Any]:
        item = self._leases(body).get(body["Key"]["leaseKey"]["S"])
        values = body.get("ExpressionAttributeValues", {})
        if item is not None:
            # Enough of the lease updates to keep the table readable: owner, counter, checkpoint.
            for name, placeholder in (("leaseCounter", ":next"), ("checkpoint", ":cp")):
                if placeholder in values:
                    item[name] = values[placeholder]
            if body["UpdateExpression"].startswith("REMOVE leaseOwner"):
                item.pop("leaseOwner", None)
            elif ":me" in values and "SET leaseOwner" in body["UpdateExpression"]:
                item["leaseOwner"] = values[":me"]
        return {}

    def dynamodb_Scan(self, body: dict[str, Any]) -> dict[str, Any]:
        items = list(self._leases(body).values())
        return {"Items": items, "Count": len(items), "ScannedCount": len(items)}

    def dynamodb_Query(self, body: dict[str, Any]) -> dict[str, Any]:
        return {"Items": [], "Count": 0, "ScannedCount": 0}

    def dynamodb_BatchWriteItem(self, body: dict[str, Any]) -> bytes:
        for table, requests in body["RequestItems"].items():
            self.written[table] += len(requests)
            self.batches[table] += 1
        return b'{"UnprocessedItems":{}}'


class _Error(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _ddb(code: str) -> str:
    return f"com.amazonaws.dynamodb.v20120810#{code}"


def _error(content_type: str, status: int, code: str, message: str) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps({"__type": code, "message": message}).encode(),
        headers={"Content-Type": content_type, "x-amzn-RequestId": "canned"},
    )


def padded(record: dict[str, Any], size: int, rng: random.Random) -> dict[str, Any]:
    """`record` with a `Note` of random base64 making its JSON about `size` bytes long."""
    room = size - len(encode(record)) - len(',"Note":""')
    if room <= 0:
        return record
    note = base64.b64encode(rng.randbytes(room * 3 // 4 + 3)).decode()[:room]
    return {**record, "Note": note}


def make_iterator(stream: str, index: int, offset: int) -> str:
    raw = f"{stream}\x00{index}\x00{offset}".encode()
    # Real iterators are ~200 opaque characters; pad to a similar size.
    return base64.b64encode(raw + b"\x00" * (150 - len(raw) % 150)).decode()


def parse_iterator(iterator: str) -> tuple[str, int, int]:
    stream, index, offset = base64.b64decode(iterator).rstrip(b"\x00").decode().split("\x00")
    return stream, int(index), int(offset)


async def serve(args: argparse.Namespace) -> None:
    canned = Canned(
        args.records,
        args.page_size,
        args.shards,
        args.record_bytes,
        args.raw_readings,
        args.unicorns,
        args.kpl,
    )
    app = web.Application(client_max_size=64 * 2**20)
    app.router.add_get("/_stats", canned.stats)
    app.router.add_post("/{tail:.*}", canned.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    site = web.SockSite(runner, sock, backlog=1024)
    await site.start()
    print(sock.getsockname()[1], flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


@contextmanager
def canned_server(
    records: int,
    page_size: int,
    shards: int = SHARDS,
    record_bytes: int = 0,
    raw_readings: int = 0,
    unicorns: int = 400,
    kpl: int = 0,
) -> Iterator[str]:
    """This endpoint in a process of its own; yields its URL, stops it on exit."""
    command = [sys.executable, "-m", "bench.canned", "--records", str(records)]
    command += ["--page-size", str(page_size)]
    if shards != SHARDS:
        command += ["--shards", str(shards)]
    if record_bytes:
        command += ["--record-bytes", str(record_bytes)]
    if raw_readings:
        command += ["--raw-readings", str(raw_readings), "--unicorns", str(unicorns)]
    if kpl:
        command += ["--kpl", str(kpl)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE)
    try:
        assert process.stdout is not None
        line = process.stdout.readline().decode().strip()
        if not line.isdigit():
            raise RuntimeError(f"canned endpoint did not start (exit code {process.wait()})")
        yield f"http://127.0.0.1:{line}"
    finally:
        process.terminate()
        process.wait(10)


def canned_stats(endpoint: str) -> dict[str, Any]:
    """The endpoint's `/_stats`."""
    with urllib.request.urlopen(f"{endpoint}/_stats", timeout=10) as response:
        stats: dict[str, Any] = json.load(response)
        return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--page-size", type=int, default=1000)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--shards", type=int, default=SHARDS, help="shards of every stream")
    parser.add_argument(
        "--record-bytes", type=int, default=0, help="pad records to about this size (0: no pad)"
    )
    parser.add_argument(
        "--raw-readings", type=int, default=0, help="per-second readings on streams named raw*"
    )
    parser.add_argument("--unicorns", type=int, default=400, help="unicorns of the readings")
    parser.add_argument(
        "--kpl", type=int, default=0, help="records a KPL aggregate holds (0: plain records)"
    )
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args))
    else:
        uvloop.run(serve(args))


if __name__ == "__main__":
    main()
