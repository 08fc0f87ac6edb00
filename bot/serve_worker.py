"""Running the retry worker (`bot worker`): the worker, the outbox relay and /metrics.

SIGTERM stops consuming, lets in-flight jobs finish within `BOT_DRAIN_TIMEOUT` (the rest go
back to the queue unacked), then closes the clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal

import aiohttp
import orjson
import uvloop
from aiohttp import web

from bot import metrics
from bot.app import create_metrics_app, make_redis
from bot.inbox import Inbox
from bot.logging import get_logger
from bot.retries.broker import Broker
from bot.retries.outbox import Outbox, Relay
from bot.retries.worker import Worker, watch_queues
from bot.settings import Settings
from bot.upstream import build_answerer

log = get_logger(__name__)


async def _run(settings: Settings, host: str, metrics_port: int) -> None:
    metrics.init()
    redis = make_redis(settings)
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=100, keepalive_timeout=30),
        json_serialize=lambda o: orjson.dumps(o).decode(),
    )
    broker = Broker(settings, "bot-worker", prefetch=settings.retry_prefetch)
    outbox = Outbox(redis, settings.queue_prefix)
    worker = Worker(settings, broker, Inbox(redis), build_answerer(settings, redis, session))
    metrics_runner = web.AppRunner(create_metrics_app(), access_log=None)
    await metrics_runner.setup()
    await web.TCPSite(metrics_runner, host, metrics_port, reuse_address=True).start()
    await broker.start()
    background = [
        asyncio.create_task(Relay(outbox, broker).run()),
        asyncio.create_task(watch_queues(broker, outbox)),
    ]
    log.info("worker_started", metrics_port=metrics_port, prefix=settings.queue_prefix)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await worker.run(stop)
    finally:
        for task in background:
            task.cancel()
        for task in background:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await broker.close()
        await session.close()
        await redis.aclose()
        await metrics_runner.cleanup()
        log.info("worker_stopped")


def serve_worker(settings: Settings, metrics_port: int, host: str = "127.0.0.1") -> None:
    """Run the retry worker until SIGTERM."""
    uvloop.run(_run(settings, host, metrics_port))
