"""The HTTP listener: /metrics, the JSON API (api.py) and the web console (static/), served by
aiohttp on the event loop of the gRPC server it sits beside, sharing its orchestrator, change
feed and executor.

Off unless asked for (`--http-listen`). The console's files need no token (they hold no data;
the page asks for the operator token and sends it as a Bearer header on every API call);
/metrics needs none either, as Prometheus scrapes it, and shows only counts. Responses carry a
content security policy that allows scripts, styles and connections to this origin only: the
console loads nothing from anywhere else.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from orchestrator.feed import ChangeFeed
from orchestrator.http.api import Api
from orchestrator.http.errors import Handler, map_errors
from orchestrator.http.scrape import exposition, metrics_registry
from orchestrator.limits import Gatekeeper
from orchestrator.metrics import Sample
from orchestrator.service import Orchestrator

STATIC = Path(__file__).parent / "static"
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


@dataclass
class HttpServer:
    """A started HTTP listener."""

    runner: web.AppRunner
    port: int

    async def stop(self) -> None:
        """Close the listener and every open connection (event streams included)."""
        await self.runner.cleanup()


@web.middleware
async def _headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    response = await handler(request)
    response.headers.setdefault("Content-Security-Policy", _CSP)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    return response


def build_app(
    orch: Orchestrator,
    feed: ChangeFeed,
    run: Callable[..., Awaitable[Any]],
    gate: Gatekeeper,
    remote_metrics: Callable[[], Iterable[Sample]] | None = None,
) -> web.Application:
    """The aiohttp application: API routes, /metrics and the console."""
    app = web.Application(middlewares=[_headers, map_errors], client_max_size=64 * 1024)
    registry = metrics_registry(orch, remote_metrics)

    async def metrics(request: web.Request) -> web.Response:
        body = await run(exposition, registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def index(request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.add_routes(Api(orch, feed, run, gate).routes())
    app.add_routes([web.get("/metrics", metrics), web.get("/", index), web.static("/static", STATIC)])
    return app


async def start_http(
    orch: Orchestrator,
    feed: ChangeFeed,
    run: Callable[..., Awaitable[Any]],
    listen: str,
    gate: Gatekeeper,
    *,
    remote_metrics: Callable[[], Iterable[Sample]] | None = None,
) -> HttpServer:
    """Serve on HOST:PORT (port 0 picks a free one) on the running event loop."""
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"HTTP listen address {listen!r} must be HOST:PORT")
    host = host.strip("[]")
    sock = socket.create_server(
        (host, int(port)), family=socket.AF_INET6 if ":" in host else socket.AF_INET, reuse_port=False
    )
    runner = web.AppRunner(
        build_app(orch, feed, run, gate, remote_metrics), access_log=None, handle_signals=False, shutdown_timeout=1.0
    )
    await runner.setup()
    try:
        await web.SockSite(runner, sock).start()
    except BaseException:
        await runner.cleanup()
        raise
    return HttpServer(runner, int(sock.getsockname()[1]))
