"""GET /v1/openapi.json: the OpenAPI document of docs/openapi.yaml, served as JSON."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import orjson
from aiohttp.web_response import Response

if TYPE_CHECKING:
    from aiohttp.web_request import Request

OPENAPI_PATH = Path(__file__).resolve().parents[2] / "docs" / "openapi.yaml"


@cache
def openapi_json() -> bytes:
    """The document, parsed once per process."""
    # Imported here: only this route reads YAML, and a Lambda's cold start pays every import.
    import yaml

    return orjson.dumps(yaml.safe_load(OPENAPI_PATH.read_text()))


async def openapi(_: Request) -> Response:
    return Response(body=openapi_json(), content_type="application/json")
