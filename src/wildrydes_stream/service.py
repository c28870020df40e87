"""The service: wires the stages, owns start/stop.

    pollers (one per owned shard) -> bounded writer queues -> BatchWriteItem writers
            \\-> shard progress <- acks ---------------------------/
    checkpointer: shard progress -> lease table, every interval and at stop

`start` and `stop` are idempotent and the class is an async context manager. `stop` stops
discovery and polling, drains what is in flight within the grace period while still renewing
and checkpointing the leases (so no other replica takes them mid-drain), writes the final
checkpoint, releases the leases, and only then stops renewing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from botocore.exceptions import ClientError
from prometheus_client import CollectorRegistry

from wildrydes_stream.aws import AwsClients
from wildrydes_stream.buffering import ByteBudget
from wildrydes_stream.checkpoint.leases import LeaseTable
from wildrydes_stream.config import Settings
from wildrydes_stream.errors import MissingResourceError, WildrydesError
from wildrydes_stream.observability.health import BlockedCalls
from wildrydes_stream.observability.http import HealthServer
from wildrydes_stream.observability.metrics import Metrics
from wildrydes_stream.sink.deadletter import DeadLetters, Destination, FileDestination, Retry
from wildrydes_stream.sink.deadletter_s3 import S3Destination
from wildrydes_stream.sink.deadletter_sqs import SqsDestination
from wildrydes_stream.sink.dynamodb import WriterPool
from wildrydes_stream.supervisor import ShardSupervisor
from wildrydes_stream.waiting import wait_or_timeout

log = logging.getLogger(__name__)

# Bound on the final checkpoint and lease release after draining, so a dead endpoint cannot
# hold a stopping pod past its grace period by much.
FINAL_CHECKPOINT_TIMEOUT = 10.0


class Service:
    def __init__(self, settings: Settings, registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.metrics = Metrics(registry)
        self._clients = AwsClients()
        self._stopping = asyncio.Event()
        self._stop_requested = asyncio.Event()
        self._failure: BaseException | None = None
        self._drained = asyncio.Event()
        """Set once the drain is over: the checkpointer stops, the final checkpoint follows."""
        self._released = asyncio.Event()
        """Set once the leases are released: the renewer stops."""
        self._discovery: asyncio.Task[None] | None = None
        self._checkpointer: asyncio.Task[None] | None = None
        self._renewer: asyncio.Task[None] | None = None
        self._started = False
        self._stopped = False
        self.drained_in_time = True
        self.http: HealthServer | None = None
        self.supervisor: ShardSupervisor | None = None
        self.pool: WriterPool | None = None
        self.blocked = BlockedCalls(self.metrics, settings.blocked_log_interval_seconds)
        """APIs failing for a reason an operator must fix: not ready while any is."""
        self.budget = ByteBudget(settings.max_buffered_bytes)

    async def __aenter__(self) -> Service:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        s = self.settings
        # The port first: a clash fails at once, before anything is created in AWS. Until the
        # shards are read, /healthz answers and /readyz says not ready.
        self.http = HealthServer(
            self.metrics.registry,
            live=self._live,
            ready=self._ready,
            host=s.http_host,
            port=s.http_port,
        )
        await self.http.start()
        try:
            clients = await self._clients.__aenter__()
            deadletters = DeadLetters(self._destinations(clients), self.metrics)
            await self._check_resources(clients)
            await deadletters.check()
            leases = LeaseTable(
                clients.dynamodb_control, s.lease_table_name, s.owner, _at_timestamp_ms(s)
            )
            await leases.ensure_table()
            self.pool = WriterPool(
                clients.dynamodb_data,
                s,
                deadletters,
                self.metrics,
                self._fail,
                blocked=self.blocked,
                budget=self.budget,
            )
            self.supervisor = ShardSupervisor(
                clients.kinesis_data,
                leases,
                s,
                self.pool.put,
                deadletters,
                self.metrics,
                self._stopping,
                self._fail,
                self.budget,
                self.blocked,
            )
            self.pool.start()
            await self.supervisor.sync()
            self._discovery = asyncio.create_task(self._supervise(), name="shard-discovery")
            self._checkpointer = asyncio.create_task(self._checkpoint_loop(), name="checkpointer")
            self._renewer = asyncio.create_task(self._renew_loop(), name="lease-renewer")
        except BaseException:
            await self._close()
            raise
        log.info(
            "service started",
            extra={
                "stream": s.stream_name,
                "table": s.table_name,
                "owner": s.owner,
                "http_port": self.http.port,
            },
        )

    def _destinations(self, clients: AwsClients) -> list[Destination]:
        s = self.settings
        # One Retry for all: failures counted per destination, logged at most once an interval.
        retry = Retry.from_settings(s, self.metrics)
        destinations: list[Destination] = []
        if s.deadletter_file:
            destinations.append(FileDestination(s.deadletter_file, retry))
        if s.deadletter_queue_url:
            destinations.append(SqsDestination(clients.sqs, s.deadletter_queue_url, retry))
        if s.deadletter_s3_uri:
            destinations.append(S3Destination(clients.s3, s.deadletter_s3_uri, retry))
        return destinations

    async def _check_resources(self, clients: AwsClients) -> None:
        s = self.settings
        try:
            await clients.kinesis.describe_stream_summary(StreamName=s.stream_name)
        except ClientError as exc:
            if exc.response["Error"]["Code"] == "ResourceNotFoundException":
                raise MissingResourceError(
                    f"Kinesis stream {s.stream_name!r} does not exist: create it or set "
                    "stream_name (WILDRYDES_STREAM_NAME)"
                ) from None
            raise
        try:
            table = await clients.dynamodb_control.describe_table(TableName=s.table_name)
        except ClientError as exc:
            if exc.response["Error"]["Code"] == "ResourceNotFoundException":
                raise MissingResourceError(
                    f"DynamoDB table {s.table_name!r} does not exist: create it or set "
                    "table_name (WILDRYDES_TABLE_NAME)"
                ) from None
            raise
        _check_sort_key(table["Table"], s)

    def _fail(self, exc: BaseException) -> None:
        """A stage died of an unexpected error: stop, and exit non-zero."""
        if self._failure is None:
            log.error("stage failed, stopping", exc_info=exc)
            self._failure = exc
        self._stop_requested.set()

    def _live(self) -> bool:
        return self._failure is None

    def _ready(self) -> bool:
        supervisor = self.supervisor
        return (
            supervisor is not None
            and supervisor.synced.is_set()
            and not self._stopping.is_set()
            and self._failure is None
            and not self.blocked.blocked
        )

    async def _supervise(self) -> None:
        assert self.supervisor is not None
        try:
            await self.supervisor.run()
        except Exception as exc:
            self._fail(exc)

    async def _checkpoint_loop(self) -> None:
        """Until the drain is over: a stop keeps checkpointing what its drain finishes."""
        assert self.supervisor is not None
        interval = self.settings.checkpoint_interval_seconds
        while not await wait_or_timeout(self._drained, interval):
            try:
                await self.supervisor.checkpoint_all()
            except Exception:
                log.exception("checkpoint failed; retrying at the next interval")

    async def _renew_loop(self) -> None:
        """Every third of the lease duration, on a fixed beat, until the leases are released:
        a stop keeps its leases through the drain and the final checkpoint."""
        assert self.supervisor is not None
        interval = self.settings.lease_duration_seconds / 3
        beat = time.monotonic()
        while not await wait_or_timeout(self._released, beat + interval - time.monotonic()):
            beat = time.monotonic()
            try:
                await self.supervisor.renew_all()
            except Exception:
                log.exception("lease renewal failed; retrying at the next interval")

    def request_stop(self) -> None:
        self._stop_requested.set()

    async def wait(self) -> None:
        """Until a stop is requested (a signal) or a stage fails."""
        await self._stop_requested.wait()

    async def run_burst(self) -> None:
        """Read every shard until caught up, write everything read, then stop (for tests and
        one-off catch-up runs). A stop request ends it early; a stage failing raises."""
        burst = asyncio.create_task(self._burst(), name="burst")
        stop = asyncio.create_task(self._stop_requested.wait(), name="burst-stop")
        try:
            await asyncio.wait({burst, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (burst, stop):
                task.cancel()
            await asyncio.gather(burst, stop, return_exceptions=True)
            await self.stop()
        if self._failure is not None:
            raise WildrydesError(f"a stage failed: {self._failure!r}") from self._failure

    async def _burst(self) -> None:
        assert self.supervisor is not None
        assert self.pool is not None
        while True:
            await self.supervisor.wait_caught_up()
            await self.pool.drain()
            await self.supervisor.settle()
            if not await self.supervisor.sync():
                return

    @property
    def exit_code(self) -> int:
        return 0 if self._failure is None and self.drained_in_time else 1

    async def stop(self) -> None:
        """Stop discovery and polling; drain within the grace period while the renewer and
        the checkpointer go on; then the final checkpoint, the release of the leases, and last
        the renewer. Bounded by the grace period plus FINAL_CHECKPOINT_TIMEOUT."""
        if not self._started or self._stopped:
            return
        self._stopped = True
        self._stopping.set()
        log.info(
            "stopping: draining in-flight records",
            extra={"grace_seconds": self.settings.shutdown_grace_seconds},
        )
        await _cancel(self._discovery)
        supervisor, pool = self.supervisor, self.pool
        if supervisor is not None and pool is not None:
            await self._drain(supervisor, pool)
            # Lease writes are shielded and serialized per lease, so cancelling a checkpoint
            # in flight loses nothing: the final one queues behind it.
            self._drained.set()
            await _cancel(self._checkpointer)
            try:
                async with asyncio.timeout(FINAL_CHECKPOINT_TIMEOUT):
                    await supervisor.checkpoint_all()
                    await supervisor.release_all()
            except Exception:
                log.exception(
                    "final checkpoint failed; records since the last one will be read again"
                )
        self._released.set()
        await _cancel(self._renewer)
        await self._close()
        log.info("stopped", extra={"drained": self.drained_in_time})

    async def _drain(self, supervisor: ShardSupervisor, pool: WriterPool) -> None:
        try:
            async with asyncio.timeout(self.settings.shutdown_grace_seconds):
                await supervisor.wait_shard_tasks()
                await pool.drain()
        except TimeoutError:
            self.drained_in_time = False
            log.warning(
                "grace period over before everything in flight was written; "
                "unwritten records will be read again"
            )
            await supervisor.cancel_shard_tasks()
        await pool.stop()

    async def _close(self) -> None:
        if self.http is not None:
            await self.http.stop()
        await self._clients.__aexit__(None, None, None)


async def _cancel(task: asyncio.Task[None] | None) -> None:
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _at_timestamp_ms(settings: Settings) -> int | None:
    """The configured AT_TIMESTAMP start in epoch ms, recorded on leases that start there."""
    moment = settings.starting_datetime()
    return None if moment is None else int(moment.timestamp() * 1000)


def _check_sort_key(table: dict[str, Any], settings: Settings) -> None:
    """Refuse to start when the table's StatusTime type disagrees with status_time_format."""
    types = {a["AttributeName"]: a["AttributeType"] for a in table["AttributeDefinitions"]}
    keys = {k["AttributeName"]: k["KeyType"] for k in table["KeySchema"]}
    expected = "N" if settings.status_time_format == "epoch_ms" else "S"
    if keys.get("Name") != "HASH" or keys.get("StatusTime") != "RANGE":
        raise WildrydesError(
            f"DynamoDB table {settings.table_name!r} must have partition key Name and sort key "
            "StatusTime"
        )
    if types.get("StatusTime") != expected:
        raise WildrydesError(
            f"DynamoDB table {settings.table_name!r} stores StatusTime as {types.get('StatusTime')}"
            f" but status_time_format={settings.status_time_format} writes {expected}: change "
            "the setting (WILDRYDES_STATUS_TIME_FORMAT)"
        )
