"""`RetryQueue`: the replicas' `Deferrer`. A job is held by the broker or the outbox, or 503.

`defer` returns only once the broker confirmed the job (publisher confirms) or the Redis
outbox holds it, so a 202 always means a job that will be answered. A marker per message id
keeps a message that is already queued (NGINX resending the POST to another replica after a
timeout) from being queued twice.
"""

from __future__ import annotations

import contextlib
import time

from redis.asyncio import Redis
from redis.exceptions import RedisError

from bot import metrics
from bot.core.types import Job
from bot.errors import Unavailable
from bot.logging import get_logger
from bot.retries.broker import Broker, BrokerUnavailable
from bot.retries.jobs import RetryPolicy, encode, next_hop
from bot.retries.outbox import Outbox
from bot.settings import Settings
from bot.store import user_key

log = get_logger(__name__)


def queued_key(user_id: str, message_id: str) -> str:
    return user_key(user_id, f"job:{message_id}")


async def publish_job(broker: Broker, job: Job, not_before: float) -> None:
    """Publish `job` to the delay level that fits its wait (or straight to the work queue)."""
    hop = next_hop(not_before - time.time(), list(broker.topology.levels))
    route = broker.topology.work if hop is None else broker.topology.delay(hop)
    await broker.publish(
        encode(job, not_before), route, message_id=job.message_id, user_id=job.user_id
    )


class RetryQueue:
    """Defers failed questions to RabbitMQ, or to the outbox while the broker is away."""

    def __init__(
        self, broker: Broker, outbox: Outbox, redis: Redis, policy: RetryPolicy, *, marker_ttl: int
    ) -> None:
        self.broker = broker
        self.outbox = outbox
        self.redis = redis
        self.policy = policy
        self.marker_ttl = marker_ttl  # how long "already queued" is remembered per message

    @classmethod
    def from_settings(
        cls, settings: Settings, broker: Broker, outbox: Outbox, redis: Redis
    ) -> RetryQueue:
        """`BOT_RETRY_*`; a message is known as queued as long as its record is kept."""
        policy = RetryPolicy.from_settings(settings)
        return cls(broker, outbox, redis, policy, marker_ttl=settings.idempotency_ttl)

    async def defer(self, job: Job, retry_after: float | None) -> None:
        """Hold `job` durably for a later attempt; raise `Unavailable` when nothing can."""
        job.attempt = max(job.attempt, 1)  # the replica's own call was the first attempt
        delay = self.policy.delay(job.attempt, retry_after)
        not_before = time.time() + delay
        if not await self._mark(job):
            log.info("retry_job_already_queued", message_id=job.message_id)
            return
        try:
            await publish_job(self.broker, job, not_before)
        except BrokerUnavailable as exc:
            log.warning("retry_publish_failed", message_id=job.message_id, error=str(exc))
        else:
            metrics.RETRY_JOBS_PUBLISHED.inc()
            log.info("retry_job_published", message_id=job.message_id, delay=round(delay, 3))
            return
        try:
            await self.outbox.add(encode(job, not_before), job.message_id, job.user_id)
        except RedisError as exc:
            await self._unmark(job)
            log.error("retry_job_not_held", message_id=job.message_id, error=type(exc).__name__)
            raise Unavailable("the message cannot be queued for retry right now", 5) from None
        log.info("retry_job_to_outbox", message_id=job.message_id)

    async def _mark(self, job: Job) -> bool:
        """False when this message id is already queued; True (go on) when Redis is away."""
        try:
            return bool(
                await self.redis.set(
                    queued_key(job.user_id, job.message_id),
                    "1",
                    nx=True,
                    ex=self.marker_ttl,
                )
            )
        except RedisError:
            return True

    async def _unmark(self, job: Job) -> None:
        with contextlib.suppress(RedisError):
            await self.redis.delete(queued_key(job.user_id, job.message_id))
