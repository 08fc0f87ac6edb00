"""Core's value types: what crosses the seams between the core, its adapters and the API.

Plain data and `Literal` kinds, importing nothing of the bot's own, so that every layer (the
API, the store, the inbox, the retry adapters, the channel adapters to come) can name them
without importing what produces them. Each result says what happened in the core's words
(``"replied"``, ``"queued"``); only ``bot.api`` turns those into HTTP status codes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "Admission",
    "AdmissionKind",
    "CacheResult",
    "Context",
    "Job",
    "Outcome",
    "OutcomeKind",
    "RateState",
    "Record",
    "Reply",
    "ReplyKind",
]

# The user's recent exchanges, oldest first: {"q": question, "a": answer, "at": RFC 3339}.
Context = list[dict[str, Any]]

# What became of a message: answered now, or held durably for a later answer in the inbox.
OutcomeKind = Literal["replied", "queued"]
# What `Store.admit` found: claimed (ok), stored with the admission (stored), answered before
# (done), held by another request (pending), or over the user's rate (limited).
AdmissionKind = Literal["ok", "stored", "done", "pending", "limited"]
# A deferred reply: the answer, or the apology sent when every attempt failed.
ReplyKind = Literal["answer", "apology"]
# Where an upstream answer came from (the `X-Cache` header): the cache, a call made for it, or
# a stale copy served because the upstream failed.
CacheResult = Literal["HIT", "MISS", "STALE"]


@dataclass(frozen=True, slots=True)
class RateState:
    """What one rate-limiter decision tells the client."""

    remaining: int
    reset_s: float
    retry_after_s: float = 0.0


@dataclass(slots=True)
class Job:
    """Everything needed to answer a message later, without the original request."""

    message_id: str
    user_id: str
    question: str
    context: Context
    first_seen: float = field(default_factory=time.time)
    attempt: int = 0
    model: str = ""  # the user's chosen model ("" for the configured one)


@dataclass(frozen=True, slots=True)
class Record:
    """A message's one answer, kept for replays: its kind and the body the caller got."""

    kind: OutcomeKind
    body: dict[str, Any]


@dataclass(slots=True)
class Outcome:
    """The answer to one message, for a front end (the HTTP API, a channel) to render."""

    kind: OutcomeKind
    body: dict[str, Any]
    replayed: bool = False
    rate: RateState | None = None
    cache: CacheResult | None = None  # when the upstream was asked


@dataclass(slots=True)
class Admission:
    """The outcome of `Store.admit`."""

    kind: AdmissionKind
    token: str = ""  # the claim taken (ok); the claim that holds the message (pending)
    record: Record | None = None  # done
    rate: RateState | None = None
    context: Context = field(default_factory=list)
    pending_ms: int = 0


@dataclass(frozen=True, slots=True)
class Reply:
    """A deferred reply in a user's inbox; `cursor` is its place in the inbox."""

    message_id: str
    reply: str
    at: str
    kind: ReplyKind
    cursor: str
