"""A local Kinesis enhanced fan-out server: HTTP/2 cleartext (prior knowledge), real event-stream
frames, and faults on request.

It serves RegisterStreamConsumer, DescribeStreamConsumer and SubscribeToShard (X-Amz-Target, as
Kinesis does) on 127.0.0.1. Records come from a feed: `MemoryFeed` (shards held here, closed
with children on request) or `KinesisFeed` (a kinesalite stream, read with GetRecords). A
subscription sends the `initial-response` event, then a SubscribeToShardEvent as soon as there
are records (or every `heartbeat_seconds` without), honouring HTTP/2 flow control, ends with
ChildShards when its shard is closed and read to the end, and ends after `lifetime_seconds`.

Faults (`Script`, taken one per subscription in order): refuse the call with an error answer,
leave out the initial-response, or after some events reset the stream, stop sending (stall),
send an exception event, or end the subscription.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ssl
import struct
import time
import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import orjson
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RequestReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import StreamClosedError

ACCOUNT = "123456789012"


def encode_message(headers: dict[str, str], payload: bytes) -> bytes:
    """One event-stream message (string headers only), as botocore's decoder reads them."""
    head = b"".join(
        struct.pack("!B", len(name)) + name.encode() + b"\x07" + struct.pack("!H", len(v)) + v
        for name, value in headers.items()
        for v in (value.encode(),)
    )
    total = 12 + len(head) + len(payload) + 4
    prelude = struct.pack("!II", total, len(head))
    prelude += struct.pack("!I", zlib.crc32(prelude))
    message = prelude + head + payload
    return message + struct.pack("!I", zlib.crc32(message))


def event_message(event_type: str, body: dict[str, Any]) -> bytes:
    return encode_message(
        {
            ":message-type": "event",
            ":event-type": event_type,
            ":content-type": "application/json",
        },
        orjson.dumps(body),
    )


def exception_message(code: str, message: str) -> bytes:
    return encode_message(
        {
            ":message-type": "exception",
            ":exception-type": code,
            ":content-type": "application/json",
        },
        orjson.dumps({"message": message}),
    )


@dataclass
class Script:
    """What one subscription does besides serving records."""

    refuse: str | None = None
    """Answer the call with this error code (HTTP 400) instead."""
    initial_response: bool = True
    after_events: int = 0
    """Events (after the initial-response) sent before `then`."""
    then: str | None = None
    """`reset` (RST_STREAM), `stall` (send nothing more, keep the stream open), `end` (end the
    stream as at 5 minutes), `exception:<Code>` (an exception event, then the end)."""


@dataclass
class Record:
    sequence: int
    data: bytes
    key: str
    arrival: float


class Feed(Protocol):
    def stream_arn(self) -> str: ...
    async def open(self, shard_id: str, position: dict[str, Any]) -> FeedCursor: ...


class FeedCursor(Protocol):
    async def next_batch(self, most: int, wait: float) -> list[Record]:
        """Records after the last batch (waiting up to `wait` for some)."""
        ...

    def continuation(self) -> str | None: ...
    def behind_ms(self) -> int: ...
    def children(self) -> list[dict[str, Any]] | None:
        """The children once the shard is closed and read to its end, else None."""
        ...


@dataclass
class MemoryShard:
    shard_id: str
    start: int
    records: list[Record] = field(default_factory=list)
    children: list[str] | None = None
    parents: list[str] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)


class MemoryFeed:
    """Shards held in memory: `put` records, `close` a shard with its children."""

    def __init__(self, stream: str = "fanout-test", shards: int = 1) -> None:
        self.stream = stream
        self.shards: dict[str, MemoryShard] = {}
        for n in range(shards):
            self.add_shard(f"shardId-{n:012d}")

    def add_shard(self, shard_id: str, parents: list[str] | None = None) -> MemoryShard:
        start = (len(self.shards) + 1) * 10**12
        shard = MemoryShard(shard_id, start, parents=parents or [])
        self.shards[shard_id] = shard
        return shard

    def stream_arn(self) -> str:
        return f"arn:aws:kinesis:us-east-1:{ACCOUNT}:stream/{self.stream}"

    def put(self, shard_id: str, data: bytes, key: str = "k") -> str:
        shard = self.shards[shard_id]
        if shard.children is not None:
            raise ValueError(f"{shard_id} is closed")
        last = shard.records[-1].sequence if shard.records else shard.start
        record = Record(last + 1, data, key, time.time())
        shard.records.append(record)
        shard.changed.set()
        shard.changed = asyncio.Event()
        return str(record.sequence)

    def close(self, shard_id: str, children: list[str]) -> None:
        shard = self.shards[shard_id]
        shard.children = children
        for child in children:
            if child not in self.shards:
                self.add_shard(child, [shard_id])
        shard.changed.set()
        shard.changed = asyncio.Event()

    async def open(self, shard_id: str, position: dict[str, Any]) -> MemoryCursor:
        shard = self.shards[shard_id]
        kind = position["Type"]
        records = shard.records
        if kind == "TRIM_HORIZON":
            index = 0
        elif kind == "LATEST":
            index = len(records)
        elif kind == "AT_TIMESTAMP":
            moment = float(position["Timestamp"])
            index = next((i for i, r in enumerate(records) if r.arrival >= moment), len(records))
        else:
            sequence = int(position["SequenceNumber"])
            after = kind == "AFTER_SEQUENCE_NUMBER"
            index = next(
                (
                    i
                    for i, r in enumerate(records)
                    if r.sequence > sequence or (not after and r.sequence == sequence)
                ),
                len(records),
            )
        return MemoryCursor(shard, index)


class MemoryCursor:
    def __init__(self, shard: MemoryShard, index: int) -> None:
        self.shard = shard
        self.index = index

    async def next_batch(self, most: int, wait: float) -> list[Record]:
        shard = self.shard
        if self.index >= len(shard.records) and shard.children is None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await shard.changed.wait()
        batch = shard.records[self.index : self.index + most]
        self.index += len(batch)
        return batch

    def continuation(self) -> str:
        records = self.shard.records
        return str(records[self.index - 1].sequence if self.index else self.shard.start)

    def behind_ms(self) -> int:
        records = self.shard.records
        if self.index >= len(records):
            return 0
        return max(1, int((time.time() - records[self.index].arrival) * 1000))

    def children(self) -> list[dict[str, Any]] | None:
        shard = self.shard
        if shard.children is None or self.index < len(shard.records):
            return None
        return [
            {
                "ShardId": child,
                "ParentShards": [shard.shard_id],
                "HashKeyRange": {"StartingHashKey": "0", "EndingHashKey": "1"},
            }
            for child in shard.children
        ]


class KinesisFeed:
    """A Kinesis stream (kinesalite) read with GetRecords every `poll_seconds` while there is
    nothing new, so records are pushed within that of being put; at once when whoever puts
    calls `notify` after each PutRecords (a feed that pushes on put)."""

    def __init__(self, kinesis: Any, stream: str, poll_seconds: float = 0.02) -> None:
        self.kinesis = kinesis
        self.stream = stream
        self.poll_seconds = poll_seconds
        self.changed = asyncio.Event()
        """Set (then replaced) by `notify`: something was put."""

    def notify(self) -> None:
        """Records were put: every cursor waiting for some reads again now."""
        self.changed.set()
        self.changed = asyncio.Event()

    def stream_arn(self) -> str:
        return f"arn:aws:kinesis:us-east-1:000000000000:stream/{self.stream}"

    async def open(self, shard_id: str, position: dict[str, Any]) -> KinesisCursor:
        kind = position["Type"]
        params: dict[str, Any] = {
            "StreamName": self.stream,
            "ShardId": shard_id,
            "ShardIteratorType": kind,
        }
        if "SequenceNumber" in position:
            params["StartingSequenceNumber"] = position["SequenceNumber"]
        if "Timestamp" in position:
            params["Timestamp"] = float(position["Timestamp"])
        answer = await self.kinesis.get_shard_iterator(**params)
        start = position.get("SequenceNumber") if kind == "AFTER_SEQUENCE_NUMBER" else None
        return KinesisCursor(self, shard_id, answer["ShardIterator"], start)


class KinesisCursor:
    def __init__(self, feed: KinesisFeed, shard_id: str, iterator: str, start: str | None):
        self.feed = feed
        self.shard_id = shard_id
        self.iterator: str | None = iterator
        self.last = start
        self._children: list[dict[str, Any]] | None = None

    async def next_batch(self, most: int, wait: float) -> list[Record]:
        deadline = time.monotonic() + wait
        while self.iterator is not None:
            # Taken before reading, so a put acknowledged after this read is not missed.
            changed = self.feed.changed
            answer = await self.feed.kinesis.get_records(ShardIterator=self.iterator, Limit=most)
            self.iterator = answer.get("NextShardIterator")
            records = answer.get("Records", [])
            if records:
                self.last = records[-1]["SequenceNumber"]
                return [
                    Record(
                        int(r["SequenceNumber"]),
                        r["Data"],
                        r["PartitionKey"],
                        r["ApproximateArrivalTimestamp"].timestamp(),
                    )
                    for r in records
                ]
            left = deadline - time.monotonic()
            if self.iterator is None or left <= 0:
                break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(self.feed.poll_seconds, left)):
                    await changed.wait()
        if self.iterator is None and self._children is None:
            listed = await self.feed.kinesis.list_shards(StreamName=self.feed.stream)
            self._children = [
                {
                    "ShardId": shard["ShardId"],
                    "ParentShards": [
                        p
                        for p in (shard.get("ParentShardId"), shard.get("AdjacentParentShardId"))
                        if p
                    ],
                    "HashKeyRange": shard["HashKeyRange"],
                }
                for shard in listed["Shards"]
                if self.shard_id in (shard.get("ParentShardId"), shard.get("AdjacentParentShardId"))
            ]
        return []

    def continuation(self) -> str | None:
        return self.last

    def behind_ms(self) -> int:
        return 0

    def children(self) -> list[dict[str, Any]] | None:
        return self._children if self.iterator is None else None


@dataclass
class Subscribed:
    """One SubscribeToShard call as the server saw it."""

    shard_id: str
    position: dict[str, Any]
    consumer_arn: str
    events: int = 0
    flow_blocked: int = 0
    """Times the server found the stream's window too small and waited."""
    waiting_for_window: bool = False
    """True while it waits so now."""


class FanoutServer:
    def __init__(
        self,
        feed: Feed,
        *,
        heartbeat_seconds: float = 1.0,
        lifetime_seconds: float = 300.0,
        max_records_per_event: int = 1000,
        activate_after: int = 1,
        event_interval_seconds: float = 0.0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.feed = feed
        self.tls = tls
        """Serve HTTP/2 over TLS (ALPN h2) with this context, as AWS does; None: cleartext."""
        self.heartbeat_seconds = heartbeat_seconds
        self.lifetime_seconds = lifetime_seconds
        self.max_records_per_event = max_records_per_event
        self.event_interval_seconds = event_interval_seconds
        """Pause after each event with records (a slow stream, for tests that need one)."""
        self.activate_after = activate_after
        """DescribeStreamConsumer calls that see a new consumer CREATING before ACTIVE."""
        self.scripts: deque[Script] = deque()
        self.consumers: dict[str, dict[str, Any]] = {}
        self.subscribed: list[Subscribed] = []
        self.calls: list[str] = []
        self.bytes_sent = 0
        self._server: asyncio.Server | None = None
        self._protocols: set[_ServerConnection] = set()
        self.port = 0

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    async def start(self) -> FanoutServer:
        loop = asyncio.get_running_loop()
        if self.tls is not None:
            self.tls.set_alpn_protocols(["h2"])
        self._server = await loop.create_server(
            lambda: _ServerConnection(self), "127.0.0.1", 0, ssl=self.tls
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        for protocol in list(self._protocols):
            protocol.abort()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def __aenter__(self) -> FanoutServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def reset_connections(self) -> None:
        """Drop every client connection (a reset mid stream, for all subscriptions at once)."""
        for protocol in list(self._protocols):
            protocol.abort()

    @property
    def open_subscriptions(self) -> int:
        return sum(len(p.subscriptions) for p in self._protocols)

    # calls

    def answer(self, target: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        operation = target.rpartition(".")[2]
        self.calls.append(operation)
        if operation == "RegisterStreamConsumer":
            name = body["ConsumerName"]
            if name in self.consumers:
                return 400, _error("ResourceInUseException", f"consumer {name} exists")
            arn = f"{body['StreamARN']}/consumer/{name}:{int(time.time())}"
            self.consumers[name] = {
                "ConsumerName": name,
                "ConsumerARN": arn,
                "ConsumerStatus": "CREATING",
                "ConsumerCreationTimestamp": time.time(),
                "StreamARN": body["StreamARN"],
                "describes": 0,
            }
            return 200, {"Consumer": _public(self.consumers[name])}
        if operation == "DescribeStreamConsumer":
            consumer = self.consumers.get(body.get("ConsumerName", ""))
            if consumer is None:
                return 400, _error("ResourceNotFoundException", "no such consumer")
            consumer["describes"] += 1
            if consumer["describes"] >= self.activate_after:
                consumer["ConsumerStatus"] = "ACTIVE"
            return 200, {"ConsumerDescription": _public(consumer)}
        return 400, _error("UnknownOperationException", operation)

    def consumer_arns(self) -> set[str]:
        return {c["ConsumerARN"] for c in self.consumers.values()}


def _public(consumer: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in consumer.items() if k != "describes"}


def _error(code: str, message: str) -> dict[str, Any]:
    return {"__type": code, "message": message}


class _ServerConnection(asyncio.Protocol):
    def __init__(self, server: FanoutServer) -> None:
        self.server = server
        self.h2 = H2Connection(H2Configuration(client_side=False, header_encoding="utf-8"))
        self.transport: asyncio.Transport | None = None
        self.requests: dict[int, tuple[dict[str, str], bytearray]] = {}
        self.subscriptions: dict[int, asyncio.Task[None]] = {}
        self.windows: dict[int, asyncio.Event] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)
        self.server._protocols.add(self)
        self.h2.initiate_connection()
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server._protocols.discard(self)
        for task in self.subscriptions.values():
            task.cancel()
        for event in self.windows.values():
            event.set()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        for event in self.h2.receive_data(data):
            if isinstance(event, RequestReceived):
                headers = {
                    (k.decode() if isinstance(k, bytes) else k): (
                        v.decode() if isinstance(v, bytes) else v
                    )
                    for k, v in event.headers or ()
                }
                self.requests[event.stream_id] = (headers, bytearray())
            elif isinstance(event, DataReceived):
                self.requests[event.stream_id][1].extend(event.data or b"")
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, StreamEnded):
                headers, body = self.requests.pop(event.stream_id)
                self.handle(event.stream_id, headers, bytes(body))
            elif isinstance(event, StreamReset):
                task = self.subscriptions.pop(event.stream_id, None)
                if task is not None:
                    task.cancel()
            elif isinstance(event, WindowUpdated):
                for waiter in list(self.windows.values()):
                    waiter.set()
            elif isinstance(event, ConnectionTerminated):
                self.abort()
        self.flush()

    def respond(self, stream_id: int, status: int, body: dict[str, Any]) -> None:
        payload = orjson.dumps(body)
        headers = [(":status", str(status)), ("content-type", "application/x-amz-json-1.1")]
        if status >= 300:
            headers.append(("x-amzn-errortype", body.get("__type", "")))
        self.h2.send_headers(stream_id, headers)
        self.h2.send_data(stream_id, payload, end_stream=True)
        self.flush()

    def handle(self, stream_id: int, headers: dict[str, str], body: bytes) -> None:
        target = headers.get("x-amz-target", "")
        params = orjson.loads(body) if body else {}
        if not headers.get("authorization", "").startswith("AWS4-HMAC-SHA256 Credential="):
            self.respond(stream_id, 400, _error("MissingAuthenticationTokenException", "unsigned"))
            return
        if target.endswith(".SubscribeToShard"):
            self.server.calls.append("SubscribeToShard")
            script = self.server.scripts.popleft() if self.server.scripts else Script()
            if script.refuse:
                self.respond(stream_id, 400, _error(script.refuse, "refused by the script"))
                return
            seen = Subscribed(params["ShardId"], params["StartingPosition"], params["ConsumerARN"])
            self.server.subscribed.append(seen)
            self.subscriptions[stream_id] = asyncio.create_task(
                self.subscribe(stream_id, seen, script)
            )
            return
        status, answer = self.server.answer(target, params)
        self.respond(stream_id, status, answer)

    async def send(self, stream_id: int, data: bytes, seen: Subscribed) -> None:
        """Send as the stream's and connection's windows allow (the client's back-pressure)."""
        h2 = self.h2
        while data:
            window = h2.local_flow_control_window(stream_id)
            if window <= 0:
                seen.flow_blocked += 1
                waiter = self.windows[stream_id] = asyncio.Event()
                seen.waiting_for_window = True
                try:
                    await waiter.wait()
                finally:
                    seen.waiting_for_window = False
                if self.transport is None or self.transport.is_closing():
                    raise ConnectionResetError
                continue
            size = min(window, h2.max_outbound_frame_size, len(data))
            h2.send_data(stream_id, data[:size])
            self.server.bytes_sent += size
            data = data[size:]
            self.flush()

    async def subscribe(self, stream_id: int, seen: Subscribed, script: Script) -> None:
        server = self.server
        try:
            cursor = await server.feed.open(seen.shard_id, seen.position)
            self.h2.send_headers(
                stream_id,
                [(":status", "200"), ("content-type", "application/vnd.amazon.eventstream")],
            )
            self.flush()
            if script.initial_response:
                await self.send(stream_id, event_message("initial-response", {}), seen)
            deadline = time.monotonic() + server.lifetime_seconds
            while time.monotonic() < deadline:
                if script.then is not None and seen.events >= script.after_events:
                    await self.misbehave(stream_id, script.then, seen)
                    return
                wait = min(server.heartbeat_seconds, max(0.0, deadline - time.monotonic()))
                batch = await cursor.next_batch(server.max_records_per_event, wait)
                event: dict[str, Any] = {
                    "Records": [
                        {
                            "SequenceNumber": str(r.sequence),
                            "ApproximateArrivalTimestamp": r.arrival,
                            "Data": base64.b64encode(r.data).decode(),
                            "PartitionKey": r.key,
                        }
                        for r in batch
                    ],
                    "ContinuationSequenceNumber": cursor.continuation(),
                    "MillisBehindLatest": cursor.behind_ms(),
                }
                children = cursor.children()
                if children is not None:
                    event["ChildShards"] = children
                    event["ContinuationSequenceNumber"] = None
                await self.send(stream_id, event_message("SubscribeToShardEvent", event), seen)
                seen.events += 1
                if children is not None:
                    break
                if batch and server.event_interval_seconds:
                    await asyncio.sleep(server.event_interval_seconds)
            self.h2.end_stream(stream_id)
            self.flush()
        except (asyncio.CancelledError, ConnectionResetError, StreamClosedError):
            return
        finally:
            self.subscriptions.pop(stream_id, None)
            self.windows.pop(stream_id, None)

    async def misbehave(self, stream_id: int, what: str, seen: Subscribed) -> None:
        if what == "reset":
            self.h2.reset_stream(stream_id)
            self.flush()
        elif what == "stall":
            await asyncio.Event().wait()  # until cancelled: the client gives up on us
        elif what == "end":
            self.h2.end_stream(stream_id)
            self.flush()
        elif what.startswith("exception:"):
            code = what.partition(":")[2]
            await self.send(stream_id, exception_message(code, "from the script"), seen)
            self.h2.end_stream(stream_id)
            self.flush()
        else:
            raise ValueError(what)
