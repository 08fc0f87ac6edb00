"""Putting a message on the delivery path: `<prefix>.chan.out.<channel>.<shard>`.

A question the upstream could not answer at once is answered later by the retry worker,
which knows only the user and the message id: `remember` keeps, per message id, where its
answer goes (for as long as the core keeps the message's record), and `forward` sends it there.
"""

from __future__ import annotations

from redis.asyncio import Redis

from bot.channels import topology
from bot.channels.wire import Inbound, Outbound, decode_outbound, encode, shard
from bot.retries.broker import Broker

CHANNEL_USERS = ("tg:", "slack:", "discord:")


def route_key(message_id: str) -> str:
    return f"chan:route:{message_id}"


class Outgoing:
    """Publishes outbound messages, confirmed by the broker (raises `BrokerUnavailable`)."""

    def __init__(self, broker: Broker, redis: Redis, prefix: str, route_ttl: int) -> None:
        self.broker = broker
        self.redis = redis
        self.prefix = prefix
        self.route_ttl = route_ttl

    async def put(self, out: Outbound) -> None:
        await self.broker.publish(
            encode(out),
            topology.outbound(self.prefix, out.channel, shard(out.lane)),
            message_id=out.id,
            user_id=out.user_id,
        )

    async def remember(self, update: Inbound) -> None:
        """Where the answer to `update` goes, should it come later (raises `RedisError`)."""
        await self.redis.set(
            route_key(update.message_id),
            encode(update.answer(update.message_id, "")),
            ex=self.route_ttl,
        )

    async def forward(self, user_id: str, message_id: str, text: str) -> None:
        """A deferred reply to the conversation its question came from; the API's users
        (no route) read their inbox instead."""
        if not user_id.startswith(CHANNEL_USERS):
            return
        raw = await self.redis.get(route_key(message_id))
        if raw is None:
            return
        blank = decode_outbound(raw if isinstance(raw, bytes) else raw.encode())
        await self.put(
            Outbound(blank.channel, blank.conversation, message_id, text, user_id, blank.extra)
        )
