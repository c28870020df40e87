"""The service as a child process: its environment, its JSON log lines, signals and HTTP.

`ServiceProcess` runs `python -m wildrydes_stream ...` with `sys.executable`, reads stderr line
by line in the background and lets a test wait for a log message, for exit, or scrape the HTTP
endpoints on the port the service reports in its "service started" line. `StallingProxy` sits
in front of dynalite and never answers chosen API calls, to make a drain hang on purpose.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import sys
import time
from collections.abc import Collection, Mapping
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from wildrydes_stream.config import ENV_PREFIX, Settings, load_settings

PYTHON = sys.executable


def service_env(
    settings: Settings, aws_env: Mapping[str, str], **overrides: object
) -> dict[str, str]:
    """This environment without WILDRYDES_*/AWS_* variables, then `aws_env`, then every setting
    as its WILDRYDES_<NAME> variable (JSON logs), then `overrides` (setting name -> value)."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith((ENV_PREFIX, "AWS_")) and key != "TABLE_NAME"
    }
    env.update(aws_env)
    changed = dataclasses.replace(settings, log_format="json", **overrides)  # type: ignore[arg-type]
    for field in dataclasses.fields(Settings):
        env[ENV_PREFIX + field.name.upper()] = str(getattr(changed, field.name))
    # The child reads exactly these settings back (guards this helper's encoding).
    assert load_settings(environ=env) == changed
    return env


def bare_env(**variables: str) -> dict[str, str]:
    """This environment without WILDRYDES_*/AWS_* variables, plus `variables`."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith((ENV_PREFIX, "AWS_")) and key != "TABLE_NAME"
    }
    env.update(variables)
    return env


class ServiceProcess:
    """One child process; stdout and stderr are collected as they arrive."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.stderr_lines: list[str] = []
        self.stdout_lines: list[str] = []
        self.http_port = 0
        """The port of /metrics, /healthz and /readyz, once `started` saw it."""
        assert process.stderr is not None
        assert process.stdout is not None
        self._readers = [
            asyncio.create_task(_collect(process.stderr, self.stderr_lines)),
            asyncio.create_task(_collect(process.stdout, self.stdout_lines)),
        ]

    @classmethod
    async def start(
        cls, env: Mapping[str, str], *args: str, own_group: bool = False
    ) -> ServiceProcess:
        """`own_group`: in a process group of its own, as a shell runs a command, so a test
        can send a signal to the whole group as Ctrl-C does."""
        process = await asyncio.create_subprocess_exec(
            PYTHON,
            "-m",
            "wildrydes_stream",
            *args,
            env=dict(env),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=own_group,
        )
        return cls(process)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    @property
    def stderr(self) -> str:
        return "".join(self.stderr_lines)

    @property
    def stdout(self) -> str:
        return "".join(self.stdout_lines)

    def logs(self) -> list[dict[str, Any]]:
        """The JSON log lines seen so far (other lines are skipped)."""
        entries = []
        for line in self.stderr_lines:
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict):
                    entries.append(entry)
        return entries

    def find_log(self, message: str) -> dict[str, Any] | None:
        return next((e for e in self.logs() if e.get("message") == message), None)

    async def wait_log(self, message: str, timeout: float = 30.0) -> dict[str, Any]:
        """The first log line with this message, waiting for it; fails early if the child exits."""
        deadline = time.monotonic() + timeout
        while True:
            entry = self.find_log(message)
            if entry is not None:
                return entry
            if self.returncode is not None and all(r.done() for r in self._readers):
                raise AssertionError(
                    f"service exited with {self.returncode} before logging {message!r}:\n"
                    f"{self.stderr}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {message!r} log line within {timeout}s:\n{self.stderr}")
            await asyncio.sleep(0.02)

    async def started(self, timeout: float = 30.0) -> int:
        """Wait for the "service started" line; returns the HTTP port it reports."""
        entry = await self.wait_log("service started", timeout)
        port = entry["http_port"]
        assert isinstance(port, int), entry
        assert port > 0, entry
        self.http_port = port
        return port

    def send(self, signum: signal.Signals) -> None:
        self.process.send_signal(signum)

    async def wait(self, timeout: float = 30.0) -> int:
        """Exit code, waiting at most `timeout` seconds; all output is collected afterwards."""
        try:
            code = await asyncio.wait_for(self.process.wait(), timeout)
        except TimeoutError:
            raise TimeoutError(f"service still running after {timeout}s:\n{self.stderr}") from None
        await asyncio.gather(*self._readers)
        return code

    async def close(self) -> None:
        """Kill the child if it still runs and reap it."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
        await self.process.wait()
        await asyncio.gather(*self._readers, return_exceptions=True)

    async def get(self, path: str, timeout: float = 5.0) -> tuple[int, str]:
        """GET a path of the service's HTTP server: (status, body)."""
        url = f"http://127.0.0.1:{self.http_port}{path}"
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
            session.get(url) as response,
        ):
            return response.status, await response.text()


async def _collect(stream: asyncio.StreamReader, lines: list[str]) -> None:
    while line := await stream.readline():
        lines.append(line.decode(errors="replace"))


async def run_to_exit(
    env: Mapping[str, str], *args: str, timeout: float = 30.0
) -> tuple[int, str, str]:
    """Run `python -m wildrydes_stream ARGS` to its end: (exit code, stdout, stderr)."""
    child = await ServiceProcess.start(env, *args)
    try:
        code = await child.wait(timeout)
    finally:
        await child.close()
    return code, child.stdout, child.stderr


class StallingProxy:
    """An HTTP/1.1 proxy to `upstream` that never answers requests whose X-Amz-Target names
    one of `stall` (e.g. "BatchWriteItem"); everything else is forwarded, one request per
    upstream connection."""

    def __init__(self, upstream: str, stall: Collection[str]) -> None:
        parts = urlsplit(upstream)
        assert parts.hostname is not None, upstream
        assert parts.port is not None, upstream
        self._upstream = (parts.hostname, parts.port)
        self._stall = frozenset(stall)
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._closing = asyncio.Event()
        self.stalled = asyncio.Event()
        """Set once a request is being held unanswered."""
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> StallingProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        # Held requests return and idle connections see EOF, so every handler ends by itself.
        self._closing.set()
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                headers = {}
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    if name:
                        headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                target = headers.get("x-amz-target", "").rpartition(".")[2]
                if target in self._stall:
                    self.stalled.set()
                    await self._closing.wait()  # never answered
                    return
                kept = [line for line in lines[1:] if line and not _is_connection(line)]
                request = "\r\n".join([lines[0], *kept, "Connection: close", "", ""])
                writer.write(await self._forward(request.encode("latin-1") + body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._handlers.discard(task)
            self._writers.discard(writer)
            writer.close()

    async def _forward(self, request: bytes) -> bytes:
        reader, writer = await asyncio.open_connection(*self._upstream)
        try:
            writer.write(request)
            await writer.drain()
            return await reader.read()  # Connection: close, so the response ends at EOF
        finally:
            writer.close()


def _is_connection(header: str) -> bool:
    return header.partition(":")[0].strip().lower() in ("connection", "keep-alive")
