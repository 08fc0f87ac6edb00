"""The application factory: routes, middlewares and the lifetimes of shared clients."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from aiohttp import web
from redis.asyncio import Redis
from redis.exceptions import RedisError

from bot import inbox_watch, metrics, runtime
from bot.api import channels, docs, health, messages, middleware, prefs, replies, webchat
from bot.api.keys import (
    CHANNELS,
    HTTP,
    MESSAGES_ROUTE,
    REDIS,
    REPLICA,
    SETTINGS,
    SIGNER,
    STATE,
    Channels,
    Replica,
    ReplicaState,
)
from bot.api.longpoll import LongPolls
from bot.channels import topology as channel_topology
from bot.channels.intake import Intake
from bot.core.service import BotService
from bot.errors import MAX_BODY
from bot.inbox import Inbox
from bot.logging import get_logger
from bot.ratelimit import SharedLimiter
from bot.retries.broker import Broker
from bot.retries.outbox import Outbox, Relay
from bot.retries.publisher import RetryQueue
from bot.settings import Settings
from bot.store import Store
from bot.upstream import build_answerer, probe
from bot.websession import SessionSigner

log = get_logger(__name__)


def create_app(settings: Settings) -> web.Application:
    """A bot replica: the public API plus /healthz and /readyz (metrics are served apart)."""
    app = web.Application(middlewares=middleware.build(settings), client_max_size=MAX_BODY)
    app[SETTINGS] = settings
    state = app[STATE] = ReplicaState()
    # Read when scraped: nothing per request (one replica per process, so one state).
    metrics.INFLIGHT.set_function(lambda: state.inflight)
    if settings.webchat_secret:
        app[SIGNER] = SessionSigner(settings.webchat_secret)
    app.cleanup_ctx.extend([clients_ctx, replica_ctx, dependency_watch_ctx])
    app.router.add_get("/healthz", health.healthz)
    app.router.add_get("/readyz", health.readyz)
    app.router.add_post(MESSAGES_ROUTE, messages.post_message)
    app.router.add_get(replies.ROUTE, replies.get_replies)
    app.router.add_get("/v1/openapi.json", docs.openapi)
    prefs.add_routes(app.router)
    webchat.add_routes(app.router)
    channels.add_routes(app.router)
    return app


def start_draining(app: web.Application) -> int:
    """Mark the replica draining (/readyz answers 503, long polls return, event streams
    close so browsers reconnect elsewhere); the requests in
    flight, which the server then lets finish."""
    state = app[STATE]
    state.draining = True
    return state.inflight


async def clients_ctx(app: web.Application) -> AsyncIterator[None]:
    """The Redis client and the HTTP session, for the life of the app."""
    settings = app[SETTINGS]
    async with (
        runtime.redis_client(settings.redis_url, auto_pipeline=True) as redis,
        runtime.http_client(limit=200) as http,
    ):
        app[REDIS], app[HTTP] = redis, http
        await warn_if_not_persistent(redis)
        yield


async def warn_if_not_persistent(redis: Redis) -> None:
    """Log once when Redis keeps nothing on disk: prefs and records would not survive it."""
    with contextlib.suppress(RedisError, OSError):
        conf = await redis.config_get("appendonly")
        if conf.get("appendonly") != "yes":
            log.warning("redis_persistence_off", hint="run Redis with appendonly yes")


async def replica_ctx(app: web.Application) -> AsyncIterator[None]:
    """Every component, built complete; and what runs beside the requests while they live.

    RabbitMQ connects in the background: the replica starts and serves commands while it is
    down (jobs go to the outbox then). The heartbeat names this replica in its claims, so if
    it dies mid-answer others take over at once.
    """
    settings, redis, http = app[SETTINGS], app[REDIS], app[HTTP]
    broker = Broker.from_settings(
        settings,
        f"bot-replica-{settings.queue_prefix}",
        declare_more=channel_topology.declarer(settings.queue_prefix, settings.channels),
    )
    outbox = Outbox(redis, settings.queue_prefix)
    # Long polls wait on one blocking reader, on a connection of its own (its block outlasts
    # the shared pool's 1 s socket timeout).
    reader = runtime.make_redis(
        settings.redis_url,
        socket_timeout=inbox_watch.BLOCK_MS / 1000 + 2,
        single_connection_client=True,
    )
    watch = inbox_watch.InboxWatch(reader, redis)
    inbox = Inbox(redis, watch)
    store = Store.from_settings(settings, redis)
    service = BotService.from_settings(
        settings,
        store,
        build_answerer(settings, redis, http),
        deferrer=RetryQueue.from_settings(settings, broker, outbox, redis),
        inbox=inbox,
    )

    async def redis_ready() -> bool:
        try:
            async with asyncio.timeout(1.0):
                return bool(await redis.ping())
        except (RedisError, OSError, TimeoutError):
            return False

    async def upstream_ready() -> bool:
        return await probe(http, settings.upstream_url)

    app[REPLICA] = Replica(
        store=store,
        service=service,
        inbox=inbox,
        longpolls=LongPolls.from_settings(settings),
        streams=LongPolls.event_streams(settings),
        key_limiter=SharedLimiter.for_api_keys(settings, redis),
        upstream_probe=upstream_ready,
    )
    intake = Intake(redis, broker, settings.queue_prefix) if settings.channels else None
    app[CHANNELS] = Channels.from_settings(settings, intake)
    app[STATE].readiness.extend([("redis", redis_ready), ("rabbitmq", broker.ready)])
    log_api_access(settings)
    metrics.init()
    await broker.start()
    async with store.heartbeat.running(), inbox_watch.running(watch):
        relay = asyncio.create_task(Relay(outbox, broker).run())
        yield
        await runtime.cancel_and_wait(relay)
    await broker.close()
    await reader.aclose()


def log_api_access(settings: Settings) -> None:
    """One line at start saying who /v1/* answers when no keys are set."""
    if not settings.api_keys:
        serving = "everyone" if settings.open_api else "loopback_only"
        log.warning("api_keys_unset", serving=serving, hint="/v1/* answers " + settings.api_access)


async def dependency_watch_ctx(app: web.Application) -> AsyncIterator[None]:
    """Refresh `bot_dependency_up` every few seconds, from this process's own view."""
    checks = [*app[STATE].readiness, ("upstream", app[REPLICA].upstream_probe)]

    async def watch() -> None:
        while True:
            results = await asyncio.gather(*(check() for _, check in checks))
            for (name, _), ok in zip(checks, results, strict=True):
                metrics.DEPENDENCY_UP.labels(dependency=name).set(int(ok))
            await asyncio.sleep(5)

    task = asyncio.create_task(watch())
    yield
    await runtime.cancel_and_wait(task)
