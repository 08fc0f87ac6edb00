"""The bot on AWS Lambda behind an API Gateway HTTP API: `handler(event, context)`.

The same API as a replica's, from the same code: an event becomes a request
(`bot.api.gateway`), the routes' table (`bot.api.routes`) picks the handler, and the
replica's middleware (`bot.api.middleware.build`: request id, API keys, error rendering)
runs around it; the answer goes back as API Gateway's result. The components are the
replica's (`bot.api.wiring.build`): state in Redis, failed questions to RabbitMQ or, while it
is away, the Redis outbox, channel updates to RabbitMQ, so the retry worker and the channels'
delivery path (running beside, on the replica stack or as a service of their own) answer
them as they answer the replicas'.

One container serves one invocation at a time and is frozen between them. Its clients
(Redis, the HTTP session, the broker connection) are made once, on its first invocation, on
one event loop that lives as long as the container, and reused by every invocation after
(deliberately module state: a Lambda container has no other place to keep them). Nothing runs
between invocations: no outbox relay (the worker's relays publish what waits there), no
heartbeat (a frozen container cannot beat, so its claims lapse with their lease). The
webhooks answer once the update is queued, as on a replica: Slack's 3 s and Discord's
deferral are met by queueing, never by work after the function returned (a frozen function
does none).

The web chat (``/chat/*``) is not served here: its event stream needs a held connection.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from typing import Any

from aiohttp.typedefs import Middleware

from bot import metrics, runtime
from bot.api import gateway, middleware
from bot.api.keys import CHANNELS, HTTP, REDIS, REPLICA, SETTINGS, STATE, ReplicaState
from bot.api.render import error_response
from bot.api.routes import ROUTES
from bot.api.wiring import build, replica_broker
from bot.errors import BadRequest, Misconfigured
from bot.inbox import Inbox
from bot.logging import configure, get_logger
from bot.retries.broker import Broker
from bot.settings import Settings, SettingsError, load_settings

__all__ = ["Container", "handler", "shutdown"]

log = get_logger(__name__)
# How long a container's first invocation waits for RabbitMQ before it serves anyway (a
# question that fails meanwhile waits in the outbox; a channel update is refused with 503).
BROKER_WAIT = 2.0


class Container:
    """What one Lambda container holds across its invocations: settings, clients,
    components, router and middleware, made once."""

    def __init__(
        self,
        settings: Settings,
        app: Mapping[Any, Any],
        middleware: Middleware,
        broker: Broker,
        stack: contextlib.AsyncExitStack,
    ) -> None:
        self.settings = settings
        self.app = app
        self.middleware = middleware
        self.broker = broker
        self.router = gateway.Router(ROUTES)
        self._stack = stack

    @classmethod
    async def start(
        cls, settings: Settings, name: str = "bot-lambda", *, broker_wait: float = BROKER_WAIT
    ) -> Container:
        """Clients and components for `settings`; waits up to `broker_wait` s for RabbitMQ."""
        stack = contextlib.AsyncExitStack()
        # One request at a time: the replica's auto-pipelining would batch nothing.
        redis = await stack.enter_async_context(runtime.redis_client(settings.redis_url))
        http = await stack.enter_async_context(runtime.http_client(limit=20))
        broker = replica_broker(settings, f"{name}-{settings.queue_prefix}")
        stack.push_async_callback(broker.close)
        # No watch: a long poll reads with XREAD BLOCK in slices on the shared client.
        parts = build(settings, redis, http, broker, Inbox(redis))
        state = ReplicaState(readiness=parts.readiness)
        app = {
            SETTINGS: settings,
            STATE: state,
            REDIS: redis,
            HTTP: http,
            REPLICA: parts.replica,
            CHANNELS: parts.channels,
        }
        metrics.init()
        await broker.start()
        await broker.wait_declared(broker_wait)
        return cls(settings, app, middleware.build(settings), broker, stack)

    async def serve(self, event: object) -> Any:
        """The API Gateway answer to one event."""
        try:
            checked = gateway.check_event(event)
            request = gateway.request_from_event(checked, self.app)
        except BadRequest as exc:
            return gateway.refusal(exc)
        handler, request.match_info = self.router.resolve(request.method, request.path)
        # The handlers read only what `GatewayRequest` has of aiohttp's request (the same
        # table of requests, replayed against both, holds them to it: tests/test_serverless).
        response = await self.middleware(request, handler)  # type: ignore[arg-type]
        return gateway.result(response, stream=request.stream, head=request.method == "HEAD")

    async def close(self) -> None:
        """Close every client (tests; a Lambda container is simply frozen, then gone)."""
        await self._stack.aclose()


class _Process:
    """The container's one event loop and `Container`, made on first use."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.container: Container | None = None

    def run(self, event: object) -> Any:
        if self.loop is None:
            self.loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self.loop)
        return self.loop.run_until_complete(self._serve(event))

    async def _serve(self, event: object) -> Any:
        if self.container is None:
            try:
                settings = load_settings()
            except SettingsError as exc:
                # One line naming the setting (its value may be a secret), and a JSON 503 for
                # every invocation until a deploy fixes it (the next one reads it again).
                log.error("settings_invalid", setting=exc.name)
                return gateway.result(error_response(Misconfigured(exc.name)))
            configure(
                settings.log_format, settings.log_level, settings.secrets, service="bot-lambda"
            )
            self.container = await Container.start(settings)
            log.info("lambda_container_started", prefix=settings.queue_prefix)
        return await self.container.serve(event)

    def close(self) -> None:
        """Close the container's clients and the loop (Lambda itself just freezes them)."""
        if self.loop is None:
            return
        if self.container is not None:
            self.loop.run_until_complete(self.container.close())
            self.container = None
        self.loop.close()
        self.loop = None
        asyncio.set_event_loop(None)


_PROCESS = _Process()


def handler(event: object, context: object) -> Any:
    """AWS Lambda's entry point (`bot.serverless.handler`) for API Gateway HTTP API events."""
    return _PROCESS.run(event)


def shutdown() -> None:
    """Close what `handler` made (benchmarks and tests: a process that outlives its use)."""
    _PROCESS.close()
