"""The application factory: routes, middlewares and the lifetimes of shared clients."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from aiohttp import web
from redis.asyncio import Redis
from redis.exceptions import RedisError

from bot import inbox_watch, metrics, runtime
from bot.api import middleware, webchat, wiring
from bot.api.keys import (
    CHANNELS,
    HTTP,
    REDIS,
    REPLICA,
    SETTINGS,
    SIGNER,
    STATE,
    ReplicaState,
)
from bot.api.routes import ROUTES
from bot.errors import MAX_BODY
from bot.inbox import Inbox
from bot.logging import get_logger
from bot.retries.outbox import Relay
from bot.settings import Settings
from bot.websession import SessionSigner

log = get_logger(__name__)


def create_app(settings: Settings) -> web.Application:
    """A bot replica: the public API plus /healthz and /readyz (metrics are served apart)."""
    app = web.Application(
        middlewares=[web.middleware(middleware.build(settings))], client_max_size=MAX_BODY
    )
    app[SETTINGS] = settings
    state = app[STATE] = ReplicaState()
    # Read when scraped: nothing per request (one replica per process, so one state).
    metrics.INFLIGHT.set_function(lambda: state.inflight)
    if settings.webchat_secret:
        app[SIGNER] = SessionSigner(settings.webchat_secret)
    app.cleanup_ctx.extend([clients_ctx, replica_ctx, dependency_watch_ctx])
    for route in ROUTES:
        if route.method == "GET":
            app.router.add_get(route.path, route.handler)
        else:
            app.router.add_route(route.method, route.path, route.handler)
    webchat.add_routes(app.router)
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
    broker = wiring.replica_broker(settings, f"bot-replica-{settings.queue_prefix}")
    # Long polls wait on one blocking reader, on a connection of its own (its block outlasts
    # the shared pool's 1 s socket timeout).
    reader = runtime.make_redis(
        settings.redis_url,
        socket_timeout=inbox_watch.BLOCK_MS / 1000 + 2,
        single_connection_client=True,
    )
    watch = inbox_watch.InboxWatch(reader, redis)
    parts = wiring.build(settings, redis, http, broker, Inbox(redis, watch))
    app[REPLICA], app[CHANNELS] = parts.replica, parts.channels
    app[STATE].readiness.extend(parts.readiness)
    log_api_access(settings)
    metrics.init()
    await broker.start()
    async with parts.replica.store.heartbeat.running(), inbox_watch.running(watch):
        relay = asyncio.create_task(Relay(parts.outbox, broker).run())
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
