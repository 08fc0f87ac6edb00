"""What an answerer returns and the protocol every upstream layer implements.

Kept apart from `bot.upstream` so the layers that wrap the client (`bot.cache`,
`bot.breaker`) and the client itself import it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from bot.core.types import CacheResult

__all__ = ["MAX_REPLY_CHARS", "Answer", "Answerer", "bounded"]

# The longest reply the bot gives (and stores for replays, in the cache and in inboxes).
# Twice the longest message a user may send, so /echo and the stub are never cut; an LLM
# answer beyond it is (an LLM's max-tokens limit belongs well below it).
MAX_REPLY_CHARS = 8192


def bounded(text: str, limit: int = MAX_REPLY_CHARS) -> str:
    """`text` cut to `limit` characters, marked with an ellipsis when cut."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass(frozen=True, slots=True)
class Answer:
    """An upstream answer and where it came from (the `X-Cache` header)."""

    text: str
    cache: CacheResult = "MISS"

    @property
    def cached(self) -> bool:
        """Whether the reply was served from the cache rather than a call made for it."""
        return self.cache in ("HIT", "STALE")


class Answerer(Protocol):
    """Answers a question; raises `bot.errors.UpstreamUnavailable` on any failure."""

    async def answer(self, question: str, context: list[dict[str, Any]]) -> Answer: ...
