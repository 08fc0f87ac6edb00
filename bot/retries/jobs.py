"""Retry jobs on the wire, and the backoff schedule (pure functions, no I/O)."""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass
from typing import Any

import orjson

from bot.core.types import Job
from bot.settings import Settings

# An upstream asking us to wait longer than this is treated as asking for this long.
MAX_RETRY_AFTER = 3600.0
# A job is a question (4096 chars at most) and a few context entries: far below this. A body
# above it was not written by `encode` and is refused unread.
MAX_JOB_BYTES = 1 << 20


def encode(job: Job, not_before: float) -> bytes:
    """The message body: the job plus the wall-clock time its next attempt may start."""
    return orjson.dumps({**asdict(job), "not_before": not_before})


def decode(body: bytes) -> tuple[Job, float]:
    """Inverse of `encode`; raises ValueError, saying what is wrong, on a body that is not a job.

    Strict about types (nothing is coerced): a body that does not look exactly like what
    `encode` writes came from a bug or a hostile writer, and goes to the dead-letter queue
    with this message as its reason instead of being half-understood.
    """
    if len(body) > MAX_JOB_BYTES:
        raise ValueError(f"body of {len(body)} bytes is over the {MAX_JOB_BYTES} byte limit")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ValueError("body is not JSON") from None
    if not isinstance(data, dict):
        raise ValueError(f"body is a JSON {_json_type(data)}, not an object")
    message_id, user_id, question = (_text(data, name) for name in _TEXT_FIELDS)
    context = data.get("context") or []
    if not isinstance(context, list) or not all(isinstance(c, dict) for c in context):
        raise ValueError("field context is not an array of objects")
    first_seen = _number(data, "first_seen", time.time())
    not_before = _number(data, "not_before", 0.0)
    attempt = data.get("attempt") or 0
    if not isinstance(attempt, int) or isinstance(attempt, bool) or attempt < 0:
        raise ValueError("field attempt is not a whole number >= 0")
    model = data.get("model") or ""
    if not isinstance(model, str):
        raise ValueError("field model is not a string")
    return Job(message_id, user_id, question, context, first_seen, attempt, model), not_before


_TEXT_FIELDS = ("message_id", "user_id", "question")


def _json_type(value: object) -> str:
    names = {list: "array", str: "string", int: "number", float: "number", bool: "boolean"}
    return names.get(type(value), "null")


def _text(data: dict[str, Any], name: str) -> str:
    value = data.get(name)
    if value is None:
        raise ValueError(f"field {name} is missing")
    if not isinstance(value, str) or not value:
        raise ValueError(f"field {name} is not a non-empty string")
    return value


def _number(data: dict[str, Any], name: str, default: float) -> float:
    value = data.get(name)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"field {name} is not a number")
    return float(value)


def backoff(
    failed_attempts: int,
    base: float,
    cap: float,
    retry_after: float | None = None,
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait after `failed_attempts` failures: full jitter, at least `retry_after`.

    Full jitter (uniform in [0, min(cap, base * 2**(n-1))]) spreads the retries of a burst of
    jobs that failed together, so a recovering upstream is not hit by all of them at once.
    An upstream's Retry-After is a floor the jitter never undercuts.
    """
    n = max(1, failed_attempts)
    ceiling = min(cap, base * 2 ** min(n - 1, 62))
    delay = (rng or random).uniform(0.0, ceiling)
    if retry_after is not None and retry_after > 0:
        delay = max(delay, min(retry_after, MAX_RETRY_AFTER))
    return delay


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How failed questions are retried (`BOT_RETRY_*`): attempts, and the backoff's bounds."""

    max_attempts: int
    base_delay: float
    max_delay: float

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        return cls(settings.retry_max_attempts, settings.retry_base_delay, settings.retry_max_delay)

    def delay(self, failed_attempts: int, retry_after: float | None = None) -> float:
        """Seconds to wait before the next attempt (`backoff` within this policy's bounds)."""
        return backoff(failed_attempts, self.base_delay, self.max_delay, retry_after)


def delay_levels(base: float, cap: float) -> list[int]:
    """TTLs in ms of the delay queues: base, 2*base, ... up to the first level >= cap.

    Any delay is a sum of these (largest first), so jittered delays need no per-message TTL
    (which would block behind the head of the queue).
    """
    first = max(1, round(base * 1000))
    levels = [first]
    while levels[-1] < cap * 1000 and len(levels) < 24:
        levels.append(levels[-1] * 2)
    return levels


def next_hop(remaining: float, levels: list[int]) -> int | None:
    """The delay level (ms) to wait in next, or None when `remaining` is close enough to 0."""
    ms = remaining * 1000
    if ms < levels[0] / 2:
        return None
    fitting = [lvl for lvl in levels if lvl <= ms]
    return fitting[-1] if fitting else levels[0]
