"""POST /v1/messages."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from bot import metrics
from bot.api.keys import SERVICE
from bot.api.middleware import REQUEST_ID, authorize_user, require_json
from bot.api.render import json_response
from bot.core.validation import parse_message
from bot.errors import BadRequest, Forbidden, PayloadTooLarge

MAX_BODY = 64 * 1024


async def read_json(request: web.Request) -> Any:
    """The request body as JSON, or a 413/415/400 error."""
    require_json(request)
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise PayloadTooLarge("request body is larger than 64 KiB")
    body = await request.read()
    if not body:
        raise BadRequest("request body is empty", code="invalid_json")
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
    service = request.app[SERVICE]
    outcome = await service.handle(msg)
    headers: dict[str, str] = {}
    if outcome.rate is not None:
        headers.update(outcome.rate.headers(service.policy))
    if outcome.replayed:
        headers["Idempotent-Replayed"] = "true"
    if outcome.cache is not None:
        headers["X-Cache"] = outcome.cache
    return json_response(outcome.body, outcome.status, headers)
