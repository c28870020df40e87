"""A webhook receiver for `local`: the low-magic alerts, printed as they arrive."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any, Self, TextIO

from aiohttp import web


class AlertReceiver:
    """Serves POST / on a free loopback port; each alert (one JSON object) is kept and
    printed on a line of its own."""

    def __init__(self, out: TextIO = sys.stdout) -> None:
        self.received: list[dict[str, Any]] = []
        self.before_print: Callable[[], None] | None = None
        """Called before an alert is printed (the live summary gives way)."""
        self.url = ""
        self._out = out
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> Self:
        app = web.Application()
        app.router.add_post("/", self._alert)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/"
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _alert(self, request: web.Request) -> web.Response:
        try:
            alert = json.loads(await request.read())
        except ValueError:
            return web.Response(status=400, text="not JSON\n")
        self.received.append(alert)
        # On a terminal the summary is being redrawn: it gives way first.
        prefix = "\r\x1b[2K" if self._out.isatty() else ""
        if self.before_print is not None:
            self.before_print()
        self._out.write(
            f"{prefix}ALERT {alert.get('state', '?'):8} {alert.get('name')} at "
            f"{alert.get('status_time')}: min magic points {alert.get('min_magic_points')} "
            f"(threshold {alert.get('threshold')})\n"
        )
        self._out.flush()
        return web.Response(text="ok\n")
