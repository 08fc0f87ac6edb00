"""The web chat's API (``/chat/*``): a signed session cookie, messages, and live replies.

The page itself is static (``web/``, served by NGINX). ``POST /chat/session`` gives the
browser an HttpOnly, SameSite=Strict cookie (`bot.websession`); ``POST /chat/messages`` is
``POST /v1/messages`` for the user ``web:{session}``; ``GET /chat/events`` streams the
session's replies as Server-Sent Events from its inbox, each event's id the inbox cursor, so a
reconnect (``Last-Event-ID``) resumes exactly after the last event on whichever replica it
lands. An immediate answer is put in the inbox too, so every reply reaches every tab and a
reload shows the history. Streams wait on the replica's one `InboxWatch` (no Redis connection
each), are bounded apart from the message path, and close when the replica drains.

No API key: the cookie is the credential, and a request another site makes (its ``Origin``
not ours) is refused with ``403``.
"""

from __future__ import annotations

import contextlib
from typing import Any

import orjson
from aiohttp import web

from bot import metrics
from bot.api.keys import EVENTS_ROUTE, REPLICA, SETTINGS, SIGNER, STATE
from bot.api.messages import read_json, respond
from bot.api.middleware import REQUEST_ID, ClientGuard
from bot.api.render import json_response
from bot.api.replies import cursor_after, one_query
from bot.core.types import Outcome, Reply
from bot.core.validation import parse_message
from bot.errors import BadRequest, Forbidden, NotFound, Unauthorized
from bot.inbox import valid_cursor
from bot.websession import COOKIE, MAX_AGE, SessionSigner, user_id

SESSION_ROUTE = "/chat/session"
MESSAGES_ROUTE = "/chat/messages"
KEEPALIVE_S = 15.0  # an idle stream gets a comment this often (proxies close silent ones)
RECONNECT_MS = 1000  # the browser's wait before it reconnects a stream that closed


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_post(SESSION_ROUTE, post_session)
    router.add_post(MESSAGES_ROUTE, post_message)
    router.add_get(EVENTS_ROUTE, get_events)


def _signer(request: web.Request) -> SessionSigner:
    signer = request.app.get(SIGNER)
    if signer is None:
        raise NotFound("the web chat is off: set BOT_WEBCHAT_SECRET", code="webchat_disabled")
    return signer


def _own_origin(request: web.Request) -> str:
    """This site's origin as the browser sees it (NGINX forwards the Host and scheme)."""
    host, scheme = request.host, request.scheme
    if ClientGuard(request.app[SETTINGS].trusted_proxies).trusts_peer(request):
        host = request.headers.get("X-Forwarded-Host") or host
        scheme = request.headers.get("X-Forwarded-Proto") or scheme
    return f"{scheme}://{host}".lower()


def _same_site(request: web.Request) -> None:
    """403 for a request another site's page made (CSRF); clients without Origin pass."""
    origin = request.headers.get("Origin")
    if origin is None:
        if request.headers.get("Sec-Fetch-Site", "same-origin") in ("same-origin", "none"):
            return
    elif origin.lower() == _own_origin(request):
        return
    raise Forbidden("cross-site request refused", code="cross_site")


def _session(request: web.Request, signer: SessionSigner) -> str:
    session = signer.session(request.cookies.get(COOKIE))
    if session is None:
        raise Unauthorized("no web chat session: POST /chat/session first", code="no_session")
    return session


async def post_session(request: web.Request) -> web.Response:
    """Keep the session the cookie holds, or start one; the cookie is (re)set either way."""
    signer = _signer(request)
    _same_site(request)
    session = signer.session(request.cookies.get(COOKIE))
    created = session is None
    if session is None:
        session = signer.new_session()
    response = json_response({"status": "created" if created else "resumed"})
    response.set_cookie(
        COOKIE,
        signer.cookie(session),
        max_age=MAX_AGE,
        path="/chat/",
        httponly=True,
        samesite="Strict",
        secure=_own_origin(request).startswith("https:"),
    )
    response.headers["Cache-Control"] = "no-store"
    return response


async def post_message(request: web.Request) -> web.StreamResponse:
    """``POST /v1/messages`` for the session's user (streamed too, with ``Accept:
    text/event-stream``); its answer goes to the inbox as well, before the client has it."""
    signer = _signer(request)
    try:
        _same_site(request)
        session = _session(request, signer)
        payload = await read_json(request)
        if isinstance(payload, dict) and "user_id" in payload:
            raise BadRequest("user_id comes from the session", code="unknown_field")
        body: Any = {**payload, "user_id": user_id(session)} if isinstance(payload, dict) else []
        msg = parse_message(body, request[REQUEST_ID])
    except (BadRequest, Forbidden, Unauthorized):
        metrics.MESSAGE["rejected"].inc()
        raise

    async def deliver(outcome: Outcome) -> None:
        if outcome.kind == "replied":
            # Once per message id (inbox.lua): a replay or a second tab adds nothing.
            await request.app[REPLICA].inbox.deliver(
                msg.user_id, msg.message_id, outcome.body["reply"]
            )

    return await respond(request, msg, deliver)


def _frame(reply: Reply) -> bytes:
    data = {"message_id": reply.message_id, "reply": reply.reply, "at": reply.at}
    data["kind"] = reply.kind
    return b"id: %s\nevent: reply\ndata: %s\n\n" % (reply.cursor.encode(), orjson.dumps(data))


async def get_events(request: web.Request) -> web.StreamResponse:
    """The session's replies after ``Last-Event-ID`` (or ``?after=``, else all), then live."""
    signer = _signer(request)
    _same_site(request)
    session = _session(request, signer)
    after = cursor_after(one_query(request, "after"))
    last_id = request.headers.get("Last-Event-ID")  # the browser's, on a reconnect: it wins
    if last_id:
        if not valid_cursor(last_id):
            raise BadRequest("Last-Event-ID must be an event's id", code="invalid_cursor")
        after = last_id
    replica, state = request.app[REPLICA], request.app[STATE]
    user = user_id(session)
    with replica.streams.slot(user):
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-store",
                "X-Accel-Buffering": "no",  # NGINX passes each event on at once
                "X-Request-ID": request[REQUEST_ID],
            }
        )
        await response.prepare(request)
        transport = request.transport

        def stop() -> bool:
            return state.draining or transport is None or transport.is_closing()

        # When it ends (drain, storage gone), the browser reconnects from the last id it got.
        with contextlib.suppress(ConnectionError):  # the browser left
            await response.write(b"retry: %d\n\n" % RECONNECT_MS)
            async for replies in replica.inbox.follow(user, after, quiet=KEEPALIVE_S, stop=stop):
                frames = b"".join(_frame(r) for r in replies)
                await response.write(frames or b": keep-alive\n\n")
        return response
