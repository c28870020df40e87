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

import binascii
from datetime import datetime
from typing import Any, Final

import orjson
from botocore.eventstream import EventStreamBuffer, EventStreamMessage
from botocore.exceptions import ClientError, NoCredentialsError

from wildrydes_stream.aws.h2 import H2Pool, H2Response
from wildrydes_stream.aws.lean import Signer, _client_error

TARGET_PREFIX: Final = "Kinesis_20131202"
CONTENT_TYPE: Final = "application/x-amz-json-1.1"


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
    """One SubscribeToShard response: its events, one at a time, read only when asked for (so
    a reader that stops asking stops the server through HTTP/2 flow control)."""

    def __init__(self, response: H2Response) -> None:
        self.response = response
        self._buffer = EventStreamBuffer()
        self._messages = iter(self._buffer)

    async def next_event(self) -> dict[str, Any] | None:
        """The next SubscribeToShardEvent (Records' Data decoded, arrival times as epoch
        seconds), None when the server ended the subscription; ClientError for an exception
        event, StreamClosed when the stream was cut off."""
        while True:
            message = next(self._messages, None)
            if message is None:
                chunk = await self.response.read()
                if not chunk:
                    return None
                self._buffer.add_data(chunk)
                continue
            event = _event(message)
            if event is not None:
                return event

    def close(self) -> None:
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
