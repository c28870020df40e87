"""Command line: `run` (the service), `aggregate` (raw readings -> per-minute windows), `local`
(everything on this machine), `provision`, `redrive` (dead letters back where they were going),
`status`, `reset`, `settings`, `metrics` (the metric families, for the docs), `produce` (the
workshop's producer)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import select
import sys
from collections.abc import Coroutine, Sequence
from typing import TYPE_CHECKING, Any

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    NoCredentialsError,
    PartialCredentialsError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from wildrydes_stream import __version__
from wildrydes_stream.config import (
    CONFIG_FILE_ENV,
    Loaded,
    Settings,
    check_deadletter_file,
    describe,
    load,
    shown_value,
)
from wildrydes_stream.errors import ConfigError, WildrydesError
from wildrydes_stream.observability.logs import configure_logging
from wildrydes_stream.runtime.heap import settle_heap
from wildrydes_stream.runtime.signals import install_signal_handlers

if TYPE_CHECKING:
    from wildrydes_stream.consumer.core import Consumer
    from wildrydes_stream.produce.producer import ProduceOptions

log = logging.getLogger("wildrydes_stream")

EXIT_FAILURE = 1
APPLICATIONS = ("run", "aggregate")
EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wildrydes-stream",
        description="Copies Wild Rydes unicorn aggregates from a Kinesis stream into DynamoDB.",
    )
    parser.add_argument("--version", action="version", version=__version__)
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="TOML settings file (default: $WILDRYDES_CONFIG); WILDRYDES_* variables override it",
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="unknown WILDRYDES_* variables and settings without effect are errors (exit 2); "
        "also WILDRYDES_STRICT=1",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _settings_options(commands.add_parser("run", help="run the service until SIGTERM or SIGINT"))
    _settings_options(
        commands.add_parser(
            "aggregate",
            help="aggregate raw readings (raw_stream_name) into per-minute windows on "
            "stream_name, until SIGTERM or SIGINT",
        )
    )
    local = commands.add_parser(
        "local",
        help="the whole pipeline on this machine: emulators, simulated unicorns, aggregate, "
        "run and alerts",
    )
    _settings_options(local)
    local.add_argument(
        "--duration",
        type=float,
        metavar="SECONDS",
        help="stop after this long, check every record landed, exit 0 if so",
    )
    local.add_argument("--shards", type=int, default=4, help="shards of the local stream")
    local.add_argument("--unicorns", type=int, default=6, help="simulated unicorns")
    local.add_argument(
        "--kpl",
        type=_positive(int),
        default=1,
        metavar="N",
        help="the fleet packs up to N readings into one record, as a KPL producer does",
    )
    local.add_argument(
        "--speed",
        type=_positive(float),
        default=60.0,
        help="simulated seconds per real second (60: a simulated minute a second)",
    )
    provision = commands.add_parser(
        "provision",
        help="create what an application reads and writes if missing: run's stream and table, "
        "or aggregate's two streams",
    )
    _settings_options(provision)
    _application_option(
        provision,
        "what to create",
        "run's (default; stream_name and table_name) or aggregate's (raw_stream_name and "
        "stream_name)",
    )
    provision.add_argument(
        "--shards", type=_positive(int), default=4, help="shards of a new stream"
    )
    redrive = commands.add_parser(
        "redrive",
        help="send dead-lettered records back, once the cause is fixed: run's into the table, "
        "aggregate's onto the stream they came from",
    )
    _settings_options(redrive)
    redrive.add_argument(
        "--from",
        dest="source",
        required=True,
        metavar="FILE|SQS-URL|S3-URI",
        help="the dead-letter file, queue URL or s3://bucket/prefix to take the records from",
    )
    redrive.add_argument(
        "--max-retry-attempts",
        type=int,
        default=10,
        metavar="N",
        help="retries of a failed write before the record stays dead-lettered (default 10; "
        "-1 retries for as long as the fault lasts)",
    )
    redrive.add_argument(
        "--app",
        "--application",
        dest="application",
        choices=APPLICATIONS,
        help="send only this application's letters, the others stay (needed when the source "
        "holds letters of both)",
    )
    status = commands.add_parser(
        "status", help="every shard's state, owner, checkpoint and lag, and every worker"
    )
    _settings_options(status)
    _application_option(status, "whose shards to show")
    status.add_argument("--json", action="store_true", help="one JSON document, for scripts")
    reset = commands.add_parser(
        "reset",
        help="move shards' checkpoints (refused while a live worker holds them, unless --force)",
    )
    _settings_options(reset)
    _application_option(reset, "whose checkpoints to move")
    which = reset.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--shard", action="append", metavar="ID", help="a shard to move (repeat for more)"
    )
    which.add_argument("--all", action="store_true", help="every shard not read to its end")
    reset.add_argument(
        "--to",
        required=True,
        metavar="POSITION",
        help="TRIM_HORIZON, LATEST (any case), a past ISO 8601 time (UTC unless a zone is "
        "given), or a sequence number of the shard (reading resumes after it)",
    )
    reset.add_argument(
        "--force",
        action="store_true",
        help="take the leases from live workers first (they drop the shards and read them "
        "again from the new position)",
    )
    _add_produce(commands)
    listing = commands.add_parser(
        "settings", help="print every setting, its variable and default, or those in effect"
    )
    _settings_options(listing)
    listing.add_argument(
        "--format",
        choices=("text", "markdown", "toml"),
        default="text",
        help="markdown: the table of docs/operating.md; toml: an example settings file",
    )
    listing.add_argument(
        "--effective",
        action="store_true",
        help="the settings in effect here (defaults, --config file, WILDRYDES_* variables) "
        "and where each came from",
    )
    catalog = commands.add_parser(
        "metrics",
        help="print every metric family run and aggregate serve at /metrics, with its HELP",
    )
    catalog.add_argument(
        "--format",
        choices=("text", "markdown"),
        default="text",
        help="markdown: the tables of docs/operating.md",
    )
    return parser


def _settings_options(command: argparse.ArgumentParser) -> None:
    """--config and --strict after the subcommand too (SUPPRESS keeps the value given before
    it when they are not repeated)."""
    command.add_argument(
        "--config", metavar="FILE", default=argparse.SUPPRESS, help="TOML settings file"
    )
    command.add_argument(
        "--strict",
        action="store_true",
        default=argparse.SUPPRESS,
        help="unknown variables and settings without effect are errors",
    )


def _application_option(
    command: argparse.ArgumentParser,
    what: str,
    detail: str = "run's (default; stream_name, lease_table_name) or aggregate's "
    "(raw_stream_name, aggregate_lease_table_name)",
) -> None:
    command.add_argument(
        "--app",
        "--application",
        dest="app",
        choices=APPLICATIONS,
        default="run",
        help=f"{what}: {detail}",
    )


def _consumer_settings(settings: Settings, app: str) -> Settings:
    """The stream and lease table the application's consumer reads with."""
    if app == "aggregate":
        from wildrydes_stream.aggregate.app import consumer_settings

        return consumer_settings(settings)
    return settings


def _positive(kind: type[int] | type[float]) -> Any:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be above 0: {text!r}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def _add_produce(commands: Any) -> None:
    produce = commands.add_parser(
        "produce",
        help="put simulated unicorn readings on a stream once a second (the workshop's producer)",
        description="Puts one raw sensor reading a second per unicorn on a Kinesis stream and "
        "prints a dot per record, as the workshop's Go producer did (its one-dash flags "
        "-name, -stream, -region work too). Needs no service settings.",
    )
    # The Go producer's flags had one dash: accept both spellings.
    produce.add_argument(
        "-name",
        "--name",
        default="Shadowfax",
        help="the (first) unicorn's name (default %(default)s)",
    )
    produce.add_argument(
        "-stream", "--stream", default="wildrydes", help="stream to put on (default %(default)s)"
    )
    produce.add_argument(
        "-region",
        "--region",
        help="AWS region (default: $AWS_REGION, $AWS_DEFAULT_REGION or the profile's)",
    )
    produce.add_argument(
        "--unicorns", type=_positive(int), default=1, metavar="N", help="unicorns to simulate"
    )
    produce.add_argument(
        "--speed",
        type=_positive(float),
        default=1.0,
        metavar="S",
        help="simulated seconds per real second (StatusTime follows simulated time)",
    )
    produce.add_argument(
        "--count", type=_positive(int), metavar="N", help="stop after N records in all"
    )
    produce.add_argument(
        "--duration", type=_positive(float), metavar="SECONDS", help="stop after this long"
    )
    produce.add_argument(
        "--quiet", action="store_true", help="no dots: only the summary line at the end"
    )
    produce.add_argument("--seed", type=int, help="random seed, to replay the same readings")
    produce.add_argument(
        "--kpl",
        type=_positive(int),
        default=1,
        metavar="N",
        help="pack up to N readings into one Kinesis record in the KPL's aggregate format, "
        "as a KPL producer does (needs kinesis:ListShards too)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; its exit code (docs/operating.md, "Exit codes"): 0 done, 1 it ran and
    failed, 2 it was not run because its arguments or settings are wrong or missing."""
    try:
        try:
            return _command(argv)
        finally:
            # Flushed here, not at interpreter exit, so a reader that went away is seen below.
            sys.stdout.flush()
    except BrokenPipeError:
        if not _stdout_gone():
            raise
        # `settings | head -1`: the reader has what it wanted. Nothing more can be printed;
        # point stdout at /dev/null so the interpreter's last flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _stdout_gone() -> bool:
    """Whether stdout is a pipe (or socket) whose reader has closed it."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(event & (select.POLLERR | select.POLLHUP) for _, event in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


def _command(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except ConfigError as exc:
        print(f"wildrydes-stream: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except WildrydesError as exc:
        print(f"wildrydes-stream: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except (BotoCoreError, ClientError) as exc:
        line, code = aws_failure(exc)
        print(f"wildrydes-stream: {line}", file=sys.stderr)
        return code


def aws_failure(exc: BotoCoreError | ClientError) -> tuple[str, int]:
    """One line and the exit code for an AWS call that failed before a command could work:
    no credentials is a missing setting (2); an endpoint out of reach, or AWS refusing, is a
    failure (1). Every command says these the same way."""
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return (
            f"no AWS credentials ({exc}): set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "or AWS_PROFILE, or run with a role (web identity on EKS, an instance profile)",
            EXIT_USAGE,
        )
    if isinstance(exc, BotoConnectionError):
        endpoint = exc.kwargs.get("endpoint_url") or exc.kwargs.get("proxy_url") or "AWS"
        return (
            f"cannot connect to {endpoint} ({exc}): check the network, the region, and "
            "AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_<SERVICE> if set",
            EXIT_FAILURE,
        )
    return f"AWS call failed: {exc}", EXIT_FAILURE


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "settings" and not args.effective:
        print(render_settings(args.format))
        return 0
    if args.command == "metrics":
        from wildrydes_stream.observability.catalog import render_metrics

        print(render_metrics(args.format))
        return 0
    if args.command == "produce":
        return _produce_command(args)
    strict = args.strict or os.environ.get("WILDRYDES_STRICT", "").lower() in ("1", "true", "yes")
    loaded = load(args.config, strict=strict)
    if args.command in ("run", "aggregate"):
        check_deadletter_file(loaded.settings)  # ConfigError: exit 2
    settings = loaded.settings
    if args.command == "settings":
        print(render_effective(loaded))
        for warning in loaded.warnings:
            print(f"wildrydes-stream: warning: {warning}", file=sys.stderr)
        return 0
    if args.command == "local" and not (args.config or os.environ.get(CONFIG_FILE_ENV)):
        # The live summary is the output here: keep logs to warnings unless asked otherwise.
        if "WILDRYDES_LOG_LEVEL" not in os.environ:
            settings = settings.replace(log_level="WARNING")
        if "WILDRYDES_LOG_FORMAT" not in os.environ:
            settings = settings.replace(log_format="text")
    configure_logging(settings.log_format, settings.log_level)
    for warning in loaded.warnings:
        log.warning(warning)
    if args.command == "run":
        return _run_loop(_serve(settings), settings.event_loop)
    if args.command == "aggregate":
        return _run_loop(_aggregate(settings), settings.event_loop)
    if args.command == "provision":
        return _run_loop(_provision(settings, args.shards, args.app))
    if args.command == "status":
        return _run_loop(_status(_consumer_settings(settings, args.app), args.app, args.json))
    if args.command == "reset":
        from wildrydes_stream.admin.reset import Target

        target = Target.parse(args.to)
        shards = None if args.all else args.shard
        consumer = _consumer_settings(settings, args.app)
        return _run_loop(_reset(consumer, shards, target, args.force))
    if args.command == "redrive":
        redriving = _redrive(settings, args.source, args.max_retry_attempts, args.application)
        return _run_loop(redriving)
    if args.command == "local":
        from wildrydes_stream.local.runner import LocalOptions, run_local

        options = LocalOptions(args.duration, args.shards, args.unicorns, args.speed, args.kpl)
        return _run_loop(run_local(settings, options))
    raise AssertionError(args.command)


def render_effective(loaded: Loaded) -> str:
    """The settings in effect, as TOML (so the output can be saved and used as a file), each
    with where its value came from. A URL that may carry a secret shows its scheme and host
    only, on a commented-out line (a saved file must not send alerts to a truncated URL)."""
    lines = []
    for name, value in dataclasses.asdict(loaded.settings).items():
        shown, redacted = shown_value(name, value)
        text = repr(shown)
        if isinstance(shown, str):
            text = json.dumps(shown, ensure_ascii=not redacted)
        line = f"{name} = {text}  # {loaded.sources[name]}"
        lines.append(f"# {line} (path not shown: it may hold a secret)" if redacted else line)
    return "\n".join(lines)


def render_settings(fmt: str) -> str:
    """Every setting as text, the markdown table of docs/operating.md, or an example TOML
    file."""
    rows = describe()
    if fmt == "markdown":
        lines = ["| Setting | Variable | Default | Meaning |", "|---|---|---|---|"]
        for name, env, default, doc in rows:
            variables = ", ".join(f"`{v}`" for v in env.split(" / "))
            lines.append(f"| `{name}` | {variables} | `{json.dumps(default)}` | {doc} |")
        return "\n".join(lines)
    if fmt == "toml":
        lines = [
            "# wildrydes-stream settings, each shown with its default. Every key is optional and",
            "# can be overridden by the environment variable WILDRYDES_<KEY IN CAPITALS>.",
            "# Use with: wildrydes-stream --config config/wildrydes-stream.toml run",
        ]
        for name, _, default, doc in rows:
            value = json.dumps(default) if isinstance(default, str) else repr(default)
            lines += ["", f"# {doc}", f"{name} = {value}"]
        return "\n".join(lines)
    return "\n".join(f"{name} ({env}) = {default!r}\n    {doc}" for name, env, default, doc in rows)


def _run_loop(main: Coroutine[Any, Any, int], loop: str = "uvloop") -> int:
    if loop == "asyncio":
        return asyncio.run(main)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


async def _serve(settings: Settings) -> int:
    from wildrydes_stream.copy.app import Service

    return await _serve_until_signalled(Service(settings))


async def _aggregate(settings: Settings) -> int:
    from wildrydes_stream.aggregate.app import Aggregator

    return await _serve_until_signalled(Aggregator(settings))


async def _serve_until_signalled(consumer: Consumer) -> int:
    """Run a consumer until SIGTERM/SIGINT (or a stage fails); its exit code."""
    install_signal_handlers(consumer.request_stop)
    async with consumer:
        settle_heap()
        await consumer.wait()
    return consumer.exit_code


async def _redrive(
    settings: Settings, source: str, max_retry_attempts: int, application: str | None
) -> int:
    from wildrydes_stream.admin.redrive import redrive

    report = await redrive(settings, source, max_retry_attempts, application)
    print(report.line())
    return 0 if report.failed == 0 else 1


def _produce_command(args: argparse.Namespace) -> int:
    from wildrydes_stream.produce.producer import ProduceOptions

    # The producer needs none of the service's settings, only an AWS region and a stream.
    options = ProduceOptions(
        stream=args.stream,
        name=args.name,
        unicorns=args.unicorns,
        speed=args.speed,
        count=args.count,
        duration=args.duration,
        quiet=args.quiet,
        seed=args.seed,
        kpl=args.kpl,
    )
    return _run_loop(_produce(options, produce_region(args.region)))


def produce_region(flag: str | None) -> str:
    """-region wins over the environment and the profile, as the Go producer's flag did."""
    if flag:
        return flag
    from aiobotocore.session import get_session

    from wildrydes_stream.aws.clients import region_name

    return region_name(get_session())


async def _produce(options: ProduceOptions, region: str) -> int:
    from aiobotocore.session import get_session

    from wildrydes_stream.aws.clients import DATA_PATH
    from wildrydes_stream.produce.producer import Producer

    # DATA_PATH: no botocore retries, the producer retries (and counts) throttles itself.
    async with get_session().create_client("kinesis", region_name=region, config=DATA_PATH) as k:
        producer = Producer(k, options)
        install_signal_handlers(producer.request_stop)
        await producer.run()
    return 0


async def _status(settings: Settings, app: str, as_json: bool) -> int:
    from wildrydes_stream.admin.status import render, status
    from wildrydes_stream.aws.clients import AwsClients

    async with AwsClients(fast=False) as clients:
        # A fan-out endpoint of its own (a local server) serves the consumer calls too.
        url = settings.fanout_endpoint_url
        consumers = await clients.fanout(url) if url else None
        report = await status(clients.kinesis, clients.dynamodb_control, settings, app, consumers)
    print(render(report, as_json))
    return 0


async def _reset(settings: Settings, shards: list[str] | None, target: Any, force: bool) -> int:
    from wildrydes_stream.admin.reset import reset
    from wildrydes_stream.aws.clients import AwsClients

    async with AwsClients(fast=False) as clients:
        changes = await reset(
            clients.kinesis, clients.dynamodb_control, settings, shards, target, force=force
        )
    for change in changes or ["nothing to reset"]:
        print(change)
    return 0


async def _provision(settings: Settings, shards: int, app: str = "run") -> int:
    from wildrydes_stream.admin.provision import provision, provision_aggregate
    from wildrydes_stream.aws.clients import AwsClients

    async with AwsClients() as clients:
        if app == "aggregate":
            problems = await provision_aggregate(clients.kinesis, settings, shards)
            ready = f"streams {settings.raw_stream_name} and {settings.stream_name} are ready"
        else:
            problems = await provision(clients.kinesis, clients.dynamodb_control, settings, shards)
            ready = f"stream {settings.stream_name} and table {settings.table_name} are ready"
    for problem in problems:
        print(f"wildrydes-stream: {problem}", file=sys.stderr)
    if problems:
        return 1
    print(ready)
    return 0
