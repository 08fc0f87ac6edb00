"""Putting a message on the delivery path: `<prefix>.chan.out.<channel>.<shard>`."""

from __future__ import annotations

from bot.channels import topology
from bot.channels.wire import Outbound, encode, shard
from bot.retries.broker import Broker

_PREFIXES = {"tg:": "telegram"}


class Outgoing:
    """Publishes outbound messages, confirmed by the broker (raises `BrokerUnavailable`)."""

    def __init__(self, broker: Broker, prefix: str) -> None:
        self.broker = broker
        self.prefix = prefix

    async def put(self, out: Outbound) -> None:
        await self.broker.publish(
            encode(out),
            topology.outbound(self.prefix, out.channel, shard(out.lane)),
            message_id=out.id,
            user_id=out.user_id,
        )

    async def forward(self, user_id: str, message_id: str, text: str) -> None:
        """A deferred reply (the retry worker's) to its channel user; other users are the
        API's, who read their inbox."""
        for prefix, channel in _PREFIXES.items():
            if user_id.startswith(prefix):
                conversation = user_id.removeprefix(prefix)
                await self.put(Outbound(channel, conversation, message_id, text, user_id))
