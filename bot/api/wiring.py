"""The replica's components, built from the settings and its clients, in one place.

The aiohttp app (`bot.app.replica_ctx`) and the serverless handler (`bot.serverless`) build
the same ones here; each owns their lifetimes its own way (a server's `cleanup_ctx`, a Lambda
container's first invocation).
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import ClientSession
from redis.asyncio import Redis

from bot import runtime
from bot.api.keys import Channels, Check, Replica
from bot.api.longpoll import LongPolls
from bot.channels import topology as channel_topology
from bot.channels.intake import Intake
from bot.core.service import BotService
from bot.inbox import Inbox
from bot.ratelimit import SharedLimiter
from bot.retries.broker import Broker
from bot.retries.outbox import Outbox
from bot.retries.publisher import RetryQueue
from bot.settings import Settings
from bot.store import Store
from bot.upstream import build_answerer, probe


@dataclass(frozen=True, slots=True)
class Parts:
    """What a process serving the API holds: its components and what /readyz reports."""

    replica: Replica
    channels: Channels
    outbox: Outbox
    readiness: list[tuple[str, Check]]


def replica_broker(settings: Settings, name: str) -> Broker:
    """The broker connection of a process serving the API: retry queues and channel intake."""
    return Broker.from_settings(
        settings,
        name,
        declare_more=channel_topology.declarer(settings.queue_prefix, settings.channels),
    )


def build(
    settings: Settings, redis: Redis, http: ClientSession, broker: Broker, inbox: Inbox
) -> Parts:
    """Every component, complete: failed questions go to `broker`, or the outbox while it is
    away (`RetryQueue`); channel updates to `broker` (`Intake`)."""
    outbox = Outbox(redis, settings.queue_prefix)
    store = Store.from_settings(settings, redis)
    service = BotService.from_settings(
        settings,
        store,
        build_answerer(settings, redis, http),
        deferrer=RetryQueue.from_settings(settings, broker, outbox, redis),
        inbox=inbox,
    )

    async def upstream_ready() -> bool:
        return await probe(http, settings.upstream_url)

    replica = Replica(
        store=store,
        service=service,
        inbox=inbox,
        longpolls=LongPolls.from_settings(settings),
        streams=LongPolls.event_streams(settings),
        key_limiter=SharedLimiter.for_api_keys(settings, redis),
        upstream_probe=upstream_ready,
    )
    intake = Intake(redis, broker, settings.queue_prefix) if settings.channels else None
    return Parts(
        replica,
        Channels.from_settings(settings, intake),
        outbox,
        [("redis", runtime.redis_check(redis)), ("rabbitmq", broker.ready)],
    )
