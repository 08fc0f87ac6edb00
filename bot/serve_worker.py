"""Running the retry worker (`bot worker`): the worker, the outbox relay and /metrics.

SIGTERM stops consuming, lets in-flight jobs finish within `BOT_DRAIN_TIMEOUT` (the rest go
back to the queue unacked), then closes the clients.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import uvloop

from bot import metrics, runtime
from bot.channels.runner import ChannelWorker
from bot.core.service import BotService
from bot.inbox import Inbox
from bot.logging import get_logger
from bot.retries.broker import Broker
from bot.retries.outbox import Outbox, Relay
from bot.retries.publisher import RetryQueue
from bot.retries.worker import Worker, watch_queues
from bot.settings import Settings
from bot.store import Store
from bot.upstream import build_answerer

log = get_logger(__name__)


async def _run(settings: Settings, host: str, metrics_port: int) -> None:
    runtime.arm_startup_deadline()
    metrics.init()
    async with (
        runtime.redis_client(settings.redis_url) as redis,
        runtime.http_client(limit=100) as session,
        runtime.metrics_server(host, metrics_port),
    ):
        broker = Broker.from_settings(settings, "bot-worker", prefetch=settings.retry_prefetch)
        outbox = Outbox(redis, settings.queue_prefix)
        answerer = build_answerer(settings, redis, session)
        inbox = Inbox(redis)
        stop = runtime.stop_event()
        channels = None
        if settings.channels:
            # The chat channels' processor and delivery: the same core as a replica's.
            store = Store.from_settings(settings, redis)
            service = BotService.from_settings(
                settings,
                store,
                answerer,
                deferrer=RetryQueue.from_settings(settings, broker, outbox, redis),
                inbox=inbox,
            )
            channels = ChannelWorker(settings, redis, session, service)
        forward = channels.outgoing.forward if channels is not None else None
        worker = Worker.from_settings(settings, broker, inbox, answerer, forward)
        await broker.start()
        background = [
            asyncio.create_task(Relay(outbox, broker).run()),
            asyncio.create_task(watch_queues(broker, outbox)),
        ]
        draining: list[asyncio.Task[None]] = []
        if channels is not None:
            draining.append(asyncio.create_task(_heartbeat_and(store, channels.run(stop))))
        log.info("worker_started", metrics_port=metrics_port, prefix=settings.queue_prefix)
        runtime.startup_done()
        try:
            await worker.run(stop)
        finally:
            if draining:  # the channels drain on `stop` too, beside the retry worker
                await asyncio.wait(draining, timeout=settings.drain_timeout + 2)
            await runtime.cancel_and_wait(*background, *draining)
            await broker.close()
    log.info("worker_stopped")


async def _heartbeat_and(store: Store, work: Coroutine[Any, Any, None]) -> None:
    """Run `work` with the store's heartbeat beating (it names this process in claims)."""
    async with store.heartbeat.running():
        await work


def serve_worker(settings: Settings, metrics_port: int, host: str = "127.0.0.1") -> None:
    """Run the retry worker until SIGTERM."""
    uvloop.run(_run(settings, host, metrics_port))
