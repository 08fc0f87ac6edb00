"""Running the retry worker (`bot worker`): the worker, the outbox relay and /metrics.

SIGTERM stops consuming, lets in-flight jobs finish within `BOT_DRAIN_TIMEOUT` (the rest go
back to the queue unacked), then closes the clients.
"""

from __future__ import annotations

import asyncio

import uvloop

from bot import metrics, runtime
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
    async with (
        runtime.redis_client(settings.redis_url) as redis,
        runtime.http_client(limit=100) as session,
        runtime.metrics_server(host, metrics_port),
    ):
        broker = Broker.from_settings(settings, "bot-worker", prefetch=settings.retry_prefetch)
        outbox = Outbox(redis, settings.queue_prefix)
        answerer = build_answerer(settings, redis, session)
        worker = Worker.from_settings(settings, broker, Inbox(redis), answerer)
        await broker.start()
        background = [
            asyncio.create_task(Relay(outbox, broker).run()),
            asyncio.create_task(watch_queues(broker, outbox)),
        ]
        log.info("worker_started", metrics_port=metrics_port, prefix=settings.queue_prefix)
        try:
            await worker.run(runtime.stop_event())
        finally:
            await runtime.cancel_and_wait(*background)
            await broker.close()
    log.info("worker_stopped")


def serve_worker(settings: Settings, metrics_port: int, host: str = "127.0.0.1") -> None:
    """Run the retry worker until SIGTERM."""
    uvloop.run(_run(settings, host, metrics_port))
