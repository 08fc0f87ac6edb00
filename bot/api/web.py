"""The part of `aiohttp.web` the API's handlers and middleware use, without aiohttp's server.

`aiohttp.web` imports the server (protocol, runner, router) with it; the handlers need only
the response types, the typed keys and the HTTP exceptions, so that the serverless handler
(`bot.serverless`), which serves them without a server, imports no more. The request type
is for annotations only: the aiohttp app hands the handlers aiohttp's `Request`, the
serverless handler its `GatewayRequest` (`bot.api.gateway`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp.helpers import AppKey, RequestKey
from aiohttp.web_exceptions import (
    HTTPException,
    HTTPMethodNotAllowed,
    HTTPNotFound,
    HTTPRequestEntityTooLarge,
)
from aiohttp.web_response import Response, StreamResponse

if TYPE_CHECKING:
    from aiohttp.web_request import Request
    from aiohttp.web_urldispatcher import UrlDispatcher

__all__ = [
    "AppKey",
    "HTTPException",
    "HTTPMethodNotAllowed",
    "HTTPNotFound",
    "HTTPRequestEntityTooLarge",
    "Request",
    "RequestKey",
    "Response",
    "StreamResponse",
    "UrlDispatcher",
]
