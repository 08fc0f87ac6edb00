"""POST /v1/messages: a JSON answer, or (`Accept: text/event-stream`) the answer streamed.

A streamed answer is Server-Sent Events: a `delta` event per piece of an upstream answer as
it arrives (`{"text": ...}`), then one `done` event whose data is the body the JSON answer
would have had. An answer with no pieces (a command, a cache hit, a replay, a queued job) is
just the `done` event. Errors found before the first event are the usual JSON errors; one
after it (rare: the answer is already flowing) is an `error` event with the same body.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp.http_exceptions import HttpProcessingError

from bot import metrics
from bot.api import web
from bot.api.keys import REPLICA
from bot.api.middleware import REQUEST_ID, authorize_user, require_json
from bot.api.render import json_response
from bot.core.service import BotService
from bot.core.types import Outcome, OutcomeKind
from bot.core.validation import Message, parse_message
from bot.errors import (
    MAX_BODY,
    BadRequest,
    BotError,
    Forbidden,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from bot.logging import get_logger

log = get_logger(__name__)
EVENT_STREAM = "text/event-stream"

# What a route does with a message's outcome besides answering it (the web chat's inbox).
Then = Callable[[Outcome], Awaitable[None]]

# The one place a message's outcome becomes an HTTP status.
STATUS: dict[OutcomeKind, int] = {"replied": 200, "queued": 202}


async def read_json(request: web.Request) -> Any:
    """The request body as JSON, or a 413/415/400 error."""
    require_json(request)
    return parse_json(await read_body(request))


async def read_body(request: web.Request) -> bytes:
    """The raw request body (what a platform signed), or a 413/415/400 error."""
    # aiohttp would inflate a gzip/deflate body itself, and a corrupt one failed the read
    # (a 500); bodies are small, so none is accepted compressed (RFC 7694: 415).
    if request.headers.get("Content-Encoding", "identity").strip().lower() != "identity":
        raise UnsupportedMediaType(
            "Content-Encoding is not supported: send the body uncompressed",
            code="unsupported_content_encoding",
        )
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise PayloadTooLarge()
    try:
        body = await request.read()
    except HttpProcessingError:  # a body the HTTP parser could not read (framing, coding)
        raise BadRequest("request body could not be read", code="invalid_body") from None
    if not body:
        raise BadRequest("request body is empty", code="invalid_json")
    return body


def parse_json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadRequest("request body is not valid JSON", code="invalid_json") from None


async def post_message(request: web.Request) -> web.StreamResponse:
    try:
        payload = await read_json(request)
        msg = parse_message(payload, request[REQUEST_ID])
        authorize_user(request, msg.user_id)
    except (BadRequest, Forbidden):
        metrics.MESSAGE["rejected"].inc()
        raise
    return await respond(request, msg)


async def respond(
    request: web.Request, msg: Message, then: Then | None = None
) -> web.StreamResponse:
    """Answer a parsed message as the client asked: JSON, or (`Accept: text/event-stream`)
    the answer streamed. `then` sees the outcome before the client does."""
    if EVENT_STREAM in request.headers.get("Accept", "").lower():
        return await _stream(request, request.app[REPLICA].service, msg, then)
    outcome, response = await answer(request, msg)
    if then is not None:
        await then(outcome)
    return response


async def answer(request: web.Request, msg: Message) -> tuple[Outcome, web.Response]:
    """Handle a parsed message: its outcome, and the JSON response that renders it."""
    service = request.app[REPLICA].service
    outcome = await service.handle(msg)
    return outcome, json_response(outcome.body, STATUS[outcome.kind], _headers(service, outcome))


def _headers(service: BotService, outcome: Outcome) -> dict[str, str]:
    headers: dict[str, str] = {}
    if outcome.rate is not None:
        headers.update(service.policy.headers(outcome.rate))
    if outcome.replayed:
        headers["Idempotent-Replayed"] = "true"
    if outcome.cache is not None:
        headers["X-Cache"] = outcome.cache
    return headers


class _Relay:
    """The event stream of one request, started by its first event."""

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.response: web.StreamResponse | None = None
        self.gone = False  # the client went away: the answer goes on without it

    async def event(self, name: str, data: Any, headers: dict[str, str] | None = None) -> None:
        if self.gone:
            return
        try:
            if self.response is None:
                self.response = web.StreamResponse(
                    headers={
                        "Content-Type": EVENT_STREAM,
                        "Cache-Control": "no-cache",
                        # NGINX passes each event on as it comes instead of buffering them.
                        "X-Accel-Buffering": "no",
                        "X-Request-ID": self.request[REQUEST_ID],
                        **(headers or {}),
                    }
                )
                await self.response.prepare(self.request)
            await self.response.write(
                b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"
            )
        except (ConnectionError, RuntimeError):  # reset, or the transport closed
            self.gone = True

    async def delta(self, piece: str) -> None:
        await self.event("delta", {"text": piece})


async def _stream(
    request: web.Request, service: BotService, msg: Message, then: Then | None
) -> web.StreamResponse:
    relay = _Relay(request)
    try:
        outcome = await service.handle(msg, relay.delta)
        if then is not None:
            await then(outcome)
    except BotError as exc:
        if relay.response is None:
            raise  # nothing sent yet: the usual JSON error
        await relay.event("error", {"error": {"code": exc.code, "message": exc.message}})
    except Exception:
        if relay.response is None:
            raise
        log.exception("stream_failed")
        await relay.event("error", {"error": {"code": "internal", "message": "internal error"}})
    else:
        await relay.event("done", outcome.body, _headers(service, outcome))
    assert relay.response is not None or relay.gone
    if relay.response is None:  # gone before anything was sent
        return web.Response(status=499)
    if not relay.gone:
        await relay.response.write_eof()
    return relay.response
