"""`python -m wildrydes_stream.local` (`make emulators`): the emulators only, for use by hand.

Starts kinesalite and dynalite on free loopback ports, creates the raw and the aggregated
streams and the table (names from the usual settings), prints the shell exports that point the
AWS SDKs and this project's commands at them, and keeps them running until Ctrl-C or SIGTERM
(then stops them and exits 0). Nothing else runs: start `produce`, `aggregate`, `run`,
`status` ... yourself in another shell after pasting the exports.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from aiobotocore.session import get_session

from wildrydes_stream.admin.provision import ensure_stream, ensure_table
from wildrydes_stream.config import Settings, load
from wildrydes_stream.errors import WildrydesError
from wildrydes_stream.local.emulators import Emulator
from wildrydes_stream.runtime.signals import install_signal_handlers

REGION = "us-east-1"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "local", "AWS_SECRET_ACCESS_KEY": "local"}


def exports(kinesis: str, dynamodb: str, region: str) -> dict[str, str]:
    """The variables that point the SDKs (and every command here) at the emulators."""
    return {
        "AWS_ENDPOINT_URL_KINESIS": kinesis,
        "AWS_ENDPOINT_URL_DYNAMODB": dynamodb,
        **CREDENTIALS,
        "AWS_REGION": region,
        "AWS_DEFAULT_REGION": region,
    }


async def serve(settings: Settings, shards: int) -> int:
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or REGION
    with Emulator.start("kinesalite") as kinesalite, Emulator.start("dynalite") as dynalite:
        variables = exports(kinesalite.endpoint, dynalite.endpoint, region)
        os.environ.update(variables)
        session = get_session()
        async with (
            session.create_client("kinesis") as kinesis,
            session.create_client("dynamodb") as dynamodb,
        ):
            await ensure_stream(kinesis, settings.raw_stream_name, shards)
            await ensure_stream(kinesis, settings.stream_name, shards)
            await ensure_table(dynamodb, settings)
        stop = asyncio.Event()
        install_signal_handlers(stop.set)
        print(
            f"kinesalite on {kinesalite.endpoint} (streams {settings.raw_stream_name}, "
            f"{settings.stream_name}: {shards} shards each), dynalite on {dynalite.endpoint} "
            f"(table {settings.table_name}). In another shell:\n"
        )
        for name, value in variables.items():
            print(f"export {name}={value}")
        print(
            "\n(The credentials are dummies: the emulators accept any.) Running until Ctrl-C; "
            "the emulators keep their data in memory only.",
            flush=True,
        )
        await stop.wait()
    print("emulators stopped", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m wildrydes_stream.local",
        description="Start the Kinesis and DynamoDB emulators with both streams and the table, "
        "print the exports to use them, and keep them running until Ctrl-C.",
    )
    parser.add_argument("--shards", type=int, default=4, help="shards of each stream")
    args = parser.parse_args(argv)
    try:
        settings = load(None).settings
        return asyncio.run(serve(settings, args.shards))
    except WildrydesError as exc:
        print(f"wildrydes-stream: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
