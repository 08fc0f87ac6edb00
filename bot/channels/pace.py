"""A channel's overall pace, shared by every delivering process (`pace.lua` in Redis).

Telegram allows a bot about 30 messages a second in all, whichever process sends them: with
two workers (or replicas of the worker) delivering, a per-process pace would double it. Each
send reserves the next slot of its channel's schedule in Redis (one round trip) and sleeps
until it. The same round trip checks and moves the conversation's next-allowed time, kept
there so a conversation's pace (Telegram's 1/s per chat, Slack's per channel) survives the
process that sent its last message: a restarted worker, or the one that takes its shard over,
waits the rest of the interval. While Redis does not answer, each process keeps its own
schedule at the same rate (fail open, as the per-user limiter does; the delivery's own
per-conversation pace still holds), and goes back to Redis by itself.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from importlib.resources import files

from redis.asyncio import Redis
from redis.exceptions import RedisError

from bot.logging import get_logger

log = get_logger(__name__)


def pace_key(channel: str, identity: str) -> str:
    """The schedule of one channel's bot (the token's digest: one schedule per bot, however
    many stacks deliver for it; never the token itself)."""
    digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return f"chan:pace:{channel}:{digest}"


class SharedPace:
    """`wait(channel, interval, ...)`: returns when this process may send the channel's next
    message (to `conversation`, at most one per `conversation_interval`)."""

    def __init__(self, redis: Redis, identities: dict[str, str]) -> None:
        self._script = redis.register_script(files("bot").joinpath("pace.lua").read_text())
        self._keys = {channel: pace_key(channel, ident) for channel, ident in identities.items()}
        self._next: dict[str, float] = {}  # channel -> this process's own next slot (fallback)

    async def wait(
        self,
        channel: str,
        interval: float,
        conversation: str = "",
        conversation_interval: float = 0.0,
    ) -> None:
        if interval <= 0 and conversation_interval <= 0:
            return
        key = self._keys.get(channel, pace_key(channel, ""))
        keys, args = [key], [round(interval * 1_000_000)]
        if conversation_interval > 0:
            keys.append(f"{key}:{conversation}")
            args.append(round(conversation_interval * 1_000_000))
        while True:
            try:
                wait_us = int(await self._script(keys=keys, args=args))
            except RedisError as exc:
                log.warning("outbound_pace_local", channel=channel, error=type(exc).__name__)
                await self._local(channel, interval)
                return
            if wait_us >= 0:
                break
            # Its last message went out from another process (or before a restart): wait the
            # rest of its interval, then reserve the channel's slot (no polling: once).
            await asyncio.sleep(-wait_us / 1e6)
        if wait_us > 0:
            await asyncio.sleep(wait_us / 1e6)

    async def _local(self, channel: str, interval: float) -> None:
        now = time.monotonic()
        slot = max(now, self._next.get(channel, 0.0))
        self._next[channel] = slot + interval
        if slot > now:
            await asyncio.sleep(slot - now)
