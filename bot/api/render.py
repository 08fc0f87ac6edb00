"""JSON responses: one place builds bodies, so every answer has the same shape."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp.web_response import Response

from bot.errors import BotError


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        body=orjson.dumps(body), status=status, headers=headers, content_type="application/json"
    )


def error_response(exc: BotError) -> Response:
    return json_response(
        {"error": {"code": exc.code, "message": exc.message}}, exc.status, exc.headers()
    )
