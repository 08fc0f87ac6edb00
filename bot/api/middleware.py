"""Middlewares: request id and log context, metrics, load shedding, API keys, errors."""

from __future__ import annotations

import hmac
import re
import time
import uuid

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from bot import metrics
from bot.api.keys import SETTINGS, STATE
from bot.api.render import error_response
from bot.errors import (
    BadRequest,
    BotError,
    HttpError,
    MethodNotAllowed,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    Unauthorized,
    UnsupportedMediaType,
)
from bot.logging import get_logger

log = get_logger(__name__)
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9_.:@-]{1,128}")
REQUEST_ID = "request_id"


def _route(request: web.Request) -> str:
    info = request.match_info
    if info.http_exception is not None or info.route.resource is None:
        return "unmatched"
    return info.route.resource.canonical


@web.middleware
async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bind a request id, count and time the request, and render every error as JSON."""
    rid = request.headers.get("X-Request-ID", "")
    if not _REQUEST_ID_RE.fullmatch(rid):
        rid = uuid.uuid4().hex
    request[REQUEST_ID] = rid
    structlog.contextvars.bind_contextvars(request_id=rid)
    route = _route(request)
    started = time.perf_counter()
    try:
        response = await _guarded(request, handler)
    finally:
        structlog.contextvars.unbind_contextvars("request_id")
    response.headers["X-Request-ID"] = rid
    elapsed = time.perf_counter() - started
    metrics.HTTP_REQUESTS.labels(route, request.method, str(response.status)).inc()
    metrics.HTTP_DURATION.labels(route, request.method).observe(elapsed)
    return response


async def _guarded(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except BotError as exc:
        return error_response(exc)
    except web.HTTPRequestEntityTooLarge:
        return error_response(PayloadTooLarge("request body is larger than 64 KiB"))
    except web.HTTPMethodNotAllowed as exc:
        return error_response(
            MethodNotAllowed(f"{request.method} is not allowed here", tuple(exc.allowed_methods))
        )
    except web.HTTPNotFound:
        return error_response(NotFound("no such route"))
    except web.HTTPException as exc:
        if exc.status >= 500:
            raise
        return error_response(HttpError(exc.status, exc.reason))
    except Exception:
        log.exception("unhandled_error", path=request.path)
        return error_response(BotError("internal error"))


@web.middleware
async def shed(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse work beyond `BOT_MAX_INFLIGHT` requests in flight, before doing any."""
    state = request.app[STATE]
    if state["inflight"] >= request.app[SETTINGS].max_inflight:
        if request.path == "/v1/messages":
            metrics.MESSAGES.labels(outcome="shed").inc()
        raise Overloaded("this replica is busy; try again", 1)
    state["inflight"] += 1
    metrics.INFLIGHT.inc()
    try:
        return await handler(request)
    finally:
        state["inflight"] -= 1
        metrics.INFLIGHT.dec()


@web.middleware
async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    """With `BOT_API_KEYS` set, every ``/v1/*`` route needs ``Authorization: Bearer <key>``."""
    keys = request.app[SETTINGS].api_keys
    if keys and request.path.startswith("/v1/"):
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise Unauthorized("missing bearer token", code="missing_api_key")
        presented = given.strip().encode()
        # Compare against every key, always, in constant time per key.
        ok = False
        for key in keys:
            ok |= hmac.compare_digest(presented, key.encode())
        if not ok:
            raise Unauthorized("invalid API key", code="invalid_api_key")
    return await handler(request)


def require_json(request: web.Request) -> None:
    """415 unless the body is declared as JSON."""
    if request.content_type != "application/json":
        raise UnsupportedMediaType("Content-Type must be application/json")


__all__ = ["BadRequest", "authenticate", "observe", "require_json", "shed"]
