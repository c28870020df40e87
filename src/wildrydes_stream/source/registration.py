"""The stream consumer enhanced fan-out reads through: found, or registered, then ACTIVE.

RegisterStreamConsumer takes a few seconds to make a consumer ACTIVE (CREATING until then);
SubscribeToShard refuses one that is not. Replicas starting together may register the same
name at once: the loser gets ResourceInUseException and waits for the winner's. A consumer that
is being deleted (DELETING) is waited out and registered again. The service never deregisters
its consumer (docs/how-it-works.md, "Enhanced fan-out", says how, and what it costs while
registered).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Final

from botocore.exceptions import ClientError

from wildrydes_stream.aws.fanout import FanoutClient
from wildrydes_stream.aws.retry import error_code
from wildrydes_stream.errors import MissingResourceError

log = logging.getLogger(__name__)

DESCRIBE_INTERVAL: Final = 1.0
"""Between DescribeStreamConsumer calls while waiting (the API allows 20 a second per stream)."""
ACTIVE_TIMEOUT: Final = 300.0


async def stream_arn(kinesis: Any, stream_name: str) -> str:
    answer = await kinesis.describe_stream_summary(StreamName=stream_name)
    return str(answer["StreamDescriptionSummary"]["StreamARN"])


async def active_consumer(
    client: FanoutClient,
    stream: str,
    name: str,
    *,
    interval: float = DESCRIBE_INTERVAL,
    timeout: float = ACTIVE_TIMEOUT,
) -> str:
    """The ARN of the ACTIVE consumer `name` of the stream (ARN `stream`), registered if
    missing; MissingResourceError when it is not ACTIVE within `timeout`."""
    registered = False
    try:
        async with asyncio.timeout(timeout):
            while True:
                description = await _describe(client, stream, name)
                if description is None:
                    registered = await _register(client, stream, name) or registered
                    continue
                status = description["ConsumerStatus"]
                if status == "ACTIVE":
                    arn = str(description["ConsumerARN"])
                    log.info(
                        "stream consumer %s",
                        "registered" if registered else "found",
                        extra={"consumer": name, "consumer_arn": arn},
                    )
                    return arn
                log.info("waiting for stream consumer", extra={"consumer": name, "state": status})
                await asyncio.sleep(interval)
    except TimeoutError:
        raise MissingResourceError(
            f"stream consumer {name!r} of {stream} is not ACTIVE after {timeout:.0f} s "
            "(fanout_consumer_name; `status` shows its state)"
        ) from None


async def _describe(client: FanoutClient, stream: str, name: str) -> dict[str, Any] | None:
    try:
        return await client.describe_stream_consumer(stream, name)
    except ClientError as exc:
        if error_code(exc) == "ResourceNotFoundException":
            return None
        raise


async def _register(client: FanoutClient, stream: str, name: str) -> bool:
    """True if this call registered it; False if another worker did first."""
    try:
        await client.register_stream_consumer(stream, name)
    except ClientError as exc:
        if error_code(exc) == "ResourceInUseException":
            return False
        raise
    log.info("registering stream consumer", extra={"consumer": name, "stream_arn": stream})
    return True
