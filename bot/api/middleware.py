"""Middlewares: request id and log context, metrics, load shedding, API keys, errors.

`build(settings)` configures them once; nothing is parsed per request that could be parsed
at start.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from functools import lru_cache

import structlog
from aiohttp.typedefs import Handler, Middleware
from redis.exceptions import RedisError

from bot import metrics
from bot.api import web
from bot.api.keys import EVENTS_ROUTE, MESSAGES_ROUTE, REPLICA, STATE
from bot.api.render import error_response
from bot.api.replies import is_long_poll
from bot.channels.wire import header_bytes
from bot.errors import (
    BadRequest,
    BotError,
    Forbidden,
    HttpError,
    MethodNotAllowed,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    RateLimited,
    StorageUnavailable,
    Unauthorized,
    UnsupportedMediaType,
)
from bot.logging import get_logger
from bot.settings import ApiKey, IpNetwork, Settings

log = get_logger(__name__)
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9_.:@-]{1,128}")
REQUEST_ID = web.RequestKey("request_id", str)
API_KEY = web.RequestKey("api_key", ApiKey)  # the key a request presented (when keys are set)
_PROBES = frozenset(("/healthz", "/readyz"))
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# What runs inside `observe`: given the request and the next handler, answers or raises.
Gate = Callable[["web.Request", Handler], Awaitable[web.StreamResponse]]


def _route(request: web.Request) -> str:
    info = request.match_info
    if info.http_exception is not None or info.route.resource is None:
        return "unmatched"
    return info.route.resource.canonical


def _request_id(given: str) -> str:
    """The request's id: the client's (or the edge's) when well formed; for an ill-formed one,
    an id derived from it, the same on every attempt of the request (an edge that passes the
    client's header as it is, like ingress-nginx, resends it to another replica after a
    failure: a fresh id there would make one message two); a fresh one when there is none."""
    if _REQUEST_ID_RE.fullmatch(given):
        return given
    if not given:
        return uuid.uuid4().hex
    digest = hashlib.blake2b(header_bytes(given), digest_size=16)
    return "x-" + digest.hexdigest()


async def observe(
    request: web.Request, handler: Handler, inner: Gate | None = None
) -> web.StreamResponse:
    """Bind a request id, count and time the request, and render every error as JSON.

    `inner` (shedding and the key check) runs inside it, so its errors are rendered too.
    """
    rid = _request_id(request.headers.get("X-Request-ID", ""))
    request[REQUEST_ID] = rid
    structlog.contextvars.bind_contextvars(request_id=rid)
    started = time.perf_counter()
    try:
        if inner is None:
            response = await handler(request)
        else:
            response = await inner(request, handler)
    except Exception as exc:  # every error is rendered (or re-raised) by _error_response
        response = _error_response(request, exc)
    finally:
        structlog.contextvars.unbind_contextvars("request_id")
    response.headers["X-Request-ID"] = rid
    metrics.HTTP.observe(
        _route(request), request.method, response.status, time.perf_counter() - started
    )
    return response


def _error_response(request: web.Request, exc: Exception) -> web.StreamResponse:
    """The JSON answer to an error a handler raised (called while it is being handled)."""
    if isinstance(exc, BotError):
        return error_response(exc)
    if isinstance(exc, RedisError):  # Redis down or refusing: the one place that says so
        log.warning("storage_unavailable", path=request.path, error=type(exc).__name__)
        return error_response(StorageUnavailable())
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return error_response(PayloadTooLarge())
    if isinstance(exc, web.HTTPMethodNotAllowed):
        return error_response(
            MethodNotAllowed(f"{request.method} is not allowed here", tuple(exc.allowed_methods))
        )
    if isinstance(exc, web.HTTPNotFound):
        return error_response(NotFound("no such route"))
    if isinstance(exc, web.HTTPException):
        if exc.status >= 500:
            raise exc
        return error_response(HttpError(exc.status, exc.reason))
    log.exception("unhandled_error", path=request.path)
    return error_response(BotError("internal error"))


def _never_shed(request: web.Request) -> bool:
    """Probes, long polls and event streams (bounded apart: `bot.api.longpoll`)."""
    return request.path in _PROBES or request.path == EVENTS_ROUTE or is_long_poll(request)


def shed(max_inflight: int, inner: Gate) -> Gate:
    """Refuse work beyond `max_inflight` requests in flight, before doing any; then `inner`.

    Liveness and readiness are never shed (a busy replica is alive, and shedding its probe
    would get it restarted or pulled just when it is needed), nor are long polls.
    """

    async def gate(request: web.Request, handler: Handler) -> web.StreamResponse:
        if _never_shed(request):
            return await inner(request, handler)
        state = request.app[STATE]
        if state.inflight >= max_inflight:
            if _route(request) == MESSAGES_ROUTE:
                metrics.MESSAGE["shed"].inc()
            raise Overloaded("this replica is busy; try again", 1)
        state.inflight += 1
        try:
            return await inner(request, handler)
        finally:
            state.inflight -= 1

    return gate


def authenticate(
    api_keys: tuple[ApiKey, ...], trusted_proxies: tuple[IpNetwork, ...], *, open_api: bool
) -> Gate:
    """Who may use ``/v1/*``: a key of `BOT_API_KEYS` (then its rate limit), else loopback.

    With keys set, every ``/v1/*`` route needs ``Authorization: Bearer <key>``, compared in
    constant time against every key; a key limited to a user_id prefix may only name such
    users (the path's here, the body's in `authorize_user`). Without keys, only loopback
    clients are served unless `BOT_OPEN_API` is set (secure by default, as Redis's
    protected mode is).
    """
    keys = tuple((k.digest, k) for k in api_keys)
    guard = ClientGuard(trusted_proxies)

    async def gate(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith("/v1/"):
            return await handler(request)
        if not keys:
            if not open_api and not guard.is_loopback(request):
                raise Forbidden(
                    "without BOT_API_KEYS the API answers loopback clients only: set "
                    "BOT_API_KEYS (or BOT_OPEN_API=1 to serve it unkeyed)",
                    code="api_keys_required",
                )
            return await handler(request)
        key = _match(keys, request.headers.get("Authorization", ""))
        request[API_KEY] = key
        user = request.match_info.get("user_id")
        if user is not None:
            authorize_user(request, user)
        await _take_key_token(request, key)
        return await handler(request)

    return gate


def _match(keys: tuple[tuple[bytes, ApiKey], ...], header: str) -> ApiKey:
    """The key the header presents, or `Unauthorized`; same work whichever key (if any)."""
    scheme, _, given = header.partition(" ")
    given = given.strip()
    if scheme.lower() != "bearer" or not given:
        raise Unauthorized("missing bearer token", code="missing_api_key")
    # Keys are ASCII (settings): a header with any other byte (aiohttp hands those over as
    # surrogates, which would not even encode) matches none.
    if not given.isascii():
        raise Unauthorized("invalid API key", code="invalid_api_key")
    presented = hashlib.sha256(given.encode()).digest()
    found: ApiKey | None = None
    for digest, key in keys:  # every key, always: the time does not say which matched
        if hmac.compare_digest(presented, digest):
            found = key
    if found is None:
        raise Unauthorized("invalid API key", code="invalid_api_key")
    return found


def authorize_user(request: web.Request, user_id: str) -> None:
    """403 when the request's key is limited to a user_id prefix that `user_id` lacks."""
    key = request.get(API_KEY)
    if key is not None and not key.allows(user_id):
        raise Forbidden(
            f"this API key acts only for users starting {key.prefix!r}", code="user_not_allowed"
        )


async def _take_key_token(request: web.Request, key: ApiKey) -> None:
    """The per-key (per-integration) limit: rotating user_ids does not get around it."""
    limiter = request.app[REPLICA].key_limiter
    if limiter is None:
        return
    state = await limiter.check(key.ident)
    if state.retry_after_s > 0:
        if _route(request) == MESSAGES_ROUTE:
            metrics.MESSAGE["rate_limited"].inc()
        raise RateLimited(
            "this API key sends too fast; slow down",
            state.retry_after_s,
            extra=limiter.policy.headers(state),
            code="key_rate_limited",
        )


class ClientGuard:
    """Decides whether a request comes from a loopback client.

    The TCP peer is the client unless it is a proxy we trust (the loopback, where NGINX runs
    natively, or `BOT_TRUSTED_PROXIES`): then its ``X-Real-IP`` (NGINX sets it to
    ``$remote_addr``) names the client. A trusted peer's missing header means the peer itself
    is the client; an unparsable one is not loopback.
    """

    def __init__(self, trusted: tuple[IpNetwork, ...]) -> None:
        self._trusted = trusted
        # Decided once per (peer, X-Real-IP) text: parsing the addresses of every request
        # cost a twentieth of a replica's CPU, and a few pairs make nearly all requests.
        self._decided = lru_cache(maxsize=1024)(self._is_loopback)

    def trusts_peer(self, request: web.Request) -> bool:
        """Whether the TCP peer is a proxy we trust (its forwarding headers count)."""
        return self._trusted_peer(_address(request.remote))

    def _trusted_peer(self, peer: IpAddress | None) -> bool:
        return peer is not None and (peer.is_loopback or any(peer in n for n in self._trusted))

    def client(self, peer_text: str | None, real: str | None) -> IpAddress | None:
        peer = _address(peer_text)
        if not self._trusted_peer(peer):
            return peer
        return peer if real is None else _address(real.strip())

    def _is_loopback(self, peer_text: str | None, real: str | None) -> bool:
        client = self.client(peer_text, real)
        return client is not None and client.is_loopback

    def is_loopback(self, request: web.Request) -> bool:
        return self._decided(request.remote, request.headers.get("X-Real-IP"))


def _address(text: str | None) -> IpAddress | None:
    if not text:
        return None
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def build(settings: Settings) -> Middleware:
    """The replica's one middleware, configured once from the settings: `observe` around
    `shed` around `authenticate` (one layer, not three: each layer costs every request).

    A plain function of (request, handler): the aiohttp app registers it as its middleware,
    the serverless handler (`bot.serverless`) calls it around the routed handler.
    """
    inner = shed(
        settings.max_inflight,
        authenticate(settings.api_keys, settings.trusted_proxies, open_api=settings.open_api),
    )

    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        return await observe(request, handler, inner)

    return middleware


def require_json(request: web.Request) -> None:
    """415 unless the body is declared as JSON."""
    if request.content_type != "application/json":
        raise UnsupportedMediaType("Content-Type must be application/json")


__all__ = [
    "BadRequest",
    "authenticate",
    "authorize_user",
    "build",
    "observe",
    "require_json",
    "shed",
]
