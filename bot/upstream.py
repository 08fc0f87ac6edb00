"""Client for the external API the bot asks questions of.

`UpstreamClient.answer` makes one call with the configured timeout and raises
`UpstreamUnavailable` on any failure, counting every outcome. The cache and the circuit
breaker wrap it (they implement the same `Answerer` protocol).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp

from bot import metrics
from bot.errors import UpstreamUnavailable
from bot.settings import Settings


@dataclass(frozen=True, slots=True)
class Answer:
    text: str
    cache: str = "MISS"  # HIT | MISS | STALE | BYPASS

    @property
    def cached(self) -> bool:
        return self.cache in ("HIT", "STALE")


class Answerer(Protocol):
    async def answer(self, question: str, context: list[dict[str, Any]]) -> Answer: ...


def _retry_after(resp: aiohttp.ClientResponse) -> float | None:
    value = resp.headers.get("Retry-After")
    if value and value.strip().isdigit():
        return float(value)
    return None


class UpstreamClient:
    """One call to the upstream per `answer`; no retries here (the queue retries)."""

    def __init__(self, session: aiohttp.ClientSession, settings: Settings) -> None:
        self.session = session
        self.base = settings.upstream_url.rstrip("/")
        self.timeout = aiohttp.ClientTimeout(total=settings.upstream_timeout)

    async def answer(self, question: str, context: list[dict[str, Any]]) -> Answer:
        started = time.perf_counter()
        outcome = "error"
        try:
            text = await self._call(question, context)
            outcome = "ok"
            return Answer(text)
        except TimeoutError:
            outcome = "timeout"
            raise UpstreamUnavailable("upstream timed out") from None
        except aiohttp.ClientError as exc:
            raise UpstreamUnavailable(f"upstream call failed: {type(exc).__name__}") from None
        finally:
            metrics.UPSTREAM_REQUESTS.labels(outcome=outcome).inc()
            metrics.UPSTREAM_DURATION.observe(time.perf_counter() - started)

    async def _call(self, question: str, context: list[dict[str, Any]]) -> str:
        payload = {"q": question, "context": context}
        async with self.session.post(
            f"{self.base}/answer", json=payload, timeout=self.timeout
        ) as resp:
            if resp.status != 200:
                raise UpstreamUnavailable(f"upstream answered {resp.status}", _retry_after(resp))
            try:
                data = await resp.json(content_type=None)
                return str(data["answer"])
            except (ValueError, KeyError, TypeError):
                raise UpstreamUnavailable("upstream sent an unreadable answer") from None


async def probe(session: aiohttp.ClientSession, base: str, wait: float = 1.0) -> bool:
    """Whether the upstream answers at all (for readiness and `bot_dependency_up`)."""
    try:
        async with asyncio.timeout(wait), session.get(base.rstrip("/") + "/healthz") as resp:
            return resp.status < 500
    except (TimeoutError, aiohttp.ClientError):
        return False
