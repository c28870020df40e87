"""What the drills share: kinesalite and dynalite on loopback, a fault proxy in front of
dynalite, the stream and the table, clients on them and the environment of a service child."""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiobotocore.session import get_session
from tests.faultproxy import FaultProxy
from tests.process import service_env

from wildrydes_stream.admin.provision import ensure_stream, ensure_table
from wildrydes_stream.config import Settings
from wildrydes_stream.local.emulators import Emulator

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "drill",
    "AWS_SECRET_ACCESS_KEY": "drill",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass
class Emulated:
    settings: Settings
    kinesis: Any
    dynamodb: Any
    proxy: FaultProxy
    """In front of dynalite: the service's DynamoDB calls go through it."""
    env: dict[str, str]
    """The environment of a service child process with `settings`."""


@asynccontextmanager
async def emulated(shards: int, **settings: Any) -> AsyncIterator[Emulated]:
    os.environ.update(CREDENTIALS)
    with (
        tempfile.TemporaryDirectory() as tmp,
        Emulator.start("kinesalite") as kinesis_emulator,
        Emulator.start("dynalite") as dynamodb_emulator,
    ):
        chosen = Settings(
            http_host="127.0.0.1",
            http_port=0,
            deadletter_file=str(Path(tmp) / "deadletter.jsonl"),
            **settings,
        )
        proxy = FaultProxy(dynamodb_emulator.endpoint)
        await proxy.start()
        session = get_session()
        try:
            async with (
                session.create_client(
                    "kinesis", region_name="us-east-1", endpoint_url=kinesis_emulator.endpoint
                ) as kinesis,
                session.create_client(
                    "dynamodb", region_name="us-east-1", endpoint_url=dynamodb_emulator.endpoint
                ) as dynamodb,
            ):
                await ensure_stream(kinesis, chosen.stream_name, shards)
                await ensure_table(dynamodb, chosen)
                env = service_env(
                    chosen,
                    {
                        **CREDENTIALS,
                        "AWS_ENDPOINT_URL_KINESIS": kinesis_emulator.endpoint,
                        "AWS_ENDPOINT_URL_DYNAMODB": proxy.endpoint,
                    },
                )
                yield Emulated(chosen, kinesis, dynamodb, proxy, env)
        finally:
            await proxy.close()
