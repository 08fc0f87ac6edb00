"""POST /v1/messages."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from bot import metrics
from bot.api.keys import REPLICA
from bot.api.middleware import REQUEST_ID, authorize_user, require_json
from bot.api.render import json_response
from bot.core.types import OutcomeKind
from bot.core.validation import parse_message
from bot.errors import MAX_BODY, BadRequest, Forbidden, PayloadTooLarge, UnsupportedMediaType

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


async def post_message(request: web.Request) -> web.Response:
    try:
        payload = await read_json(request)
        msg = parse_message(payload, request[REQUEST_ID])
        authorize_user(request, msg.user_id)
    except (BadRequest, Forbidden):
        metrics.MESSAGES.labels(outcome="rejected").inc()
        raise
    service = request.app[REPLICA].service
    outcome = await service.handle(msg)
    headers: dict[str, str] = {}
    if outcome.rate is not None:
        headers.update(service.policy.headers(outcome.rate))
    if outcome.replayed:
        headers["Idempotent-Replayed"] = "true"
    if outcome.cache is not None:
        headers["X-Cache"] = outcome.cache
    return json_response(outcome.body, STATUS[outcome.kind], headers)
