"""Preferences as a service: GET/PUT/DELETE /v1/users/{user_id}/prefs[/{key}]."""

from __future__ import annotations

from aiohttp import web
from redis.exceptions import RedisError

from bot.api.keys import STORE
from bot.api.messages import read_json
from bot.api.render import json_response
from bot.core.validation import check_id, check_pref_key, check_pref_value
from bot.errors import BadRequest, Conflict, Unavailable
from bot.store import MAX_PREFS, TooManyPrefs


def _user(request: web.Request) -> str:
    return check_id(request.match_info["user_id"], "user_id")


def _unavailable() -> Unavailable:
    return Unavailable("preferences are unavailable right now", 5)


async def get_prefs(request: web.Request) -> web.Response:
    user = _user(request)
    try:
        prefs = await request.app[STORE].prefs(user)
    except RedisError:
        raise _unavailable() from None
    return json_response({"prefs": prefs})


async def put_prefs(request: web.Request) -> web.Response:
    """Merge the given preferences into the user's; all or nothing."""
    user = _user(request)
    payload = await read_json(request)
    if not isinstance(payload, dict) or set(payload) != {"prefs"}:
        raise BadRequest('body must be {"prefs": {"key": "value", ...}}', code="invalid_body")
    values = payload["prefs"]
    if not isinstance(values, dict):
        raise BadRequest("prefs must be an object of strings", code="invalid_body")
    if len(values) > MAX_PREFS:
        raise BadRequest(f"at most {MAX_PREFS} preferences per user", code="too_many_prefs")
    clean = {check_pref_key(k): check_pref_value(v) for k, v in values.items()}
    try:
        prefs = await request.app[STORE].set_prefs(user, clean)
    except TooManyPrefs as exc:
        # The request is valid on its own (at most 100 keys): what refuses it is what the
        # user already has, so 409, not the 400 of an ill-formed request.
        raise Conflict(str(exc), code="too_many_prefs") from None
    except RedisError:
        raise _unavailable() from None
    return json_response({"prefs": prefs})


async def delete_prefs(request: web.Request) -> web.Response:
    user = _user(request)
    try:
        await request.app[STORE].del_prefs(user)
    except RedisError:
        raise _unavailable() from None
    return web.Response(status=204)


async def delete_pref(request: web.Request) -> web.Response:
    user = _user(request)
    key = check_pref_key(request.match_info["key"])
    try:
        await request.app[STORE].del_prefs(user, key)
    except RedisError:
        raise _unavailable() from None
    return web.Response(status=204)


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/v1/users/{user_id}/prefs", get_prefs)
    router.add_put("/v1/users/{user_id}/prefs", put_prefs)
    router.add_delete("/v1/users/{user_id}/prefs", delete_prefs)
    router.add_delete("/v1/users/{user_id}/prefs/{key}", delete_pref)
