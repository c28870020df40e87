"""A fault-injecting HTTP proxy between the service and an emulator, for the fault tests.

No emulator throttles, fails or is slow on demand, so the proxy forwards every AWS JSON-protocol
request to kinesalite or dynalite and, where a rule says so, answers with a real AWS error body,
returns part of a BatchWriteItem in `UnprocessedItems` (or fails part of a PutRecords), or adds
latency. The operation comes from
the `X-Amz-Target` header (`DynamoDB_20120810.BatchWriteItem` -> `BatchWriteItem`).

Botocore signs the request including its Host header; the emulators do not verify signatures, so
the request is forwarded with the upstream's Host and otherwise unchanged.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import time
import uuid
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

# Headers that describe one hop, not the message: aiohttp sets them again on each side.
# Accept-Encoding too, so the emulator answers uncompressed and bodies can be edited.
_HOP_HEADERS = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "accept-encoding"}
)


@dataclass(frozen=True)
class AwsError:
    status: int
    type: str
    message: str
    html: bool = False
    """Answer `message` as an HTML page (a proxy's or load balancer's), not an AWS JSON body."""


DYNAMODB_THROTTLED = AwsError(
    400,
    "com.amazonaws.dynamodb.v20120810#ProvisionedThroughputExceededException",
    "The level of configured provisioned throughput for the table was exceeded. "
    "Consider increasing your provisioning level with the UpdateTable API.",
)
DYNAMODB_INTERNAL = AwsError(
    500, "com.amazonaws.dynamodb.v20120810#InternalServerError", "Internal server error"
)
DYNAMODB_UNAVAILABLE = AwsError(
    503, "com.amazonaws.dynamodb.v20120810#ServiceUnavailable", "Service Unavailable"
)
DYNAMODB_ACCESS_DENIED = AwsError(
    400,
    "com.amazon.coral.service#AccessDeniedException",
    "User: arn:aws:sts::123456789012:assumed-role/wildrydes-stream/pod is not authorized to "
    "perform: dynamodb:BatchWriteItem on resource: arn:aws:dynamodb:us-east-1:123456789012:"
    "table/UnicornSensorData because no identity-based policy allows the "
    "dynamodb:BatchWriteItem action",
)
DYNAMODB_TABLE_MISSING = AwsError(
    400,
    "com.amazonaws.dynamodb.v20120810#ResourceNotFoundException",
    "Requested resource not found",
)
UNRECOGNIZED_CLIENT = AwsError(
    400,
    "com.amazon.coral.service#UnrecognizedClientException",
    "The security token included in the request is invalid.",
)
EXPIRED_TOKEN = AwsError(
    400,
    "com.amazon.coral.service#ExpiredTokenException",
    "The security token included in the request is expired",
)
INVALID_SIGNATURE = AwsError(
    400,
    "com.amazon.coral.service#InvalidSignatureException",
    "Signature expired: 20261128T100000Z is now earlier than 20261128T100500Z "
    "(20261128T101000Z - 5 min.)",
)
FORBIDDEN_PAGE = AwsError(403, "", "<html><body><h1>403 Forbidden</h1></body></html>", html=True)
KINESIS_ACCESS_DENIED = AwsError(
    400,
    "AccessDeniedException",
    "User: arn:aws:sts::123456789012:assumed-role/wildrydes-stream/pod is not authorized to "
    "perform: kinesis:GetShardIterator on resource: arn:aws:kinesis:us-east-1:123456789012:"
    "stream/wildrydes-aggregated",
)
KINESIS_THROTTLED = AwsError(
    400,
    "ProvisionedThroughputExceededException",
    "Rate exceeded for shard shardId-000000000000 in stream test under account 000000000000.",
)
KINESIS_EXPIRED_ITERATOR = AwsError(
    400,
    "ExpiredIteratorException",
    "Iterator expired. The iterator was created at time Thu Jan 01 00:00:00 UTC 1970 while "
    "right now it is Thu Jan 01 00:05:01 UTC 1970 which is further in the future than the "
    "tolerated delay of 300000 milliseconds.",
)


@dataclass
class _Rule:
    operation: str
    times: int | None  # calls still to affect; None: until cleared
    after: int  # matching calls still to let through untouched before the rule applies
    error: AwsError | None = None
    forward: int | None = None  # BatchWriteItem: requests forwarded per table, None = half
    garble: bool = False
    behind_ms: int | None = None  # GetRecords: forward, then report this MillisBehindLatest


class FaultProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.calls: Counter[str] = Counter()
        """Requests seen, by operation (including the ones answered with a fault)."""
        self.injected: Counter[str] = Counter()
        """Errors and partial BatchWriteItem answers given, by operation."""
        self.unprocessed_returned = 0
        self.get_records_limits: list[int | None] = []
        """The Limit of every GetRecords, in order."""
        self.item_writes: Counter[tuple[str, str]] = Counter()
        """Items DynamoDB accepted through the proxy, by (Name, StatusTime): above 1 is a
        duplicate write."""
        """Write requests handed back in UnprocessedItems by the proxy."""
        self.compress_large = False
        """Answer like DynamoDB: gzip bodies over 1 KiB when the client accepts gzip, with
        x-amz-crc32 computed over the compressed bytes."""
        self.compressed = 0
        """Responses sent gzip-compressed."""
        self.first_written: dict[tuple[str, str], float] = {}
        """time.monotonic() when DynamoDB first answered 200 to a write of each item, by key."""
        self._rules: list[_Rule] = []
        self._delays: dict[str, float] = {}
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self.endpoint = ""

    async def start(self) -> None:
        # Responses pass through byte for byte (no decompression), so their CRC32 stays valid.
        self._session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application(client_max_size=32 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.endpoint = f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    def fail(
        self, operation: str, error: AwsError, times: int | None = 1, *, after: int = 0
    ) -> None:
        """Answer `times` calls of `operation` (None: all until `clear`) with `error`; `*` is
        every operation."""
        self._rules.append(_Rule(operation, times, after, error=error))

    def unprocess(self, times: int | None = 1, *, forward: int | None = None) -> None:
        """For `times` BatchWriteItem calls, write only the first `forward` requests of each
        table (default half, rounded down) and return the rest in UnprocessedItems."""
        self._rules.append(_Rule("BatchWriteItem", times, 0, forward=forward))

    def fail_entries(self, times: int | None = 1, *, forward: int | None = None) -> None:
        """For `times` PutRecords calls, put only the first `forward` records of each (default
        half, rounded down) and answer the rest as throttled entries, as Kinesis does."""
        self._rules.append(_Rule("PutRecords", times, 0, forward=forward))

    def garble(self, operation: str, times: int | None = 1) -> None:
        """Answer `times` calls of `operation` with a 200 whose body is not JSON (as a broken
        middlebox might), CRC32 intact so only the body itself is wrong."""
        self._rules.append(_Rule(operation, times, 0, garble=True))

    def behind(self, millis: int, times: int | None = None) -> None:
        """Forward GetRecords but answer that the shard is `millis` behind the tip (kinesalite
        always says 0)."""
        self._rules.append(_Rule("GetRecords", times, 0, behind_ms=millis))

    def delay(self, operation: str, seconds: float) -> None:
        """Hold every call of `operation` for `seconds` before forwarding it."""
        self._delays[operation] = seconds

    def clear(self) -> None:
        self._rules.clear()
        self._delays.clear()

    def _take_rule(self, operation: str) -> _Rule | None:
        """The first live rule for `operation`, spending one of its calls."""
        for rule in self._rules:
            if rule.operation not in (operation, "*"):
                continue
            if rule.after > 0:
                rule.after -= 1
                return None
            if rule.times is not None:
                rule.times -= 1
                if rule.times == 0:
                    self._rules.remove(rule)
            return rule
        return None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        response = await self._answer(request)
        if self.compress_large and "gzip" in request.headers.get("Accept-Encoding", ""):
            return self._compressed(response)
        return response

    def _compressed(self, response: web.Response) -> web.Response:
        body = response.body
        if not isinstance(body, bytes) or len(body) <= 1024:
            return response
        self.compressed += 1
        packed = gzip.compress(body)
        headers = {k: v for k, v in response.headers.items() if k.lower() != "content-length"}
        headers["Content-Encoding"] = "gzip"
        if "x-amz-crc32" in {k.lower() for k in headers}:
            headers = {k: v for k, v in headers.items() if k.lower() != "x-amz-crc32"}
            headers["x-amz-crc32"] = str(zlib.crc32(packed))
        return web.Response(status=response.status, headers=headers, body=packed)

    async def _answer(self, request: web.Request) -> web.Response:
        target = request.headers.get("X-Amz-Target", "")
        operation = target.rpartition(".")[2]
        body = await request.read()
        if operation == "BatchWriteItem" and _to_state_table(body):
            # The applications' state table (consumer/statestore.py) is a fault target of
            # its own: rules for the item table's writes leave it alone.
            operation = STATE_WRITE
        self.calls[operation] += 1
        if operation == "GetRecords":
            self.get_records_limits.append(json.loads(body).get("Limit"))
        if operation in self._delays:
            await asyncio.sleep(self._delays[operation])
        rule = self._take_rule(operation)
        if rule is not None and rule.error is not None:
            self.injected[operation] += 1
            return _error_response(target, rule.error)
        if rule is not None and rule.garble:
            self.injected[operation] += 1
            return _json_response(200, target, b"<html>502 Bad Gateway</html>")
        if rule is not None and rule.behind_ms is not None:
            self.injected[operation] += 1
            status, _, payload = await self._forward(request, body)
            answer = json.loads(payload)
            if status == 200:
                answer["MillisBehindLatest"] = rule.behind_ms
            return _json_response(status, target, json.dumps(answer).encode())
        if rule is not None and operation == "PutRecords":
            self.injected[operation] += 1
            return await self._partial_put_records(request, body, rule.forward)
        if rule is not None:
            self.injected[operation] += 1
            return await self._partial_batch_write(request, body, rule.forward)
        status, headers, payload = await self._forward(request, body)
        if operation == "BatchWriteItem" and status == 200:
            self._record_writes(body, payload)
        return web.Response(status=status, headers=headers, body=payload)

    def _record_writes(self, body: bytes, payload: bytes) -> None:
        """Count every item DynamoDB took, by key, to find the same item written twice."""
        now = time.monotonic()
        unprocessed = json.loads(payload).get("UnprocessedItems", {})
        left = {
            json.dumps(w["PutRequest"]["Item"], sort_keys=True)
            for writes in unprocessed.values()
            for w in writes
            if "PutRequest" in w
        }
        for writes in json.loads(body)["RequestItems"].values():
            for write in writes:
                item = write.get("PutRequest", {}).get("Item", {})
                if "StatusTime" not in item:
                    continue  # not a table item (the state table's, a delete)
                if json.dumps(item, sort_keys=True) not in left:
                    status_time = item["StatusTime"]
                    key = (item["Name"]["S"], status_time.get("N") or status_time.get("S"))
                    self.item_writes[key] += 1
                    self.first_written.setdefault(key, now)

    async def _forward(
        self, request: web.Request, body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
        async with self._session.request(
            request.method,
            self.upstream + request.path_qs,
            headers=headers,
            data=body if len(body) < 512 * 1024 else io.BytesIO(body),
        ) as response:
            payload = await response.read()
            out = {k: v for k, v in response.headers.items() if k.lower() not in _HOP_HEADERS}
            return response.status, out, payload

    async def _partial_batch_write(
        self, request: web.Request, body: bytes, forward: int | None
    ) -> web.Response:
        request_items: dict[str, list[Any]] = json.loads(body)["RequestItems"]
        sent: dict[str, list[Any]] = {}
        held: dict[str, list[Any]] = {}
        for table, writes in request_items.items():
            keep = len(writes) // 2 if forward is None else min(forward, len(writes))
            if keep:
                sent[table] = writes[:keep]
            if writes[keep:]:
                held[table] = writes[keep:]
            self.unprocessed_returned += len(writes) - keep
        result: dict[str, Any] = {"UnprocessedItems": {}}
        if sent:  # BatchWriteItem refuses an empty request: with nothing to send, send nothing
            status, _, payload = await self._forward(
                request, json.dumps({**json.loads(body), "RequestItems": sent}).encode()
            )
            if status != 200:  # dynalite refused the part: pass its error on unchanged
                return _json_response(status, request.headers["X-Amz-Target"], payload)
            result = json.loads(payload)
        unprocessed = result.setdefault("UnprocessedItems", {})
        for table, writes in held.items():
            unprocessed.setdefault(table, []).extend(writes)
        return _json_response(200, request.headers["X-Amz-Target"], json.dumps(result).encode())

    async def _partial_put_records(
        self, request: web.Request, body: bytes, forward: int | None
    ) -> web.Response:
        call = json.loads(body)
        records: list[Any] = call["Records"]
        keep = len(records) // 2 if forward is None else min(forward, len(records))
        target = request.headers["X-Amz-Target"]
        results: list[dict[str, Any]] = []
        if keep:  # PutRecords refuses an empty request: with nothing to send, send nothing
            status, _, payload = await self._forward(
                request, json.dumps({**call, "Records": records[:keep]}).encode()
            )
            if status != 200:
                return _json_response(status, target, payload)
            results = json.loads(payload)["Records"]
        throttled = {
            "ErrorCode": KINESIS_THROTTLED.type,
            "ErrorMessage": KINESIS_THROTTLED.message,
        }
        results += [dict(throttled) for _ in records[keep:]]
        answer = {"FailedRecordCount": len(records) - keep, "Records": results}
        return _json_response(200, target, json.dumps(answer).encode())


STATE_WRITE = "BatchWriteItem:state"
"""The operation name rules and counters use for BatchWriteItem calls to a state table."""


def _to_state_table(body: bytes) -> bool:
    tables = json.loads(body).get("RequestItems", {})
    return bool(tables) and all(name.endswith("-state") for name in tables)


def _error_response(target: str, error: AwsError) -> web.Response:
    if error.html:
        return web.Response(status=error.status, text=error.message, content_type="text/html")
    body = json.dumps({"__type": error.type, "message": error.message}).encode()
    return _json_response(error.status, target, body)


def _json_response(status: int, target: str, body: bytes) -> web.Response:
    dynamodb = target.startswith("DynamoDB")
    headers = {
        "Content-Type": "application/x-amz-json-1.0" if dynamodb else "application/x-amz-json-1.1",
        "x-amzn-RequestId": uuid.uuid4().hex,
    }
    if dynamodb:
        # Botocore checks DynamoDB bodies against this header: it must match what is sent.
        headers["x-amz-crc32"] = str(zlib.crc32(body))
    return web.Response(status=status, headers=headers, body=body)
