"""Taking an update in: claim its dedupe key, queue it durably, then let the platform go.

The claim is a lease (`LEASE_MS`) that becomes final (`DEDUPE_TTL`) only once the broker has
confirmed the update. A process that dies between the two leaves a lease that runs out, so
the platform's redelivery is processed and not dropped as a duplicate. A redelivery that
arrives while another replica holds the lease gets `503` (the platform retries); one that
arrives after the final mark is a duplicate (`200`, nothing done). Redis or RabbitMQ away
→ `503`: nothing was taken, the platform sends it again.
"""

from __future__ import annotations

import contextlib
import uuid
from typing import Literal

from redis.asyncio import Redis
from redis.exceptions import RedisError

from bot import metrics
from bot.channels import topology
from bot.channels.wire import Inbound, encode, shard
from bot.errors import Unavailable
from bot.logging import get_logger
from bot.retries.broker import Broker, BrokerUnavailable

log = get_logger(__name__)

LEASE_MS = 15_000  # longer than a publish may take (its confirm times out at 2 s)
DEDUPE_TTL = 86_400  # a day: Telegram and Slack redeliver for far less
_DONE = "done"
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

Taken = Literal["queued", "duplicate"]


def dedupe_key(channel: str, key: str) -> str:
    return f"chan:seen:{channel}:{key}"


class Intake:
    """Claim, queue, mark: one update into `<prefix>.chan.in.<shard>` at most once."""

    def __init__(self, redis: Redis, broker: Broker, prefix: str) -> None:
        self.redis = redis
        self.broker = broker
        self.prefix = prefix

    async def take(self, update: Inbound, dedupe: str) -> Taken:
        """Queue `update` unless its key was taken before; raises `Unavailable` (503) when it
        cannot say (a dependency is away, another replica is queueing it right now)."""
        key = dedupe_key(update.channel, dedupe)
        token = uuid.uuid4().hex
        try:
            if not await self.redis.set(key, token, nx=True, px=LEASE_MS):
                if await self.redis.get(key) == _DONE:
                    metrics.CHANNEL_UPDATES.labels(update.channel, "duplicate").inc()
                    return "duplicate"
                metrics.CHANNEL_UPDATES.labels(update.channel, "busy").inc()
                raise Unavailable("this update is being queued by another replica", 1)
        except RedisError as exc:
            metrics.CHANNEL_UPDATES.labels(update.channel, "unavailable").inc()
            log.warning("channel_intake_failed", channel=update.channel, error=type(exc).__name__)
            raise Unavailable("storage is unavailable right now; try again", 1) from None
        try:
            await self.broker.publish(
                encode(update),
                topology.inbound(self.prefix, shard(update.lane)),
                message_id=update.message_id,
                user_id=update.user_id,
            )
        except BrokerUnavailable as exc:
            metrics.CHANNEL_UPDATES.labels(update.channel, "unavailable").inc()
            log.warning("channel_intake_failed", channel=update.channel, error=str(exc))
            await self._release(key, token)
            raise Unavailable("the queue is unavailable right now; try again", 1) from None
        try:
            await self.redis.set(key, _DONE, ex=DEDUPE_TTL)
        except RedisError as exc:
            # Queued all the same: the lease runs out, and a redelivery after that is
            # answered from the core's idempotency record, sent at most once (delivery).
            log.warning("channel_dedupe_mark_failed", error=type(exc).__name__)
        metrics.CHANNEL_UPDATES.labels(update.channel, "queued").inc()
        return "queued"

    async def _release(self, key: str, token: str) -> None:
        with contextlib.suppress(RedisError):  # else the lease runs out by itself
            await self.redis.eval(_RELEASE, 1, key, token)
