"""What an answerer returns and the protocol every upstream layer implements.

Kept apart from `bot.upstream` so the layers that wrap the client (`bot.cache`,
`bot.breaker`) and the client itself import it without importing each other.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from bot.core.types import CacheResult

__all__ = [
    "ASK",
    "INCOMPLETE_NOTES",
    "MAX_REPLY_CHARS",
    "Answer",
    "Answerer",
    "Ask",
    "Incomplete",
    "Sink",
    "bounded",
]

# Receives each piece of an answer as the upstream streams it.
Sink = Callable[[str], Awaitable[None]]
# Why an answer is not the whole answer (none of these is cached):
# content_null: the model sent no text (a refusal or a tool call); empty_choices: no choice at
# all; length: cut at max_tokens; truncated: the stream broke (or ran out of time) midway.
Incomplete = Literal["", "content_null", "empty_choices", "length", "truncated"]
INCOMPLETE_NOTES: dict[Incomplete, str] = {
    "content_null": "Sorry, the language model gave no answer to this message.",
    "empty_choices": "Sorry, the language model returned an empty answer. Please ask again.",
    "length": "\n\n[The answer was cut off at its length limit.]",
    "truncated": "\n\n[The answer was cut off: the connection to the language model broke.]",
}

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
    incomplete: Incomplete = ""

    @property
    def cacheable(self) -> bool:
        """Only a whole answer is stored for others (and served stale)."""
        return not self.incomplete

    @property
    def upstream_failed(self) -> bool:
        """A stream that broke midway: an answer for the user, a failure for the breaker."""
        return self.incomplete == "truncated"

    @property
    def cached(self) -> bool:
        """Whether the reply was served from the cache rather than a call made for it."""
        return self.cache in ("HIT", "STALE")


@dataclass(frozen=True, slots=True)
class Ask:
    """How to ask besides the question: the model ("" for the configured one) and where
    the answer's pieces go as they arrive (None: only the whole answer is wanted)."""

    model: str = ""
    sink: Sink | None = None


ASK = Ask()


class Answerer(Protocol):
    """Answers a question; raises `bot.errors.UpstreamUnavailable` on a failure worth
    retrying and `bot.errors.UpstreamRejected` on one that is not."""

    async def answer(
        self, question: str, context: list[dict[str, Any]], ask: Ask = ASK
    ) -> Answer: ...
