"""The outbox: jobs the broker could not confirm wait in a Redis stream until a relay
publishes them.

Every replica and the worker run a `Relay`; they share one consumer group, so an entry is
published by one of them. An entry is acknowledged and deleted only after the broker
confirmed it; a relay that dies in between leaves it pending, and another relay claims it
after `CLAIM_IDLE_MS`. A job published twice is harmless: the inbox keeps one reply per
message id.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from typing import Any

from redis.asyncio import ConnectionPool, Redis
from redis.exceptions import RedisError, ResponseError

from bot import metrics
from bot.logging import get_logger
from bot.retries.broker import Broker, BrokerUnavailable
from bot.retries.jobs import decode

log = get_logger(__name__)

GROUP = "relay"
CLAIM_IDLE_MS = 30_000
# A consumer (one per relay process ever started) idle this long with nothing pending is a
# process gone; a relay that starts removes such names, so the group does not grow forever.
# Removing a live but idle one is harmless: its next read makes it again.
STALE_CONSUMER_MS = 600_000
BATCH = 100
# Under the Redis client's 1 s socket timeout.
BLOCK_MS = 500


def outbox_key(prefix: str) -> str:
    return f"bot:outbox:{prefix}"


class Outbox:
    """Append jobs to the stream (one round trip)."""

    def __init__(self, redis: Redis, prefix: str) -> None:
        self.redis = redis
        self.key = outbox_key(prefix)

    async def add(self, body: bytes, message_id: str, user_id: str) -> str:
        """Hold a job until a relay publishes it; raises RedisError when Redis cannot."""
        entry_id: str = await self.redis.xadd(
            self.key, {"body": body.decode(), "mid": message_id, "uid": user_id}
        )
        return entry_id

    async def length(self) -> int:
        return int(await self.redis.xlen(self.key))


class Relay:
    """Publishes outbox entries to the work queue whenever the broker is up.

    An entry that is not a job (no body, a body `decode` refuses, bytes that are not UTF-8)
    is parked in the dead-letter queue with its reason and deleted, once; the entries behind
    it flow on. The relay reads the stream as bytes, with a client of its own, so even an
    entry that is not text cannot make the read itself fail for every relay in turn.
    """

    def __init__(self, outbox: Outbox, broker: Broker) -> None:
        self.outbox = outbox
        self.broker = broker
        pool = outbox.redis.connection_pool
        self.redis: Redis = Redis.from_pool(
            ConnectionPool(
                connection_class=pool.connection_class,
                **{**pool.connection_kwargs, "decode_responses": False},
            )
        )
        self.key = outbox.key
        self.consumer = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._group_ready = False

    async def run(self) -> None:
        """Relay until cancelled."""
        try:
            while True:
                try:
                    moved = await self.relay_once()
                except RedisError as exc:
                    log.warning("outbox_relay_redis_error", error=type(exc).__name__)
                    self._group_ready = False  # the stream (and its group) may have been lost
                    await asyncio.sleep(1)
                    continue
                except Exception:  # the relay must outlive any surprise; the entry stays
                    log.exception("outbox_relay_failed")
                    await asyncio.sleep(1)
                    continue
                if moved is None:
                    await asyncio.sleep(0.5)  # broker down: the outbox keeps the jobs
        finally:
            await self.close()

    async def close(self) -> None:
        await self.redis.aclose()

    async def relay_once(self) -> int | None:
        """Publish one batch; the count published, or None while the broker is down."""
        if not self.broker.up:
            return None
        await self._ensure_group()
        # Our own pending entries first (a publish that failed), then dead relays' entries,
        # then new ones.
        entries = await self._read("0")
        if not entries:
            claimed = await self.redis.xautoclaim(
                self.key, GROUP, self.consumer, CLAIM_IDLE_MS, "0-0", count=BATCH
            )
            entries = claimed[1]
        if not entries:
            entries = await self._read(">", block=BLOCK_MS)
        published = 0
        for entry_id, fields in entries:
            if not fields:  # deleted while pending
                await self.redis.xack(self.key, GROUP, entry_id)
                continue
            body = fields.get(b"body")
            mid, uid = (_text(fields.get(name)) for name in (b"mid", b"uid"))
            problem = _unreadable(body)
            try:
                if problem is None:
                    await self.broker.publish(
                        body, self.broker.topology.work, message_id=mid, user_id=uid
                    )
                else:
                    await self.broker.dead_letter(
                        body or b"", "outbox_unreadable", problem, message_id=mid, user_id=uid
                    )
            except BrokerUnavailable:
                return published or None
            pipe = self.redis.pipeline(transaction=True)
            pipe.xack(self.key, GROUP, entry_id)
            pipe.xdel(self.key, entry_id)
            await pipe.execute()
            if problem is None:
                metrics.RETRY_JOBS_PUBLISHED.inc()
                published += 1
                log.info("outbox_job_relayed", message_id=mid)
        return published

    async def _read(self, start: str, block: int | None = None) -> list[tuple[bytes, Any]]:
        res = await self.redis.xreadgroup(
            GROUP, self.consumer, {self.key: start}, count=BATCH, block=block
        )
        if not res:
            return []
        entries: list[tuple[bytes, Any]] = res[0][1]
        return entries

    async def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            await self.redis.xgroup_create(self.key, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        await self._forget_gone_consumers()
        self._group_ready = True

    async def _forget_gone_consumers(self) -> None:
        """Remove the names of relays gone long ago; never one with entries pending (those
        are claimed by a live relay first, after `CLAIM_IDLE_MS`)."""
        for consumer in await self.redis.xinfo_consumers(self.key, GROUP):
            if consumer["pending"] == 0 and consumer["idle"] > STALE_CONSUMER_MS:
                await self.redis.xgroup_delconsumer(self.key, GROUP, consumer["name"])


def _text(value: bytes | None) -> str:
    return "" if value is None else value.decode(errors="replace")


def _unreadable(body: bytes | None) -> str | None:
    """Why an outbox entry's body is not a job, or None when it is one."""
    if body is None:
        return "entry has no body field"
    try:
        decode(body)
    except ValueError as exc:
        return str(exc)
    return None
