"""The retry worker: takes jobs from the work queue and answers them, or tries again later.

Bounded prefetch; a job is acked only after its reply is stored (or it was moved on: to a
delay queue, or to the dead-letter queue with an apology in the inbox), so a worker killed at
any point loses nothing: the broker redelivers what was not acked, and the inbox keeps one
reply per message id. Backoff is exponential with full jitter and never shorter than the
upstream's Retry-After; delays are served by the per-level delay queues (`publish_job`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from aio_pika.abc import AbstractIncomingMessage
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from redis.exceptions import RedisError

from bot import metrics
from bot.core.service import Job
from bot.errors import UpstreamUnavailable
from bot.inbox import APOLOGY, Inbox
from bot.logging import get_logger
from bot.retries.broker import Broker, BrokerUnavailable
from bot.retries.jobs import backoff, decode, encode, next_hop
from bot.retries.outbox import Outbox
from bot.retries.publisher import publish_job
from bot.settings import Settings
from bot.upstream import Answerer

log = get_logger(__name__)

# A job that hit a Redis or broker error waits this long before it is handed back.
_INFRA_PAUSE = 2.0


class Worker:
    """Consumes `<prefix>.work` until `stop` is set."""

    def __init__(
        self, settings: Settings, broker: Broker, inbox: Inbox, answerer: Answerer
    ) -> None:
        self.settings = settings
        self.broker = broker
        self.inbox = inbox
        self.answerer = answerer
        self.levels = list(broker.topology.levels)
        self._inflight: set[asyncio.Task[object]] = set()

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until `stop`; then let in-flight jobs finish (or hand them back) and return."""
        while not stop.is_set() and not await self.broker.wait_declared(1.0):
            pass
        if stop.is_set():
            return
        queue = self.broker.queues[self.broker.topology.work]
        tag = await queue.consume(self._on_message)
        log.info("worker_consuming", queue=queue.name, prefetch=self.broker.prefetch)
        await stop.wait()
        with contextlib.suppress(*CONNECTION_EXCEPTIONS):
            await queue.cancel(tag)
        await self.drain(self.settings.drain_timeout)

    async def drain(self, seconds: float) -> None:
        """Wait for in-flight jobs; cancel what is left (its messages go back when the
        channel closes, unacked)."""
        if self._inflight:
            log.info("worker_draining", inflight=len(self._inflight))
            _, pending = await asyncio.wait(set(self._inflight), timeout=seconds)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
                log.warning("worker_requeued", jobs=len(pending))

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._inflight.add(task)
        try:
            await self.handle(message)
        except (RedisError, BrokerUnavailable, *CONNECTION_EXCEPTIONS) as exc:
            log.warning("retry_job_deferred_by_error", error=repr(exc))
            await asyncio.sleep(_INFRA_PAUSE)
            with contextlib.suppress(*CONNECTION_EXCEPTIONS):
                await message.nack(requeue=True)
        finally:
            self._inflight.discard(task)

    async def handle(self, message: AbstractIncomingMessage) -> None:
        """One delivery: skip, re-delay, answer, retry later or give up."""
        try:
            job, not_before = decode(message.body)
        except ValueError as exc:
            log.error("retry_job_unreadable", error=str(exc))
            await message.reject(requeue=False)  # dead-letters it to the parking lot
            return
        if await self.inbox.answered(job.user_id, job.message_id):
            # Redelivered after its reply was stored (a worker died before acking) or queued
            # twice: answered once is enough.
            log.info("retry_job_already_answered", message_id=job.message_id)
            await message.ack()
            return
        if next_hop(not_before - time.time(), self.levels) is not None:
            await publish_job(self.broker, job, not_before)  # the rest of its wait
            await message.ack()
            return
        try:
            answer = await self.answerer.answer(job.question, job.context)
        except UpstreamUnavailable as exc:
            await self._failed(job, exc)
            await message.ack()
            return
        if await self.inbox.deliver(job.user_id, job.message_id, answer.text):
            metrics.REPLIES_DELIVERED.inc()
        metrics.RETRY_ATTEMPTS.labels(outcome="success").inc()
        log.info(
            "retry_job_answered",
            message_id=job.message_id,
            attempt=job.attempt + 1,
            waited=round(time.time() - job.first_seen, 3),
        )
        await message.ack()

    async def _failed(self, job: Job, exc: UpstreamUnavailable) -> None:
        job.attempt += 1
        if job.attempt >= self.settings.retry_max_attempts:
            await self.broker.publish(
                encode(job, 0.0),
                self.broker.topology.dead,
                message_id=job.message_id,
                user_id=job.user_id,
            )
            if await self.inbox.deliver(job.user_id, job.message_id, APOLOGY, "apology"):
                metrics.REPLIES_DELIVERED.inc()
            metrics.RETRY_ATTEMPTS.labels(outcome="dead").inc()
            log.warning("retry_job_dead", message_id=job.message_id, attempts=job.attempt)
            return
        delay = backoff(
            job.attempt,
            self.settings.retry_base_delay,
            self.settings.retry_max_delay,
            exc.retry_after,
        )
        await publish_job(self.broker, job, time.time() + delay)
        metrics.RETRY_ATTEMPTS.labels(outcome="retry").inc()
        log.info(
            "retry_job_rescheduled",
            message_id=job.message_id,
            attempt=job.attempt,
            delay=round(delay, 3),
            reason=exc.reason,
        )


async def watch_queues(broker: Broker, outbox: Outbox, interval: float = 5.0) -> None:
    """Refresh `bot_retry_queue_messages` and `bot_dependency_up` until cancelled."""
    while True:
        metrics.DEPENDENCY_UP.labels(dependency="rabbitmq").set(int(broker.up))
        try:
            if broker.up:
                for role, n in (await broker.queue_depths()).items():
                    metrics.RETRY_QUEUE_MESSAGES.labels(queue=role).set(n)
            metrics.RETRY_QUEUE_MESSAGES.labels(queue="outbox").set(await outbox.length())
            metrics.DEPENDENCY_UP.labels(dependency="redis").set(1)
        except RedisError:
            metrics.DEPENDENCY_UP.labels(dependency="redis").set(0)
        except (BrokerUnavailable, *CONNECTION_EXCEPTIONS) as exc:
            log.warning("queue_depths_failed", error=repr(exc))
        await asyncio.sleep(interval)
