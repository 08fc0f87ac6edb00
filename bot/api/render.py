"""JSON responses: one place builds bodies, so every answer has the same shape."""

from __future__ import annotations

from typing import Any

import orjson

from bot.api import web
from bot.errors import BotError


def json_response(
    body: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(body), status=status, headers=headers, content_type="application/json"
    )


def error_response(exc: BotError) -> web.Response:
    return json_response(
        {"error": {"code": exc.code, "message": exc.message}}, exc.status, exc.headers()
    )
