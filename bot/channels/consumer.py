"""Consuming a set of shard queues into per-conversation lanes, and stopping cleanly."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from aio_pika.abc import AbstractIncomingMessage
from aio_pika.exceptions import CONNECTION_EXCEPTIONS

from bot.channels.lanes import Lanes
from bot.logging import get_logger
from bot.retries.broker import Broker

log = get_logger(__name__)

# Takes one delivery, synchronously (before any await): the task that handles and acks it,
# submitted to its conversation's lane.
Route = Callable[[AbstractIncomingMessage], "asyncio.Task[None]"]


class ShardConsumer:
    """Consumes `queues` of `broker`; each message runs in its conversation's lane and is
    acked by its work (unacked work goes back to the queue when the process stops)."""

    def __init__(self, broker: Broker, queues: list[str], drain_timeout: float) -> None:
        self.broker = broker
        self.names = queues
        self.drain_timeout = drain_timeout
        self.lanes = Lanes()
        self._inflight: set[asyncio.Task[None]] = set()

    async def run(self, stop: asyncio.Event, route: Route) -> None:
        """Consume until `stop`, then let the lanes finish within the drain timeout."""
        while not stop.is_set() and not await self.broker.wait_declared(1.0):
            pass
        tags: list[tuple[str, str]] = []
        for name in self.names:
            queue = self.broker.queues.get(name)
            if queue is None or stop.is_set():
                continue
            while not stop.is_set():
                try:
                    tags.append((name, await queue.consume(self._on_message(route))))
                    break
                except CONNECTION_EXCEPTIONS as exc:
                    log.warning("channel_consume_failed", queue=name, error=repr(exc))
                    await asyncio.sleep(1)
        await stop.wait()
        for name, tag in tags:
            with contextlib.suppress(*CONNECTION_EXCEPTIONS):
                await self.broker.queues[name].cancel(tag)
        if self._inflight:
            _, pending = await asyncio.wait(set(self._inflight), timeout=self.drain_timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)

    def _on_message(self, route: Route) -> Callable[[AbstractIncomingMessage], Awaitable[None]]:
        async def on_message(message: AbstractIncomingMessage) -> None:
            # `route` is synchronous up to the lane's submit: lanes take messages in the
            # order the queue delivered them.
            task = route(message)
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)
            await asyncio.wait([task])

        return on_message


async def ack(message: AbstractIncomingMessage) -> None:
    """Ack; a connection lost meanwhile means the broker redelivers it (handled as a repeat)."""
    with contextlib.suppress(*CONNECTION_EXCEPTIONS):
        await message.ack()
