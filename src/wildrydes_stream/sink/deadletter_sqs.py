"""Dead letters to an SQS queue: one message per record, SendMessageBatch.

A message holds at most the queue's MaximumMessageSize (256 KiB at most here), and base64
inflates a record by 4/3: a record over about 190 KB does not fit. Its message then points at
the line of the S3 object that holds it whole (the S3 destination is written first), or, with
no S3 destination configured, keeps the metadata only and says so in the reason.
"""

from __future__ import annotations

import logging
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from wildrydes_stream.aws.retry import error_code
from wildrydes_stream.errors import WildrydesError
from wildrydes_stream.sink.deadletter import LetterBatch, Retry
from wildrydes_stream.sink.letters import OMITTED_NOTE, dumps

log = logging.getLogger(__name__)

SQS_BATCH = 10
SQS_MAX_BODY = 256 * 1024


class SqsRefused(Exception):
    """Some entries of a SendMessageBatch failed; the call is retried with those only."""


class SqsDestination:
    """SendMessageBatch, retrying failed entries until SQS has them all."""

    name = "sqs"
    archive = False

    def __init__(self, client: Any, queue_url: str, retry: Retry) -> None:
        self._client = client
        self._queue_url = queue_url
        self._retry = retry
        self.max_body = SQS_MAX_BODY

    async def check(self) -> None:
        """The queue exists and this role may use it; learn its message size limit."""
        try:
            response = await self._client.get_queue_attributes(
                QueueUrl=self._queue_url, AttributeNames=["MaximumMessageSize"]
            )
        except (BotoCoreError, ClientError) as exc:
            cause = f"{error_code(exc)}: {exc}" if error_code(exc) else str(exc)
            raise WildrydesError(
                f"dead-letter queue {self._queue_url} cannot be used ({cause}): set "
                "deadletter_queue_url (WILDRYDES_DEADLETTER_QUEUE_URL) to an existing queue this "
                "role may send to"
            ) from None
        size = response.get("Attributes", {}).get("MaximumMessageSize")
        if size is not None:
            self.max_body = min(SQS_MAX_BODY, int(size))

    async def send(self, batch: LetterBatch) -> None:
        bodies = [self._body(batch, i) for i in range(len(batch.entries))]
        for chunk in _batches(bodies):
            await self._send_batch(chunk)

    async def _send_batch(self, bodies: list[str]) -> None:
        entries = {str(i): body for i, body in enumerate(bodies)}

        async def attempt() -> None:
            nonlocal entries
            response = await self._client.send_message_batch(
                QueueUrl=self._queue_url,
                Entries=[{"Id": i, "MessageBody": body} for i, body in entries.items()],
            )
            failed = response.get("Failed", [])
            # Sent ones are not sent again: retry only what SQS refused.
            entries = {i: entries[i] for i in (f["Id"] for f in failed)}
            if entries:
                codes = sorted({f.get("Code", "?") for f in failed})
                raise SqsRefused(f"SQS refused {len(entries)} messages: {', '.join(codes)}")

        await self._retry(self.name, attempt)

    def _body(self, batch: LetterBatch, index: int) -> str:
        value = batch.entries[index]
        body = dumps(value)
        if len(body) <= self.max_body:  # ASCII: characters are bytes
            return body
        slim = {k: v for k, v in value.items() if k != "data_base64"}
        if batch.archived_at is not None:
            return dumps({**slim, "data_s3_uri": batch.archived_at, "data_s3_line": index + 1})
        # No S3 destination: keep the metadata rather than lose the entry, and say so.
        log.warning(
            "record too large for an SQS message and no S3 destination: its data is omitted "
            "from the queue (set deadletter_s3_uri (WILDRYDES_DEADLETTER_S3_URI) to keep it)",
            extra={"shard": value["shard_id"], "sequence_number": value["sequence_number"]},
        )
        return dumps({**slim, "reason": value["reason"] + OMITTED_NOTE})


def _batches(bodies: list[str]) -> list[list[str]]:
    """SendMessageBatch takes 10 messages and 256 KiB in all, whichever comes first."""
    batches: list[list[str]] = []
    size = 0
    for body in bodies:
        length = len(body)
        if not batches or len(batches[-1]) == SQS_BATCH or size + length > SQS_MAX_BODY:
            batches.append([])
            size = 0
        batches[-1].append(body)
        size += length
    return batches
