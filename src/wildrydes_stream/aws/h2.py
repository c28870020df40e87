"""A small HTTP/2 client on asyncio and h2 (the sans-IO protocol library of python-hyper).

Kinesis serves SubscribeToShard over HTTP/2 only (aiobotocore speaks HTTP/1.1). One connection
carries many subscriptions as streams; the pool opens another once a connection holds
`max_streams` (or the server's MAX_CONCURRENT_STREAMS).

Flow control is the back-pressure: received data is acknowledged to the server (WINDOW_UPDATE)
only when the reader takes it with `H2Response.read`, so a reader that stops reading stops the
server after one stream window (`STREAM_WINDOW`) and holds no more than that in memory. The
connection window is as large as all its streams' windows together, so one paused stream never
holds up the others on its connection.

TLS connections ask for `h2` by ALPN; plain `http://` connections speak HTTP/2 with prior
knowledge (h2c), as local servers and kinesis-local do.

Quiet connections read on a grid (`quiet_read_grid`): hundreds of idle subscriptions each get
an empty event every few seconds, each at its own moment, and every one of them woke the event
loop (on a small VM a wake-up costs more than the event's own Python). After a read a quiet
connection leaves its socket alone until the next grid point, shared by the pool's
connections, so what came in meanwhile is taken in one wake-up. A connection whose streams
carry data (`H2Response.prompt_for`) reads at once again.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import ssl
import time
import typing
from collections import deque
from collections.abc import Callable
from typing import Final
from urllib.parse import urlsplit

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
)
from h2.exceptions import ProtocolError
from h2.settings import SettingCodes

STREAM_WINDOW: Final = 65_535
"""Bytes the server may send on one stream before the reader takes them (HTTP/2's default)."""
MAX_STREAMS: Final = 100
"""Streams one connection carries at most (fewer if the server says so)."""


class StreamClosed(ConnectionResetError):
    """The stream or its connection ended before its response did (reset, GOAWAY, a closed
    socket): a network fault, retried like one."""


class H2Response:
    """One request's response: status and headers, then the body read chunk by chunk."""

    def __init__(self, connection: _Connection, stream_id: int) -> None:
        self._connection = connection
        self.stream_id = stream_id
        self.status = 0
        self.headers: dict[str, str] = {}
        self._loop = loop = asyncio.get_running_loop()
        self.head: asyncio.Future[None] = loop.create_future()
        self.waiting_since: float | None = None
        """Loop time since which `read` has been waiting for the server (None: not waiting).
        Silence while nobody reads is flow control at work, not a stall."""
        self._chunks: deque[tuple[bytes, int]] = deque()
        self._ended = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.closed = False

    async def read(self) -> bytes:
        """The next chunk of the body, b"" at its end; StreamClosed when it was cut off.

        The chunk is acknowledged to the server as it is taken, opening the window again."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._ended:
                return b""
            loop = self._loop
            self._waiter = waiter = loop.create_future()
            self.waiting_since = loop.time()
            try:
                await waiter
            finally:
                self._waiter = None
                self.waiting_since = None
        data, flow = self._chunks.popleft()
        self._connection.acknowledge(self.stream_id, flow)
        return data

    async def body(self) -> bytes:
        """The whole body (small answers: errors, JSON calls)."""
        parts = []
        while chunk := await self.read():
            parts.append(chunk)
        return b"".join(parts)

    def prompt_for(self, seconds: float) -> None:
        """Data is flowing: for `seconds` from now the connection reads as soon as anything
        comes in, not on its quiet grid."""
        self._connection.prompt_until(self._loop.time() + seconds)

    def close(self) -> None:
        """Stop the stream (RST_STREAM CANCEL unless it ended) and hand back its window."""
        if self.closed:
            return
        self.closed = True
        unread = sum(flow for _, flow in self._chunks)
        self._chunks.clear()
        self._connection.finish(self, cancel=not self._ended or self._error is not None)
        if unread:
            self._connection.acknowledge(self.stream_id, unread)
        # A reader waiting on this stream (another task) wakes up to StreamClosed.
        self._fail(StreamClosed("stream closed by the client"))

    @property
    def buffered(self) -> int:
        """Bytes received and not yet read (at most one stream window)."""
        return sum(len(data) for data, _ in self._chunks)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _received(self, data: bytes, flow: int) -> None:
        if self.closed:
            self._connection.acknowledge(self.stream_id, flow)
            return
        self._chunks.append((data, flow))
        self._wake()

    def _end(self) -> None:
        self._ended = True
        self._wake()

    def fail(self, error: BaseException) -> None:
        """End the response here with `error` (its reader gets it); the stream stays open
        until `close`."""
        self._fail(error)

    def _fail(self, error: BaseException) -> None:
        if self._error is None and not self._ended:
            self._error = error
        if not self.head.done():
            self.head.set_exception(error)
            self.head.exception()  # retrieved: nobody may be waiting for the head any more
        self._wake()


class _TlsTransport(typing.Protocol):
    """What asyncio's and uvloop's TLS transports have beyond asyncio.Transport."""

    def set_read_buffer_limits(self, high: int | None = None, low: int | None = None) -> None: ...


class _Connection(asyncio.Protocol):
    def __init__(self, max_streams: int, hold: Callable[[_Connection], None] | None = None) -> None:
        self._h2 = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
        self._max_streams = max_streams
        self._transport: asyncio.Transport | None = None
        self._streams: dict[int, H2Response] = {}
        self.open = False
        self.last_received = time.monotonic()
        """When a frame last came in: a connection silent for long is dead (see H2Pool)."""
        self._hold = hold
        """Called after a read while the connection is quiet: its reading is paused, and the
        pool resumes it at the next grid point. None: reads are never held."""
        self._prompt_until = 0.0
        """Loop time until which reads are not held (data is flowing)."""
        self.held = False
        self._tls: _TlsTransport | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self._transport = typing.cast(asyncio.Transport, transport)
        if transport.get_extra_info("ssl_object") is not None:
            self._tls = typing.cast(_TlsTransport, transport)
        self.open = True
        h2 = self._h2
        h2.local_settings.update(
            {
                SettingCodes.ENABLE_PUSH: 0,
                SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                SettingCodes.MAX_CONCURRENT_STREAMS: 0,  # the server opens none
            }
        )
        h2.initiate_connection()
        # Room for every stream's window at once: a paused stream blocks only itself.
        h2.increment_flow_control_window(STREAM_WINDOW * self._max_streams)
        self._flush()

    def data_received(self, data: bytes) -> None:
        self.last_received = time.monotonic()
        try:
            events = self._h2.receive_data(data)
        except ProtocolError as exc:
            self._flush()
            self._abort(StreamClosed(f"HTTP/2 protocol error: {exc}"))
            return
        for event in events:
            self._handle(event)
        self._flush()
        transport = self._transport
        if (
            self._hold is not None
            and self.open
            and transport is not None
            and asyncio.get_running_loop().time() >= self._prompt_until
        ):
            transport.pause_reading()
            if self._tls is not None:
                # Paused, a TLS transport only stops handing data on: it still reads the
                # socket into its buffer, a wake-up per record. A read limit of 0 stops that.
                self._tls.set_read_buffer_limits(high=0)
            self.held = True
            self._hold(self)

    def prompt_until(self, when: float) -> None:
        self._prompt_until = max(self._prompt_until, when)
        self.release()

    def release(self) -> None:
        """Read again now if held."""
        if self.held:
            self.held = False
            transport = self._transport
            if self.open and transport is not None and not transport.is_closing():
                if self._tls is not None:
                    self._tls.set_read_buffer_limits()  # the transport's defaults again
                transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        self._fail_all(StreamClosed(f"connection closed: {exc or 'by the server'}"))

    # requests

    @property
    def has_room(self) -> bool:
        if not self.open:
            return False
        limit = min(self._max_streams, self._h2.remote_settings.max_concurrent_streams)
        return len(self._streams) < limit

    def request(self, headers: list[tuple[str, str]], body: bytes) -> H2Response:
        h2 = self._h2
        stream_id = h2.get_next_available_stream_id()
        response = H2Response(self, stream_id)
        self._streams[stream_id] = response
        h2.send_headers(stream_id, headers, end_stream=not body)
        if body:
            # Requests here are small JSON bodies, far below any initial window.
            if len(body) > h2.local_flow_control_window(stream_id):
                h2.reset_stream(stream_id)
                self._streams.pop(stream_id, None)
                raise ValueError("request body larger than the server's window")
            h2.send_data(stream_id, body, end_stream=True)
        self._flush()
        return response

    def acknowledge(self, stream_id: int, flow: int) -> None:
        if not self.open or flow <= 0:
            return
        self._h2.acknowledge_received_data(flow, stream_id)
        self._flush()

    def finish(self, response: H2Response, cancel: bool) -> None:
        self._streams.pop(response.stream_id, None)
        if cancel and self.open:
            with contextlib.suppress(Exception):  # already closed on the protocol's side
                self._h2.reset_stream(response.stream_id)
            self._flush()

    def close(self) -> None:
        if self._transport is not None and self.open:
            with contextlib.suppress(Exception):
                self._h2.close_connection()
                self._flush()
            self._transport.close()
        self.open = False

    def _abort(self, error: BaseException) -> None:
        self.open = False
        self._fail_all(error)
        if self._transport is not None:
            self._transport.abort()

    def _fail_all(self, error: BaseException) -> None:
        streams, self._streams = self._streams, {}
        for response in streams.values():
            response._fail(error)

    def _handle(self, event: Event) -> None:
        if isinstance(event, ConnectionTerminated):
            # GOAWAY: no new streams here; the open ones are failed so their readers move to
            # another connection at once (they resume where they were).
            self.open = False
            self._fail_all(StreamClosed(f"GOAWAY from the server (code {event.error_code})"))
            if self._transport is not None:
                self._transport.close()
            return
        stream_id = getattr(event, "stream_id", None)
        response = self._streams.get(stream_id) if stream_id is not None else None
        if isinstance(event, DataReceived):
            if response is None:
                # A stream already closed here: only the connection's window is handed back.
                self._h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                return
            response._received(event.data or b"", event.flow_controlled_length)
        elif response is None:
            return
        elif isinstance(event, ResponseReceived):
            headers = {_text(name).lower(): _text(value) for name, value in event.headers or ()}
            response.status = int(headers.pop(":status", "0"))
            response.headers = headers
            if not response.head.done():
                response.head.set_result(None)
        elif isinstance(event, StreamEnded | TrailersReceived):
            if isinstance(event, TrailersReceived) and event.stream_ended is None:
                return
            self._streams.pop(response.stream_id, None)
            response._end()
            if not response.head.done():
                response._fail(StreamClosed("stream ended without a response"))
        elif isinstance(event, StreamReset):
            self._streams.pop(response.stream_id, None)
            response._fail(StreamClosed(f"stream reset by the server (code {event.error_code})"))

    def _flush(self) -> None:
        data = self._h2.data_to_send()
        if data and self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


class H2Pool:
    """HTTP/2 connections to one origin, each carrying up to `max_streams` requests at once."""

    def __init__(
        self,
        url: str,
        *,
        ssl_context: ssl.SSLContext | None = None,
        connect_timeout: float = 5.0,
        max_streams: int = MAX_STREAMS,
        quiet_read_grid: float = 0.0,
    ) -> None:
        """`quiet_read_grid`: seconds between the points at which quiet connections read
        (0: every connection reads at once, always)."""
        parts = urlsplit(url)
        self.scheme = parts.scheme or "https"
        self.host = parts.hostname or ""
        default_port = 443 if self.scheme == "https" else 80
        self.port = parts.port or default_port
        self.authority = parts.netloc
        self.path = parts.path or "/"
        self._ssl: ssl.SSLContext | None = None
        if self.scheme == "https":
            self._ssl = ssl_context or ssl.create_default_context()
            self._ssl.set_alpn_protocols(["h2"])
        self._connect_timeout = connect_timeout
        self._max_streams = max_streams
        self._connections: list[_Connection] = []
        self._connecting: asyncio.Lock = asyncio.Lock()
        self._grid = quiet_read_grid
        self._held: list[_Connection] = []
        self._release_timer: asyncio.TimerHandle | None = None

    async def request(self, method: str, headers: dict[str, str], body: bytes = b"") -> H2Response:
        """Send a request; returns once the response's status and headers are in."""
        pseudo = [
            (":method", method),
            (":scheme", self.scheme),
            (":authority", self.authority),
            (":path", self.path),
        ]
        fields = pseudo + [(name.lower(), value) for name, value in headers.items()]
        if body:
            fields.append(("content-length", str(len(body))))
        connection = await self._connection()
        response = connection.request(fields, body)
        try:
            async with asyncio.timeout(self._connect_timeout + 30):
                await response.head
        except BaseException:
            response.close()
            raise
        return response

    async def _connection(self) -> _Connection:
        self._connections = [c for c in self._connections if c.open]
        for connection in self._connections:
            if connection.has_room:
                return connection
        async with self._connecting:
            for connection in self._connections:
                if connection.has_room:
                    return connection
            loop = asyncio.get_running_loop()
            async with asyncio.timeout(self._connect_timeout):
                hold = self._hold if self._grid > 0 else None
                _, protocol = await loop.create_connection(
                    lambda: _Connection(self._max_streams, hold),
                    self.host,
                    self.port,
                    ssl=self._ssl,
                    server_hostname=self.host if self._ssl else None,
                )
            self._connections.append(protocol)
            return protocol

    def _hold(self, connection: _Connection) -> None:
        """Resume `connection` at the next grid point, with every other one held by then: one
        timer (one wake-up) for all of them."""
        self._held.append(connection)
        if self._release_timer is None:
            loop = asyncio.get_running_loop()
            grid = self._grid
            when = math.ceil(loop.time() / grid) * grid
            self._release_timer = loop.call_at(when, self._release_held)

    def _release_held(self) -> None:
        self._release_timer = None
        held, self._held = self._held, []
        for connection in held:
            connection.release()

    def retire_if_silent(self, response: H2Response, seconds: float) -> bool:
        """Close the response's connection when nothing at all came in on it for `seconds`
        (a half-dead TCP connection: every stream on it is stalled); True if closed."""
        connection = response._connection
        if connection.open and time.monotonic() - connection.last_received >= seconds:
            connection._abort(StreamClosed(f"connection silent for {seconds:.0f} s"))
            return True
        return False

    @property
    def connections(self) -> int:
        return sum(1 for c in self._connections if c.open)

    async def close(self) -> None:
        if self._release_timer is not None:
            self._release_timer.cancel()
            self._release_timer = None
        self._held = []
        for connection in self._connections:
            connection.close()
        self._connections = []
