"""The channel queues, declared idempotently (quorum, durable, as the retry queues):

    <prefix>.chan.in.<n>    updates to answer, sharded by conversation
    <prefix>.chan.out.<channel>.<n>
                            messages to send, per channel (its depth is that channel's
                            backlog), sharded by conversation
    <prefix>.chan.dead      sends that failed for good, each with its reason (header `reason`)

Each shard has a single active consumer: whichever process holds it handles all of its
conversations, in order; another takes over when it dies (its unacked messages come back
first). Within the process, conversations run side by side (`Lanes`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aio_pika.abc import AbstractChannel, AbstractQueue

from bot.channels.wire import SHARDS


def inbound(prefix: str, n: int) -> str:
    return f"{prefix}.chan.in.{n}"


def outbound(prefix: str, channel: str, n: int) -> str:
    return f"{prefix}.chan.out.{channel}.{n}"


def dead(prefix: str) -> str:
    return f"{prefix}.chan.dead"


def names(prefix: str, channels: tuple[str, ...]) -> list[str]:
    """Every channel queue of a prefix and its enabled channels, the dead-letter queue last."""
    shards = range(SHARDS)
    outs = [outbound(prefix, c, n) for c in channels for n in shards]
    return [*(inbound(prefix, n) for n in shards), *outs, dead(prefix)]


def declarer(
    prefix: str, channels: tuple[str, ...]
) -> Callable[[AbstractChannel], Awaitable[dict[str, AbstractQueue]]] | None:
    """What a broker declares beside the retry queues: nothing when no channel is enabled."""
    if not channels:
        return None

    async def declare(channel: AbstractChannel) -> dict[str, AbstractQueue]:
        quorum: dict[str, Any] = {"x-queue-type": "quorum"}
        shard_args = {**quorum, "x-single-active-consumer": True}
        *shards, last = names(prefix, channels)
        queues = {last: await channel.declare_queue(last, durable=True, arguments=quorum)}
        for name in shards:
            queues[name] = await channel.declare_queue(name, durable=True, arguments=shard_args)
        return queues

    return declare
