"""GET /v1/users/{user_id}/replies?after=<cursor>&wait=<s>&limit=<n>: deferred replies."""

from __future__ import annotations

from aiohttp import web
from redis.exceptions import RedisError

from bot.api.keys import SERVICE, STATE
from bot.api.render import json_response
from bot.core.validation import check_id
from bot.errors import BadRequest, Unavailable
from bot.inbox import CURSOR_RE, MAX_WAIT, PAGE


def _wait(raw: str | None) -> float:
    if raw is None or raw == "":
        return 0.0
    try:
        wait = float(raw)
    except ValueError:
        wait = -1.0
    if not 0 <= wait <= MAX_WAIT:
        raise BadRequest(
            f"wait must be a number of seconds from 0 to {MAX_WAIT:g}", code="invalid_wait"
        )
    return wait


def _limit(raw: str | None) -> int:
    if raw is None or raw == "":
        return PAGE
    if not raw.isdigit() or not 1 <= int(raw) <= PAGE:
        raise BadRequest(f"limit must be an integer from 1 to {PAGE}", code="invalid_limit")
    return int(raw)


async def get_replies(request: web.Request) -> web.Response:
    """Replies after the cursor, oldest first; `wait` long-polls until one arrives."""
    user = check_id(request.match_info["user_id"], "user_id")
    after = request.query.get("after") or "0"
    if not CURSOR_RE.fullmatch(after):
        raise BadRequest("after must be a cursor returned as next", code="invalid_cursor")
    wait = _wait(request.query.get("wait"))
    limit = _limit(request.query.get("limit"))
    inbox = request.app[SERVICE].inbox
    if inbox is None:
        raise Unavailable("deferred replies are unavailable right now", 5)
    state = request.app[STATE]
    try:
        replies, cursor = await inbox.page(
            user, after, wait=wait, limit=limit, stop=lambda: bool(state["draining"])
        )
    except RedisError:
        raise Unavailable("deferred replies are unavailable right now", 5) from None
    return json_response({"replies": [r.as_json() for r in replies], "next": cursor})
