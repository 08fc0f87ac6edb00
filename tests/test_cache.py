"""The shared answer cache: hit/miss/stale, TTL, single-flight (in-process and through NGINX),
a dead lock holder, stale-on-error and the OpenAI-compatible upstream."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
import requests
from aiohttp import ClientResponse
from prometheus_client import REGISTRY
from redis.asyncio import Redis
from structlog.testing import capture_logs

from bot import cache as cache_module
from bot.answers import ASK, Answer, Ask
from bot.cache import CachedAnswerer, cache_id, normalise
from bot.errors import UpstreamUnavailable
from tests.support import AppClient, Stack, Upstream, post, unique


class CountingUpstream:
    """An in-process upstream that numbers its calls (like the stub) and can fail."""

    def __init__(self, delay: float = 0.05) -> None:
        self.delay = delay
        self.calls = 0
        self.fail = False

    async def answer(self, question: str, context: list[dict[str, Any]], ask: Ask = ASK) -> Answer:
        self.calls += 1
        n = self.calls
        await asyncio.sleep(self.delay)
        if self.fail:
            raise UpstreamUnavailable("upstream answered 503", 2.0)
        return Answer(f"[{n}] {question}")


def cached(redis: Redis, upstream: CountingUpstream, **kw: Any) -> CachedAnswerer:
    opts: dict[str, Any] = {
        "kind": "stub",
        "ttl": 0.3,
        "stale_ttl": 60,
        "lock_seconds": 1.0,
        "wait_seconds": 2.5,
    }
    opts.update(kw)
    return CachedAnswerer(redis, upstream, **opts)


def lookups(result: str) -> float:
    return REGISTRY.get_sample_value("bot_cache_lookups_total", {"result": result}) or 0.0


def test_key_ignores_case_and_spacing_but_not_the_upstream_kind() -> None:
    assert normalise("  What IS\ta  Pulsar? ") == "what is a pulsar?"
    assert cache_id("What is a pulsar?", "stub") == cache_id("what  is a PULSAR?", "stub")
    assert cache_id("what is a pulsar?", "stub") != cache_id("what is a pulsar?", "openai:m")
    assert cache_id("what is a pulsar?", "stub") != cache_id("what is a quasar?", "stub")


async def test_hit_miss_and_stale_are_counted_and_flagged(redis: Redis) -> None:
    upstream = CountingUpstream()
    cache = cached(redis, upstream)
    before = {r: lookups(r) for r in ("hit", "miss", "stale")}

    miss = await cache.answer("What is a pulsar?", [])
    hit = await cache.answer("  what is a PULSAR? ", [])
    assert (miss.cache, miss.cached, hit.cache, hit.cached) == ("MISS", False, "HIT", True)
    assert hit.text == miss.text == "[1] What is a pulsar?"

    await asyncio.sleep(0.35)  # past the TTL: what is left is a stale copy
    upstream.fail = True
    stale = await cache.answer("what is a pulsar?", [])
    assert (stale.cache, stale.cached, stale.text) == ("STALE", True, miss.text)

    assert upstream.calls == 2  # the hit asked nobody; the stale one tried first
    after = {r: lookups(r) - before[r] for r in before}
    assert after == {"hit": 1, "miss": 1, "stale": 1}


async def test_cached_answer_expires_after_the_ttl(redis: Redis) -> None:
    upstream = CountingUpstream()
    cache = cached(redis, upstream)
    assert (await cache.answer("q-ttl", [])).cache == "MISS"
    assert (await cache.answer("q-ttl", [])).cache == "HIT"
    await asyncio.sleep(0.35)
    fresh = await cache.answer("q-ttl", [])
    assert (fresh.cache, fresh.text) == ("MISS", "[2] q-ttl")


async def test_failure_without_a_stale_copy_raises_with_retry_after(redis: Redis) -> None:
    upstream = CountingUpstream()
    upstream.fail = True
    before = lookups("miss")
    with pytest.raises(UpstreamUnavailable) as err:
        await cached(redis, upstream).answer("never answered", [])
    assert err.value.retry_after == 2.0
    assert lookups("miss") - before == 1


async def test_answers_asked_with_context_are_neither_served_nor_stored(redis: Redis) -> None:
    upstream = CountingUpstream()
    cache = cached(redis, upstream, ttl=60)
    shared = await cache.answer("q-ctx", [])
    mine = await cache.answer("q-ctx", [{"q": "my secret", "a": "ok"}])
    assert (mine.cache, mine.text) == ("MISS", "[2] q-ctx")  # not the shared answer
    assert (await cache.answer("q-ctx", [])).text == shared.text  # nor did it replace it

    await cache.answer("q-ctx-first", [{"q": "my secret", "a": "ok"}])
    fresh = await cache.answer("q-ctx-first", [])
    assert (fresh.cache, fresh.text) == ("MISS", "[4] q-ctx-first")  # nothing was left behind
    assert upstream.calls == 4


async def test_single_flight_across_processes_calls_once(redis_url: str) -> None:
    upstream = CountingUpstream(delay=0.2)
    clients = [Redis.from_url(redis_url, decode_responses=True) for _ in range(3)]
    try:
        replicas = [cached(r, upstream) for r in clients]
        answers = await asyncio.gather(*(replicas[i % 3].answer("q-flight", []) for i in range(60)))
    finally:
        for r in clients:
            await r.aclose()
    assert upstream.calls == 1
    assert {a.text for a in answers} == {"[1] q-flight"}


async def test_waiters_share_the_holder_failure_at_once(redis_url: str) -> None:
    upstream = CountingUpstream(delay=0.2)
    upstream.fail = True
    clients = [Redis.from_url(redis_url, decode_responses=True) for _ in range(2)]
    try:
        a, b = (cached(r, upstream) for r in clients)
        started = time.monotonic()
        results = await asyncio.gather(
            a.answer("q-fail", []), b.answer("q-fail", []), return_exceptions=True
        )
        elapsed = time.monotonic() - started
    finally:
        for r in clients:
            await r.aclose()
    assert all(isinstance(r, UpstreamUnavailable) for r in results), results
    assert upstream.calls == 1  # the waiter did not call again
    assert elapsed < 1.0  # nor wait for the lock to lapse


class StreamingUpstream(CountingUpstream):
    """Streams its answer to the ask's sink word by word, `delay` apart."""

    async def answer(self, question: str, context: list[dict[str, Any]], ask: Ask = ASK) -> Answer:
        self.calls += 1
        words = [f"[{self.calls}]", *(f" {w}" for w in question.split())]
        for word in words:
            await asyncio.sleep(self.delay)
            if ask.sink is not None:
                await ask.sink(word)
        return Answer("".join(words))


async def test_waiters_hear_the_pieces_and_a_stuck_one_does_not_hold_up_the_rest(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two processes: the holder's askers and the other's all hear the pieces, in order and
    adding up to the answer; an asker whose sink hangs is dropped after `SINK_TIMEOUT`
    (the others and the answer go on); no piece goes past `MAX_REPLY_CHARS`."""
    monkeypatch.setattr(cache_module, "SINK_TIMEOUT", 0.1)
    monkeypatch.setattr(cache_module, "MAX_REPLY_CHARS", 30)
    upstream = StreamingUpstream(delay=0.05)
    clients = [Redis.from_url(redis_url, decode_responses=True) for _ in range(2)]
    heard: dict[str, list[str]] = {"lead": [], "here": [], "there": []}
    stuck = asyncio.Event()

    def sink(name: str) -> Callable[[str], Awaitable[None]]:
        async def take(piece: str) -> None:
            heard[name].append(piece)

        return take

    async def hang(piece: str) -> None:
        await stuck.wait()

    question = "q-pieces one two three four five six seven eight"
    try:
        a, b = (cached(r, upstream, lock_seconds=3.0, wait_seconds=5.0) for r in clients)
        lead = asyncio.ensure_future(a.answer(question, [], Ask("", sink("lead"))))
        await asyncio.sleep(0.02)
        started = time.monotonic()
        answers = await asyncio.gather(
            lead,
            a.answer(question, [], Ask("", hang)),
            a.answer(question, [], Ask("", sink("here"))),
            b.answer(question, [], Ask("", sink("there"))),
        )
        elapsed = time.monotonic() - started
    finally:
        for r in clients:
            await r.aclose()
    assert upstream.calls == 1
    whole = "[1] " + question
    assert {x.text for x in answers} == {whole}
    for name, pieces in heard.items():
        assert "".join(pieces) == whole[:30], (name, pieces)  # bounded, in order
    assert len(heard["lead"]) >= 3 and len(heard["there"]) >= 3, heard
    assert elapsed < 1.5  # the stuck asker cost one SINK_TIMEOUT, not the answer


async def test_waiter_takes_over_when_the_lock_holder_is_gone(redis: Redis) -> None:
    upstream = CountingUpstream()
    cache = cached(redis, upstream)
    # A holder that took the lock and died: nobody will store or release.
    await redis.set(f"cache:{{{cache_id('q-orphan', 'stub')}}}:lock", "dead", px=400)
    started = time.monotonic()
    answer = await cache.answer("q-orphan", [])
    elapsed = time.monotonic() - started
    assert (answer.text, upstream.calls) == ("[1] q-orphan", 1)
    assert 0.3 < elapsed < 2.5


async def test_answers_without_redis_by_asking_upstream() -> None:
    upstream = CountingUpstream()
    dead = Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2, socket_timeout=0.2)
    try:
        answer = await cached(dead, upstream).answer("q-no-redis", [])
    finally:
        await dead.aclose()
    assert (answer.text, answer.cache) == ("[1] q-no-redis", "MISS")


# --- through NGINX, against the stub ------------------------------------------------------


def _per_replica(stack: Stack, name: str, labels: str) -> list[float]:
    values = []
    for i in range(1, int(stack.env["BOT_REPLICAS"]) + 1):
        lines = requests.get(stack.metrics_url(i), timeout=5).text.splitlines()
        values.append(
            sum(float(ln.split()[-1]) for ln in lines if ln.startswith(f"{name}{{{labels}}} "))
        )
    return values


def _metric(stack: Stack, name: str, labels: str) -> float:
    return sum(_per_replica(stack, name, labels))


async def _ask_many(
    url: str, items: list[tuple[str, str]]
) -> list[tuple[int, dict[str, Any], str]]:
    """POST (user, text) pairs concurrently; (status, body, X-Cache) for each."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:

        async def one(user: str, text: str) -> tuple[int, dict[str, Any], str]:
            body = {"user_id": user, "text": text}
            async with session.post(url + "/v1/messages", json=body) as resp:
                return resp.status, await resp.json(), resp.headers.get("X-Cache", "")

        return await asyncio.gather(*(one(u, t) for u, t in items))


@pytest.mark.system
async def test_single_flight_through_nginx_calls_the_upstream_once(stack: Stack) -> None:
    stack.reset_stub()
    question = f"what is {unique('star')}?"
    hits_before = _metric(stack, "bot_cache_lookups_total", 'result="hit"')
    misses_before = _per_replica(stack, "bot_cache_lookups_total", 'result="miss"')
    results = await _ask_many(stack.url, [(unique(), question) for _ in range(50)])
    misses = _per_replica(stack, "bot_cache_lookups_total", 'result="miss"')

    assert stack.stub_stats()["calls"] == 1
    assert [s for s, _, _ in results] == [200] * 50
    assert {b["reply"] for _, b, _ in results} == {f"[1] You asked: {question}"}
    assert {c for _, _, c in results} <= {"MISS", "HIT"}
    # The 50 were spread over the replicas, each waiting on the one call (its lookups missed).
    assert all(after > before for after, before in zip(misses, misses_before, strict=True))

    again = post(stack.url + "/v1/messages", {"user_id": unique(), "text": question.upper()})
    assert again.headers["X-Cache"] == "HIT" and again.json()["cached"] is True
    assert _metric(stack, "bot_cache_lookups_total", 'result="hit"') > hits_before
    assert stack.stub_stats()["calls"] == 1


def _wait_calls(stack: Stack, n: int, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while stack.stub_stats()["calls"] < n:
        assert time.monotonic() < deadline, "the stub was never called"
        time.sleep(0.02)


_LIMITS = {"BOT_RATE_LIMIT": "100/second"}


def quiet(stack: Stack) -> Stack:
    """Stop the retry worker (if the stack has one): only the replicas' calls reach the stub."""
    stack.ctl("stop", "worker")
    return stack


@pytest.mark.system
async def test_lock_holder_killed_mid_call_waiters_still_get_an_answer(
    make_stack: Callable[..., Stack],
) -> None:
    stack = quiet(make_stack(BOT_UPSTREAM_TIMEOUT="1.5", **_LIMITS))
    stack.faults(latency_ms=1000)
    question = f"who holds {unique('lock')}?"

    holder = asyncio.create_task(_ask_many(stack.replica_url(1), [(unique(), question)]))
    await asyncio.to_thread(_wait_calls, stack, 1)  # replica 1 holds the lock, mid-call
    started = time.monotonic()
    waiters = [
        asyncio.create_task(_ask_many(stack.replica_url(i), [(unique(), question)] * 4))
        for i in (2, 3)
    ]
    await asyncio.sleep(0.3)
    stack.kill("bot-1")
    results = [r for w in waiters for r in await w]
    elapsed = time.monotonic() - started
    with pytest.raises(aiohttp.ClientError):
        await holder

    # One call died with its holder; one waiter took over after the lock lapsed (2.5 s).
    assert stack.stub_stats()["calls"] == 2
    assert [s for s, _, _ in results] == [200] * 8
    assert {b["reply"] for _, b, _ in results} == {f"[2] You asked: {question}"}
    assert elapsed < 1.5 + 1.0 + 1.5 + 1.0  # lock lapse + takeover call + slack


async def test_upstream_outage_serves_a_stale_copy_without_waiting(
    make_app_client: Callable[..., Awaitable[AppClient]], upstream: Upstream
) -> None:
    """On a replica in-process (no retry worker: only its own calls reach the stub)."""
    client = await make_app_client(BOT_CACHE_TTL="1", **_LIMITS)

    async def ask(text: str) -> ClientResponse:
        return await client.post("/v1/messages", json={"user_id": unique(), "text": text})

    question = f"is {unique('stale')} still there?"
    first = await ask(question)
    assert (first.status, first.headers["X-Cache"]) == (200, "MISS")
    reply = (await first.json())["reply"]
    await asyncio.sleep(1.1)  # no longer fresh
    upstream.faults(outage=True)
    stale_before = lookups("stale")

    for _ in range(6):  # breaker closed, then open
        started = time.monotonic()
        r = await ask(question)
        assert time.monotonic() - started < 0.5  # the timeout is 2 s: nothing waited for it
        assert (r.status, r.headers["X-Cache"]) == (200, "STALE")
        body = await r.json()
        assert body["cached"] is True and body["reply"] == reply
    assert lookups("stale") - stale_before == 6
    assert upstream.stats().failures >= 1  # the outage was real

    # No copy: the question goes to the retry queue (RabbitMQ is up), it is not refused.
    never = await ask(unique("new"))
    assert never.status == 202, await never.text()
    assert await never.json() == {"message_id": never.headers["X-Request-ID"], "status": "queued"}


async def test_openai_compatible_upstream_gets_context_as_earlier_messages(
    make_app_client: Callable[..., Awaitable[AppClient]],
    upstream: Upstream,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """On a replica in-process; its structlog events and library log lines are captured."""
    secret = "sk-test-" + unique("key")
    with capture_logs() as events:
        client = await make_app_client(
            UPSTREAM_KIND="openai",
            UPSTREAM_MODEL="stub-model",
            UPSTREAM_API_KEY=secret,
            **_LIMITS,
        )

        async def ask(user: str, text: str) -> ClientResponse:
            return await client.post("/v1/messages", json={"user_id": user, "text": text})

        user = unique()
        first_q, second_q = f"what is {unique('pulsar')}?", f"and {unique('quasar')}?"
        first = await (await ask(user, first_q)).json()
        assert first["reply"] == f"[1] You asked: {first_q}"
        second = await (await ask(user, second_q)).json()
        assert second["reply"] == f"[2] You asked: {second_q}"

        last = upstream.stats().last
        assert last["model"] == "stub-model"
        assert last["authorization"] == f"Bearer {secret}"
        assert last["context"] == [
            {"role": "user", "content": first_q},
            {"role": "assistant", "content": first["reply"]},
        ]
        # The same faults apply on this route.
        upstream.faults(outage=True)
        failed = await ask(unique(), unique("q"))
        assert failed.status == 202, await failed.text()  # queued for retry, as by default
        assert (await failed.json())["status"] == "queued"
        assert upstream.stats().failures >= 1
    assert events  # the capture saw the replica's events (e.g. the failed call)
    assert secret not in repr(events) and secret not in caplog.text
