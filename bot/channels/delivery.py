"""Sending queued messages to the platforms: in order per conversation, paced, acked only
after the platform's 2xx.

Each conversation is a lane (`Lanes`): its messages go one at a time, at most one per
`chat_interval` (`group_interval` for a Telegram group), and all of a channel's sends at most
one per `interval`; both hold across every delivering process and its restarts (`SharedPace`).
A 429 pauses that lane for exactly the platform's retry-after (noted in Redis for `bot
channels status`) while every other lane keeps flowing; 5xx, timeouts and connection errors
are retried in the lane with backoff and full jitter, up to `BOT_RETRY_MAX_ATTEMPTS`; a
permanent error (403 blocked, 400 chat not found) goes to `<prefix>.chan.dead` at once with
its reason. A record per message sent (`chan:sent:`, a day) makes a redelivered message (a
worker died after the send) a no-op; a crash between the platform's 2xx and that record
repeats at most that one message.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field

from aio_pika.abc import AbstractIncomingMessage
from redis.asyncio import Redis
from redis.exceptions import RedisError

from bot import metrics
from bot.channels import topology
from bot.channels.consumer import ShardConsumer, ack
from bot.channels.pace import SharedPace
from bot.channels.sending import Sender, Sent
from bot.channels.wire import SHARDS, Outbound, decode_outbound
from bot.logging import get_logger
from bot.retries.broker import Broker, BrokerUnavailable
from bot.retries.jobs import RetryPolicy

log = get_logger(__name__)

SENT_TTL = 86_400
_HOLD = 1.0  # seconds a lane waits after a Redis or broker error before trying again


@dataclass(frozen=True, slots=True)
class Pacing:
    """Seconds between two sends to one conversation, and between any two of the channel's
    (whichever process sends them: `identity`, the bot's token, names the shared schedule).
    A group conversation (a negative Telegram chat id) waits at least `group_interval`."""

    chat_interval: float
    interval: float
    group_interval: float = 0.0
    identity: str = field(default="", repr=False)

    def lane_interval(self, conversation: str) -> float:
        if self.group_interval and conversation.startswith("-"):
            return max(self.chat_interval, self.group_interval)
        return self.chat_interval


def sent_key(out: Outbound) -> str:
    return f"chan:sent:{out.channel}:{out.id}"


def paused_key(prefix: str, channel: str) -> str:
    """Conversations paused by a 429: a sorted set, scored by the epoch the pause ends."""
    return f"chan:paused:{prefix}:{channel}"


class Delivery:
    """Consumes the outbound queues of the channels it has senders for."""

    def __init__(
        self,
        broker: Broker,
        redis: Redis,
        senders: dict[str, tuple[Sender, Pacing]],
        prefix: str,
        policy: RetryPolicy,
        *,
        drain_timeout: float,
    ) -> None:
        self.broker = broker
        self.redis = redis
        self.senders = senders
        self.prefix = prefix
        self.policy = policy
        queues = [topology.outbound(prefix, c, n) for c in senders for n in range(SHARDS)]
        self.consumer = ShardConsumer(broker, queues, drain_timeout)
        self._last: dict[str, float] = {}  # lane -> monotonic time of its last send
        self._paused: dict[str, float] = {}  # lane -> monotonic time its 429 pause ends
        self.pace = SharedPace(redis, {c: p.identity for c, (_, p) in senders.items()})

    async def run(self, stop: asyncio.Event) -> None:
        await self.consumer.run(stop, self._route)

    def paused(self, channel: str) -> int:
        """Conversations of `channel` paused by a 429 right now."""
        now = time.monotonic()
        prefix = channel + ":"
        return sum(1 for k, t in self._paused.items() if t > now and k.startswith(prefix))

    def _route(self, message: AbstractIncomingMessage) -> asyncio.Task[None]:
        try:
            out = decode_outbound(message.body)
            if out.channel not in self.senders:
                raise ValueError(f"no sender for channel {out.channel!r}")
        except ValueError as exc:
            return asyncio.create_task(self._park(message, None, f"unreadable: {exc}"))
        return self.consumer.lanes.submit(out.lane, lambda: self._deliver(out, message))

    async def _deliver(self, out: Outbound, message: AbstractIncomingMessage) -> None:
        sender, pacing = self.senders[out.channel]
        failures = 0
        while True:
            try:
                if await self.redis.exists(sent_key(out)):
                    metrics.OUTBOUND_SENDS.labels(out.channel, "skipped").inc()
                    break
            except RedisError as exc:
                log.warning("outbound_held", channel=out.channel, error=type(exc).__name__)
                await asyncio.sleep(_HOLD)
                continue
            await self._pace(out, pacing)
            try:
                result = await sender.send(out)
            except Exception as exc:  # a sender's bug must not wedge its conversation
                log.exception("outbound_send_crashed", channel=out.channel)
                result = Sent("transient", type(exc).__name__)
            self._last[out.lane] = time.monotonic()
            if result.kind == "ok":
                metrics.OUTBOUND_SENDS.labels(out.channel, "sent").inc()
                await self._mark_sent(out)
                break
            if result.kind == "paused":
                metrics.OUTBOUND_SENDS.labels(out.channel, "rate_limited").inc()
                self._paused[out.lane] = time.monotonic() + result.retry_after
                log.info("outbound_paused", channel=out.channel, seconds=result.retry_after)
                await self._note_pause(out, result.retry_after)
                continue
            if result.kind == "transient":
                metrics.OUTBOUND_SENDS.labels(out.channel, "error").inc()
                failures += 1
                if failures < self.policy.max_attempts:
                    await asyncio.sleep(self.policy.delay(failures))
                    continue
                await self._park(
                    message, out, f"max_attempts: {failures} attempts: {result.reason}"
                )
                return
            await self._park(message, out, f"permanent: {result.reason}")
            return
        await ack(message)

    async def _pace(self, out: Outbound, pacing: Pacing) -> None:
        """Wait for the lane's turn (its pause, its per-chat interval), then the channel's."""
        interval = pacing.lane_interval(out.conversation)
        paused_until = self._paused.get(out.lane, 0.0)
        ready = max(self._last.get(out.lane, 0.0) + interval, paused_until)
        wait = ready - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        self._paused.pop(out.lane, None)
        await self.pace.wait(out.channel, pacing.interval, out.conversation, interval)

    async def _note_pause(self, out: Outbound, seconds: float) -> None:
        """Best effort: `bot channels status` lists the conversations paused right now."""
        key, now = paused_key(self.prefix, out.channel), time.time()
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.zremrangebyscore(key, "-inf", now)
                pipe.zadd(key, {out.conversation: now + seconds})
                pipe.expire(key, math.ceil(seconds) + 1, nx=True)
                pipe.expire(key, math.ceil(seconds) + 1, gt=True)
                await pipe.execute()
        except RedisError as exc:
            log.warning("outbound_pause_note_failed", error=type(exc).__name__)

    async def _mark_sent(self, out: Outbound) -> None:
        try:
            await self.redis.set(sent_key(out), "1", ex=SENT_TTL)
        except RedisError as exc:
            # Sent, but a redelivery would send it again: counted, it is the documented limit.
            metrics.OUTBOUND_DUPLICATES.labels(out.channel).inc()
            log.warning("outbound_sent_record_failed", error=type(exc).__name__)

    async def _park(
        self, message: AbstractIncomingMessage, out: Outbound | None, reason: str
    ) -> None:
        """Dead-letter with the reason, then ack; held (not acked) while the broker is away."""
        while True:
            try:
                await self.broker.publish(
                    message.body,
                    topology.dead(self.prefix),
                    message_id=message.message_id or "",
                    user_id=out.user_id if out else "",
                    reason=reason,
                )
                break
            except BrokerUnavailable:
                await asyncio.sleep(_HOLD)
        channel = out.channel if out else "unknown"
        if out is not None:
            metrics.OUTBOUND_SENDS.labels(channel, "dead_lettered").inc()
        log.warning("outbound_dead_lettered", channel=channel, reason=reason)
        await ack(message)
