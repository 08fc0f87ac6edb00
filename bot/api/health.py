"""Liveness and readiness.

Liveness (`/healthz`) says only that the process runs: nothing it depends on can fail it, so
a Redis outage or a busy replica never gets pods restarted. Readiness (`/readyz`) says whether
this replica can usefully take traffic: it can while RabbitMQ is down (jobs wait in the
outbox in Redis) and while Redis is down (commands and questions are still answered, limited
by the in-process limiter), so a dependency outage, which every replica sees at once, does
not pull them all; it is 503 only while draining. The dependencies are reported in the body
(and as `bot_dependency_up`) for operators. Neither is ever shed.
"""

from __future__ import annotations

import asyncio

from bot.api import web
from bot.api.keys import STATE
from bot.api.render import json_response


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """200 unless draining; the dependencies' state is information, not a verdict."""
    state = request.app[STATE]
    if state.draining:
        return json_response({"status": "draining"}, 503, {"Retry-After": "1"})
    checks = state.readiness
    results = await asyncio.gather(*(check() for _, check in checks))
    deps = {name: ok for (name, _), ok in zip(checks, results, strict=True)}
    return json_response({"status": "ready", "dependencies": deps})
