"""The core under hostile use and failure, through NGINX: duplicate floods, answers that must
not cross users, a full Redis, and a replica killed mid-question."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis as redis_sync
import requests
from redis.asyncio import Redis

from bot.answers import ASK, MAX_REPLY_CHARS, Answer, Ask, bounded
from bot.core.service import BotService
from bot.core.validation import Message, parse_message
from bot.errors import Unavailable
from bot.ratelimit import LocalLimiter, Policy
from bot.settings import Rate
from bot.store import CONTEXT_SIZE, MAX_PREFS, Heartbeat, Store, record_key, user_key
from tests.support import (
    REDIS_KEY_FAMILIES,
    PrivateRedis,
    Stack,
    key_families,
    post,
    stack_env,
    unique,
)

pytestmark = pytest.mark.system


class SlowUpstream:
    """An in-process upstream that takes `delay` seconds and numbers its answers."""

    def __init__(self, name: str, delay: float) -> None:
        self.name, self.delay, self.calls = name, delay, 0

    async def answer(self, question: str, context: list[dict[str, Any]], ask: Ask = ASK) -> Answer:
        self.calls += 1
        await asyncio.sleep(self.delay)
        return Answer(f"{self.name}: {question}")


def _service(redis: Redis, upstream: SlowUpstream, **kw: Any) -> BotService:
    policy = Policy(Rate(100, 1.0), 100)
    return BotService(Store(redis, policy), upstream, policy, LocalLimiter(policy), **kw)


def _message(user: str, mid: str, text: str = "what is a pulsar?") -> Message:
    return parse_message({"user_id": user, "text": text, "message_id": mid}, "rid")


async def test_duplicates_beyond_the_waiting_bound_are_refused_at_once(redis: Redis) -> None:
    upstream = SlowUpstream("a", 0.5)
    service = _service(redis, upstream, max_waiting=2)
    msg = _message(unique(), unique("m"))
    tasks = [asyncio.create_task(service.handle(msg)) for _ in range(5)]
    done = await asyncio.gather(*tasks, return_exceptions=True)
    refused = [d for d in done if isinstance(d, Unavailable)]
    answered = [d for d in done if not isinstance(d, BaseException)]
    assert len(answered) == 3 and len(refused) == 2, done
    assert all(e.code == "busy" and e.retry_after >= 1 for e in refused)
    assert {a.body["reply"] for a in answered} == {"a: what is a pulsar?"}
    assert [a.replayed for a in answered] == [False, True, True]
    assert upstream.calls == 1


async def test_a_false_takeover_still_stores_one_reply(redis: Redis) -> None:
    """Replica A is alive but its heartbeat looks gone (a long event-loop stall): B takes the
    claim over and both answer. The first to finish wins: one record, one context entry,
    and A's caller gets B's answer too."""
    a_up, b_up = SlowUpstream("a", 1.2), SlowUpstream("b", 0.05)
    a, b = _service(redis, a_up), _service(redis, b_up)
    a.store.heartbeat.active = True  # names itself in claims, but never beats
    await b.store.heartbeat.beat()
    user, mid = unique(), unique("m")
    first = asyncio.create_task(a.handle(_message(user, mid)))
    await asyncio.sleep(0.1)  # A holds the claim and is asking its upstream
    second = await b.handle(_message(user, mid))
    late = await first
    assert (a_up.calls, b_up.calls) == (1, 1)  # both answered...
    assert second.body["reply"] == "b: what is a pulsar?" and not second.replayed
    assert late.body == second.body and late.replayed  # ... but B's answer is the one
    stored = orjson.loads(await redis.get(record_key(user, mid)))
    assert stored["body"] == second.body
    assert len(await redis.lrange(user_key(user, "ctx"), 0, -1)) == 1


def _say(stack: Stack, user: str, text: str) -> dict[str, object]:
    r = post(stack.url + "/v1/messages", {"user_id": user, "text": text})
    assert r.status_code == 200, r.text
    body: dict[str, object] = r.json()
    return body


def test_one_users_conversation_never_reaches_another_users_answer(stack: Stack) -> None:
    question = f"what is {unique('pulsar')}?"
    alice, bob, carol = unique("alice"), unique("bob"), unique("carol")
    _say(stack, alice, f"/echo my secret is {unique('s')}")  # now in Alice's context
    hers = _say(stack, alice, question)
    assert "(context " in str(hers["reply"])  # the stub saw her conversation
    # Bob, with no conversation, must not get the answer computed with Alice's
    his = _say(stack, bob, question)
    assert "(context " not in str(his["reply"]) and his["cached"] is False
    # and nobody can plant an answer for others by asking inside a conversation
    _say(stack, carol, "/echo hello")
    _say(stack, carol, question)
    again = _say(stack, unique("dave"), question)
    assert again["reply"] == his["reply"] and again["cached"] is True


# --- a stack of this module's own, on a Redis of its own (exact command counts, OOM) ---------


# The sync client's annotations make every result an Awaitable too: typed loosely here.
Own = tuple[Stack, Any]


@pytest.fixture(scope="module")
def own(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Own]:
    tmp = tmp_path_factory.mktemp("core")
    server = PrivateRedis(tmp / "redis", appendonly=False)
    server.start()
    env = stack_env(0, REDIS_URL=server.url, BOT_RATE_LIMIT="100/second", BOT_RATE_BURST="1000")
    stack = Stack(tmp / "run", env)
    try:
        stack.start()
        yield stack, redis_sync.Redis.from_url(server.url, decode_responses=True)
    finally:
        stack.stop()
        server.stop()


def _commands(r: Any) -> int:
    return int(r.info("stats")["total_commands_processed"])


async def _flood(url: str, body: dict[str, str], n: int) -> list[tuple[int, dict[str, Any], str]]:
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one() -> tuple[int, dict[str, Any], str]:
            async with session.post(url + "/v1/messages", json=body) as resp:
                return resp.status, await resp.json(), resp.headers.get("Retry-After", "")

        return await asyncio.gather(*(one() for _ in range(n)))


async def test_a_flood_of_duplicates_costs_one_call_and_a_few_redis_commands_per_replica(
    own: Own,
) -> None:
    stack, r = own
    stack.reset_stub()
    stack.faults(latency_ms=1500)  # the message is in progress for the whole flood
    n, replicas = 150, stack.settings.replicas  # 50 a replica: below its cap of 64
    body = {"user_id": unique(), "text": f"slow {unique('q')}?", "message_id": unique("m")}
    try:
        before, stats = _commands(r), r.info("commandstats")
        started = time.monotonic()
        results = await _flood(stack.url, body, n)
        elapsed = time.monotonic() - started
        used = _commands(r) - before
        calls = stack.stub_stats()["calls"]
    finally:
        stack.reset_stub()
    after = r.info("commandstats")
    delta = {k[8:]: v["calls"] - stats.get(k, {"calls": 0})["calls"] for k, v in after.items()}
    scripts = delta.get("evalsha", 0)  # admissions and cache lookups
    statuses = Counter(s for s, _, _ in results)
    print(f"\n{n} duplicates: {dict(statuses)} in {elapsed:.2f}s; Redis: {used} commands")
    print({k: v for k, v in delta.items() if v})
    assert set(statuses) <= {200, 503}, statuses
    assert statuses[200] >= n // 2
    replies = {b["reply"] for s, b, _ in results if s == 200}
    assert len(replies) == 1 and body["text"] in replies.pop()
    refused = [(b, ra) for s, b, ra in results if s == 503]
    assert all(b["error"]["code"] == "busy" and int(ra) >= 1 for b, ra in refused), refused[:1]
    assert calls == 1
    # Each replica: one admission, then a backoff poll of the claim while another replica
    # answers (about a dozen looks in 1.5 s); plus the background (heartbeats, the outbox
    # relay). Nothing grows with the number of duplicates: before, each one ran its own
    # admission and then read Redis every 20 ms (150 scripts and thousands of commands).
    assert scripts <= 30 * replicas, delta
    assert used <= 150 * replicas, delta


def _owners(stack: Stack) -> dict[str, str]:
    """Each replica's current heartbeat owner id (it names itself in its claims)."""
    owners = {}
    for i in range(1, stack.settings.replicas + 1):
        for line in stack.logs(f"bot-{i}").splitlines():
            if '"heartbeat_started"' in line:
                owners[orjson.loads(line)["owner"]] = f"bot-{i}"  # the last start wins
    return owners


def _echo_load(stack: Stack, stop: threading.Event, codes: Counter[int]) -> None:
    with requests.Session() as session:
        while not stop.is_set():
            body = orjson.dumps({"user_id": unique(), "text": "/echo load"})
            try:
                r = session.post(
                    stack.url + "/v1/messages",
                    data=body,
                    headers={"Content-Type": "application/json"},
                    timeout=15,
                )
                codes[r.status_code] += 1
            except requests.RequestException:
                codes[0] += 1


def test_resend_after_a_replica_is_killed_mid_question_is_answered_in_seconds_once(
    own: Own,
) -> None:
    stack, r = own
    stack.reset_stub()
    stack.faults(latency_ms=3000)  # the question is in progress when its replica dies
    pids = {f"bot-{i}": stack.pid(f"bot-{i}") for i in range(1, stack.settings.replicas + 1)}
    user, mid = unique(), unique("m")
    body = {"user_id": user, "text": f"who holds {unique('q')}?", "message_id": mid}
    stop, codes = threading.Event(), Counter[int]()
    load = [threading.Thread(target=_echo_load, args=(stack, stop, codes)) for _ in range(4)]
    result: dict[str, Any] = {}

    def send() -> None:
        result["r"] = post(stack.url + "/v1/messages", body, timeout=40)
        result["at"] = time.monotonic()

    sender = threading.Thread(target=send)
    try:
        for t in load:
            t.start()
        sender.start()
        deadline = time.monotonic() + 10
        claim = ""
        while not claim.startswith("P") or stack.stub_stats()["calls"] < 1:
            assert time.monotonic() < deadline, "no replica took the question"
            claim = r.get(record_key(user, mid)) or ""
            time.sleep(0.02)
        victim = _owners(stack)[claim[1:].partition(".")[0]]
        stack.faults(latency_ms=50)  # the replica that takes over gets a quick answer
        pid = pids[victim]
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        sender.join(timeout=40)
        waited = result["at"] - killed
    finally:
        stop.set()
        for t in load:
            t.join(timeout=20)
        calls = stack.stub_stats()["calls"]
        stack.reset_stub()
    print(f"\nresend answered {waited:.2f}s after SIGKILL of {victim}; load: {dict(codes)}")
    assert not os.path.exists(f"/proc/{pid}") or stack.pid(victim) != pid
    resp = result["r"]
    assert resp.status_code == 200, resp.text
    assert body["text"] in resp.json()["reply"]
    # Before: the resend waited for the dead replica's claim to lapse (about 9 s). The issue's
    # bound is 3 s; the heartbeat's 1.5 s lease makes it about 2 s here.
    assert waited < 3.0, waited
    # The dead replica's call was lost with it; one more, and one reply stored, once.
    assert calls == 2
    replay = post(stack.url + "/v1/messages", body)
    assert replay.json() == resp.json() and replay.headers["Idempotent-Replayed"] == "true"
    assert len(r.lrange(user_key(user, "ctx"), 0, -1)) == 1
    assert set(codes) == {200}, codes
    stack.wait_ready(victim)


def test_a_full_redis_answers_503_storage_full_and_keeps_what_is_stored(
    own: Own,
) -> None:
    """Through NGINX: a replica's 503 is tried once more on another replica (`@reroute`),
    whose own 503 reaches the client as it is: one JSON `storage_full` with Retry-After,
    never NGINX's 502/504 or its generic `unavailable`; what is stored is served unchanged."""
    stack, r = own
    url = stack.url
    user = unique()
    prefs_url = f"{url}/v1/users/{user}/prefs"
    assert requests.put(prefs_url, json={"prefs": {"lang": "en"}}, timeout=5).ok
    said = {"user_id": user, "text": "/echo kept", "message_id": unique("m")}
    asked = {"user_id": user, "text": f"is {unique('q')} kept?", "message_id": unique("m")}
    first, answer = post(url + "/v1/messages", said), post(url + "/v1/messages", asked)
    assert first.status_code == answer.status_code == 200
    records = [record_key(user, said["message_id"]), record_key(user, asked["message_id"])]
    stored = {key: r.get(key) for key in records}
    r.config_set("maxmemory-policy", "noeviction")
    r.config_set("maxmemory", "1")  # full: every write is refused from now on
    try:
        refused = [
            post(url + "/v1/messages", {"user_id": user, "text": "/echo new"}),
            post(url + "/v1/messages", {"user_id": unique(), "text": f"{unique('q')}?"}),
            post(url + "/v1/messages", {"user_id": user, "text": "/prefs set tz UTC"}),
            requests.put(prefs_url, json={"prefs": {"tz": "UTC"}}, timeout=5),
        ]
        for resp in refused:
            assert resp.status_code == 503, resp.text
            assert resp.headers["Content-Type"].startswith("application/json"), resp.headers
            error = resp.json()["error"]
            assert error["code"] == "storage_full" and set(error) == {"code", "message"}, error
            assert int(resp.headers["Retry-After"]) >= 1
        # what is stored is still served, unchanged
        for body, before in ((said, first), (asked, answer)):
            again = post(url + "/v1/messages", body)
            assert again.json() == before.json(), again.text
            assert again.headers["Idempotent-Replayed"] == "true"
        assert requests.get(prefs_url, timeout=5).json() == {"prefs": {"lang": "en"}}
    finally:
        r.config_set("maxmemory", "0")
    # Each refusal was one request for NGINX, answered by the second replica it asked.
    time.sleep(1.2)  # NGINX flushes its access log every second
    log = stack.access_log()
    for resp in refused:
        [entry] = [e for e in log if e["request_id"] == resp.headers["X-Request-ID"]]
        assert (entry["status"], entry["upstream_status"]) == (503, "503 : 503"), entry
    assert {k: r.get(k) for k in stored} == stored
    assert requests.get(prefs_url, timeout=5).json() == {"prefs": {"lang": "en"}}
    assert post(url + "/v1/messages", {"user_id": user, "text": "/echo back"}).ok
    assert post(url + "/v1/messages", said).json() == first.json()


class FixedUpstream:
    """An in-process upstream with a fixed answer (one as long as the bot allows)."""

    def __init__(self, text: str) -> None:
        self.text = text

    async def answer(self, question: str, context: list[dict[str, Any]], ask: Ask = ASK) -> Answer:
        return Answer(bounded(self.text))


async def _usage(redis: Redis, key: str) -> int:
    used = await redis.memory_usage(key, samples=0)
    return int(used or 0)


async def test_what_a_message_and_a_user_store_is_bounded_and_expires(redis: Redis) -> None:
    """Measures the figures docs/scaling.md states; every key gets a TTL (but the outbox)."""
    long_answer = "x" * (MAX_REPLY_CHARS * 3)
    service = _service(redis, FixedUpstream(long_answer))  # type: ignore[arg-type]
    user = unique()
    sizes: dict[str, int] = {}

    async def send(text: str) -> str:
        mid = unique("m")
        await service.handle(_message(user, mid, text))
        return mid

    mid = await send("/echo hello there")
    sizes["record, /echo of 17 chars"] = await _usage(redis, record_key(user, mid))
    mid = await send("what is a pulsar, in a sentence or two?")
    record = orjson.loads(await redis.get(record_key(user, mid)))
    assert len(record["body"]["reply"]) == MAX_REPLY_CHARS  # cut, and stored cut
    sizes["record, longest reply"] = await _usage(redis, record_key(user, mid))
    for _ in range(CONTEXT_SIZE):
        await send("q" * 4096)
    ctx = await redis.lrange(user_key(user, "ctx"), 0, -1)
    assert len(ctx) == CONTEXT_SIZE
    assert all(len(orjson.loads(e)["q"]) == len(orjson.loads(e)["a"]) == 1024 for e in ctx)
    sizes["context, full (10 longest entries)"] = await _usage(redis, user_key(user, "ctx"))
    prefs = {f"{i:02d}" + "k" * 62: "v" * 1024 for i in range(MAX_PREFS)}
    await service.store.set_prefs(user, prefs)
    sizes["prefs, full (100 x 64 + 1024 chars)"] = await _usage(redis, user_key(user, "prefs"))
    sizes["rate limit state"] = await _usage(redis, user_key(user, "rl"))
    for name, size in sizes.items():
        print(f"{name}: {size} bytes")

    assert sizes["record, longest reply"] < 12 * 1024
    assert sizes["context, full (10 longest entries)"] < CONTEXT_SIZE * 2 * 1024 + 4096
    # Every key in the DB (this user's, and any a stack sharing the DB wrote) is of a family
    # the doc's table lists, and expires unless the table says why not.
    families = key_families({key: await redis.pttl(key) async for key in redis.scan_iter()})
    assert families.keys() >= {"bot:{user}:msg:<id>", "bot:{user}:ctx", "bot:{user}:rl"}
    assert await redis.ttl(user_key(user, "prefs")) > 170 * 86400


def test_docs_list_every_redis_key_family() -> None:
    """docs/scaling.md's table of Redis keys names each family `key_families` knows."""
    doc = (Path(__file__).parent.parent / "docs" / "scaling.md").read_text()
    table = doc.split("## Redis memory", 1)[1].split("\n## ", 1)[0]
    missing = [name for name, _, _ in REDIS_KEY_FAMILIES if f"`{name}`" not in table]
    assert not missing, missing


async def test_only_tokens_of_a_process_whose_heartbeat_lapsed_count_as_gone(
    redis: Redis,
) -> None:
    """The key expiring is the key deleted here, and the time it has been missing is read on
    a clock of the test's own: the windows are a beat and a half, which a loaded machine's
    sleeps overshoot (this test failed in CI that way when it slept for real)."""
    now = [1000.0]
    mine = Heartbeat(redis, period=0.1, ttl=0.3, clock=lambda: now[0])
    theirs = Heartbeat(redis, period=0.1, ttl=0.3)
    assert not await mine.gone(theirs.token())  # not beating yet: names nobody
    await theirs.beat()
    token = theirs.token()
    assert not await mine.gone("P" + token) and not await mine.gone(token)
    await redis.delete(Heartbeat.key(theirs.owner))  # it stopped beating: its key expired
    assert not await mine.gone(token)  # missing once is not enough: it may be putting it back
    now[0] += 0.1
    assert not await mine.gone(token)
    await theirs.beat()  # it was (a flushed Redis): alive after all
    now[0] += 0.2
    assert not await mine.gone(token)  # and the time missing starts again
    await redis.delete(Heartbeat.key(theirs.owner))
    assert not await mine.gone("P" + token)
    now[0] += 0.14
    assert not await mine.gone("P" + token)
    now[0] += 0.02  # missing for longer than a beat and a half: gone
    assert await mine.gone("P" + token) and await mine.gone(token)
    await mine.beat()
    assert not await mine.gone(mine.token())  # never itself
    # tokens of processes that never beat (the retry worker's cache locks, older replicas)
    assert not await mine.gone(uuid.uuid4().hex) and not await mine.gone("P" + uuid.uuid4().hex)
