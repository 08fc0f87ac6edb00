"""GET /v1/users/{user_id}/replies?after=<cursor>&wait=<s>&limit=<n>: deferred replies.

A long poll (``wait`` > 0) is bounded by `bot.api.longpoll.LongPolls`, not by the load shedder.
"""

from __future__ import annotations

import re
from contextlib import nullcontext

from bot.api import web
from bot.api.keys import REPLICA, STATE
from bot.api.render import json_response
from bot.core.types import Reply
from bot.core.validation import check_id
from bot.errors import BadRequest
from bot.inbox import MAX_WAIT, PAGE, valid_cursor

ROUTE = "/v1/users/{user_id}/replies"
# ASCII only: str.isdigit() and float() accept other scripts' digits, which int() or Redis
# then refuse (a 500 once).
# No bound on the digits: 0.30000000000000004 is a valid wait (float() reads any length fast).
_WAIT_RE = re.compile(r"[0-9]+(\.[0-9]*)?([eE][+-]?[0-9]+)?")
_LIMIT_RE = re.compile(r"[0-9]{1,3}")


def one_query(request: web.Request, name: str) -> str | None:
    """The one value of query parameter `name`: given twice it is ambiguous, a 400."""
    values = request.query.getall(name, [])
    if len(values) > 1:
        raise BadRequest(f"{name} must be given at most once", code="invalid_query")
    return values[0] if values else None


def _wait(raw: str | None) -> float:
    if raw is None or raw == "":
        return 0.0
    wait = float(raw) if _WAIT_RE.fullmatch(raw) else -1.0
    if not 0 <= wait <= MAX_WAIT:
        raise BadRequest(
            f"wait must be a number of seconds from 0 to {MAX_WAIT:g}", code="invalid_wait"
        )
    return wait


def _limit(raw: str | None) -> int:
    if raw is None or raw == "":
        return PAGE
    if not _LIMIT_RE.fullmatch(raw) or not 1 <= int(raw) <= PAGE:
        raise BadRequest(f"limit must be an integer from 1 to {PAGE}", code="invalid_limit")
    return int(raw)


def cursor_after(raw: str | None) -> str:
    after = raw or "0"
    if not valid_cursor(after):
        raise BadRequest("after must be a cursor returned as next", code="invalid_cursor")
    return after


def is_long_poll(request: web.Request) -> bool:
    """A well-formed replies request with ``wait`` > 0 (the load shedder lets it by)."""
    resource = request.match_info.route.resource
    if resource is None or resource.canonical != ROUTE:
        return False
    try:
        return _wait(one_query(request, "wait")) > 0
    except BadRequest:
        return False


async def get_replies(request: web.Request) -> web.Response:
    """Replies after the cursor, oldest first; `wait` long-polls until one arrives."""
    user = check_id(request.match_info["user_id"], "user_id")
    after = cursor_after(one_query(request, "after"))
    wait = _wait(one_query(request, "wait"))
    limit = _limit(one_query(request, "limit"))
    replica, state = request.app[REPLICA], request.app[STATE]
    with replica.longpolls.slot(user) if wait > 0 else nullcontext():
        replies, cursor = await replica.inbox.page(
            user, after, wait=wait, limit=limit, stop=lambda: state.draining
        )
    return json_response({"replies": [_rendered(r) for r in replies], "next": cursor})


def _rendered(reply: Reply) -> dict[str, str]:
    """A reply as contract.md shows it (its kind and cursor stay inside)."""
    return {"message_id": reply.message_id, "reply": reply.reply, "at": reply.at}
