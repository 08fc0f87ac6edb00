"""Clients for the external API the bot asks questions of, and their composition.

`UpstreamClient` asks the bundled stub's `POST /answer`; `OpenAIClient` asks any
OpenAI-compatible `chat/completions` endpoint (`UPSTREAM_KIND=openai`). Each `answer` makes
one call with the configured timeout and raises `UpstreamUnavailable` on any failure,
counting every outcome; no retries here (the retry queue retries). `build_answerer` wraps
the client in the circuit breaker and the shared cache: replicas and the retry worker both
call it.
"""

from __future__ import annotations

import asyncio
import email.utils
import time
from datetime import UTC, datetime
from typing import Any

import aiohttp
from redis.asyncio import Redis

from bot import metrics
from bot.answers import Answer, Answerer, bounded
from bot.breaker import BreakerAnswerer, CircuitBreaker
from bot.cache import CachedAnswerer
from bot.errors import UpstreamUnavailable
from bot.settings import Settings

__all__ = [
    "Answer",
    "Answerer",
    "OpenAIClient",
    "UpstreamClient",
    "build_answerer",
    "make_client",
    "probe",
]

_RETRY_AFTER_STATUSES = (429, 503)


def _retry_after(resp: aiohttp.ClientResponse) -> float | None:
    """Seconds the upstream asked us to wait (delta-seconds or an HTTP date), if it did."""
    if resp.status not in _RETRY_AFTER_STATUSES:
        return None
    value = (resp.headers.get("Retry-After") or "").strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max((when - datetime.now(UTC)).total_seconds(), 0.0)


class _HttpUpstream:
    """One HTTP call per answer, with the timeout, every outcome counted."""

    def __init__(self, session: aiohttp.ClientSession, url: str, timeout: float) -> None:
        self.session = session
        self.base = url.rstrip("/")
        self.timeout = aiohttp.ClientTimeout(total=timeout)

    async def answer(self, question: str, context: list[dict[str, Any]]) -> Answer:
        started = time.perf_counter()
        outcome = "error"
        try:
            text = await self._call(question, context)
            outcome = "ok"
            return Answer(bounded(text))
        except TimeoutError:
            outcome = "timeout"
            raise UpstreamUnavailable("upstream timed out") from None
        except aiohttp.ClientError as exc:
            raise UpstreamUnavailable(f"upstream call failed: {type(exc).__name__}") from None
        finally:
            metrics.UPSTREAM_REQUESTS.labels(outcome=outcome).inc()
            metrics.UPSTREAM_DURATION.observe(time.perf_counter() - started)

    async def _call(self, question: str, context: list[dict[str, Any]]) -> str:
        raise NotImplementedError

    async def _post(self, url: str, payload: dict[str, Any], headers: dict[str, str]) -> Any:
        async with self.session.post(
            url, json=payload, headers=headers, timeout=self.timeout
        ) as resp:
            if resp.status != 200:
                raise UpstreamUnavailable(f"upstream answered {resp.status}", _retry_after(resp))
            try:
                return await resp.json(content_type=None)
            except ValueError:
                raise UpstreamUnavailable("upstream sent an unreadable answer") from None


class UpstreamClient(_HttpUpstream):
    """The bundled stub's API: `POST /answer` with `{"q", "context"}` -> `{"answer"}`."""

    async def _call(self, question: str, context: list[dict[str, Any]]) -> str:
        data = await self._post(f"{self.base}/answer", {"q": question, "context": context}, {})
        try:
            return str(data["answer"])
        except (KeyError, TypeError):
            raise UpstreamUnavailable("upstream sent an unreadable answer") from None


def chat_messages(question: str, context: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The conversation as chat messages: earlier exchanges, then the question."""
    messages: list[dict[str, str]] = []
    for turn in context:
        if turn.get("q"):
            messages.append({"role": "user", "content": str(turn["q"])})
        if turn.get("a"):
            messages.append({"role": "assistant", "content": str(turn["a"])})
    messages.append({"role": "user", "content": question})
    return messages


class OpenAIClient(_HttpUpstream):
    """An OpenAI-compatible `chat/completions` endpoint (`UPSTREAM_URL` with or without /v1)."""

    def __init__(
        self, session: aiohttp.ClientSession, url: str, timeout: float, *, model: str, key: str
    ) -> None:
        super().__init__(session, url, timeout)
        path = "/chat/completions" if self.base.endswith("/v1") else "/v1/chat/completions"
        self.url = self.base + path
        self.model = model
        # The key lives only in this header; the logger redacts it from any event too.
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}

    async def _call(self, question: str, context: list[dict[str, Any]]) -> str:
        payload = {"model": self.model, "messages": chat_messages(question, context)}
        data = await self._post(self.url, payload, self._headers)
        try:
            return str(data["choices"][0]["message"]["content"])
        except (KeyError, IndexError, TypeError):
            raise UpstreamUnavailable("upstream sent an unreadable answer") from None


def upstream_kind(settings: Settings) -> str:
    """What answers depend on besides the question: the API, and the model for OpenAI."""
    if settings.upstream_kind == "openai":
        return f"openai:{settings.upstream_model}"
    return settings.upstream_kind


def make_client(settings: Settings, session: aiohttp.ClientSession) -> Answerer:
    """The client `UPSTREAM_KIND` names, at `UPSTREAM_URL` with `BOT_UPSTREAM_TIMEOUT`."""
    url, timeout = settings.upstream_url, settings.upstream_timeout
    if settings.upstream_kind == "openai":
        model, key = settings.upstream_model, settings.upstream_api_key
        return OpenAIClient(session, url, timeout, model=model, key=key)
    return UpstreamClient(session, url, timeout)


def build_answerer(settings: Settings, redis: Redis, session: aiohttp.ClientSession) -> Answerer:
    """The upstream as the bot asks it: cache (single-flight, stale) -> breaker -> client.

    Call once per process: the breaker it creates is this process's own.
    """
    guarded = BreakerAnswerer(
        make_client(settings, session), CircuitBreaker.from_settings(settings)
    )
    # The lock outlives one upstream call (timeout + margin to store the answer); a waiter
    # waits for a holder that may die (the lock lapses) and for its own takeover call.
    lock = settings.upstream_timeout + 1.0
    return CachedAnswerer(
        redis,
        guarded,
        kind=upstream_kind(settings),
        ttl=settings.cache_ttl,
        stale_ttl=settings.cache_stale_ttl,
        lock_seconds=lock,
        wait_seconds=lock + settings.upstream_timeout + 0.5,
    )


async def probe(session: aiohttp.ClientSession, base: str, wait: float = 1.0) -> bool:
    """Whether the upstream answers at all (for readiness and `bot_dependency_up`)."""
    try:
        async with asyncio.timeout(wait), session.get(base.rstrip("/") + "/healthz") as resp:
            return resp.status < 500
    except (TimeoutError, aiohttp.ClientError):
        return False
