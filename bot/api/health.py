"""Liveness, readiness and the OpenAPI document."""

from __future__ import annotations

import asyncio

from aiohttp import web

from bot.api.keys import READINESS, STATE
from bot.api.render import json_response


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """200 when every dependency answers and the replica is not draining."""
    if request.app[STATE]["draining"]:
        return json_response({"status": "draining"}, 503, {"Retry-After": "1"})
    checks = request.app[READINESS]
    results = await asyncio.gather(*(check() for _, check in checks))
    deps = {name: ok for (name, _), ok in zip(checks, results, strict=True)}
    ready = all(deps.values())
    headers = {} if ready else {"Retry-After": "1"}
    return json_response(
        {"status": "ready" if ready else "unavailable", "dependencies": deps},
        200 if ready else 503,
        headers,
    )
