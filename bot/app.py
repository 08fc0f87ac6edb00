"""The application factory: routes, middlewares and the lifetimes of shared clients."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import orjson
from aiohttp import web
from redis.asyncio import Redis
from redis.exceptions import RedisError

from bot import metrics
from bot.api import docs, health, messages, middleware, prefs, replies
from bot.api.keys import (
    HTTP,
    KEY_LIMITER,
    LONGPOLLS,
    READINESS,
    REDIS,
    SERVICE,
    SETTINGS,
    STATE,
    STORE,
    UPSTREAM_PROBE,
)
from bot.api.longpoll import LongPolls
from bot.core.service import BotService
from bot.errors import MAX_BODY
from bot.inbox import Inbox
from bot.logging import get_logger
from bot.ratelimit import LocalLimiter, Policy, SharedLimiter
from bot.retries.broker import Broker
from bot.retries.outbox import Outbox, Relay
from bot.retries.publisher import RetryQueue
from bot.settings import Settings
from bot.store import Store
from bot.upstream import build_answerer, probe

log = get_logger(__name__)
Check = Callable[[], Awaitable[bool]]


def create_app(settings: Settings) -> web.Application:
    """A bot replica: the public API plus /healthz and /readyz (metrics are served apart)."""
    app = web.Application(
        middlewares=middleware.build(settings),
        client_max_size=MAX_BODY,
    )
    app[SETTINGS] = settings
    app[STATE] = {"draining": False, "inflight": 0}
    app[READINESS] = []
    app[LONGPOLLS] = LongPolls(settings.longpoll_max, settings.longpoll_per_user)
    app.cleanup_ctx.extend(
        [redis_ctx, http_ctx, service_ctx, heartbeat_ctx, retries_ctx, dependency_watch_ctx]
    )
    app.router.add_get("/healthz", health.healthz)
    app.router.add_get("/readyz", health.readyz)
    app.router.add_post("/v1/messages", messages.post_message)
    app.router.add_get(replies.ROUTE, replies.get_replies)
    app.router.add_get("/v1/openapi.json", docs.openapi)
    prefs.add_routes(app.router)
    return app


def create_metrics_app() -> web.Application:
    """The /metrics endpoint, on its own port so it is never reachable through NGINX."""

    async def serve_metrics(_: web.Request) -> web.Response:
        body, content_type = metrics.render()
        return web.Response(body=body, headers={"Content-Type": content_type})

    app = web.Application()
    app.router.add_get("/metrics", serve_metrics)
    return app


def make_redis(settings: Settings) -> Redis:
    """A Redis client whose every call has a timeout."""
    redis: Redis = Redis.from_url(
        settings.redis_url,
        decode_responses=True,
        socket_timeout=1.0,
        socket_connect_timeout=1.0,
        health_check_interval=15,
    )
    return redis


async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
    redis = make_redis(app[SETTINGS])
    app[REDIS] = redis

    async def redis_ready() -> bool:
        try:
            async with asyncio.timeout(1.0):
                return bool(await redis.ping())
        except (RedisError, OSError, TimeoutError):
            return False

    app[READINESS].append(("redis", redis_ready))
    await warn_if_not_persistent(redis)
    yield
    await redis.aclose()


async def warn_if_not_persistent(redis: Redis) -> None:
    """Log once when Redis keeps nothing on disk: prefs and records would not survive it."""
    with contextlib.suppress(RedisError, OSError):
        conf = await redis.config_get("appendonly")
        if conf.get("appendonly") != "yes":
            log.warning("redis_persistence_off", hint="run Redis with appendonly yes")


async def http_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=200, keepalive_timeout=30),
        json_serialize=lambda o: orjson.dumps(o).decode(),
    )
    app[HTTP] = session

    async def upstream_ready() -> bool:
        return await probe(session, settings.upstream_url)

    app[UPSTREAM_PROBE] = upstream_ready  # not in /readyz: an upstream outage is survivable
    yield
    await session.close()


async def service_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    policy = Policy(settings.rate_limit, settings.rate_burst)
    lease_ms = int((2 * settings.upstream_timeout + 5) * 1000)
    store = Store(app[REDIS], policy, lease_ms=lease_ms, record_ttl=settings.idempotency_ttl)
    app[STORE] = store
    app[SERVICE] = BotService(
        store,
        build_answerer(settings, app[REDIS], app[HTTP]),
        policy,
        LocalLimiter(policy.scaled(settings.replicas)),
        wait_timeout=lease_ms / 1000 + 1,
        limit=settings.rate_limit_enabled,
    )
    if settings.api_keys and settings.key_rate_limit is not None:
        app[KEY_LIMITER] = SharedLimiter(
            app[REDIS],
            Policy(settings.key_rate_limit, settings.key_rate_burst, "key"),
            settings.replicas,
            "apikey",
        )
    log_api_access(settings)
    metrics.init()
    yield


def log_api_access(settings: Settings) -> None:
    """One line at start saying who /v1/* answers when no keys are set."""
    if not settings.api_keys:
        serving = "everyone" if settings.open_api else "loopback_only"
        log.warning("api_keys_unset", serving=serving, hint="/v1/* answers " + settings.api_access)


async def heartbeat_ctx(app: web.Application) -> AsyncIterator[None]:
    """This replica's heartbeat in Redis: if it dies mid-answer, others take over at once."""
    async with app[STORE].heartbeat.running():
        yield


async def retries_ctx(app: web.Application) -> AsyncIterator[None]:
    """RabbitMQ (connecting in the background), the outbox relay, and the service's deferrer.

    The replica starts and serves commands while RabbitMQ is down: jobs go to the outbox then.
    """
    settings = app[SETTINGS]
    broker = Broker(settings, f"bot-replica-{settings.queue_prefix}")
    outbox = Outbox(app[REDIS], settings.queue_prefix)
    service = app[SERVICE]
    service.inbox = Inbox(app[REDIS])
    service.deferrer = RetryQueue(settings, broker, outbox, app[REDIS])
    app[READINESS].append(("rabbitmq", broker.ready))
    await broker.start()
    relay = asyncio.create_task(Relay(outbox, broker).run())
    yield
    relay.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await relay
    await broker.close()


async def dependency_watch_ctx(app: web.Application) -> AsyncIterator[None]:
    """Refresh `bot_dependency_up` every few seconds, from this process's own view."""

    async def watch() -> None:
        while True:
            checks = [*app[READINESS], ("upstream", app[UPSTREAM_PROBE])]
            results = await asyncio.gather(*(check() for _, check in checks))
            for (name, _), ok in zip(checks, results, strict=True):
                metrics.DEPENDENCY_UP.labels(dependency=name).set(int(ok))
            await asyncio.sleep(5)

    task = asyncio.create_task(watch())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
