"""Running a replica: the API and metrics servers on uvloop, with a graceful SIGTERM drain."""

from __future__ import annotations

import gc

import uvloop
from aiohttp import web

from bot import runtime
from bot.app import create_app, start_draining
from bot.logging import get_logger
from bot.settings import Settings

log = get_logger(__name__)

# The collector's first generation runs every GEN0 new container objects (Python's default:
# 700, a collection every few requests here); the objects of one request die with it, by
# reference counting, so collecting ten times less often finds the same garbage.
GEN0, GEN1, GEN2 = 7000, 10, 10


def settle_heap() -> None:
    """After start-up: what it built lives as long as the process, so the collector stops
    walking it (`gc.freeze`), and young objects are collected less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GEN0, GEN1, GEN2)


async def _serve(settings: Settings, host: str, port: int, metrics_port: int) -> None:
    runtime.arm_startup_deadline()
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
    await runner.setup()
    async with runtime.metrics_server(host, metrics_port):
        await web.TCPSite(runner, host, port, backlog=1024, reuse_address=True).start()
        settle_heap()
        log.info("replica_started", port=port, metrics_port=metrics_port)
        runtime.startup_done()
        await runtime.stop_event().wait()
        # Drain: not ready any more, stop accepting, let in-flight requests finish, close
        # clients.
        log.info("replica_draining", inflight=start_draining(app))
        await runner.cleanup()
    log.info("replica_stopped")


def serve(settings: Settings, port: int, metrics_port: int, host: str = "127.0.0.1") -> None:
    """Run one replica until SIGTERM."""
    uvloop.run(_serve(settings, host, port, metrics_port))
