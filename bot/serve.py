"""Running a replica: the API and metrics servers on uvloop, with a graceful SIGTERM drain."""

from __future__ import annotations

import asyncio
import signal

import uvloop
from aiohttp import web

from bot.api.keys import STATE
from bot.app import create_app, create_metrics_app
from bot.logging import get_logger
from bot.settings import Settings

log = get_logger(__name__)


async def _serve(settings: Settings, host: str, port: int, metrics_port: int) -> None:
    app = create_app(settings)
    # shutdown_timeout: how long in-flight requests may take to finish after SIGTERM.
    # Header limits above NGINX's (large_client_header_buffers 4 8k): whatever NGINX lets
    # through, the replica parses, so no request gets aiohttp's plain-text 400 instead of JSON.
    runner = web.AppRunner(
        app,
        access_log=None,
        shutdown_timeout=settings.drain_timeout,
        max_headers=8192,
        max_line_size=16384,
        max_field_size=16384,
    )
    metrics_runner = web.AppRunner(create_metrics_app(), access_log=None)
    await runner.setup()
    await metrics_runner.setup()
    await web.TCPSite(runner, host, port, backlog=1024, reuse_address=True).start()
    await web.TCPSite(metrics_runner, host, metrics_port, reuse_address=True).start()
    log.info("replica_started", port=port, metrics_port=metrics_port)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()

    # Drain: not ready any more, stop accepting, let in-flight requests finish, close clients.
    log.info("replica_draining", inflight=app[STATE]["inflight"])
    app[STATE]["draining"] = True
    await runner.cleanup()
    await metrics_runner.cleanup()
    log.info("replica_stopped")


def serve(settings: Settings, port: int, metrics_port: int, host: str = "127.0.0.1") -> None:
    """Run one replica until SIGTERM."""
    uvloop.run(_serve(settings, host, port, metrics_port))
