"""The consumer core: discovery, leases, pollers, progress, checkpoints, around a sink.

    pollers (one per owned shard) -> application's sink (bounded) -> acks -> shard progress
    checkpointer: shard progress -> lease table, every interval and at stop

Two applications run on it (`run` copies records into the table, `aggregate` puts minute
windows on a stream); they differ only in how a record is decoded and where it goes: an
`Application` says both, and checks its destination at start.

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
from collections.abc import Callable
from typing import Any, Protocol, Self

from botocore.exceptions import ClientError
from prometheus_client import CollectorRegistry

from wildrydes_stream.aws.clients import AwsClients
from wildrydes_stream.aws.lean import DynamoDBData
from wildrydes_stream.config import Settings, stream_setting
from wildrydes_stream.consumer.leases import LeaseTable
from wildrydes_stream.consumer.state import ShardState
from wildrydes_stream.consumer.statestore import StateStore
from wildrydes_stream.consumer.supervisor import ShardSupervisor
from wildrydes_stream.errors import MissingResourceError, WildrydesError
from wildrydes_stream.observability.health import BlockedCalls
from wildrydes_stream.observability.http import HealthServer
from wildrydes_stream.observability.logs import RetryLog
from wildrydes_stream.observability.metrics import Metrics
from wildrydes_stream.records.envelope import Envelope, ItemKey
from wildrydes_stream.runtime.budget import ByteBudget
from wildrydes_stream.runtime.waiting import wait_or_timeout
from wildrydes_stream.sink.deadletter import DeadLetters, Destination, FileDestination, Retry
from wildrydes_stream.sink.deadletter_s3 import S3Destination
from wildrydes_stream.sink.deadletter_sqs import SqsDestination
from wildrydes_stream.source.fanout import Fanout
from wildrydes_stream.source.registration import active_consumer, stream_arn

log = logging.getLogger(__name__)

# Bound on the final checkpoint and lease release after draining, so a dead endpoint cannot
# hold a stopping pod past its grace period by much.
FINAL_CHECKPOINT_TIMEOUT = 10.0


class Sink(Protocol):
    """Where decoded records go. It acknowledges each one (`envelope.tenure.finish`) once it is
    durably handled, bounds what it holds (`put_many` waits when full) and drains on request.

    `put_many` takes a page's records in shard order and, from the call on, owns their bytes
    in the byte bound: it gives them back once done with them, or at once if it will not
    hold them (cancelled, fenced)."""

    def start(self) -> None: ...
    async def put_many(self, envelopes: list[Envelope]) -> None: ...
    async def drain(self) -> None: ...
    async def stop(self) -> None: ...


class Wiring:
    """What the core hands an application to build its sink with."""

    def __init__(
        self,
        clients: AwsClients,
        settings: Settings,
        deadletters: DeadLetters,
        metrics: Metrics,
        on_failure: Callable[[BaseException], None],
        blocked: BlockedCalls,
        budget: ByteBudget,
    ) -> None:
        self.clients = clients
        self.settings = settings
        self.deadletters = deadletters
        self.metrics = metrics
        self.on_failure = on_failure
        self.blocked = blocked
        self.budget = budget


class Application(Protocol):
    """What one use of the consumer adds: decoding, a start-up check and the sink, and the
    per-shard state that moves with a lease (None when it keeps none)."""

    name: str
    """`run` or `aggregate`: named in every dead letter, so `redrive` knows where it goes."""
    state: ShardState | None

    def decode(self, data: bytes) -> tuple[ItemKey, Any]:
        """A record's routing key and payload; RecordError when the record is bad."""
        ...

    async def check(self, clients: AwsClients) -> None:
        """Refuse to start, with one line, when the destination is missing or wrong."""
        ...

    def sink(self, wiring: Wiring) -> Sink: ...


class Consumer:
    def __init__(
        self,
        settings: Settings,
        application: Application,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.settings = settings
        self.application = application
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
        self.sink: Sink | None = None
        self._retry_log = RetryLog(log)
        self.blocked = BlockedCalls(self.metrics, settings.blocked_log_interval_seconds)
        """APIs failing for a reason an operator must fix: not ready while any is."""
        self.budget = ByteBudget(settings.max_buffered_bytes)
        self.state_store: StateStore | None = None

    async def __aenter__(self) -> Self:
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
            deadletters = DeadLetters(
                self._destinations(clients), self.metrics, self.application.name
            )
            await self._check_stream(clients)
            fanout = await self._fanout(clients) if s.read_mode == "fanout" else None
            await self.application.check(clients)
            await deadletters.check()
            lean = clients.dynamodb_data
            leases = LeaseTable(
                clients.dynamodb_control,
                s.lease_table_name,
                s.owner,
                _at_timestamp_ms(s),
                fast=lean if isinstance(lean, DynamoDBData) else None,
            )
            await leases.ensure_table()
            store = None
            if self.application.state is not None:
                store = StateStore(clients.dynamodb_control, s.state_table_name)
                await store.ensure_table()
            self.state_store = store
            self.sink = self.application.sink(
                Wiring(clients, s, deadletters, self.metrics, self._fail, self.blocked, self.budget)
            )
            self.supervisor = ShardSupervisor(
                clients.kinesis_data,
                leases,
                s,
                self.sink.put_many,
                deadletters,
                self.metrics,
                self._stopping,
                self._fail,
                self.application.decode,
                self.budget,
                self.blocked,
                self.application.state,
                store,
                self.sink.drain,
                fanout,
            )
            self.sink.start()
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
                **self.endpoints(),
                "owner": s.owner,
                "http_port": self.http.port,
                # The loop actually running (uvloop's is uvloop.Loop): the event_loop setting.
                "event_loop": type(asyncio.get_running_loop()).__module__.partition(".")[0],
            },
        )

    def endpoints(self) -> dict[str, str]:
        """Where records come from and go, as the start line names them (an application
        with another destination says so)."""
        s = self.settings
        return {"stream": s.stream_name, "table": s.table_name, "lease_table": s.lease_table_name}

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

    async def _check_stream(self, clients: AwsClients) -> None:
        s = self.settings
        try:
            await clients.kinesis.describe_stream_summary(StreamName=s.stream_name)
        except ClientError as exc:
            if exc.response["Error"]["Code"] == "ResourceNotFoundException":
                raise MissingResourceError(
                    f"Kinesis stream {s.stream_name!r} does not exist: create it or set "
                    f"{stream_setting(s)}"
                ) from None
            raise

    async def _fanout(self, clients: AwsClients) -> Fanout:
        """read_mode `fanout`: the stream consumer, registered if missing and ACTIVE."""
        s = self.settings
        client = await clients.fanout(s.fanout_endpoint_url, s.fanout_quiet_read_grid_seconds)
        stream = await stream_arn(clients.kinesis, s.stream_name)
        try:
            arn = await active_consumer(client, stream, s.fanout_consumer_name)
        except OSError as exc:  # refused, reset (no HTTP/2 there), unreachable
            raise WildrydesError(
                f"cannot reach SubscribeToShard at {client.url} over HTTP/2 ({exc}): "
                "read_mode fanout needs an endpoint that speaks it (AWS, kinesis-local; "
                "fanout_endpoint_url); the embedded backend of `local` has none, use polling"
            ) from exc
        return Fanout(client, arn)

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
            except Exception as exc:
                self._retry_log.failed("checkpoint", exc)

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
            except Exception as exc:
                self._retry_log.failed("lease renewal", exc)

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
        assert self.sink is not None
        supervisor = self.supervisor
        while True:
            await supervisor.wait_caught_up()
            await self.sink.drain()
            await supervisor.settle()
            # The lease loop may have started shards meanwhile: done only when a sync starts
            # nothing and every shard read here is caught up (then drain what they read).
            if not await supervisor.sync() and supervisor.all_caught_up():
                await self.sink.drain()
                await supervisor.settle()
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
        supervisor, sink = self.supervisor, self.sink
        if supervisor is not None:
            supervisor.halt_all()  # pollers pausing between polls stop now, not after it
        if supervisor is not None and sink is not None:
            await self._drain(supervisor, sink)
            # Lease writes are shielded and serialized per lease, so cancelling a checkpoint
            # in flight loses nothing: the final one queues behind it.
            self._drained.set()
            await _cancel(self._checkpointer)
            # Each bounded on its own: a final checkpoint that cannot be written must not keep
            # the leases from being released (another replica would wait for them to expire).
            try:
                async with asyncio.timeout(FINAL_CHECKPOINT_TIMEOUT):
                    await supervisor.checkpoint_all(final=True)
            except Exception:
                log.exception(
                    "final checkpoint failed; records since the last one will be read again"
                )
            try:
                async with asyncio.timeout(FINAL_CHECKPOINT_TIMEOUT):
                    await supervisor.release_all()
            except Exception:
                log.exception("releasing the leases failed; they expire instead")
        self._released.set()
        await _cancel(self._renewer)
        await self._close()
        log.info("stopped", extra={"drained": self.drained_in_time})

    async def _drain(self, supervisor: ShardSupervisor, sink: Sink) -> None:
        try:
            async with asyncio.timeout(self.settings.shutdown_grace_seconds):
                await supervisor.wait_shard_tasks()
                await sink.drain()
        except TimeoutError:
            self.drained_in_time = False
            log.warning(
                "grace period over before everything in flight was written; "
                "unwritten records will be read again"
            )
            await supervisor.cancel_shard_tasks()
        await sink.stop()

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
