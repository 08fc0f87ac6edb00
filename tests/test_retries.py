"""The retry queue in-process against the real RabbitMQ and Redis (own queue prefix, own DB):
backoff arithmetic, publisher confirms and dedupe, outbox fallback and relay, 503 when nothing
holds a job, the inbox's exactly-once and paging, and backoff timing through the queues."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import statistics
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import replace
from itertools import pairwise
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pytest
from prometheus_client import REGISTRY
from redis.asyncio import Redis
from redis.exceptions import RedisError

from bot import metrics
from bot.answers import ASK, Answer, Ask
from bot.core.types import Job
from bot.errors import Unavailable, UpstreamRejected, UpstreamUnavailable
from bot.inbox import APOLOGY, Inbox
from bot.retries import dlq, topology
from bot.retries import worker as worker_module
from bot.retries.broker import Broker
from bot.retries.jobs import backoff, decode, delay_levels, encode, next_hop
from bot.retries.outbox import Outbox, Relay
from bot.retries.publisher import RetryQueue
from bot.retries.worker import Worker
from bot.runtime import make_redis
from bot.settings import Settings
from infra.common import drop_queues
from tests.support import AMQP_URL, PrivateRedis, free_port, unique

# -- pure ---------------------------------------------------------------------------------


def test_backoff_is_full_jitter_under_an_exponential_cap() -> None:
    rng = random.Random(7)
    for n, cap in [(1, 0.1), (2, 0.2), (3, 0.4), (5, 1.0), (9, 1.0)]:
        delays = [backoff(n, 0.1, 1.0, rng=rng) for _ in range(2000)]
        assert 0 <= min(delays) < cap * 0.05 and cap * 0.95 < max(delays) <= cap
        assert statistics.mean(delays) == pytest.approx(cap / 2, rel=0.1)


def test_backoff_never_undercuts_retry_after() -> None:
    rng = random.Random(1)
    assert all(backoff(1, 0.1, 1.0, retry_after=3.0, rng=rng) == 3.0 for _ in range(100))
    assert all(backoff(12, 1.0, 300, retry_after=1e9, rng=rng) >= 3600 for _ in range(10))


def test_any_delay_is_served_by_the_levels_largest_first() -> None:
    levels = delay_levels(0.1, 1.0)
    assert levels == [100, 200, 400, 800, 1600]
    for wanted in (0.04, 0.05, 0.33, 1.0, 2.5, 7.77):
        left, hops = wanted, 0
        while (hop := next_hop(left, levels)) is not None:
            left -= hop / 1000
            hops += 1
        assert abs(left) <= 0.05 and hops <= 8


def test_job_round_trips_and_garbage_is_refused() -> None:
    job = Job("m-1", "u-1", "why?", [{"q": "a", "a": "b"}], first_seen=10.0, attempt=3)
    assert decode(encode(job, 42.5)) == (job, 42.5)
    chosen = replace(job, model="m-big")  # the user's model goes with the job
    assert decode(encode(chosen, 1.0)) == (chosen, 1.0)
    with pytest.raises(ValueError, match="model"):
        decode(b'{"message_id": "m", "user_id": "u", "question": "q", "model": 5}')
    with pytest.raises(ValueError):
        decode(b'{"nope": 1}')


# -- against RabbitMQ and Redis -----------------------------------------------------------


def settings_for(redis_url: str, **kw: Any) -> Settings:
    base = Settings(
        redis_url=redis_url,
        amqp_url=AMQP_URL,
        queue_prefix=f"test-{uuid.uuid4().hex[:8]}",
        retry_base_delay=0.05,
        retry_max_delay=0.8,
        retry_max_attempts=7,
        retry_prefetch=64,
        drain_timeout=2.0,
    )
    return replace(base, **kw)


@pytest.fixture
async def settings(redis_url: str) -> AsyncIterator[Settings]:
    s = settings_for(redis_url)
    yield s
    drop_queues(s)


@pytest.fixture
async def broker(settings: Settings) -> AsyncIterator[Broker]:
    b = Broker.from_settings(settings, "test")
    await b.start()
    try:
        assert await b.wait_declared(30)
        yield b
    finally:
        await b.close()


def job(user: str | None = None, mid: str | None = None) -> Job:
    return Job(mid or unique("m"), user or unique("u"), "what is a pulsar?", [])


async def queued(broker: Broker) -> int:
    depths = await broker.queue_depths()
    return depths["work"] + depths["delay"]


async def test_defer_returns_after_confirm_and_queues_a_message_once(
    settings: Settings, broker: Broker, redis: Redis
) -> None:
    rq = RetryQueue.from_settings(settings, broker, Outbox(redis, settings.queue_prefix), redis)
    j = job()
    await rq.defer(j, retry_after=30)  # long enough to stay in a delay queue
    await rq.defer(replace(j), retry_after=30)  # NGINX resent it to another replica
    assert await queued(broker) == 1
    assert await Outbox(redis, settings.queue_prefix).length() == 0


async def test_broker_down_means_outbox_and_the_relay_publishes_it_later(
    settings: Settings, broker: Broker, redis: Redis
) -> None:
    down = replace(settings, amqp_url=f"amqp://guest:guest@127.0.0.1:{free_port()}/")
    dead = Broker.from_settings(down, "test-down")
    await dead.start()
    outbox = Outbox(redis, settings.queue_prefix)
    try:
        rq = RetryQueue.from_settings(down, dead, outbox, redis)
        for _ in range(5):
            await rq.defer(job(), retry_after=30)
        assert await outbox.length() == 5
        assert not await dead.ready()
    finally:
        await dead.close()
    relay = Relay(outbox, broker)
    assert await relay.relay_once() == 5
    assert await outbox.length() == 0
    assert await queued(broker) == 5


async def test_nothing_holds_the_job_means_503(settings: Settings) -> None:
    port = free_port()
    down = replace(settings, amqp_url=f"amqp://guest:guest@127.0.0.1:{port}/")
    dead = Broker.from_settings(down, "test-down")
    await dead.start()
    gone = Redis.from_url(f"redis://127.0.0.1:{port}/0", socket_connect_timeout=0.5)
    try:
        rq = RetryQueue.from_settings(down, dead, Outbox(gone, down.queue_prefix), gone)
        with pytest.raises(Unavailable) as exc:
            await rq.defer(job(), retry_after=None)
        assert exc.value.status == 503 and exc.value.retry_after >= 1
    finally:
        await dead.close()
        await gone.aclose()


async def test_inbox_keeps_one_answer_per_message_and_pages_with_a_cursor(redis: Redis) -> None:
    inbox, user = Inbox(redis), unique("u")
    assert await inbox.deliver(user, "m1", "first")
    assert not await inbox.deliver(user, "m1", "again")  # a redelivered job
    assert await inbox.deliver(user, "m2", APOLOGY, "apology")
    assert not await inbox.deliver(user, "m2", APOLOGY, "apology")
    assert await inbox.deliver(user, "m2", "late answer")  # after `bot dlq replay`
    assert not await inbox.deliver(user, "m2", "late answer")
    for i in range(3, 8):
        await inbox.deliver(user, f"m{i}", f"r{i}")
    page, cursor = await inbox.page(user, limit=4)
    assert [r.message_id for r in page] == ["m1", "m2", "m2", "m3"]
    assert [r.reply for r in page[:3]] == ["first", APOLOGY, "late answer"]
    rest, cursor = await inbox.page(user, cursor)
    assert [r.message_id for r in rest] == ["m4", "m5", "m6", "m7"]
    empty, same = await inbox.page(user, cursor)
    assert empty == [] and same == cursor


async def test_the_inbox_forgets_what_its_stream_trimmed(
    redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`inbox:ids` is bounded as the stream is: one user's endless deferred replies cannot grow
    it past twice the stream's entries, and what the stream still holds is delivered once."""
    monkeypatch.setattr("bot.inbox.MAX_ENTRIES", 100)  # `MAXLEN ~` trims whole nodes of 100
    inbox, user = Inbox(redis), unique("u")
    ids_key = f"bot:{{{user}}}:inbox:ids"
    for i in range(450):
        assert await inbox.deliver(user, f"m{i}", f"r{i}")
        assert await redis.hlen(ids_key) <= 2 * 100 + 1
    kept = [r.message_id for r in (await inbox.page(user, limit=1000))[0]]
    assert "m449" in kept and "m0" not in kept and len(kept) >= 100
    # every reply the stream holds is still known, so still delivered once
    assert set(kept) <= {
        k.decode() if isinstance(k, bytes) else k for k in await redis.hkeys(ids_key)
    }
    for mid in kept:
        assert not await inbox.deliver(user, mid, "again")


async def test_long_poll_returns_when_a_reply_arrives(redis: Redis) -> None:
    inbox, user = Inbox(redis), unique("u")
    started = time.monotonic()
    poll = asyncio.create_task(inbox.page(user, "0", wait=10))
    await asyncio.sleep(0.3)
    await inbox.deliver(user, "m1", "hello")
    replies, _ = await poll
    assert [r.reply for r in replies] == ["hello"]
    assert time.monotonic() - started < 5  # woke up, did not sit out the 10 s
    nothing, _ = await inbox.page(user, replies[0].cursor, wait=0.5)
    assert nothing == []


class ScriptedUpstream:
    """Records when each job was attempted; fails until `succeed_at` attempts."""

    def __init__(self, retry_after: dict[str, float], succeed_at: int) -> None:
        self.calls: dict[str, list[float]] = defaultdict(list)
        self.retry_after = retry_after
        self.succeed_at = succeed_at

    async def answer(self, question: str, context: list[dict[str, Any]], ask: Ask = ASK) -> Answer:
        self.calls[question].append(time.monotonic())
        if len(self.calls[question]) + 1 >= self.succeed_at:  # +1: the replica's attempt
            return Answer(f"answer to {question}")
        raise UpstreamUnavailable("upstream answered 503", self.retry_after.get(question))


async def test_attempt_times_grow_with_jitter_and_honour_retry_after(
    settings: Settings, broker: Broker, redis: Redis
) -> None:
    inbox = Inbox(redis)
    questions = [f"q{i}" for i in range(24)]
    upstream = ScriptedUpstream({"q0": 0.6, "q1": 0.6}, succeed_at=settings.retry_max_attempts)
    worker_broker = Broker.from_settings(settings, "test-worker", prefetch=settings.retry_prefetch)
    await worker_broker.start()
    worker = Worker.from_settings(settings, worker_broker, inbox, upstream)
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop))
    rq = RetryQueue.from_settings(settings, broker, Outbox(redis, settings.queue_prefix), redis)
    user = unique("u")
    deferred: dict[str, float] = {}
    for q in questions:
        j = Job(f"m-{q}", user, q, [])
        deferred[q] = time.monotonic()
        await rq.defer(j, retry_after=upstream.retry_after.get(q))
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            replies, _ = await inbox.page(user, wait=1)
            if len(replies) == len(questions):
                break
    finally:
        stop.set()
        await running
        await worker_broker.close()
    replies, _ = await inbox.page(user)
    assert sorted(r.message_id for r in replies) == sorted(f"m-{q}" for q in questions)
    gaps: dict[int, list[float]] = defaultdict(list)  # after failure n -> waits
    for q in questions:
        times = [deferred[q], *upstream.calls[q]]
        assert len(times) == settings.retry_max_attempts  # answered at the last attempt
        for n, (a, b) in enumerate(pairwise(times), start=1):
            if q in upstream.retry_after:
                assert b - a >= 0.6 - 0.05, (q, n, b - a)  # Retry-After honoured
                continue
            cap = min(settings.retry_max_delay, settings.retry_base_delay * 2 ** (n - 1))
            assert b - a <= cap + 2.0, (q, n, b - a, cap)  # never far past its ceiling
            gaps[n].append(b - a)
    for n, waits in gaps.items():
        # Jitter within the ceiling: nearly every wait under it plus the scheduling slack a
        # busy machine adds (a few late ones are that machine, not the policy).
        cap = min(settings.retry_max_delay, settings.retry_base_delay * 2 ** (n - 1))
        on_time = sum(w <= cap + 0.3 for w in waits)
        assert on_time >= 0.8 * len(waits), (n, cap, sorted(round(w, 3) for w in waits))
    means = [statistics.mean(gaps[n]) for n in sorted(gaps)]
    print("mean wait after failure n:", [round(m, 3) for m in means])
    assert means[3] > means[1] > 0 and means[4] > means[2]  # grows as configured
    assert statistics.stdev(gaps[4]) > 0.05  # and with jitter: not all the same


async def test_a_thousand_concurrent_defers_and_their_resends_queue_each_job_once(
    settings: Settings, broker: Broker, redis: Redis
) -> None:
    """Every job deferred at once, each twice (NGINX's resend to another replica): each one
    reaches the work queue exactly once, intact. (Throughput is `make bench`'s business.)"""
    rq = RetryQueue.from_settings(settings, broker, Outbox(redis, settings.queue_prefix), redis)
    n = 1000
    jobs = {j.message_id: j for j in (job() for _ in range(n))}
    sem = asyncio.Semaphore(64)

    async def one(j: Job) -> None:
        async with sem:
            await rq.defer(j, retry_after=None)  # a first attempt: well under a second

    await asyncio.gather(*(one(replace(j)) for j in jobs.values() for _ in range(2)))
    assert await Outbox(redis, settings.queue_prefix).length() == 0  # all confirmed
    # Jobs wait out their short delay, then move to the work queue: wait for all of them.
    deadline = time.monotonic() + 15
    while (await broker.queue_depths())["work"] < n and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    queue = broker.queues[broker.topology.work]
    seen: list[Job] = []
    while (msg := await queue.get(no_ack=True, fail=False, timeout=5)) is not None:
        seen.append(decode(msg.body)[0])
    assert sorted(j.message_id for j in seen) == sorted(jobs)  # each once, none lost
    for j in seen:
        sent = jobs[j.message_id]
        assert (j.user_id, j.question, j.context) == (sent.user_id, sent.question, sent.context)
        assert j.attempt == 1
    assert await queued(broker) == 0


# -- poison input and dependency outages ----------------------------------------------------

# Bodies that are not jobs, each for its own reason: the worker must park each one once.
POISON = [
    b"not json at all",
    b"[1, 2, 3]",
    b'"a json string"',
    b"42",
    b"null",
    b"true",
    b'{"message_id": "p-1", "user_id": "u-p"}',  # no question
    b'{"message_id": 7, "user_id": {"a": 1}, "question": ["q"]}',  # wrong types
    orjson.dumps({"message_id": "p-big", "user_id": "u-p", "question": "x" * (2 << 20)}),
]


def dead_letter_count(reason: str) -> float:
    value = REGISTRY.get_sample_value("bot_retry_dead_letters_total", {"reason": reason})
    return value or 0.0


async def dead_letters(broker: Broker) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Take every message out of the dead-letter queue."""
    queue = broker.queues[broker.topology.dead]
    out = []
    while (msg := await queue.get(no_ack=True, fail=False, timeout=5)) is not None:
        out.append(msg)
    return out


class Answers:
    """An upstream that answers every question, recording them."""

    def __init__(self) -> None:
        self.questions: list[str] = []

    async def answer(self, question: str, context: list[dict[str, Any]], ask: Ask = ASK) -> Answer:
        self.questions.append(question)
        return Answer(f"answer to {question}")


@contextlib.asynccontextmanager
async def running_worker(settings: Settings, inbox: Inbox, upstream: Any) -> AsyncIterator[Broker]:
    """The real worker, consuming in this process; yields its broker."""
    wb = Broker.from_settings(settings, "test-worker", prefetch=settings.retry_prefetch)
    await wb.start()
    assert await wb.wait_declared(30)
    stop = asyncio.Event()
    running = asyncio.create_task(Worker.from_settings(settings, wb, inbox, upstream).run(stop))
    try:
        yield wb
    finally:
        stop.set()
        await running
        await wb.close()


async def wait_inbox(inbox: Inbox, user: str, n: int, timeout: float = 20) -> list[Any]:
    deadline = time.monotonic() + timeout
    while True:
        replies, _ = await inbox.page(user, wait=0.5)
        if len(replies) >= n or time.monotonic() > deadline:
            return replies


async def test_poison_jobs_are_dead_lettered_once_with_reason_and_the_queue_flows_on(
    settings: Settings, redis: Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    # Fewer prefetch slots than poison bodies: each one stuck unacked would block a slot.
    settings = replace(settings, retry_prefetch=4)
    inbox, upstream, user = Inbox(redis), Answers(), unique("u")
    good = [Job(f"g-{i}", user, f"good {i}?", []) for i in range(10)]
    before = dead_letter_count("unreadable")
    async with running_worker(settings, inbox, upstream) as wb:
        for i, body in enumerate(POISON):
            await wb.publish(body, wb.topology.work, message_id=f"poison-{i}")
        for j in good:
            await wb.publish(encode(j, 0.0), wb.topology.work, message_id=j.message_id)
        replies = await wait_inbox(inbox, user, len(good))
        await asyncio.sleep(0.5)  # a poison body parked twice would show up now
        capsys.readouterr()
        await asyncio.to_thread(dlq.run, settings, argparse.Namespace(action="list"))
        listing = capsys.readouterr().out
        dead = await dead_letters(wb)
        depths = await wb.queue_depths()
    assert sorted(r.message_id for r in replies) == sorted(j.message_id for j in good)
    assert sorted(upstream.questions) == sorted(j.question for j in good)  # poison never asked
    assert sorted(m.body for m in dead) == sorted(POISON)  # each once
    reasons = [str((m.headers or {}).get("reason")) for m in dead]
    assert all(r.startswith("unreadable: ") for r in reasons), reasons
    assert any("not JSON" in r for r in reasons) and any("array" in r for r in reasons)
    assert any("question is missing" in r for r in reasons)
    assert any("byte limit" in r for r in reasons)
    assert depths["work"] == 0
    assert dead_letter_count("unreadable") - before == len(POISON)
    assert f"{len(POISON)} dead-lettered job(s)" in listing
    assert "unreadable: body is a JSON array, not an object" in listing, listing


async def test_a_starting_relay_forgets_relays_long_gone_but_none_with_entries_pending(
    settings: Settings, broker: Broker, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    outbox = Outbox(redis, settings.queue_prefix)
    await redis.xgroup_create(outbox.key, "relay", id="0", mkstream=True)
    await redis.xgroup_createconsumer(outbox.key, "relay", "gone-idle")
    await outbox.add(encode(job(), time.time() + 30), "m-held", "u-held")
    await redis.xreadgroup("relay", "gone-holding", {outbox.key: ">"}, count=1)
    await asyncio.sleep(0.05)
    monkeypatch.setattr("bot.retries.outbox.STALE_CONSUMER_MS", 20)  # both are "long" idle
    relay = Relay(outbox, broker)
    try:
        await relay.relay_once()
    finally:
        await relay.close()
    names = {c["name"] for c in await redis.xinfo_consumers(outbox.key, "relay")}
    # the idle one is gone; the one that held an entry stays until that entry is claimed
    assert "gone-idle" not in names and "gone-holding" in names, names


async def test_malformed_outbox_entries_are_parked_once_and_the_relay_goes_on(
    settings: Settings, broker: Broker, redis: Redis
) -> None:
    outbox = Outbox(redis, settings.queue_prefix)
    raw = Redis.from_url(settings.redis_url)  # bytes: one entry is not even UTF-8
    bad: list[dict[bytes, bytes]] = [
        {b"mid": b"no-body"},
        {b"body": b"not json", b"mid": b"b-1"},
        {b"body": b"[1]", b"mid": b"b-2"},
        {b"body": b"\xff\xfe not utf-8", b"mid": b"b-3"},
        {b"body": b'{"message_id": "b-4"}', b"mid": b"b-4"},
    ]
    for fields in bad:
        await raw.xadd(outbox.key, fields)
    await raw.aclose()
    good = [job() for _ in range(5)]
    for j in good:
        await outbox.add(encode(j, time.time() + 30), j.message_id, j.user_id)
    before = dead_letter_count("outbox_unreadable")
    relays = [Relay(outbox, broker) for _ in range(2)]  # two replicas' relays
    tasks = [asyncio.create_task(r.run()) for r in relays]
    try:
        deadline = time.monotonic() + 15
        while await outbox.length() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.3)
        assert all(not t.done() for t in tasks)  # neither relay died on a bad entry
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert await outbox.length() == 0
    assert await queued(broker) == len(good)
    dead = await dead_letters(broker)
    assert sorted(m.message_id or "" for m in dead) == sorted(
        f[b"mid"].decode() for f in bad
    )  # each once
    assert all(str((m.headers or {}).get("reason")).startswith("outbox_unreadable: ") for m in dead)
    assert dead_letter_count("outbox_unreadable") - before == len(bad)


async def test_redis_outage_delays_jobs_and_dead_letters_none(
    tmp_path: Path, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A delivery limit and pause small enough that burning deliveries shows within seconds.
    monkeypatch.setattr(topology, "WORK_DELIVERY_LIMIT", 3)
    monkeypatch.setattr(worker_module, "_INFRA_PAUSE", 0.5)
    private = PrivateRedis(tmp_path / "redis")
    private.start()
    settings = replace(settings, redis_url=private.url, retry_prefetch=8)
    client = make_redis(settings.redis_url)
    inbox, upstream, user = Inbox(client), Answers(), unique("u")
    jobs = [Job(f"o-{i}", user, f"during the outage {i}?", []) for i in range(20)]
    dead_before = {r: dead_letter_count(r) for r in metrics.DEAD_REASONS}
    try:
        async with running_worker(settings, inbox, upstream) as wb:
            private.stop()
            with pytest.raises(RedisError):
                await client.ping()  # the outage is real
            for j in jobs:
                await wb.publish(encode(j, 0.0), wb.topology.work, message_id=j.message_id)
            await asyncio.sleep(4)  # 8 put-backs each; the old nack loop burned 3 deliveries
            assert upstream.questions == []  # nothing answered without Redis
            private.start()
            back = time.monotonic()
            replies = await wait_inbox(inbox, user, len(jobs))
            print(
                f"redis outage: {len(replies)}/{len(jobs)} answered "
                f"{time.monotonic() - back:.2f}s after Redis returned"
            )
            await asyncio.sleep(0.5)  # a duplicate would show up now
            replies, _ = await inbox.page(user)
            dead = await dead_letters(wb)
    finally:
        await client.aclose()
        private.stop()
    assert sorted(r.message_id for r in replies) == sorted(j.message_id for j in jobs)
    assert {r.kind for r in replies} == {"answer"}  # no apology: nothing gave up
    assert dead == []
    assert {r: dead_letter_count(r) for r in metrics.DEAD_REASONS} == dead_before


async def test_job_redelivered_up_to_the_limit_is_parked_with_reason_and_apology(
    redis_url: str, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job handed back unacked again and again (workers dying on it) is parked by the
    worker, with its reason and the user's apology, before the broker's delivery limit
    would drop it in the dead-letter queue silently."""
    monkeypatch.setattr(topology, "WORK_DELIVERY_LIMIT", 3)
    settings = settings_for(redis_url)  # queues of its own: declared with the lower limit
    inbox, upstream, j = Inbox(redis), Answers(), job()
    try:
        hand = Broker.from_settings(settings, "test-hand")  # a worker that dies on every delivery
        await hand.start()
        assert await hand.wait_declared(30)
        await hand.publish(encode(j, 0.0), hand.topology.work, message_id=j.message_id)
        work = hand.queues[hand.topology.work]
        for _ in range(3):
            msg = await work.get(no_ack=False, timeout=5)
            await msg.nack(requeue=True)
        await hand.close()
        before = dead_letter_count("redelivered")
        async with running_worker(settings, inbox, upstream) as wb:
            replies = await wait_inbox(inbox, j.user_id, 1, timeout=15)
            dead: list[aio_pika.abc.AbstractIncomingMessage] = []
            deadline = time.monotonic() + 10
            while not dead and time.monotonic() < deadline:
                dead = await dead_letters(wb)
    finally:
        drop_queues(settings)
    assert [(r.message_id, r.reply) for r in replies] == [(j.message_id, APOLOGY)]
    assert upstream.questions == []
    assert [decode(m.body)[0].message_id for m in dead] == [j.message_id]
    assert str((dead[0].headers or {}).get("reason")).startswith("redelivered: delivered 4 times")
    assert dead_letter_count("redelivered") - before == 1


class Refusing:
    """An upstream that refuses every question for good (a revoked key), recording the asks."""

    def __init__(self) -> None:
        self.models: list[str] = []

    async def answer(self, question: str, context: list[dict[str, Any]], ask: Ask = ASK) -> Answer:
        self.models.append(ask.model)
        raise UpstreamRejected(401, "invalid_api_key", "Incorrect API key provided")


async def test_a_job_the_upstream_refuses_for_good_is_parked_at_once_with_its_apology(
    settings: Settings, redis: Redis
) -> None:
    inbox, upstream = Inbox(redis), Refusing()
    j = replace(job(), model="m-big")
    before = dead_letter_count("rejected")
    async with running_worker(settings, inbox, upstream) as wb:
        await wb.publish(encode(j, 0.0), wb.topology.work, message_id=j.message_id)
        replies = await wait_inbox(inbox, j.user_id, 1, timeout=15)
        dead: list[aio_pika.abc.AbstractIncomingMessage] = []
        deadline = time.monotonic() + 10
        while not dead and time.monotonic() < deadline:
            dead = await dead_letters(wb)
    assert upstream.models == ["m-big"]  # asked once, with the user's model: no retries
    assert [r.message_id for r in replies] == [j.message_id]
    assert "credentials" in replies[0].reply
    reason = str((dead[0].headers or {}).get("reason"))
    assert reason.startswith("rejected: upstream answered 401 invalid_api_key"), reason
    assert dead_letter_count("rejected") - before == 1


async def test_full_redis_holds_jobs_without_spinning_and_loses_none(
    tmp_path: Path, settings: Settings
) -> None:
    """A Redis that answers reads and PING but refuses writes (maxmemory, noeviction): the
    worker cannot store replies, so the jobs wait, a few attempts each rather than a hot
    loop, and all are answered once when Redis takes writes again."""
    private = PrivateRedis(tmp_path / "redis", appendonly=False)
    private.start()
    # A backlog several times the prefetch: a worker that resumed at once after each failure
    # would take every one of them round again and again.
    settings = replace(settings, redis_url=private.url, retry_prefetch=2)
    client = make_redis(settings.redis_url)
    inbox, upstream, user = Inbox(client), Answers(), unique("u")
    jobs = [Job(f"f-{i}", user, f"while Redis is full {i}?", []) for i in range(10)]
    try:
        await client.set("ballast", "x" * 200_000)
        used = int((await client.info("memory"))["used_memory"])
        await client.config_set("maxmemory-policy", "noeviction")
        await client.config_set("maxmemory", str(used - 100_000))
        with pytest.raises(RedisError):
            await client.set("one-more", "x")  # the Redis is full
        async with running_worker(settings, inbox, upstream) as wb:
            for j in jobs:
                await wb.publish(encode(j, 0.0), wb.topology.work, message_id=j.message_id)
            await asyncio.sleep(4)
            attempts = len(upstream.questions)
            await client.config_set("maxmemory", "0")
            replies = await wait_inbox(inbox, user, len(jobs))
            await asyncio.sleep(0.5)
            replies, _ = await inbox.page(user)
            dead = await dead_letters(wb)
    finally:
        await client.aclose()
        private.stop()
    print(f"full redis: {attempts} upstream calls for {len(jobs)} jobs in 4 s")
    assert 1 <= attempts <= 12  # about the prefetch per pause, not the whole backlog each time
    assert sorted(r.message_id for r in replies) == sorted(j.message_id for j in jobs)
    assert dead == []
