"""The /metrics, /healthz and /readyz endpoints, served by aiohttp inside the service's loop."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from wildrydes_stream.errors import WildrydesError


class HealthServer:
    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        live: Callable[[], bool],
        ready: Callable[[], bool],
        host: str,
        port: int,
    ) -> None:
        self._registry = registry
        self._live = live
        self._ready = ready
        self._host = host
        self._port = port
        self._runner: web.AppRunner | None = None
        self.port: int | None = None
        """The bound port, once started (useful when configured as 0)."""

    async def start(self) -> None:
        if self._runner is not None:
            return
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self._host, self._port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise WildrydesError(
                f"cannot serve /metrics on {self._host}:{self._port}: {exc.strerror}; set "
                "http_port (WILDRYDES_HTTP_PORT) to a free port, or 0 for any"
            ) from None
        self._runner = runner
        server: Any = site._server
        sockets = server.sockets if server is not None else ()
        self.port = sockets[0].getsockname()[1] if sockets else self._port

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self._registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.Response:
        ok = self._live()
        return web.Response(status=200 if ok else 503, text="ok\n" if ok else "unhealthy\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        ok = self._ready()
        return web.Response(status=200 if ok else 503, text="ready\n" if ok else "not ready\n")
