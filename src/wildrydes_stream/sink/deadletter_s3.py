"""Dead letters to S3: one object of JSON lines per batch, records of any size.

Like Lambda's S3 on-failure destination. Keys sort by time under the prefix,
`prefix/YYYY/MM/DD/HH/YYYYMMDDTHHMMSS.ffffffZ-<uuid>.jsonl`, so a listing reads oldest first
and an operator can pick an hour. Each object is written once under a fresh key, so retrying
a PutObject can only write the same object again.
"""

from __future__ import annotations

import uuid
from typing import Any, Final

from botocore.exceptions import BotoCoreError, ClientError

from wildrydes_stream.aws.retry import error_code
from wildrydes_stream.errors import WildrydesError
from wildrydes_stream.sink.deadletter import LetterBatch, Retry
from wildrydes_stream.sink.letters import dumps, parse_s3_uri

# Written at start to prove the prefix is writable; redrive skips it (not .jsonl).
WRITE_CHECK: Final = ".wildrydes-stream-write-check"
SUFFIX: Final = ".jsonl"


class S3Destination:
    name = "s3"
    archive = True

    def __init__(self, client: Any, uri: str, retry: Retry) -> None:
        self._client = client
        self.location = parse_s3_uri(uri, "setting deadletter_s3_uri")
        self._retry = retry

    async def check(self) -> None:
        """The bucket exists and this role may write under the prefix: put a small marker."""
        key = self.location.key(WRITE_CHECK)
        try:
            await self._client.put_object(
                Bucket=self.location.bucket,
                Key=key,
                Body=b"wildrydes-stream checks at start that it may write dead letters here\n",
            )
        except (BotoCoreError, ClientError) as exc:
            cause = f"{error_code(exc)}: {exc}" if error_code(exc) else str(exc)
            raise WildrydesError(
                f"cannot write dead letters to {self.location} ({cause}): set deadletter_s3_uri "
                "(WILDRYDES_DEADLETTER_S3_URI) to a bucket and prefix this role may put objects in"
            ) from None

    async def send(self, batch: LetterBatch) -> None:
        at = batch.at
        key = self.location.key(
            f"{at:%Y/%m/%d/%H}/{at:%Y%m%dT%H%M%S.%f}Z-{uuid.uuid4().hex}{SUFFIX}"
        )
        body = "".join(dumps(value) + "\n" for value in batch.entries).encode("ascii")
        await self._retry(
            self.name,
            lambda: self._client.put_object(
                Bucket=self.location.bucket,
                Key=key,
                Body=body,
                ContentType="application/x-ndjson",
            ),
        )
        batch.archived_at = f"s3://{self.location.bucket}/{key}"
