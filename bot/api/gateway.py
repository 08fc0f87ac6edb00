"""API Gateway HTTP API events (payload format 2.0) as the API's requests, and back.

Two conversion functions, in (`request_from_event`) and out (`result`), as bolt-python's
adapters are, and the routing aiohttp's router does for the app, so the API's own handlers
and middleware answer an event exactly as they answer a request on a replica. Nothing here
imports aiohttp's server: `GatewayRequest` is what those handlers read of
`aiohttp.web.Request` (headers, path, query, match info, body, peer, per-request values), no
more.

A REST API (payload 1.0) event has no ``version: "2.0"``: `check_event` refuses it with a
400 that names the format served.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable, Mapping
from typing import Any

from aiohttp.helpers import HeadersMixin
from aiohttp.http import HttpVersion11
from aiohttp.typedefs import Handler
from multidict import CIMultiDict, CIMultiDictProxy, MultiDictProxy
from yarl import URL

from bot.api.render import error_response
from bot.api.routes import Route
from bot.api.web import Response, StreamResponse
from bot.errors import MAX_BODY, BadRequest, MethodNotAllowed, NotFound, PayloadTooLarge

PAYLOAD_VERSION = "2.0"
# An HTTP method: a token (RFC 9110).
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,32}")
# A `{name}` of an aiohttp path template matches one segment (aiohttp's own pattern).
_VARIABLE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
# Set by the transport (aiohttp's, when a streamed answer is prepared), not by the handlers:
# API Gateway frames and dates the answer itself.
_TRANSPORT = frozenset(
    ("connection", "keep-alive", "transfer-encoding", "content-length", "date", "server")
)


class UnsupportedEvent(BadRequest):
    """An event that is not an HTTP API payload 2.0 request."""

    def __init__(self, what: str) -> None:
        super().__init__(
            f"{what}: this function serves API Gateway HTTP API events with payload format "
            "version 2.0 (a REST API, or an HTTP API integration set to payload 1.0, sends "
            "1.0 events)",
            code="unsupported_event",
        )


def check_event(event: object) -> dict[str, Any]:
    """The event, when it is an HTTP API payload 2.0 request; else `UnsupportedEvent`."""
    if not isinstance(event, dict):
        raise UnsupportedEvent("the event is not a JSON object")
    version = event.get("version")
    if version != PAYLOAD_VERSION:
        what = "a payload 1.0 (REST API) event" if "httpMethod" in event else "an unknown event"
        raise UnsupportedEvent(f"{what}, version {version!r}")
    context = event.get("requestContext")
    http = context.get("http") if isinstance(context, dict) else None
    if not isinstance(http, dict) or not isinstance(http.get("method"), str):
        raise UnsupportedEvent("a payload 2.0 event without requestContext.http")
    # API Gateway never sends the rest otherwise; a direct invoke might. Strings must also be
    # encodable: JSON carries lone surrogates, which no HTTP request can.
    if not _TOKEN.fullmatch(http["method"]):
        raise UnsupportedEvent("a payload 2.0 event whose method is not an HTTP token")
    for field in ("rawPath", "rawQueryString", "body"):
        if not _text(event.get(field, "")):
            raise UnsupportedEvent(f"a payload 2.0 event whose {field} is not a string")
    if not _text(http.get("path", "")) or not _text(http.get("sourceIp", "")):
        raise UnsupportedEvent("a payload 2.0 event whose path or sourceIp is not a string")
    headers = event.get("headers") or {}
    if not isinstance(headers, dict) or not all(map(_text, [*headers, *headers.values()])):
        raise UnsupportedEvent("a payload 2.0 event whose headers are not strings")
    cookies = event.get("cookies") or []
    if not isinstance(cookies, list) or not all(map(_text, cookies)):
        raise UnsupportedEvent("a payload 2.0 event whose cookies are not a list of strings")
    return event


def _text(value: object) -> bool:
    """A string (or null) that is valid Unicode: no lone surrogate."""
    if value is None:
        return True
    if not isinstance(value, str):
        return False
    if value.isascii():
        return True
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


class _Resource:
    __slots__ = ("canonical",)

    def __init__(self, canonical: str) -> None:
        self.canonical = canonical  # the route's template, as metrics and `is_long_poll` read


class _MatchedRoute:
    __slots__ = ("resource",)

    def __init__(self, resource: _Resource | None) -> None:
        self.resource = resource


class MatchInfo(dict[str, str]):
    """The path's variables, and the route they matched (aiohttp's `UrlMappingMatchInfo`)."""

    def __init__(
        self, values: Mapping[str, str], canonical: str | None, failed: BaseException | None
    ) -> None:
        super().__init__(values)
        self.route = _MatchedRoute(None if canonical is None else _Resource(canonical))
        self.http_exception = failed  # set when no route answers (404, 405)


class Router:
    """Routes a method and path to a handler as aiohttp's router does: `{name}` is one
    segment, a GET route answers HEAD too, a known path with another method is a 405 with
    `Allow`, anything else a 404 (both raised inside the middleware, so rendered by it)."""

    def __init__(self, routes: Iterable[Route]) -> None:
        resources: dict[str, dict[str, Handler]] = {}
        for route in routes:
            methods = resources.setdefault(route.path, {})
            methods[route.method] = route.handler
            if route.method == "GET":
                methods.setdefault("HEAD", route.handler)
        self._resources = [(_pattern(path), path, methods) for path, methods in resources.items()]

    def resolve(self, method: str, path: str) -> tuple[Handler, MatchInfo]:
        for pattern, canonical, methods in self._resources:
            found = pattern.fullmatch(path)
            if found is None:
                continue
            handler = methods.get(method)
            if handler is None:
                refused = MethodNotAllowed(f"{method} is not allowed here", tuple(methods))
                return _raiser(refused), MatchInfo({}, None, refused)
            values = {k: _unquote_path_safe(v) for k, v in found.groupdict().items()}
            return handler, MatchInfo(values, canonical, None)
        missing = NotFound("no such route")
        return _raiser(missing), MatchInfo({}, None, missing)


def _pattern(template: str) -> re.Pattern[str]:
    parts, at = [], 0
    for var in _VARIABLE.finditer(template):
        parts += [re.escape(template[at : var.start()]), f"(?P<{var.group(1)}>[^{{}}/]+)"]
        at = var.end()
    return re.compile("".join([*parts, re.escape(template[at:])]))


def _unquote_path_safe(value: str) -> str:
    # What aiohttp does to a matched segment of `URL.path_safe` (%2F and %25 stay encoded).
    return value.replace("%2F", "/").replace("%25", "%") if "%" in value else value


def _raiser(error: Exception) -> Handler:
    async def refuse(_: Any) -> StreamResponse:
        raise error

    return refuse


class StreamBuffer:
    """Where a streamed answer (`StreamResponse.prepare`, then `write`s) is written: an HTTP
    API integration cannot stream, so the events go back together, once the answer ends.

    The part of aiohttp's payload writer that `StreamResponse` calls.
    """

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.length: int | None = None
        self.buffer_size = 0
        self.output_size = 0

    def enable_chunking(self) -> None:
        """Nothing to frame: API Gateway sends the body with its own length."""

    def enable_compression(self, encoding: str = "deflate", strategy: int | None = None) -> None:
        """Never asked for: the API compresses nothing."""

    async def write_headers(self, status_line: str, headers: Any) -> None:
        """The headers go into the result, from the response itself."""

    def send_headers(self) -> None:
        """As `write_headers`."""

    async def write(self, chunk: bytes | bytearray | memoryview) -> None:
        self.chunks.append(bytes(chunk))
        self.output_size += len(chunk)

    async def write_eof(self, chunk: bytes = b"") -> None:
        if chunk:
            await self.write(chunk)

    async def drain(self) -> None:
        """Nothing waits to be sent."""

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)


class GatewayRequest(HeadersMixin):
    """What the API's handlers and middleware read of an aiohttp request, from an event.

    A streamed answer is written to `stream` (`StreamBuffer`), through the three members
    aiohttp's `StreamResponse.prepare` reads of the request it answers.
    """

    version = HttpVersion11
    keep_alive = True

    def __init__(
        self,
        app: Mapping[Any, Any],
        method: str,
        url: URL,
        headers: CIMultiDict[str],
        body: bytes,
        remote: str | None,
    ) -> None:
        self.app = app
        self.method = method
        self.rel_url = url
        self.path = url.path
        self._headers = self._proxy = CIMultiDictProxy(headers)
        self._body = body
        self.remote = remote
        self.match_info = MatchInfo({}, None, None)
        self._state: dict[Any, Any] = {}
        self.stream = self._payload_writer = StreamBuffer()

    async def _prepare_hook(self, response: StreamResponse) -> None:
        """Nothing to do before a streamed answer's headers (aiohttp's signals)."""

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        return self._proxy

    @property
    def query(self) -> MultiDictProxy[str]:
        return self.rel_url.query

    async def read(self) -> bytes:
        """The body, or 413 past the app's limit (aiohttp's `client_max_size`)."""
        if len(self._body) > MAX_BODY:
            raise PayloadTooLarge()
        return self._body

    def __getitem__(self, key: Any) -> Any:
        return self._state[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        self._state[key] = value

    def get(self, key: Any, default: Any = None) -> Any:
        return self._state.get(key, default)


def request_from_event(event: dict[str, Any], app: Mapping[Any, Any]) -> GatewayRequest:
    """The request an HTTP API payload 2.0 event carries (`check_event` passed it)."""
    http = event["requestContext"]["http"]
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in (event.get("headers") or {}).items():
        headers.add(name, value)  # any case: CIMultiDict compares names case-insensitively
    cookies = event.get("cookies")
    if cookies:  # 2.0 carries the Cookie header apart, one item per cookie
        headers["Cookie"] = "; ".join(cookies)
    raw_body = event.get("body") or ""
    if event.get("isBase64Encoded"):
        try:
            body = base64.b64decode(raw_body, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest("the body is not valid base64", code="invalid_body") from None
    else:
        body = raw_body.encode()
    path = event.get("rawPath") or http.get("path") or "/"
    url = URL.build(path=path, query_string=event.get("rawQueryString") or "", encoded=True)
    return GatewayRequest(app, http["method"].upper(), url, headers, body, http.get("sourceIp"))


def result(
    response: StreamResponse, *, stream: StreamBuffer | None = None, head: bool = False
) -> Any:
    """The API Gateway answer to `response`: status, headers, cookies apart, the body as
    text when it is UTF-8, else base64 (a streamed response's body is in `stream`)."""
    headers: dict[str, str] = {}
    for name, value in response.headers.items():
        key = name.lower()
        if key == "set-cookie" or key in _TRANSPORT:
            continue
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    # A prepared response has its `set_cookie`s among its headers already.
    cookies = [] if response.prepared else [m.OutputString() for m in response.cookies.values()]
    cookies += response.headers.getall("Set-Cookie", [])
    if response.prepared and stream is not None:
        body = stream.body
    else:
        raw = response.body if isinstance(response, Response) else None
        body = raw if isinstance(raw, bytes) else b""
    answer: dict[str, Any] = {"statusCode": response.status, "headers": headers}
    if cookies:
        answer["cookies"] = cookies
    if head:
        body = b""
    try:
        answer.update(body=body.decode(), isBase64Encoded=False)
    except UnicodeDecodeError:
        answer.update(body=base64.b64encode(body).decode(), isBase64Encoded=True)
    return answer


def refusal(exc: BadRequest) -> Any:
    """The API Gateway answer to an event that never became a request (JSON, as every
    error the API answers)."""
    return result(error_response(exc))
