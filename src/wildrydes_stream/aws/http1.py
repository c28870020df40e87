"""A lean HTTP/1.1 client: a pool of persistent connections to one origin, for POSTs.

aiohttp spends most of a small request's client CPU in its general machinery (ClientSession,
ClientRequest, the payload registry, StreamWriter, ResponseHandler, a task per request). The
data path only ever POSTs a body it already holds to one origin and reads a small answer, so
this module does just that: an asyncio Protocol per connection, the request head and body
written at once, the answer parsed by httptools (llhttp, the parser Node.js uses) as it
arrives and handed back as (status, headers, body). bench/transport.py measures the difference.

- Connections are kept alive and reused, most recently used first; at most `limit` are open,
  and a caller finding all of them busy waits for one. Idle connections are closed after
  `idle_timeout` seconds, and dropped as soon as the server closes them.
- `connect_timeout` bounds opening a connection (TLS handshake included); `read_timeout` bounds
  each wait for the server, from the request to the answer's last byte, restarting whenever
  data arrives (aiohttp's `sock_read`). It is enforced by one timer for the whole pool, every
  `read_timeout / 20` (at most 1 s), rather than a timer per request: a request times out
  between `read_timeout` and 5% later. None means no limit.
- Content-Length, chunked and read-until-close answers; `Connection: close` answers (and
  HTTP/1.0 ones) close the connection after the answer.
- Writing respects flow control: when the transport's buffer is full the caller waits for it
  to drain (or for the answer, or a failure) before waiting for the answer.
- A server may close an idle keep-alive connection at any moment, and a request written on it
  meanwhile meets a closed connection. When a reused connection closes before a single byte of
  the answer has arrived, the request is sent once more on a freshly opened connection (as
  browsers, Go's net/http and aiohttp, for idempotent methods, do): the callers of this module
  only send AWS calls that are safe to repeat (GetRecords with the same iterator, a
  BatchWriteItem of the same puts). Any other failure raises.

Errors are aiohttp's exception classes, so whoever classifies aiohttp's errors classifies these
the same way: `ClientOSError` (cannot connect, connection reset), `ServerDisconnectedError`
(closed before the answer), `ClientPayloadError` (closed mid-answer, malformed answer),
`ConnectionTimeoutError` and `SocketTimeoutError` (both `asyncio.TimeoutError`).
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Mapping
from contextlib import suppress
from typing import Final, NamedTuple, cast
from urllib.parse import urlsplit

import aiohttp
from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser

LARGE_BODY: Final = 64 * 1024
"""Bodies from this size on are written after the head rather than copied into one buffer."""

_DEFAULT_PORTS: Final = {"http": 80, "https": 443}


class Response(NamedTuple):
    status: int
    headers: dict[str, str]
    """Names in lower case; a repeated header's values joined with ", "."""
    body: bytes


class _StaleConnection(Exception):
    """A reused connection closed before any of the answer arrived (sent again, not raised)."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


class Http1Pool:
    """Persistent HTTP/1.1 connections to the origin of `url`; `post` sends one request."""

    def __init__(
        self,
        url: str,
        *,
        limit: int = 10,
        connect_timeout: float | None = None,
        read_timeout: float | None = None,
        ssl_context: ssl.SSLContext | None = None,
        idle_timeout: float = 15.0,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.hostname: str = parts.hostname
        self.port: int = parts.port or _DEFAULT_PORTS[parts.scheme]
        self.path: str = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        host = self.hostname
        if ":" in host:
            host = f"[{host}]"
        if self.port != _DEFAULT_PORTS[parts.scheme]:
            host = f"{host}:{self.port}"
        self.host: str = host
        """The Host header, by botocore's rules (lower case, IPv6 in brackets, no default port),
        so that it is the host a SigV4 signature covers."""
        self._ssl: ssl.SSLContext | None = None
        if parts.scheme == "https":
            self._ssl = ssl_context or ssl.create_default_context()
        self._limit = max(1, limit)
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._tick = min(1.0, read_timeout / 20) if read_timeout is not None else 0.0
        self._watchdog: asyncio.TimerHandle | None = None
        self._idle_timeout = idle_timeout
        self._idle: deque[_Connection] = deque()
        """Kept-alive connections, least recently used first: taken from the right, expired
        from the left."""
        self._open = 0
        """Connections open or being opened: at most `limit`."""
        self._waiters: deque[asyncio.Future[_Connection | None]] = deque()
        """Callers waiting for a connection: handed an idle one, or None (open one)."""
        self._busy: set[_Connection] = set()
        self._closed = False

    @property
    def open_connections(self) -> int:
        return self._open

    async def post(
        self, headers: Mapping[str, str], body: bytes, path: str | None = None
    ) -> Response:
        """POST `body` with `headers` (Host and Content-Length are added); the whole answer."""
        lines = [f"{name}: {value}\r\n" for name, value in headers.items()]
        text = "".join(lines)
        if text.count("\n") != len(lines) or text.count("\r") != len(lines):
            raise ValueError("line break in a request header")
        head = (
            f"POST {path or self.path} HTTP/1.1\r\nHost: {self.host}\r\n{text}"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        if len(body) < LARGE_BODY:
            head, body = head + body, b""
        retried = False
        while True:
            connection = None if retried else self._take_idle()
            if connection is None:
                connection = await self._new_connection()
            busy = self._busy
            busy.add(connection)
            if self._watchdog is None and self._tick:
                self._watchdog = connection.loop.call_later(self._tick, self._watch)
            done = False
            try:
                waiter = connection.send(head, body)
                if connection.paused and not waiter.done():
                    await connection.drain()
                response = await waiter
                done = True
                return response
            except _StaleConnection as stale:
                if retried:
                    raise stale.error from None
                retried = True
            finally:
                busy.discard(connection)
                connection.waiter = None
                self._release(connection, done)

    def _take_idle(self) -> _Connection | None:
        idle = self._idle
        while idle:
            connection = idle.pop()
            if connection.reusable():
                return connection
            connection.close()
            self._slot_freed()
        return None

    async def _new_connection(self) -> _Connection:
        """A new connection, once the pool has room for one (or an idle one meanwhile)."""
        if self._closed:
            raise aiohttp.ClientConnectionError("connection pool closed")
        if self._open < self._limit:
            self._open += 1
        else:
            waiter: asyncio.Future[_Connection | None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                handed = await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    # Handed a connection (or a slot) just as the wait was cancelled.
                    got = waiter.result()
                    if got is None:
                        self._slot_freed()
                    else:
                        self._release(got, True)
                else:
                    with suppress(ValueError):  # unless passed over already, as cancelled
                        self._waiters.remove(waiter)
                raise
            if handed is not None:
                return handed
            # Handed the slot of a connection that closed: open one in its place.
        try:
            return await self._connect()
        except BaseException:
            self._slot_freed()
            raise

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        connection = _Connection(loop)
        try:
            async with asyncio.timeout(self._connect_timeout):
                await loop.create_connection(
                    lambda: connection,
                    self.hostname,
                    self.port,
                    ssl=self._ssl,
                    server_hostname=self.hostname if self._ssl else None,
                )
        except TimeoutError:
            connection.close()
            raise aiohttp.ConnectionTimeoutError(
                f"Connection timeout to host {self.hostname}:{self.port}"
            ) from None
        except OSError as exc:
            raise _os_error(
                exc,
                f"Cannot connect to host {self.hostname}:{self.port} "
                f"ssl:{self._ssl is not None} [{exc.strerror or exc}]",
            ) from exc
        return connection

    def _release(self, connection: _Connection, done: bool) -> None:
        """After a request: the connection is kept if the answer allows it, else closed."""
        if not done or self._closed or not connection.reusable():
            connection.close()
            self._slot_freed()
            return
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(connection)
                return
        now = connection.loop.time()
        connection.idle_since = now
        idle = self._idle
        idle.append(connection)
        expired = now - self._idle_timeout
        while idle[0].idle_since < expired:  # stops at the latest, idle since now
            idle.popleft().close()
            self._slot_freed()

    def _slot_freed(self) -> None:
        """A connection closed: a waiter may open one in its place, or the pool shrinks."""
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._open -= 1

    def _watch(self) -> None:
        """The read timeout, for every request in flight; runs while any is."""
        self._watchdog = None
        busy = self._busy
        if not busy or self._read_timeout is None:
            return
        loop = asyncio.get_running_loop()
        silent_since = loop.time() - self._read_timeout
        for connection in [c for c in busy if c.last_read <= silent_since]:
            connection.time_out()
        self._watchdog = loop.call_later(self._tick, self._watch)

    async def close(self) -> None:
        """Close every connection; requests in flight fail."""
        self._closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(aiohttp.ClientConnectionError("connection pool closed"))
        connections = [*self._idle, *self._busy]
        self._idle.clear()
        for connection in connections:
            connection.close()
        # Let the transports finish closing (connection_lost) before the loop moves on.
        await asyncio.sleep(0)


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection: one request at a time, its answer parsed as it arrives."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = HttpResponseParser(self)
        self.waiter: asyncio.Future[Response] | None = None
        self.idle_since = 0.0
        self.last_read = 0.0
        self.used = False
        """An answer has been read on this connection before: it is being reused."""
        self.lost = False
        self.paused = False
        self.drained: asyncio.Future[None] | None = None
        # The answer being read.
        self.status = 0
        self.headers: dict[str, str] = {}
        self.parts: list[bytes] = []
        self.headers_done = False
        self.received = False
        self.complete = True
        self.keep_alive = False

    def reusable(self) -> bool:
        transport = self.transport
        return (
            self.keep_alive
            and self.complete
            and not self.lost
            and transport is not None
            and not transport.is_closing()
        )

    def send(self, head: bytes, body: bytes) -> asyncio.Future[Response]:
        """Write a request; the future answer."""
        transport = self.transport
        assert transport is not None
        waiter: asyncio.Future[Response] = self.loop.create_future()
        self.waiter = waiter
        self.status = 0
        self.headers = {}
        self.parts = []
        self.headers_done = self.received = self.complete = self.keep_alive = False
        self.last_read = self.loop.time()
        if self.lost or transport.is_closing():
            # Closed while it waited to be used (a connection handed over, or one the server
            # closed as soon as it was opened): nothing was sent.
            closed = aiohttp.ServerDisconnectedError()
            waiter.set_exception(_StaleConnection(closed) if self.used else closed)
            return waiter
        # One write, so one send(2): two would cost a second system call per request, the
        # largest part of an idle poll's CPU with hundreds of shards.
        transport.write(head + body if body else head)
        return waiter

    async def drain(self) -> None:
        """Until the transport's buffer drains, the answer arrives or the connection fails."""
        self.drained = self.loop.create_future()
        try:
            await self.drained
        finally:
            self.drained = None

    def time_out(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self._fail(aiohttp.SocketTimeoutError("Timeout on reading data from socket"))
            self.close()

    def close(self) -> None:
        self.keep_alive = False
        if self.transport is not None and not self.lost:
            self.transport.close()

    def _fail(self, error: Exception) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        self._wake_writer()

    def _wake_writer(self) -> None:
        drained = self.drained
        if drained is not None and not drained.done():
            drained.set_result(None)

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.waiter is None:
            # Nothing was asked: a server's farewell (a 408) or garbage. Not reusable.
            self.close()
            return
        self.received = True
        self.last_read = self.loop.time()
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade:
            self._fail(aiohttp.ClientPayloadError("unexpected protocol upgrade in an answer"))
            self.close()
        except HttpParserError as exc:
            self._fail(aiohttp.ClientPayloadError(f"malformed HTTP answer: {exc}"))
            self.close()

    def eof_received(self) -> bool | None:
        self._ended(None)
        return None  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._ended(exc)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self.last_read = self.loop.time()  # the server is reading: progress
        self._wake_writer()

    def _ended(self, exc: Exception | None) -> None:
        """The server closed the connection (or it broke)."""
        self.keep_alive = False
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        headers = self.headers
        framed = "content-length" in headers or "transfer-encoding" in headers
        if exc is None and self.headers_done and not framed:
            # An answer read until the connection closes: the close ends it.
            self.complete = True
            waiter.set_result(Response(self.status, headers, b"".join(self.parts)))
            self._wake_writer()
            return
        error: Exception
        if self.headers_done:
            error = aiohttp.ClientPayloadError(
                "Response payload is not completed" + (f": {exc!r}" if exc else "")
            )
        elif isinstance(exc, OSError):
            error = _os_error(exc, f"Connection lost: {exc}")
        elif exc is not None:
            error = aiohttp.ClientConnectionError(f"Connection lost: {exc!r}")
        else:
            error = aiohttp.ServerDisconnectedError()
        if self.used and not self.received:
            error = _StaleConnection(error)
        self._fail(error)

    # httptools callbacks

    def on_message_begin(self) -> None:
        if self.complete:
            raise HttpParserError("data after the answer")

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        headers = self.headers
        headers[key] = f"{headers[key]}, {text}" if key in headers else text

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        self.parts.append(body)

    def on_message_complete(self) -> None:
        if self.status < 200:
            # An interim answer (100 Continue, 103 Early Hints): the final one follows.
            self.headers = {}
            self.parts = []
            self.headers_done = False
            return
        self.complete = True
        self.used = True
        parts = self.parts
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(Response(self.status, self.headers, body))
        self._wake_writer()


def _os_error(exc: OSError, message: str) -> aiohttp.ClientOSError:
    if exc.errno is None:
        return aiohttp.ClientOSError(message)
    return aiohttp.ClientOSError(exc.errno, message)
