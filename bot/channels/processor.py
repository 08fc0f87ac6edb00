"""Answering queued updates through the core, one conversation at a time.

Each update is answered by `BotService` exactly as a `POST /v1/messages` would be (rate limit,
cache, idempotency on its message id, context, prefs, the retry queue when the upstream
fails), then its answer is queued for delivery; only then is the update acked. A dependency
error holds the conversation and tries the same update again (order kept, nothing dropped);
a process that dies leaves its unacked updates to the shard's next consumer, whose replay of
the core's record is sent at most once (delivery keeps a record per message sent).
"""

from __future__ import annotations

import asyncio
import math

from aio_pika.abc import AbstractIncomingMessage
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from redis.asyncio import Redis
from redis.exceptions import RedisError

from bot import metrics
from bot.channels import topology
from bot.channels.consumer import ShardConsumer, ack
from bot.channels.outbound import Outgoing
from bot.channels.wire import SHARDS, Inbound, Outbound, decode_inbound
from bot.core.service import BotService
from bot.core.validation import parse_message
from bot.errors import BotError, RateLimited, Unavailable
from bot.logging import get_logger
from bot.retries.broker import Broker, BrokerUnavailable

log = get_logger(__name__)

_HOLD = 1.0  # seconds a conversation waits before trying an update again after an error
POLITE = (
    "You are sending messages faster than I can answer. "
    "Please wait {seconds} s; the messages sent meanwhile are not answered."
)


class Processor:
    """Consumes `<prefix>.chan.in.*`."""

    def __init__(
        self,
        broker: Broker,
        redis: Redis,
        service: BotService,
        outgoing: Outgoing,
        prefix: str,
        *,
        drain_timeout: float,
    ) -> None:
        self.redis = redis
        self.service = service
        self.outgoing = outgoing
        queues = [topology.inbound(prefix, n) for n in range(SHARDS)]
        self.consumer = ShardConsumer(broker, queues, drain_timeout)

    async def run(self, stop: asyncio.Event) -> None:
        await self.consumer.run(stop, self._route)

    def _route(self, message: AbstractIncomingMessage) -> asyncio.Task[None]:
        try:
            update = decode_inbound(message.body)
        except ValueError as exc:
            log.warning("channel_update_unreadable", error=str(exc))
            return asyncio.create_task(ack(message))
        return self.consumer.lanes.submit(update.lane, lambda: self._process(update, message))

    async def _process(self, update: Inbound, message: AbstractIncomingMessage) -> None:
        while True:
            try:
                out = await self.answer(update)
                if out is not None:
                    await self.outgoing.put(out)
                break
            except (RedisError, Unavailable, BrokerUnavailable, *CONNECTION_EXCEPTIONS) as exc:
                log.warning(
                    "channel_update_held", message_id=update.message_id, error=type(exc).__name__
                )
                await asyncio.sleep(_HOLD)
            except Exception:
                # A bug, not a dependency: holding the update would stop its conversation
                # for good. Logged with its id, and let go.
                log.exception("channel_update_failed", message_id=update.message_id)
                break
        metrics.CHANNEL_UPDATES.labels(update.channel, "processed").inc()
        await ack(message)

    async def answer(self, update: Inbound) -> Outbound | None:
        """What to send for `update`: its answer, an error's message, one polite note per
        rate-limit window, or nothing (queued: the retry worker sends the answer later)."""
        # Where a deferred answer goes: written before the core may queue the question, so
        # the retry worker finds it however soon it answers.
        await self.outgoing.remember(update)
        try:
            msg = parse_message(
                {"user_id": update.user_id, "text": update.text, "message_id": update.message_id},
                update.message_id,
            )
            outcome = await self.service.handle(msg)
        except RateLimited as exc:
            return await self._polite(update, exc.retry_after)
        except Unavailable:
            raise  # a dependency: the conversation holds and tries again
        except BotError as exc:  # a bad command, a 101st pref: the user reads why
            return update.answer(update.message_id, exc.message)
        if outcome.kind != "replied":
            return None
        return update.answer(update.message_id, str(outcome.body["reply"]))

    async def _polite(self, update: Inbound, retry_after: float) -> Outbound | None:
        """The note for the first message limited in a window; None for the others."""
        ms = max(1000, math.ceil(retry_after * 1000))
        if not await self.redis.set(f"chan:polite:{update.user_id}", "1", nx=True, px=ms):
            return None
        text = POLITE.format(seconds=math.ceil(ms / 1000))
        return update.answer(f"{update.message_id}:limited", text)
