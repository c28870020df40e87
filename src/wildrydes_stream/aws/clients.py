"""AWS clients, following the SDK's own conventions.

Credentials come from the default chain (environment, web identity on Kubernetes, profiles,
instance metadata) and endpoints from `AWS_ENDPOINT_URL` / `AWS_ENDPOINT_URL_<SERVICE>`, both
handled by botocore itself. The one gap is the region: botocore reads `AWS_DEFAULT_REGION` but
not `AWS_REGION`, which Lambda and EKS set, so both are honoured here.
"""

from __future__ import annotations

import os
import ssl
from contextlib import AsyncExitStack
from typing import Any

from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession, get_session

from wildrydes_stream.aws.fanout import FanoutClient
from wildrydes_stream.aws.h2 import H2Pool
from wildrydes_stream.aws.lean import DynamoDBData, KinesisData, _ssl_context
from wildrydes_stream.errors import ConfigError

# Data-path calls are retried by the service itself (with metrics and dead-lettering), so
# botocore must not hide throttles behind its own retries there.
DATA_PATH = AioConfig(
    retries={"total_max_attempts": 1},
    connect_timeout=5,
    read_timeout=30,
    max_pool_connections=64,
)
CONTROL_PATH = AioConfig(
    retries={"mode": "standard", "total_max_attempts": 5},
    connect_timeout=5,
    read_timeout=30,
)


def region_name(session: AioSession | None = None) -> str:
    # The AWS CLI and the SDKs prefer AWS_REGION to AWS_DEFAULT_REGION; botocore reads only
    # the latter, so the order is set here.
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if not region and session is not None:
        region = session.get_config_variable("region")
    if not region:
        raise ConfigError(
            "no AWS region: set AWS_REGION or AWS_DEFAULT_REGION (or a region in ~/.aws/config)"
        )
    return region


class AwsClients:
    """The clients one service instance uses, opened and closed together."""

    def __init__(self, fast: bool = True) -> None:
        self._stack = AsyncExitStack()
        self._fast = fast
        self.kinesis: Any = None
        self.dynamodb: Any = None
        """Data path: BatchWriteItem, no botocore retries."""
        self.kinesis_data: Any = None
        """GetRecords on the lean awsjson client (other calls go to `kinesis`); with
        `fast=False`, `kinesis` itself."""
        self.dynamodb_data: Any = None
        """BatchWriteItem on the lean awsjson client (other calls go to `dynamodb`); with
        `fast=False`, `dynamodb` itself."""
        self.dynamodb_control: Any = None
        """Lease table and DescribeTable, with botocore's standard retries."""
        self.sqs: Any = None
        self.s3: Any = None
        self.sns: Any = None
        """Low-magic alerts (alerts/destinations.py), which retry and count failures themselves."""
        self._session: AioSession | None = None
        self.region = ""

    async def __aenter__(self) -> AwsClients:
        session = self._session = get_session()
        region = self.region = region_name(session)
        create = session.create_client
        enter = self._stack.enter_async_context
        self.kinesis = await enter(create("kinesis", region_name=region, config=DATA_PATH))
        self.dynamodb = await enter(create("dynamodb", region_name=region, config=DATA_PATH))
        self.dynamodb_control = await enter(
            create("dynamodb", region_name=region, config=CONTROL_PATH)
        )
        # Dead letters are retried by their destinations (sink/deadletter.py), which count and
        # log each failure: botocore's own retries would hide them for seconds at a time.
        self.sqs = await enter(create("sqs", region_name=region, config=DATA_PATH))
        self.s3 = await enter(create("s3", region_name=region, config=DATA_PATH))
        self.sns = await enter(create("sns", region_name=region, config=DATA_PATH))
        self.kinesis_data, self.dynamodb_data = self.kinesis, self.dynamodb
        if self._fast:
            credentials = await session.get_credentials()
            self.kinesis_data = await enter(KinesisData(self.kinesis, credentials))
            self.dynamodb_data = await enter(DynamoDBData(self.dynamodb, credentials))
        return self

    async def fanout(self, endpoint_url: str = "", quiet_read_grid: float = 0.0) -> FanoutClient:
        """An HTTP/2 client for enhanced fan-out (SubscribeToShard and the consumer calls), to
        `endpoint_url` or the Kinesis endpoint, quiet connections reading on a grid of
        `quiet_read_grid` seconds (h2.py); closed with the other clients."""
        assert self._session is not None, "AwsClients used outside `async with`"
        url = endpoint_url or self.kinesis.meta.endpoint_url
        tls = _ssl_context(self.kinesis) if url.startswith("https:") else None
        client = FanoutClient(
            url,
            self.region,
            await self._session.get_credentials(),
            H2Pool(
                url,
                ssl_context=tls if isinstance(tls, ssl.SSLContext) else None,
                connect_timeout=DATA_PATH.connect_timeout,
                quiet_read_grid=quiet_read_grid,
            ),
        )
        self._stack.push_async_callback(client.close)
        return client

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()
