"""What a platform send came to, in the delivery loop's words."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

import aiohttp
import orjson

from bot.channels.wire import Outbound

SEND_TIMEOUT = 10.0  # seconds for one platform call, whole
JSON_HEADERS = {"Content-Type": "application/json"}

# ok: the platform returned 2xx; paused: 429, wait `retry_after` then send again; transient:
# 5xx, timeout, connection error (back off, try again); permanent: the dead-letter queue.
SentKind = Literal["ok", "paused", "transient", "permanent"]


@dataclass(frozen=True, slots=True)
class Sent:
    kind: SentKind
    reason: str = ""
    retry_after: float = 0.0


class Sender(Protocol):
    """One platform's send call."""

    async def send(self, out: Outbound) -> Sent: ...


def classify(status: int, description: str) -> Sent:
    """A non-2xx, non-429 answer: 5xx (and 408) are worth another try, any other 4xx is not
    (403 blocked, 400 chat not found, 404 unknown webhook)."""
    if status >= 500 or status == 408:
        return Sent("transient", f"{status}: {description}")
    return Sent("permanent", f"{status}: {description}")


@dataclass(frozen=True, slots=True)
class Answer:
    """What the platform answered: its status, body and `Retry-After` header."""

    status: int
    raw: bytes
    retry_after: str | None


async def call(
    http: aiohttp.ClientSession, method: str, url: str, body: Any, headers: dict[str, str]
) -> Answer | Sent:
    """Send `body` as JSON; a timeout or a connection error is already a transient `Sent`."""
    try:
        async with http.request(
            method,
            url,
            data=orjson.dumps(body),
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=SEND_TIMEOUT),
        ) as resp:
            return Answer(resp.status, await resp.read(), resp.headers.get("Retry-After"))
    except TimeoutError:
        return Sent("transient", "timeout")
    except aiohttp.ClientError as exc:
        return Sent("transient", type(exc).__name__)


def json_object(raw: bytes) -> dict[str, Any]:
    """A platform's JSON object body, or {} when it is not one."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}
