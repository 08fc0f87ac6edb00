"""The retry worker: takes jobs from the work queue and answers them, or tries again later.

Bounded prefetch; a job is acked only after its reply is stored (or it was moved on: to a
delay queue, or to the dead-letter queue with an apology in the inbox), so a worker killed at
any point loses nothing: the broker redelivers what was not acked, and the inbox keeps one
reply per message id. Backoff is exponential with full jitter and never shorter than the
upstream's Retry-After; delays are served by the per-level delay queues (`publish_job`).

A dependency outage delays jobs and never loses them. On a Redis error the job is put back
through a delay queue (a new message, so it burns none of the work queue's delivery limit) and
the worker stops consuming until Redis answers again. Nothing reaches the dead-letter queue
without its reason: a body that is not a job is parked there once (no apology: there is no
user to tell), and a job the broker redelivered nearly up to the queue's delivery limit (the
worker kept dying on it) is parked by the worker itself, with the apology, before the broker
would drop it there silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from aio_pika.abc import AbstractIncomingMessage, AbstractQueue
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from redis.exceptions import RedisError

from bot import metrics
from bot.answers import Ask
from bot.core.types import Job
from bot.errors import UpstreamRejected, UpstreamUnavailable
from bot.inbox import APOLOGY, Inbox
from bot.logging import get_logger
from bot.retries.broker import Broker, BrokerUnavailable
from bot.retries.jobs import RetryPolicy, decode, encode, next_hop
from bot.retries.outbox import Outbox
from bot.retries.publisher import publish_job
from bot.settings import Settings
from bot.upstream import Answerer

log = get_logger(__name__)

# A job that hit a Redis error comes back after about this long (through a delay queue).
_INFRA_PAUSE = 2.0
# How often a paused worker asks Redis whether it is back.
_PROBE_INTERVAL = 0.5
# Deliveries left before the broker's own (silent) dead-lettering when the worker parks a job.
_DELIVERY_MARGIN = 1
# (user_id, message_id, text): a deferred reply handed on to a chat channel.
Forward = Callable[[str, str, str], Awaitable[None]]


def delivery_count(message: AbstractIncomingMessage) -> int:
    """Earlier deliveries of this message that were not acked (quorum queues count them)."""
    count = (message.headers or {}).get("x-delivery-count", 0)
    return count if isinstance(count, int) else 0


class Worker:
    """Consumes `<prefix>.work` until `stop` is set."""

    def __init__(
        self,
        broker: Broker,
        inbox: Inbox,
        answerer: Answerer,
        policy: RetryPolicy,
        *,
        drain_timeout: float,
        forward: Forward | None = None,
    ) -> None:
        self.broker = broker
        # Sends a deferred reply on to its chat channel (bot.channels), before the inbox
        # records it: a redelivered job forwards again, and delivery sends it once.
        self.forward = forward
        self.inbox = inbox
        self.answerer = answerer
        self.policy = policy
        self.drain_timeout = drain_timeout
        self.levels = list(broker.topology.levels)
        self._inflight: set[asyncio.Task[object]] = set()
        self._redis_lost = asyncio.Event()

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        broker: Broker,
        inbox: Inbox,
        answerer: Answerer,
        forward: Forward | None = None,
    ) -> Worker:
        """`BOT_RETRY_*` and `BOT_DRAIN_TIMEOUT`."""
        policy = RetryPolicy.from_settings(settings)
        drain = settings.drain_timeout
        return cls(broker, inbox, answerer, policy, drain_timeout=drain, forward=forward)

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until `stop`; then let in-flight jobs finish (or hand them back) and return."""
        while not stop.is_set() and not await self.broker.wait_declared(1.0):
            pass
        queue = self.broker.queues.get(self.broker.topology.work)
        while queue is not None and not stop.is_set():
            tag = await self._consume(queue, stop)
            if tag is None:
                break
            await _first(stop.wait(), self._redis_lost.wait())
            with contextlib.suppress(*CONNECTION_EXCEPTIONS):
                await queue.cancel(tag)
            if not stop.is_set():
                await self._await_redis(stop)
        await self.drain(self.drain_timeout)

    async def _consume(self, queue: AbstractQueue, stop: asyncio.Event) -> str | None:
        """Start consuming (retrying while the broker is away); None once `stop` is set."""
        while not stop.is_set():
            try:
                tag = await queue.consume(self._on_message)
            except CONNECTION_EXCEPTIONS as exc:
                log.warning("worker_consume_failed", error=repr(exc))
                await asyncio.sleep(1)
                continue
            log.info("worker_consuming", queue=queue.name, prefetch=self.broker.prefetch)
            return str(tag)
        return None

    async def _await_redis(self, stop: asyncio.Event) -> None:
        """Hold consumption until Redis answers a PING (or `stop`), and at least as long as
        the jobs put back are away: a Redis that answers PING but refuses writes (full) must
        not turn into a loop that takes and puts back the same jobs as fast as it can."""
        log.warning("worker_paused", dependency="redis")
        metrics.DEPENDENCY_UP.labels(dependency="redis").set(0)
        paused = time.monotonic()
        await _first(stop.wait(), asyncio.sleep(_INFRA_PAUSE))
        while not stop.is_set():
            try:
                async with asyncio.timeout(1.0):
                    await self.inbox.redis.ping()
                break
            except (RedisError, OSError, TimeoutError):
                await _first(stop.wait(), asyncio.sleep(_PROBE_INTERVAL))
        self._redis_lost.clear()
        metrics.DEPENDENCY_UP.labels(dependency="redis").set(1)
        log.info("worker_resumed", paused=round(time.monotonic() - paused, 3))

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
        except RedisError as exc:
            self._redis_lost.set()
            await self._put_back(message, exc)
        except (BrokerUnavailable, *CONNECTION_EXCEPTIONS) as exc:
            log.warning("retry_job_deferred_by_error", error=repr(exc))
            await asyncio.sleep(_INFRA_PAUSE)
            with contextlib.suppress(*CONNECTION_EXCEPTIONS):
                await message.nack(requeue=True)
        finally:
            self._inflight.discard(task)

    async def _put_back(self, message: AbstractIncomingMessage, exc: Exception) -> None:
        """Send a job Redis failed for round a delay queue, unchanged, and ack the delivery:
        a new message starts with no deliveries counted, so an outage of any length uses
        up none of the work queue's delivery limit."""
        log.warning("retry_job_deferred_by_error", message_id=message.message_id, error=repr(exc))
        hop = next_hop(_INFRA_PAUSE, self.levels) or self.levels[0]
        try:
            await self.broker.publish(
                message.body,
                self.broker.topology.delay(hop),
                message_id=message.message_id or "",
                user_id=_user_id(message),
            )
        except (BrokerUnavailable, *CONNECTION_EXCEPTIONS):
            with contextlib.suppress(*CONNECTION_EXCEPTIONS):
                await message.nack(requeue=True)
            return
        with contextlib.suppress(*CONNECTION_EXCEPTIONS):
            await message.ack()

    async def handle(self, message: AbstractIncomingMessage) -> None:
        """One delivery: park, skip, re-delay, answer, retry later or give up."""
        try:
            job, not_before = decode(message.body)
        except ValueError as exc:
            # Poison: no retry can make it a job. Parked once, and the queue flows on.
            await self.broker.dead_letter(
                message.body,
                "unreadable",
                str(exc),
                message_id=message.message_id or "",
                user_id=_user_id(message),
            )
            await message.ack()
            return
        deliveries = delivery_count(message) + 1
        if deliveries > self.broker.topology.delivery_limit - _DELIVERY_MARGIN:
            detail = f"delivered {deliveries} times without being acked"
            await self._give_up(job, "redelivered", detail)
            await message.ack()
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
            answer = await self.answerer.answer(job.question, job.context, Ask(job.model))
        except UpstreamUnavailable as exc:
            await self._failed(job, exc)
            await message.ack()
            return
        except UpstreamRejected as exc:
            # Refused for good: no more attempts; parked (an operator may replay it once the
            # key or model is fixed) with the apology that says why.
            await self._give_up(job, "rejected", str(exc), exc.apology)
            await message.ack()
            return
        if self.forward is not None:
            await self.forward(job.user_id, job.message_id, answer.text)
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
        if job.attempt >= self.policy.max_attempts:
            await self._give_up(job, "max_attempts", f"{job.attempt} attempts: {exc.reason}")
            return
        delay = self.policy.delay(job.attempt, exc.retry_after)
        await publish_job(self.broker, job, time.time() + delay)
        metrics.RETRY_ATTEMPTS.labels(outcome="retry").inc()
        log.info(
            "retry_job_rescheduled",
            message_id=job.message_id,
            attempt=job.attempt,
            delay=round(delay, 3),
            reason=exc.reason,
        )

    async def _give_up(self, job: Job, code: str, detail: str, apology: str = APOLOGY) -> None:
        """Apologise to the user, then park the job with its reason.

        The apology first: should Redis fail, nothing was parked yet and the job is put back
        whole; the inbox keeps one apology per message id whatever happens after.
        """
        if self.forward is not None:
            await self.forward(job.user_id, job.message_id, apology)
        if await self.inbox.deliver(job.user_id, job.message_id, apology, "apology"):
            metrics.REPLIES_DELIVERED.inc()
        await self.broker.dead_letter(
            encode(job, 0.0), code, detail, message_id=job.message_id, user_id=job.user_id
        )
        metrics.RETRY_ATTEMPTS.labels(outcome="dead").inc()


def _user_id(message: AbstractIncomingMessage) -> str:
    uid = (message.headers or {}).get("user_id", "")
    return uid if isinstance(uid, str) else ""


async def _first(*aws: Coroutine[Any, Any, object]) -> None:
    """Wait until the first of `aws` finishes; cancel the others."""
    tasks = [asyncio.ensure_future(aw) for aw in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


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
