"""Preferences as a service: GET/PUT/DELETE /v1/users/{user_id}/prefs[/{key}].

Errors are the middleware's to render: a `RedisError` is a 503, `TooManyPrefs` a 400 (a 409
when the keys the user already has are what exceeds the limit).
"""

from __future__ import annotations

from bot.api import web
from bot.api.keys import REPLICA
from bot.api.messages import read_json
from bot.api.render import json_response
from bot.core.validation import check_id, check_pref_key, check_pref_value
from bot.errors import BadRequest, Conflict
from bot.store import MAX_PREFS, TooManyPrefs


def _user(request: web.Request) -> str:
    return check_id(request.match_info["user_id"], "user_id")


async def get_prefs(request: web.Request) -> web.Response:
    prefs = await request.app[REPLICA].store.prefs(_user(request))
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
    if len(values) > MAX_PREFS:  # before checking each of them
        raise TooManyPrefs()
    clean = {check_pref_key(k): check_pref_value(v) for k, v in values.items()}
    request.app[REPLICA].service.check_prefs(clean)
    try:
        prefs = await request.app[REPLICA].store.set_prefs(user, clean)
    except TooManyPrefs as exc:
        # The request is valid on its own (at most 100 keys): what refuses it is what the
        # user already has, so 409, not the 400 of an ill-formed request.
        raise Conflict(exc.message, code="too_many_prefs") from None
    return json_response({"prefs": prefs})


async def delete_prefs(request: web.Request) -> web.Response:
    await request.app[REPLICA].store.del_prefs(_user(request))
    return web.Response(status=204)


async def delete_pref(request: web.Request) -> web.Response:
    user = _user(request)
    await request.app[REPLICA].store.del_prefs(user, check_pref_key(request.match_info["key"]))
    return web.Response(status=204)
