"""`Store` and `BotService` directly against the real Redis (this run's DB): admission,
first-writer-wins records, context, preferences, and the service's one-answer-per-message
rule within a replica and across two, with no HTTP, NGINX or processes in between."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisError

from bot.answers import ASK, Answer, Ask
from bot.core.service import BotService
from bot.core.types import Record
from bot.core.validation import Message
from bot.errors import RateLimited, Unavailable, UpstreamUnavailable
from bot.ratelimit import LocalLimiter, Policy
from bot.settings import parse_rate
from bot.store import CONTEXT_SIZE, MAX_PREFS, PREFS_TTL, Store, TooManyPrefs, user_key
from tests.support import free_port, unique

ROOMY = Policy(parse_rate("100/second"), 1000)


def store(redis: Redis, policy: Policy = ROOMY, **kw: Any) -> Store:
    return Store(redis, policy, **kw)


def record(text: str) -> Record:
    return Record("replied", {"reply": text})


# -- Store ----------------------------------------------------------------------------------


async def test_admit_claims_once_and_the_first_finish_is_the_record(redis: Redis) -> None:
    s, user, mid = store(redis), unique(), unique("m")
    first = await s.admit(user, mid, want_context=False)
    assert first.kind == "ok" and first.token
    assert first.rate is not None and first.rate.remaining == ROOMY.burst
    held = await s.admit(user, mid, want_context=False)
    assert held.kind == "pending"
    assert held.token.removeprefix("P") == first.token and held.pending_ms > 0

    assert await s.finish(user, mid, record("one"), None) is None
    # A second writer (a takeover that answered too) loses: it gets the first record back.
    assert await s.finish(user, mid, record("two"), None) == record("one")
    done = await s.admit(user, mid, want_context=False)
    assert (done.kind, done.record) == ("done", record("one"))


async def test_a_released_claim_can_be_taken_again(redis: Redis) -> None:
    s, user, mid = store(redis), unique(), unique("m")
    claim = await s.admit(user, mid, want_context=False)
    await s.release(user, mid, "not-" + claim.token)  # not ours: the claim stays
    assert (await s.admit(user, mid, want_context=False)).kind == "pending"
    await s.release(user, mid, claim.token)
    assert (await s.admit(user, mid, want_context=False)).kind == "ok"


async def test_an_answer_known_in_advance_is_stored_with_the_admission(redis: Redis) -> None:
    s, user, mid = store(redis), unique(), unique("m")
    entry = {"q": "/echo hi", "a": "hi", "at": "now"}
    stored = await s.admit(user, mid, want_context=False, answered=(record("hi"), entry))
    assert stored.kind == "stored" and not stored.token
    replay = await s.admit(user, mid, want_context=False)
    assert (replay.kind, replay.record) == ("done", record("hi"))
    assert await s.context(user) == [entry]


async def test_context_keeps_the_last_exchanges_oldest_first(redis: Redis) -> None:
    s, user = store(redis), unique()
    for i in range(CONTEXT_SIZE + 3):
        mid = unique("m")
        await s.admit(user, mid, want_context=False)
        await s.finish(user, mid, record(f"a{i}"), {"q": f"q{i}", "a": f"a{i}"})
    expected = [f"q{i}" for i in range(3, CONTEXT_SIZE + 3)]
    assert [c["q"] for c in await s.context(user)] == expected
    asked = await s.admit(user, unique("m"), want_context=True)
    assert asked.kind == "ok" and [c["q"] for c in asked.context] == expected
    assert (await s.admit(user, unique("m"), want_context=False)).context == []


async def test_admit_limits_a_user_past_the_burst_and_not_others(redis: Redis) -> None:
    s, user = store(redis, Policy(parse_rate("1/minute"), 2)), unique()
    kinds = [(await s.admit(user, unique("m"), want_context=False)).kind for _ in range(4)]
    assert kinds == ["ok", "ok", "ok", "limited"]
    limited = await s.admit(user, unique("m"), want_context=False)
    assert limited.rate is not None and 50 < limited.rate.retry_after_s <= 60
    unlimited = await s.admit(user, unique("m"), want_context=False, limit=False)
    assert unlimited.kind == "ok" and unlimited.rate is None
    assert (await s.admit(unique(), unique("m"), want_context=False)).kind == "ok"


async def test_prefs_merge_delete_and_expire(redis: Redis) -> None:
    s, user = store(redis), unique()
    assert await s.prefs(user) == {}
    assert await s.set_prefs(user, {"lang": "en", "tz": "UTC"}) == {"lang": "en", "tz": "UTC"}
    assert await s.set_prefs(user, {"lang": "fr"}) == {"lang": "fr", "tz": "UTC"}
    assert await s.pref(user, "lang") == "fr" and await s.pref(user, "nope") is None
    assert 0 < await redis.ttl(user_key(user, "prefs")) <= PREFS_TTL
    assert await s.del_prefs(user, "tz", "nope") == 1
    assert await s.prefs(user) == {"lang": "fr"}
    assert await s.del_prefs(user) == 1 and await s.prefs(user) == {}


async def test_prefs_past_the_key_limit_are_refused_whole(redis: Redis) -> None:
    s, user = store(redis), unique()
    full = {f"k{i}": "v" for i in range(MAX_PREFS)}
    await s.set_prefs(user, full)
    with pytest.raises(TooManyPrefs):
        await s.set_prefs(user, {"k0": "changed", "one-more": "x"})
    assert await s.prefs(user) == full  # all or nothing: k0 kept its value
    assert (await s.set_prefs(user, {"k0": "changed"}))["k0"] == "changed"


# -- BotService -----------------------------------------------------------------------------


class Upstream:
    """An answerer that counts its calls; slow enough for duplicates to overlap."""

    def __init__(self, delay: float = 0.05, fail: bool = False) -> None:
        self.calls: list[tuple[str, list[dict[str, Any]]]] = []
        self.delay = delay
        self.fail = fail

    async def answer(self, question: str, context: list[dict[str, Any]], ask: Ask = ASK) -> Answer:
        self.calls.append((question, context))
        await asyncio.sleep(self.delay)
        if self.fail:
            raise UpstreamUnavailable("upstream answered 503", 2.0)
        return Answer(f"[{len(self.calls)}] {question}")


def service(s: Store, answerer: Upstream, policy: Policy = ROOMY, **kw: Any) -> BotService:
    return BotService(s, answerer, policy, LocalLimiter(policy), **kw)


def message(user: str, text: str, mid: str | None = None) -> Message:
    return Message(user, text, mid or unique("m"), explicit_id=mid is not None)


async def test_a_question_is_answered_once_and_replayed_after(redis: Redis) -> None:
    up = Upstream()
    bot = service(store(redis), up)
    user, mid = unique(), unique("m")
    first = await bot.handle(message(user, "what is a pulsar?", mid))
    assert first.body["reply"] == "[1] what is a pulsar?" and not first.replayed
    again = await bot.handle(message(user, "something else", mid))
    assert again.replayed and again.body == first.body
    assert len(up.calls) == 1


async def test_questions_carry_the_context_of_earlier_exchanges(redis: Redis) -> None:
    up = Upstream(delay=0)
    bot = service(store(redis), up)
    user = unique()
    await bot.handle(message(user, "/echo earlier"))
    await bot.handle(message(user, "first?"))
    await bot.handle(message(user, "second?"))
    assert [[c["q"] for c in ctx] for _, ctx in up.calls] == [
        ["/echo earlier"],
        ["/echo earlier", "first?"],
    ]
    assert up.calls[1][1][-1]["a"] == "[1] first?"


async def test_duplicates_within_and_across_replicas_make_one_upstream_call(
    redis: Redis,
) -> None:
    up = Upstream(delay=0.2)
    # Two replicas: each its own Store (own heartbeat) and service, one Redis.
    replicas = [service(store(redis), up), service(store(redis), up)]
    msg = message(unique(), f"q {unique()}", unique("m"))
    outcomes = await asyncio.gather(*(replicas[i % 2].handle(msg) for i in range(20)))
    assert len(up.calls) == 1
    assert len({o.body["reply"] for o in outcomes}) == 1
    assert sum(not o.replayed for o in outcomes) == 1


async def test_upstream_failure_without_a_queue_is_503_and_frees_the_claim(
    redis: Redis,
) -> None:
    up = Upstream(delay=0, fail=True)
    bot = service(store(redis), up)
    msg = message(unique(), "anyone there?", unique("m"))
    with pytest.raises(Unavailable) as err:
        await bot.handle(msg)
    assert err.value.retry_after == 2.0
    up.fail = False
    retried = await bot.handle(msg)  # the claim was released: the retry is answered
    assert retried.body["reply"] == "[2] anyone there?" and not retried.replayed


async def test_a_user_past_the_limit_is_refused_with_retry_after(redis: Redis) -> None:
    policy = Policy(parse_rate("1/minute"), 1)
    bot = service(store(redis, policy), Upstream(), policy)
    user = unique()
    for _ in range(2):
        await bot.handle(message(user, "/help"))
    with pytest.raises(RateLimited) as err:
        await bot.handle(message(user, "/help"))
    assert 50 <= err.value.retry_after <= 60


async def test_commands_answer_when_redis_is_unreachable() -> None:
    gone = Redis(host="127.0.0.1", port=free_port(), decode_responses=True, socket_timeout=1)
    try:
        bot = service(store(gone), Upstream())
        out = await bot.handle(message(unique(), "/echo still here"))
        assert out.body["reply"] == "still here"
        # Prefs live in Redis: core lets the RedisError through, and the API's one error map
        # renders it as a 503 (test_seams checks that on every route).
        with pytest.raises(RedisError):
            await bot.handle(message(unique(), "/prefs"))
    finally:
        await gone.aclose()
