"""Kinesis enhanced fan-out over HTTP/2: the stream consumer's calls and SubscribeToShard.

SubscribeToShard answers with an event stream (`application/vnd.amazon.eventstream`): binary
messages, each with headers and a JSON payload, decoded here with botocore's own
`EventStreamBuffer`. A message is an event (`initial-response`, which kinesis-local leaves
out, then `SubscribeToShardEvent`s), an `exception` (ResourceInUseException, throttling,
expired credentials... raised as the ClientError botocore would raise) or an `error`.

Requests are signed with SigV4 by lean.py's `Signer` (botocore's algorithm) with the session's
credentials, refreshed when they expire. RegisterStreamConsumer and DescribeStreamConsumer go
over the same HTTP/2 connection as JSON calls, so a local endpoint that serves fan-out alone
(`fanout_endpoint_url`) serves them too.
"""

from __future__ import annotations

import asyncio
import binascii
import math
from datetime import datetime
from typing import Any, Final

import orjson
from botocore.eventstream import EventStreamBuffer, EventStreamMessage
from botocore.exceptions import ClientError, NoCredentialsError

from wildrydes_stream.aws.h2 import H2Pool, H2Response, StreamClosed
from wildrydes_stream.aws.lean import Signer, _client_error

TARGET_PREFIX: Final = "Kinesis_20131202"
CONTENT_TYPE: Final = "application/x-amz-json-1.1"
PRELUDE_LENGTH_BYTES: Final = 4
"""An event-stream message starts with its total length, a big-endian 32-bit integer."""
PROMPT_AFTER_RECORDS_SECONDS: Final = 1.0
"""After an event with records its connection reads at once for this long, so records that
keep coming are never held to the quiet grid (setting fanout_quiet_read_grid_seconds); a
connection without records for this long reads on the grid again."""


class FanoutClient:
    """Signed Kinesis calls over an HTTP/2 pool to one endpoint."""

    def __init__(self, url: str, region: str, credentials: Any, pool: H2Pool | None = None):
        url = url if url.count("/") > 2 else url + "/"
        self.url = url
        self._credentials = credentials
        self._signer = Signer(url, "kinesis", region, CONTENT_TYPE)
        self.pool = pool or H2Pool(url)

    async def close(self) -> None:
        await self.pool.close()

    async def _send(self, operation: str, params: dict[str, Any]) -> H2Response:
        if self._credentials is None:
            raise NoCredentialsError()
        body = orjson.dumps(params)
        frozen = await self._credentials.get_frozen_credentials()
        headers = self._signer.headers(frozen, f"{TARGET_PREFIX}.{operation}", body)
        return await self.pool.request("POST", headers, body)

    async def call(self, operation: str, params: dict[str, Any]) -> dict[str, Any]:
        """One JSON call: its answer, or the ClientError botocore would raise."""
        response = await self._send(operation, params)
        try:
            payload = await response.body()
        finally:
            response.close()
        if response.status >= 300:
            raise _client_error(operation, response.status, response.headers, payload)
        answer: dict[str, Any] = orjson.loads(payload) if payload else {}
        return answer

    async def describe_stream_consumer(self, stream_arn: str, name: str) -> dict[str, Any]:
        answer = await self.call(
            "DescribeStreamConsumer", {"StreamARN": stream_arn, "ConsumerName": name}
        )
        description: dict[str, Any] = answer["ConsumerDescription"]
        return description

    async def register_stream_consumer(self, stream_arn: str, name: str) -> dict[str, Any]:
        answer = await self.call(
            "RegisterStreamConsumer", {"StreamARN": stream_arn, "ConsumerName": name}
        )
        consumer: dict[str, Any] = answer["Consumer"]
        return consumer

    async def subscribe(
        self, consumer_arn: str, shard_id: str, position: dict[str, Any]
    ) -> Subscription:
        """Open a subscription; ClientError when the service refuses it outright."""
        params = {"ConsumerARN": consumer_arn, "ShardId": shard_id, "StartingPosition": position}
        response = await self._send("SubscribeToShard", params)
        if response.status >= 300:
            try:
                payload = await response.body()
            finally:
                response.close()
            raise _client_error("SubscribeToShard", response.status, response.headers, payload)
        return Subscription(response)


class Stalled(TimeoutError):
    """A subscription's server sent nothing for the stall time while it was being read."""


def starting_position(position: str, since: datetime | None) -> dict[str, Any]:
    """SubscribeToShard's StartingPosition for a checkpoint (a sequence number: after it),
    `AT_SEQUENCE_NUMBER:<n>`, or a sentinel; AT_TIMESTAMP at `since`."""
    if position.isdigit():
        return {"Type": "AFTER_SEQUENCE_NUMBER", "SequenceNumber": position}
    if position.startswith("AT_SEQUENCE_NUMBER:"):
        return {"Type": "AT_SEQUENCE_NUMBER", "SequenceNumber": position.partition(":")[2]}
    if position == "AT_TIMESTAMP":
        if since is None:
            raise ValueError("AT_TIMESTAMP needs a moment")
        return {"Type": "AT_TIMESTAMP", "Timestamp": since.timestamp()}
    return {"Type": position}


class Subscription:
    """One SubscribeToShard response: its messages, one at a time, read only when asked for
    (so a reader that stops asking stops the server through HTTP/2 flow control).

    A message is read in two steps: `message_size` as soon as its first bytes arrive (the
    prelude says how long it is), then `next_message` for the rest. Between them the reader
    can make room in its byte bound for a message of up to 10 MiB of records before
    receiving more than a stream window of it."""

    def __init__(self, response: H2Response) -> None:
        self.response = response
        self._pending = bytearray()
        self._stall_seconds = 0.0
        self._stall_timer: asyncio.TimerHandle | None = None

    def watch(self, stall_seconds: float) -> None:
        """From now on, a read that waits `stall_seconds` for the server fails with Stalled.

        One timer a subscription, moved on only when it fires, instead of a timeout around
        every read: an idle shard's events arrive every few seconds, and a timeout per read
        (two timer handles, a context manager) was a tenth of what idle subscriptions cost."""
        self._stall_seconds = stall_seconds
        self._arm(asyncio.get_running_loop().time() + stall_seconds)

    def _arm(self, when: float) -> None:
        # Rounded up to the whole second: the checks of every subscription fall due together
        # (one wake-up of the loop, not one a subscription), and a stall is noticed at most
        # a second late.
        self._stall_timer = asyncio.get_running_loop().call_at(math.ceil(when), self._check_stall)

    def _check_stall(self) -> None:
        response = self.response
        if response.closed:
            return
        since = response.waiting_since
        now = asyncio.get_running_loop().time()
        if since is not None and now - since >= self._stall_seconds:
            response.fail(Stalled(f"no event for {self._stall_seconds:.0f} s"))
            return
        self._arm((since if since is not None else now) + self._stall_seconds)

    async def message_size(self) -> int | None:
        """Bytes of the next message (its prelude's total length), None when the server ended
        the subscription between messages; StreamClosed when it was cut off."""
        while len(self._pending) < PRELUDE_LENGTH_BYTES:
            if not await self._receive():
                if self._pending:
                    raise StreamClosed("subscription ended inside a message")
                return None
        return int.from_bytes(self._pending[:PRELUDE_LENGTH_BYTES], "big")

    async def next_message(self) -> dict[str, Any] | None:
        """The next message decoded: a SubscribeToShardEvent (Records' Data decoded, arrival
        times as epoch seconds), None for a message of another kind (initial-response);
        ClientError for an exception event, StreamClosed when the stream was cut off."""
        size = await self.message_size()
        if size is None:
            raise StreamClosed("subscription ended before its next message")
        while len(self._pending) < size:
            if not await self._receive():
                raise StreamClosed("subscription ended inside a message")
        frame = bytes(self._pending[:size])
        del self._pending[:size]
        decoder = EventStreamBuffer()
        decoder.add_data(frame)
        event = _event(next(iter(decoder)))
        if event is not None and event.get("Records"):
            self.response.prompt_for(PROMPT_AFTER_RECORDS_SECONDS)
        return event

    async def next_event(self) -> dict[str, Any] | None:
        """The next SubscribeToShardEvent, None when the server ended the subscription."""
        while await self.message_size() is not None:
            event = await self.next_message()
            if event is not None:
                return event
        return None

    async def _receive(self) -> bool:
        chunk = await self.response.read()
        self._pending += chunk
        return bool(chunk)

    def close(self) -> None:
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        self.response.close()


def _event(message: EventStreamMessage) -> dict[str, Any] | None:
    headers = message.headers
    kind = headers.get(":message-type")
    if kind == "event":
        if headers.get(":event-type") != "SubscribeToShardEvent":
            return None  # initial-response, or an event type this client does not know
        event: dict[str, Any] = orjson.loads(message.payload)
        b64decode = binascii.a2b_base64
        for record in event.get("Records", ()):
            record["Data"] = b64decode(record["Data"])
        return event
    if kind == "exception":
        code = str(headers.get(":exception-type", "UnknownException"))
        return _raise(code, message.payload)
    code = str(headers.get(":error-code", "InternalFailure"))
    text = str(headers.get(":error-message", ""))
    raise ClientError(
        {"Error": {"Code": code, "Message": text}, "ResponseMetadata": {"HTTPStatusCode": 200}},
        "SubscribeToShard",
    )


def _raise(code: str, payload: bytes) -> dict[str, Any]:
    text = ""
    try:
        body = orjson.loads(payload) if payload else {}
        if isinstance(body, dict):
            text = str(body.get("message") or body.get("Message") or "")
    except orjson.JSONDecodeError:
        pass
    raise ClientError(
        {"Error": {"Code": code, "Message": text}, "ResponseMetadata": {"HTTPStatusCode": 200}},
        "SubscribeToShard",
    )
