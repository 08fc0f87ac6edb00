"""Process plumbing shared by the replica and the retry worker, written once.

The lifetimes of the clients every process holds (Redis, the HTTP session), the `/metrics`
server on its own port, the signals that stop a process, and cancel-then-await of the
background tasks it owns. As arq's `connections.py` is to its worker: small, and nothing in
it knows what the process does.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import io
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from bot import metrics
from bot.autopipe import AutoPipelineRedis
from bot.logging import get_logger

log = get_logger(__name__)

if TYPE_CHECKING:
    from aiohttp import web

__all__ = [
    "arm_startup_deadline",
    "cancel_and_wait",
    "http_client",
    "make_redis",
    "metrics_server",
    "redis_check",
    "redis_client",
    "startup_done",
    "stop_event",
]


def make_redis(
    url: str, *, socket_timeout: float = 1.0, auto_pipeline: bool = False, **kwargs: Any
) -> Redis:
    """A Redis client whose every call has a timeout (it connects on first use).

    With `auto_pipeline`, the commands of one event-loop tick go as one pipeline, answered
    within `socket_timeout` as a batch (`bot.autopipe`): for the replica's shared client.
    """
    cls = AutoPipelineRedis if auto_pipeline else Redis
    redis: Redis = cls.from_url(
        url,
        decode_responses=True,
        socket_timeout=socket_timeout,
        socket_connect_timeout=1.0,
        health_check_interval=15,
        **kwargs,
    )
    if isinstance(redis, AutoPipelineRedis):
        redis.batching(socket_timeout)
    return redis


@contextlib.asynccontextmanager
async def redis_client(url: str, **kwargs: Any) -> AsyncIterator[Redis]:
    """`make_redis` for the life of the block, closed after."""
    redis = make_redis(url, **kwargs)
    try:
        yield redis
    finally:
        await redis.aclose()


def redis_check(redis: Redis) -> Callable[[], Awaitable[bool]]:
    """A check of whether Redis answers a PING within a second (for /readyz)."""

    async def ready() -> bool:
        try:
            async with asyncio.timeout(1.0):
                return bool(await redis.ping())
        except (RedisError, OSError, TimeoutError):
            return False

    return ready


@contextlib.asynccontextmanager
async def http_client(limit: int) -> AsyncIterator[aiohttp.ClientSession]:
    """A pooled HTTP session (at most `limit` connections) encoding JSON with orjson."""
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, keepalive_timeout=30),
        json_serialize=lambda o: orjson.dumps(o).decode(),
    )
    try:
        yield session
    finally:
        await session.close()


def metrics_app() -> web.Application:
    """The `/metrics` endpoint alone."""
    # Imported here: the serverless handler uses this module's clients, not aiohttp's server.
    from aiohttp import web

    async def serve(_: web.Request) -> web.Response:
        body, content_type = metrics.render()
        return web.Response(body=body, headers={"Content-Type": content_type})

    app = web.Application()
    app.router.add_get("/metrics", serve)
    return app


@contextlib.asynccontextmanager
async def metrics_server(host: str, port: int) -> AsyncIterator[None]:
    """`/metrics` on a port of its own, so it is never reachable through NGINX."""
    from aiohttp import web

    runner = web.AppRunner(metrics_app(), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, reuse_address=True).start()
        yield
    finally:
        await runner.cleanup()


# A process that is not serving this long after it began starting is stuck, not slow: start-up
# waits for nothing remote (Redis and RabbitMQ connect in the background).
STARTUP_DEADLINE = 45.0


def arm_startup_deadline(seconds: float | None = None) -> None:
    """Exit the process, with every thread's stack on stderr, unless `startup_done` comes
    within `seconds`.

    The watchdog is faulthandler's own thread, so it fires even when the event loop is blocked
    inside C code; the supervisor (supervisord, Kubernetes) then starts the process afresh, and
    the log says where it hung. A process stuck before it serves would otherwise sit there
    forever, alive to its supervisor and never ready.
    """
    seconds = STARTUP_DEADLINE if seconds is None else seconds
    faulthandler.dump_traceback_later(seconds, exit=True, file=sys.stderr)


def startup_done() -> None:
    """Disarm `arm_startup_deadline`: the process serves."""
    faulthandler.cancel_dump_traceback_later()


def stop_event() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT: the process's cue to drain and stop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


# How long a cancelled background task gets to stop. One that takes longer has swallowed its
# cancellation (a library turning it into an error that the task's loop retries, say): the
# shutdown goes on without it rather than hang, and its stack is logged to say where it was.
STOP_TIMEOUT = 5.0


async def cancel_and_wait(*tasks: asyncio.Task[object] | asyncio.Task[None]) -> None:
    """Cancel background tasks this process owns and wait until each has stopped, at most
    `STOP_TIMEOUT` seconds; an error a task ended with is raised, as awaiting it would."""
    for task in tasks:
        task.cancel()
    if not tasks:
        return
    _, stuck = await asyncio.wait(tasks, timeout=STOP_TIMEOUT)
    for task in stuck:
        stack = io.StringIO()
        task.print_stack(file=stack)
        log.error("task_did_not_stop", task=task.get_name(), stack=stack.getvalue())
    for task in tasks:
        if task.done() and not task.cancelled() and (error := task.exception()) is not None:
            raise error
