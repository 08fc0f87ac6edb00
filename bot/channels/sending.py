"""What a platform send came to, in the delivery loop's words."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from bot.channels.wire import Outbound

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
