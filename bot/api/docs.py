"""GET /v1/openapi.json: the OpenAPI document of docs/openapi.yaml, served as JSON."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import orjson

from bot.api import web

OPENAPI_PATH = Path(__file__).resolve().parents[2] / "docs" / "openapi.yaml"


@cache
def openapi_json() -> bytes:
    """The document, parsed once per process."""
    # Imported here: only this route reads YAML, and a Lambda's cold start pays every import.
    import yaml

    return orjson.dumps(yaml.safe_load(OPENAPI_PATH.read_text()))


async def openapi(_: web.Request) -> web.Response:
    return web.Response(body=openapi_json(), content_type="application/json")
