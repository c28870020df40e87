"""The lean HTTP/1.1 client (http1.py) against real servers on loopback ports.

Most servers here are a few lines of asyncio streams, so that each can misbehave exactly as a
test needs (close idle connections, answer chunked, stall, drop the connection mid-answer); one
is aiohttp's web server, as a well-behaved peer.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from botocore.auth import _host_from_url

from wildrydes_stream.aws.http1 import Http1Pool
from wildrydes_stream.aws.retry import fault_of, is_transient

HEADERS = {"Content-Type": "application/x-amz-json-1.0", "X-Amz-Target": "Test.Echo"}
Request = tuple[dict[str, str], bytes]


class Peer:
    """One server-side connection: read requests, write raw answers."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def request(self) -> Request | None:
        """The next request's headers (lower-case names) and body; None once the client left."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        lines = head.decode("latin-1").split("\r\n")
        assert lines[0].startswith("POST ")
        assert lines[0].endswith(" HTTP/1.1")
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        body = await self.reader.readexactly(int(headers["content-length"]))
        return headers, body

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    async def answer(self, body: bytes, extra: str = "", status: str = "200 OK") -> None:
        self.write(
            f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n{extra}"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await self.writer.drain()

    def reset(self) -> None:
        """Close with a TCP reset (SO_LINGER 0) rather than a FIN."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


Handler = Callable[["Server", Peer], Awaitable[None]]


class Server:
    """A loopback server running `handler` for each connection, counting what it sees."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.port = 0
        self.connections = 0
        self.requests = 0
        self.open = 0
        self.most_open = 0
        self.tasks: set[asyncio.Task[Any]] = set()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            await self.handler(self, Peer(reader, writer))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            # Only stop() cancels; ending quietly spares a log line from asyncio's streams
            # (on 3.11 they call exception() on a cancelled handler task).
            pass
        finally:
            self.open -= 1
            self.tasks.discard(task)
            writer.close()
            with suppress(ConnectionError):
                await writer.wait_closed()

    async def request(self, peer: Peer) -> Request | None:
        request = await peer.request()
        if request is not None:
            self.requests += 1
        return request

    async def stop(self, server: asyncio.Server) -> None:
        server.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await server.wait_closed()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"


@asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[Server]:
    state = Server(handler)
    server = await asyncio.start_server(state.serve, "127.0.0.1", 0)
    state.port = server.sockets[0].getsockname()[1]
    try:
        yield state
    finally:
        await state.stop(server)


@asynccontextmanager
async def pool_for(handler: Handler, **options: Any) -> AsyncIterator[tuple[Server, Http1Pool]]:
    async with serving(handler) as server:
        pool = Http1Pool(server.url, **options)
        try:
            yield server, pool
        finally:
            await pool.close()


async def echo(server: Server, peer: Peer) -> None:
    """Keep-alive: answer every request with its own body."""
    while (request := await server.request(peer)) is not None:
        await peer.answer(request[1])


async def test_keep_alive_one_connection_for_many_calls() -> None:
    async with pool_for(echo, limit=4) as (server, pool):
        for n in range(50):
            status, headers, body = await pool.post(HEADERS, b'{"n":%d}' % n)
            assert (status, body) == (200, b'{"n":%d}' % n)
            assert headers["content-type"] == "application/json"

    assert server.connections == 1
    assert server.requests == 50


async def test_request_carries_host_length_and_headers() -> None:
    seen: list[Request] = []

    async def record(server: Server, peer: Peer) -> None:
        while (request := await server.request(peer)) is not None:
            seen.append(request)
            await peer.answer(b"{}")

    async with pool_for(record) as (server, pool):
        await pool.post({**HEADERS, "Accept-Encoding": "identity"}, b"x" * 100)

    [(headers, body)] = seen
    assert headers["host"] == f"127.0.0.1:{server.port}"
    assert headers["content-length"] == "100"
    assert headers["x-amz-target"] == "Test.Echo"
    assert headers["accept-encoding"] == "identity"
    assert body == b"x" * 100


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:4567/",
        "http://localhost:80/",
        "https://dynamodb.eu-west-1.amazonaws.com/",
        "https://Kinesis.US-East-1.amazonaws.com:443/",
        "https://example.com:8443/path",
        "http://[::1]:8000/",
    ],
)
def test_host_header_is_the_one_botocore_signs(url: str) -> None:
    assert Http1Pool(url).host == _host_from_url(url)


async def test_header_with_a_line_break_is_refused() -> None:
    async with pool_for(echo) as (server, pool):
        with pytest.raises(ValueError, match="line break"):
            await pool.post({"X-Evil": "a\r\nInjected: yes"}, b"{}")
        with pytest.raises(ValueError, match="line break"):
            await pool.post({"X-Evil": "a\nb"}, b"{}")
    assert server.requests == 0


async def test_server_closing_idle_connections_next_call_still_succeeds() -> None:
    async def close_when_idle(server: Server, peer: Peer) -> None:
        while (request := await server.request(peer)) is not None:
            await peer.answer(request[1])
            try:
                await asyncio.wait_for(peer.reader.readuntil(b"\r\n\r\n"), 0.05)
            except TimeoutError:
                return  # idle for 50 ms: close, as load balancers do
            raise AssertionError("the client sent a second request in 50 ms")

    async with pool_for(close_when_idle) as (server, pool):
        for _ in range(3):
            assert (await pool.post(HEADERS, b"1")).body == b"1"
            await asyncio.sleep(0.2)

    assert server.connections == 3
    assert server.requests == 3


async def test_server_closing_right_after_each_answer_is_retried_on_a_fresh_connection() -> None:
    # No `Connection: close`: the client learns of the close only when it next writes, or
    # reads EOF where the answer should be. Nothing of the answer arrived: sent again, once.
    async def one_answer_then_close(server: Server, peer: Peer) -> None:
        request = await server.request(peer)
        if request is not None:
            await peer.answer(request[1])

    async with pool_for(one_answer_then_close) as (server, pool):
        for n in range(10):
            assert (await pool.post(HEADERS, b"%d" % n)).body == b"%d" % n

    assert server.requests == 10
    assert server.connections >= 10


async def test_connection_close_answer_opens_a_new_connection_next_time() -> None:
    async def answer_and_close(server: Server, peer: Peer) -> None:
        request = await server.request(peer)
        if request is not None:
            await peer.answer(request[1], extra="Connection: close\r\n")
            # Leave the connection open: the client must close it itself.
            await peer.reader.read()

    async with pool_for(answer_and_close) as (server, pool):
        for n in range(3):
            assert (await pool.post(HEADERS, b"%d" % n)).body == b"%d" % n
            assert pool.open_connections == 0

    assert server.connections == 3


async def test_chunked_answer() -> None:
    async def chunked(server: Server, peer: Peer) -> None:
        while await server.request(peer) is not None:
            peer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for piece in (b'{"Records":', b"[1,2,3]", b"}"):
                await asyncio.sleep(0.01)
                peer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            peer.write(b"0\r\n\r\n")

    async with pool_for(chunked) as (server, pool):
        for _ in range(2):
            status, headers, body = await pool.post(HEADERS, b"{}")
            assert (status, body) == (200, b'{"Records":[1,2,3]}')
            assert headers["transfer-encoding"] == "chunked"

    assert server.connections == 1


async def test_answer_read_until_the_server_closes() -> None:
    async def unframed(server: Server, peer: Peer) -> None:
        if await server.request(peer) is not None:
            peer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n")
            peer.write(b'{"a":')
            await asyncio.sleep(0.02)
            peer.write(b"1}")

    async with pool_for(unframed) as (_, pool):
        assert (await pool.post(HEADERS, b"{}")).body == b'{"a":1}'
        assert pool.open_connections == 0


async def test_interim_answer_is_skipped() -> None:
    async def continue_first(server: Server, peer: Peer) -> None:
        while (request := await server.request(peer)) is not None:
            peer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await peer.answer(request[1])

    async with pool_for(continue_first) as (server, pool):
        for _ in range(2):
            status, _, body = await pool.post(HEADERS, b"ok")
            assert (status, body) == (200, b"ok")
    assert server.connections == 1


async def test_error_status_is_an_answer_not_an_exception() -> None:
    async def throttled(server: Server, peer: Peer) -> None:
        while await server.request(peer) is not None:
            await peer.answer(
                b'{"__type":"ThrottlingException"}',
                extra="x-amzn-ErrorType: ThrottlingException:http://internal/\r\n",
                status="400 Bad Request",
            )

    async with pool_for(throttled) as (server, pool):
        status, headers, _ = await pool.post(HEADERS, b"{}")
        assert status == 400
        assert headers["x-amzn-errortype"].startswith("ThrottlingException")
        await pool.post(HEADERS, b"{}")
    assert server.connections == 1


async def test_read_timeout_raises_a_transient_timeout() -> None:
    async def silent(server: Server, peer: Peer) -> None:
        await server.request(peer)
        await asyncio.sleep(30)

    async with pool_for(silent, read_timeout=0.3) as (_, pool):
        started = time.monotonic()
        with pytest.raises(aiohttp.SocketTimeoutError) as caught:
            await pool.post(HEADERS, b"{}")
        waited = time.monotonic() - started

    assert 0.3 <= waited < 1.5
    assert isinstance(caught.value, asyncio.TimeoutError)
    assert is_transient(caught.value)
    assert fault_of(caught.value) == "transient"


async def test_read_timeout_restarts_whenever_data_arrives() -> None:
    async def trickle(server: Server, peer: Peer) -> None:
        while await server.request(peer) is not None:
            peer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for _ in range(6):
                await asyncio.sleep(0.1)
                peer.write(b"1\r\nx\r\n")
            peer.write(b"0\r\n\r\n")

    async with pool_for(trickle, read_timeout=0.3) as (_, pool):
        assert (await pool.post(HEADERS, b"{}")).body == b"x" * 6


async def test_a_timed_out_connection_is_not_reused() -> None:
    calls = 0

    async def slow_first(server: Server, peer: Peer) -> None:
        nonlocal calls
        while (request := await server.request(peer)) is not None:
            calls += 1
            if calls == 1:
                await asyncio.sleep(0.5)
            await peer.answer(request[1])

    async with pool_for(slow_first, read_timeout=0.2) as (server, pool):
        with pytest.raises(asyncio.TimeoutError):
            await pool.post(HEADERS, b"late")
        assert (await pool.post(HEADERS, b"fresh")).body == b"fresh"
    assert server.connections == 2


async def test_connection_dropped_mid_answer_is_a_network_error() -> None:
    async def half_then_close(server: Server, peer: Peer) -> None:
        if await server.request(peer) is not None:
            peer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"{" * 10)
            await peer.writer.drain()

    async with pool_for(half_then_close) as (server, pool):
        with pytest.raises(aiohttp.ClientPayloadError) as caught:
            await pool.post(HEADERS, b"{}")

    assert is_transient(caught.value)
    assert fault_of(caught.value) == "transient"
    assert server.requests == 1  # part of an answer came: not sent again


async def test_connection_reset_mid_answer_is_a_network_error() -> None:
    async def half_then_reset(server: Server, peer: Peer) -> None:
        if await server.request(peer) is not None:
            peer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"{" * 10)
            await peer.writer.drain()
            await asyncio.sleep(0.05)
            peer.reset()

    async with pool_for(half_then_reset) as (_, pool):
        with pytest.raises(aiohttp.ClientError) as caught:
            await pool.post(HEADERS, b"{}")

    assert is_transient(caught.value)


async def test_fresh_connection_closed_before_the_answer_is_not_sent_again() -> None:
    async def close_without_answer(server: Server, peer: Peer) -> None:
        await server.request(peer)

    async with pool_for(close_without_answer) as (server, pool):
        with pytest.raises(aiohttp.ServerDisconnectedError) as caught:
            await pool.post(HEADERS, b"{}")

    assert is_transient(caught.value)
    assert server.requests == 1


async def test_reused_connection_closed_twice_raises_after_one_retry() -> None:
    answered = 0

    async def answer_once_overall(server: Server, peer: Peer) -> None:
        nonlocal answered
        while (request := await server.request(peer)) is not None:
            if answered:
                return  # close without an answer
            answered += 1
            await peer.answer(request[1])

    async with pool_for(answer_once_overall) as (server, pool):
        await pool.post(HEADERS, b"{}")
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await pool.post(HEADERS, b"{}")

    assert server.requests == 3  # the answered one, then the failed one and its one retry


async def test_malformed_answer_is_a_payload_error() -> None:
    async def garbage(server: Server, peer: Peer) -> None:
        if await server.request(peer) is not None:
            peer.write(b"HTTP/1.1 2OO OK\r\n\r\nnot http")

    async with pool_for(garbage) as (_, pool):
        with pytest.raises(aiohttp.ClientPayloadError):
            await pool.post(HEADERS, b"{}")


async def test_refused_connection_is_a_transient_os_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        pool = Http1Pool(f"http://127.0.0.1:{port}/", connect_timeout=2)
        with pytest.raises(aiohttp.ClientOSError) as caught:
            await pool.post(HEADERS, b"{}")
        await pool.close()

    assert is_transient(caught.value)
    assert pool.open_connections == 0


async def test_pool_limit_holds_under_concurrency() -> None:
    async def slow_echo(server: Server, peer: Peer) -> None:
        while (request := await server.request(peer)) is not None:
            await asyncio.sleep(0.02)
            await peer.answer(request[1])

    async with pool_for(slow_echo, limit=3) as (server, pool):
        answers = await asyncio.gather(*(pool.post(HEADERS, b"%d" % n) for n in range(30)))
        assert [a.body for a in answers] == [b"%d" % n for n in range(30)]
        assert pool.open_connections == 3

    assert server.most_open == 3
    assert server.connections == 3
    assert server.requests == 30


async def test_pool_limit_holds_when_connections_keep_closing() -> None:
    async def answer_and_close(server: Server, peer: Peer) -> None:
        request = await server.request(peer)
        if request is not None:
            await asyncio.sleep(0.01)
            await peer.answer(request[1], extra="Connection: close\r\n")

    async with pool_for(answer_and_close, limit=2) as (server, pool):
        answers = await asyncio.gather(*(pool.post(HEADERS, b"%d" % n) for n in range(12)))
        assert [a.body for a in answers] == [b"%d" % n for n in range(12)]

    assert server.most_open <= 2
    assert server.connections == 12


async def test_cancelled_call_frees_its_connection() -> None:
    async def stall_first(server: Server, peer: Peer) -> None:
        while (request := await server.request(peer)) is not None:
            if request[1] == b"stall":
                await asyncio.sleep(30)
            await peer.answer(request[1])

    async with pool_for(stall_first, limit=1) as (server, pool):
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.1):
                await pool.post(HEADERS, b"stall")
        assert (await pool.post(HEADERS, b"next")).body == b"next"
        assert pool.open_connections == 1

    assert server.connections == 2


async def test_callers_cancelled_while_waiting_for_a_connection_leave_the_pool_whole() -> None:
    async def slow_echo(server: Server, peer: Peer) -> None:
        while (request := await server.request(peer)) is not None:
            await asyncio.sleep(0.05)
            await peer.answer(request[1])

    async with pool_for(slow_echo, limit=1) as (server, pool):
        first = asyncio.create_task(pool.post(HEADERS, b"first"))
        waiting = [asyncio.create_task(pool.post(HEADERS, b"%d" % n)) for n in range(5)]
        await asyncio.sleep(0.01)
        for task in waiting[::2]:
            task.cancel()
        assert (await first).body == b"first"
        results = await asyncio.gather(*waiting, return_exceptions=True)
        assert [r.body for r in results[1::2]] == [b"1", b"3"]  # type: ignore[union-attr]
        assert all(isinstance(r, asyncio.CancelledError) for r in results[::2])
        assert (await pool.post(HEADERS, b"last")).body == b"last"
        assert pool.open_connections == 1

    assert server.connections == 1


async def test_large_body_written_under_flow_control() -> None:
    size = 16 * 2**20

    async def slow_reader(server: Server, peer: Peer) -> None:
        head = await peer.reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        received = 0
        while received < length:
            received += len(await peer.reader.read(2**20))
            await asyncio.sleep(0.001)
        server.requests += 1
        await peer.answer(b'{"received":%d}' % received)

    async with pool_for(slow_reader, read_timeout=10) as (_, pool):
        answer = await pool.post(HEADERS, b"x" * size)

    assert answer.body == b'{"received":%d}' % size


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, as PEM files."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def test_https_verifies_the_server_and_keeps_connections_alive(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    state = Server(echo)
    server = await asyncio.start_server(state.serve, "127.0.0.1", 0, ssl=server_context)
    port = server.sockets[0].getsockname()[1]
    trusting = Http1Pool(
        f"https://127.0.0.1:{port}/", ssl_context=ssl.create_default_context(cafile=cert)
    )
    default = Http1Pool(f"https://127.0.0.1:{port}/")  # the system's CAs: not this one
    try:
        for n in range(5):
            assert (await trusting.post(HEADERS, b"%d" % n)).body == b"%d" % n
        with pytest.raises(aiohttp.ClientOSError, match="CERTIFICATE_VERIFY_FAILED") as caught:
            await default.post(HEADERS, b"{}")
    finally:
        await trusting.close()
        await default.close()
        await state.stop(server)

    assert state.requests == 5
    assert state.connections == 1  # kept alive (the refused handshake never reached it)
    assert is_transient(caught.value)


async def test_keep_alive_with_aiohttp_web_server() -> None:
    peers: set[Any] = set()

    async def handle(request: web.Request) -> web.Response:
        peers.add(request.transport)
        return web.Response(body=await request.read(), content_type="application/json")

    app = web.Application()
    app.router.add_post("/", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    pool = Http1Pool(f"http://127.0.0.1:{port}/", limit=2)
    try:
        for n in range(20):
            assert (await pool.post(HEADERS, b"%d" % n)).body == b"%d" % n
        answers = await asyncio.gather(*(pool.post(HEADERS, b"%d" % n) for n in range(20)))
        assert [a.body for a in answers] == [b"%d" % n for n in range(20)]
    finally:
        await pool.close()
        await runner.cleanup()

    assert len(peers) == 2


async def test_closed_pool_refuses_calls() -> None:
    async with pool_for(echo) as (_, pool):
        await pool.post(HEADERS, b"{}")
        await pool.close()
        with pytest.raises(aiohttp.ClientConnectionError):
            await pool.post(HEADERS, b"{}")


# The service runs on uvloop (cli.py), whose transports are not asyncio's: every scenario above
# runs on it too.
ON_UVLOOP = [
    test_keep_alive_one_connection_for_many_calls,
    test_request_carries_host_length_and_headers,
    test_header_with_a_line_break_is_refused,
    test_server_closing_idle_connections_next_call_still_succeeds,
    test_server_closing_right_after_each_answer_is_retried_on_a_fresh_connection,
    test_connection_close_answer_opens_a_new_connection_next_time,
    test_chunked_answer,
    test_answer_read_until_the_server_closes,
    test_interim_answer_is_skipped,
    test_error_status_is_an_answer_not_an_exception,
    test_read_timeout_raises_a_transient_timeout,
    test_read_timeout_restarts_whenever_data_arrives,
    test_a_timed_out_connection_is_not_reused,
    test_connection_dropped_mid_answer_is_a_network_error,
    test_connection_reset_mid_answer_is_a_network_error,
    test_fresh_connection_closed_before_the_answer_is_not_sent_again,
    test_reused_connection_closed_twice_raises_after_one_retry,
    test_malformed_answer_is_a_payload_error,
    test_refused_connection_is_a_transient_os_error,
    test_pool_limit_holds_under_concurrency,
    test_pool_limit_holds_when_connections_keep_closing,
    test_cancelled_call_frees_its_connection,
    test_callers_cancelled_while_waiting_for_a_connection_leave_the_pool_whole,
    test_large_body_written_under_flow_control,
    test_keep_alive_with_aiohttp_web_server,
    test_closed_pool_refuses_calls,
]


@pytest.mark.parametrize("scenario", ON_UVLOOP, ids=lambda f: f.__name__.removeprefix("test_"))
def test_on_uvloop(scenario: Callable[[], Awaitable[None]]) -> None:
    uvloop = pytest.importorskip("uvloop")
    uvloop.run(scenario())


def test_https_on_uvloop(tmp_path: Path) -> None:
    uvloop = pytest.importorskip("uvloop")
    uvloop.run(test_https_verifies_the_server_and_keeps_connections_alive(tmp_path))
