"""Retry jobs on the wire, and the backoff schedule (pure functions, no I/O)."""

from __future__ import annotations

import random
import time
from dataclasses import asdict
from typing import Any

import orjson

from bot.core.service import Job

# An upstream asking us to wait longer than this is treated as asking for this long.
MAX_RETRY_AFTER = 3600.0


def encode(job: Job, not_before: float) -> bytes:
    """The message body: the job plus the wall-clock time its next attempt may start."""
    return orjson.dumps({**asdict(job), "not_before": not_before})


def decode(body: bytes) -> tuple[Job, float]:
    """Inverse of `encode`; raises ValueError on a body that is not a job."""
    try:
        data: dict[str, Any] = orjson.loads(body)
        not_before = float(data.pop("not_before", 0.0))
        job = Job(
            message_id=str(data["message_id"]),
            user_id=str(data["user_id"]),
            question=str(data["question"]),
            context=list(data.get("context") or []),
            first_seen=float(data.get("first_seen") or time.time()),
            attempt=int(data.get("attempt") or 0),
        )
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"not a retry job: {exc}") from None
    return job, not_before


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
