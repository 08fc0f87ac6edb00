"""Clients for the external API the bot asks questions of, and their composition.

`UpstreamClient` asks the bundled stub's `POST /answer`; `OpenAIClient` asks any
OpenAI-compatible `chat/completions` endpoint (`UPSTREAM_KIND=openai`), streaming. Each
`answer` makes one call with the configured timeouts and raises `UpstreamUnavailable` on a
failure worth retrying (timeouts, 408/409/429/5xx) and `UpstreamRejected` on one that is not
(the rest of 4xx), counting every outcome; no retries here (the retry queue retries).
`build_answerer` wraps the client in the circuit breaker and the shared cache: replicas and
the retry worker both call it.
"""

from __future__ import annotations

import asyncio
import email.utils
import re
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NoReturn

import aiohttp
import orjson
from redis.asyncio import Redis

from bot import metrics
from bot.answers import (
    ASK,
    INCOMPLETE_NOTES,
    MAX_REPLY_CHARS,
    Answer,
    Answerer,
    Ask,
    Incomplete,
    bounded,
)
from bot.breaker import BreakerAnswerer, CircuitBreaker
from bot.cache import CachedAnswerer
from bot.errors import UpstreamRejected, UpstreamUnavailable
from bot.logging import get_logger
from bot.settings import Settings

log = get_logger(__name__)

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
# Statuses worth asking again (later): the rest of 4xx is permanent (the same call fails the
# same way), 5xx is transient.
_TRANSIENT_4XX = (408, 409, 429)
_CODE_RE = re.compile(r"[a-z0-9_.-]{1,64}")
_DURATION_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|h|m|s)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_ERROR_BODY_MAX = 64 * 1024


def parse_duration(text: str) -> float | None:
    """Seconds in an OpenAI reset header (``1s``, ``6m0s``, ``20ms``, ``1h2m3.5s``; bare
    seconds too), or None."""
    text = text.strip()
    try:
        return max(float(text), 0.0)
    except ValueError:
        pass
    parts = _DURATION_RE.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    return sum(float(n) * _UNITS[u] for n, u in parts)


def _http_date_delay(value: str) -> float | None:
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max((when - datetime.now(UTC)).total_seconds(), 0.0)


def retry_after(status: int, headers: Mapping[str, str]) -> float | None:
    """Seconds the upstream asked us to wait, if it did (429/503 only).

    `Retry-After` (seconds or an HTTP date) or `retry-after-ms` when present; else, for a
    429, the `x-ratelimit-reset-*` header of the budget that ran out (remaining 0), else the
    longest.
    """
    if status not in _RETRY_AFTER_STATUSES:
        return None
    value = (headers.get("Retry-After") or "").strip()
    if value:
        return float(value) if value.isdigit() else _http_date_delay(value)
    ms = (headers.get("retry-after-ms") or "").strip()
    if ms:
        seconds = parse_duration(ms)
        return None if seconds is None else seconds / 1000
    if status != 429:
        return None  # the rate-limit budgets say nothing about a 503
    resets: list[tuple[bool, float]] = []
    for budget in ("requests", "tokens"):
        reset = parse_duration(headers.get(f"x-ratelimit-reset-{budget}") or "")
        if reset is not None:
            used_up = (headers.get(f"x-ratelimit-remaining-{budget}") or "").strip() == "0"
            resets.append((used_up, reset))
    if not resets:
        return None
    spent = [r for used_up, r in resets if used_up]
    return max(spent or [r for _, r in resets])


class _HttpUpstream:
    """One HTTP call per answer, with the timeout, every outcome counted."""

    def __init__(self, session: aiohttp.ClientSession, url: str, timeout: float) -> None:
        self.session = session
        self.base = url.rstrip("/")
        self.timeout = aiohttp.ClientTimeout(total=timeout)

    async def answer(self, question: str, context: list[dict[str, Any]], ask: Ask = ASK) -> Answer:
        started = time.perf_counter()
        outcome = "error"
        try:
            answer = await self._call(question, context, ask)
            outcome = "error" if answer.upstream_failed else "ok"
            return answer
        except TimeoutError:
            outcome = "timeout"
            raise UpstreamUnavailable("upstream timed out") from None
        except aiohttp.ClientError as exc:
            raise UpstreamUnavailable(f"upstream call failed: {type(exc).__name__}") from None
        finally:
            metrics.UPSTREAM_REQUESTS.labels(outcome=outcome).inc()
            metrics.UPSTREAM_DURATION.observe(time.perf_counter() - started)

    async def _call(self, question: str, context: list[dict[str, Any]], ask: Ask) -> Answer:
        raise NotImplementedError


class UpstreamClient(_HttpUpstream):
    """The bundled stub's API: `POST /answer` with `{"q", "context"}` -> `{"answer"}`."""

    async def _call(self, question: str, context: list[dict[str, Any]], ask: Ask) -> Answer:
        payload = {"q": question, "context": context}
        async with self.session.post(
            f"{self.base}/answer", json=payload, timeout=self.timeout
        ) as resp:
            if resp.status != 200:
                raise UpstreamUnavailable(
                    f"upstream answered {resp.status}", retry_after(resp.status, resp.headers)
                )
            try:
                return Answer(bounded(str((await resp.json(content_type=None))["answer"])))
            except (ValueError, KeyError, TypeError):
                raise UpstreamUnavailable("upstream sent an unreadable answer") from None


def chat_messages(
    question: str, context: list[dict[str, Any]], system: str = ""
) -> list[dict[str, str]]:
    """The conversation as chat messages: the system prompt, earlier exchanges, the question."""
    messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    for turn in context:
        if turn.get("q"):
            messages.append({"role": "user", "content": str(turn["q"])})
        if turn.get("a"):
            messages.append({"role": "assistant", "content": str(turn["a"])})
    messages.append({"role": "user", "content": question})
    return messages


@dataclass(slots=True)
class _Reading:
    """What a chat completion (streamed or whole) said so far."""

    parts: list[str] = field(default_factory=list)
    refusal: str = ""
    choices: bool = False  # any choice at all
    finish: str = ""
    done: bool = False  # [DONE], or a whole (non-streamed) completion
    usage: dict[str, Any] | None = None

    def take(self, choice: dict[str, Any], message: dict[str, Any]) -> str:
        """Record one choice (or delta); the new text it carries."""
        self.choices = True
        if isinstance(message.get("refusal"), str):
            self.refusal += message["refusal"]
        if choice.get("finish_reason"):
            self.finish = str(choice["finish_reason"])
        content = message.get("content")
        piece = content if isinstance(content, str) else ""
        if piece:
            self.parts.append(piece)
        return piece

    def answer(self, cut: bool) -> Answer:
        """The reply this reading gives: whole, or a defined incomplete one."""
        text = "".join(self.parts)
        if cut or not (self.done or self.finish):
            if not text:
                raise UpstreamUnavailable("upstream stream ended before any answer")
            return _incomplete(text, "truncated")
        if not self.choices:
            return _incomplete("", "empty_choices")
        if not text:
            return _incomplete(self.refusal.strip(), "content_null")
        if self.finish == "length":
            return _incomplete(text, "length")
        return Answer(bounded(text))


def _incomplete(text: str, reason: Incomplete) -> Answer:
    metrics.UPSTREAM_INCOMPLETE.labels(reason=reason).inc()
    log.info("upstream_answer_incomplete", reason=reason, chars=len(text))
    note = INCOMPLETE_NOTES[reason]
    if reason in ("content_null", "empty_choices"):
        return Answer(bounded(text or note), incomplete=reason)
    return Answer(bounded(text, MAX_REPLY_CHARS - len(note)) + note, incomplete=reason)


async def _sse_data(content: aiohttp.StreamReader) -> AsyncIterator[str]:
    """The `data` of each Server-Sent Event in `content` (comments and other fields skipped)."""
    lines: list[str] = []
    async for raw in content:
        line = raw.decode().rstrip("\r\n")
        if not line:
            if lines:
                yield "\n".join(lines)
                lines = []
        elif line.startswith("data:"):
            lines.append(line[5:].removeprefix(" "))
    if lines:
        yield "\n".join(lines)


class OpenAIClient:
    """An OpenAI-compatible `chat/completions` endpoint (`UPSTREAM_URL` with or without /v1).

    Always asks for a stream (`stream: true`, usage included): the pieces go to the ask's
    sink as they arrive, and the time to the first token is bounded on its own
    (`UPSTREAM_FIRST_TOKEN_TIMEOUT`) besides connecting and the whole answer. A provider
    that answers with one JSON completion anyway is read the same way.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        url: str,
        *,
        model: str,
        key: str,
        system_prompt: str = "",
        max_tokens: int | None = None,
        temperature: float | None = None,
        connect_timeout: float = 3.0,
        first_token_timeout: float = 20.0,
        total_timeout: float = 90.0,
        prices: Mapping[str, tuple[float, float]] | None = None,
    ) -> None:
        self.session = session
        base = url.rstrip("/")
        self.url = base + ("/chat/completions" if base.endswith("/v1") else "/v1/chat/completions")
        self.model = model
        self.system_prompt = system_prompt
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.first_token_timeout = min(first_token_timeout, total_timeout)
        self.total_timeout = total_timeout
        # Connecting has its own bound; the rest is bounded by the first-token and total
        # deadlines around the whole call.
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=connect_timeout, sock_connect=connect_timeout
        )
        self.prices = dict(prices or {})
        # The key lives only in this header; the logger redacts it from any event too.
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}

    @classmethod
    def from_settings(cls, settings: Settings, session: aiohttp.ClientSession) -> OpenAIClient:
        metrics.UPSTREAM_BUDGET.set(settings.upstream_daily_budget)
        return cls(
            session,
            settings.upstream_url,
            model=settings.upstream_model,
            key=settings.upstream_api_key,
            system_prompt=settings.upstream_system_prompt,
            max_tokens=settings.upstream_max_tokens,
            temperature=settings.upstream_temperature,
            connect_timeout=settings.upstream_connect_timeout,
            first_token_timeout=settings.upstream_first_token_timeout,
            total_timeout=settings.upstream_total_timeout,
            prices={m: (p, c) for m, p, c in settings.upstream_prices},
        )

    def payload(self, model: str, question: str, context: list[dict[str, Any]]) -> dict[str, Any]:
        """The request body for one question."""
        body: dict[str, Any] = {
            "model": model,
            "messages": chat_messages(question, context, self.system_prompt),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        if self.temperature is not None:
            body["temperature"] = self.temperature
        return body

    async def answer(self, question: str, context: list[dict[str, Any]], ask: Ask = ASK) -> Answer:
        model = ask.model or self.model
        started = time.perf_counter()
        outcome = "error"
        reading = _Reading()
        try:
            answer = await self._complete(model, question, context, ask, reading)
            outcome = "ok" if not answer.upstream_failed else "error"
            return answer
        except TimeoutError:
            outcome = "timeout"
            if reading.parts:  # the whole answer ran out of time midway: what came is kept
                return reading.answer(cut=True)
            raise UpstreamUnavailable("upstream timed out before the first token") from None
        except (aiohttp.ClientError, ValueError) as exc:
            if reading.parts:  # the stream broke midway
                return reading.answer(cut=True)
            raise UpstreamUnavailable(f"upstream call failed: {type(exc).__name__}") from None
        finally:
            metrics.UPSTREAM_REQUESTS.labels(outcome=outcome).inc()
            metrics.UPSTREAM_DURATION.observe(time.perf_counter() - started)
            self._count(model, reading.usage)

    async def _complete(
        self,
        model: str,
        question: str,
        context: list[dict[str, Any]],
        ask: Ask,
        reading: _Reading,
    ) -> Answer:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.total_timeout
        async with asyncio.timeout_at(loop.time() + self.first_token_timeout) as bound:
            async with self.session.post(
                self.url,
                json=self.payload(model, question, context),
                headers=self._headers,
                timeout=self._timeout,
            ) as resp:
                if resp.status != 200:
                    await _refused(resp, model)
                if resp.content_type == "application/json":  # a whole completion after all
                    data = await resp.json()
                    reading.done = True
                    reading.usage = _usage(data)
                    for choice in _choices(data)[:1]:
                        piece = reading.take(choice, _dict(choice.get("message")))
                        if piece and ask.sink is not None:
                            await ask.sink(piece)
                    return reading.answer(cut=False)
                async for data in _sse_data(resp.content):
                    if data.strip() == "[DONE]":
                        reading.done = True
                        break
                    chunk = orjson.loads(data)
                    if not isinstance(chunk, dict):
                        raise ValueError("a stream chunk that is not an object")
                    if "error" in chunk:  # the provider failed midway
                        raise aiohttp.ClientPayloadError(f"stream error: {chunk['error']!r:.200}")
                    reading.usage = _usage(chunk) or reading.usage
                    for choice in _choices(chunk):
                        if choice.get("index", 0) != 0:
                            continue
                        first = not reading.parts
                        piece = reading.take(choice, _dict(choice.get("delta")))
                        if piece and first:
                            bound.reschedule(deadline)  # the first token came in time
                        if piece and ask.sink is not None:
                            await ask.sink(piece)
        return reading.answer(cut=False)

    def _count(self, model: str, usage: dict[str, Any] | None) -> None:
        """Tokens used and their estimated cost (`UPSTREAM_PRICES`), by the model asked."""
        if not usage:
            return
        prompt, completion = _tokens(usage, "prompt_tokens"), _tokens(usage, "completion_tokens")
        metrics.UPSTREAM_TOKENS.labels(kind="prompt", model=model).inc(prompt)
        metrics.UPSTREAM_TOKENS.labels(kind="completion", model=model).inc(completion)
        price = self.prices.get(model)
        if price is not None:
            cost = (prompt * price[0] + completion * price[1]) / 1_000_000
            metrics.UPSTREAM_COST.labels(model=model).inc(cost)


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _choices(data: Any) -> list[dict[str, Any]]:
    choices = data.get("choices") if isinstance(data, dict) else None
    return [c for c in choices if isinstance(c, dict)] if isinstance(choices, list) else []


def _usage(data: Any) -> dict[str, Any] | None:
    usage = data.get("usage") if isinstance(data, dict) else None
    return usage if isinstance(usage, dict) else None


def _tokens(usage: dict[str, Any], name: str) -> int:
    n = usage.get(name)
    return n if isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 10**9 else 0


async def _refused(resp: aiohttp.ClientResponse, model: str) -> NoReturn:
    """Raise what an error status means: `UpstreamRejected` for good, else
    `UpstreamUnavailable` (with how long the upstream asked us to wait)."""
    status = resp.status
    try:
        body = orjson.loads(await resp.content.read(_ERROR_BODY_MAX))
    except (ValueError, aiohttp.ClientError):
        body = None
    error = _dict(body.get("error")) if isinstance(body, dict) else {}
    raw = str(error.get("code") or error.get("type") or "").lower()
    code = raw if _CODE_RE.fullmatch(raw) else ("other" if raw else "none")
    message = bounded(str(error.get("message") or ""), 300)
    metrics.UPSTREAM_ERRORS.labels(status=str(status), code=code).inc()
    permanent = 400 <= status < 500 and status not in _TRANSIENT_4XX
    fields = {"status": status, "code": code, "model": model, "provider_message": message}
    if permanent:
        log.warning("upstream_rejected", **fields)
        raise UpstreamRejected(status, code, message)
    wait = retry_after(status, resp.headers)
    if code == "insufficient_quota":
        log.warning("upstream_quota_exhausted", **fields)
    else:
        log.info("upstream_error", retry_after=wait, **fields)
    raise UpstreamUnavailable(f"upstream answered {status} {code}", wait)


def upstream_kind(settings: Settings) -> str:
    """What answers depend on besides the question: the API, and the model for OpenAI."""
    if settings.upstream_kind == "openai":
        return f"openai:{settings.upstream_model}"
    return settings.upstream_kind


def make_client(settings: Settings, session: aiohttp.ClientSession) -> Answerer:
    """The client `UPSTREAM_KIND` names, at `UPSTREAM_URL` (the stub's with
    `BOT_UPSTREAM_TIMEOUT`, an LLM's with the `UPSTREAM_*_TIMEOUT`s)."""
    if settings.upstream_kind == "openai":
        return OpenAIClient.from_settings(settings, session)
    return UpstreamClient(session, settings.upstream_url, settings.upstream_timeout)


def build_answerer(settings: Settings, redis: Redis, session: aiohttp.ClientSession) -> Answerer:
    """The upstream as the bot asks it: cache (single-flight, stale) -> breaker -> client.

    Call once per process: the breaker it creates is this process's own.
    """
    guarded = BreakerAnswerer(
        make_client(settings, session), CircuitBreaker.from_settings(settings)
    )
    # The lock outlives one upstream call (timeout + margin to store the answer); a waiter
    # waits for a holder that may die (the lock lapses) and for its own takeover call.
    lock = settings.call_timeout + 1.0
    return CachedAnswerer(
        redis,
        guarded,
        kind=upstream_kind(settings),
        ttl=settings.cache_ttl,
        stale_ttl=settings.cache_stale_ttl,
        lock_seconds=lock,
        wait_seconds=lock + settings.call_timeout + 0.5,
    )


async def probe(session: aiohttp.ClientSession, base: str, wait: float = 1.0) -> bool:
    """Whether the upstream answers at all (for readiness and `bot_dependency_up`)."""
    try:
        async with asyncio.timeout(wait), session.get(base.rstrip("/") + "/healthz") as resp:
            return resp.status < 500
    except (TimeoutError, aiohttp.ClientError):
        return False
