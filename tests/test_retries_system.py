"""The retry path end to end: NGINX, replicas, the worker, the stub, Redis and a RabbitMQ node
of this module's own (so the test may stop and restart it). Each test counts what it sent,
what was answered 202, what reached the inboxes, duplicates (0) and losses (0)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

import aio_pika
import pytest
import requests

from bot.core.types import Job
from bot.inbox import APOLOGY
from bot.retries.jobs import encode
from bot.retries.outbox import outbox_key
from tests.rabbit import PrivateRabbit
from tests.support import (
    Stack,
    claim_redis_db,
    post,
    release_redis_db,
    run,
    running_stack,
    unique,
)

pytestmark = pytest.mark.system


@pytest.fixture(scope="module")
def rabbit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRabbit]:
    node = PrivateRabbit(tmp_path_factory.mktemp("rabbit"))
    node.start()
    yield node
    node.stop()


@pytest.fixture(scope="module")
def rstack(tmp_path_factory: pytest.TempPathFactory, rabbit: PrivateRabbit) -> Iterator[Stack]:
    owner = f"retries-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    db = claim_redis_db(owner)
    env = {
        "AMQP_URL": rabbit.url,
        "BOT_REPLICAS": "2",
        "BOT_OBSERVABILITY": "false",
        "BOT_RATE_LIMIT": "1000/second",
        "BOT_RATE_BURST": "1000",
        "BOT_RETRY_BASE_DELAY": "0.1",
        "BOT_RETRY_MAX_DELAY": "0.4",
        "BOT_RETRY_MAX_ATTEMPTS": "8",
        "BOT_UPSTREAM_TIMEOUT": "1",
        "BOT_DRAIN_TIMEOUT": "3",
        # Opened by failures without Retry-After, the breaker would space attempts >= 1 s
        # apart; its own tests cover it.
        "BOT_BREAKER_CONSECUTIVE": "100000",
        "BOT_BREAKER_MIN_CALLS": "100000",
    }
    try:
        with running_stack(tmp_path_factory.mktemp("rstack"), db, **env) as stack:
            yield stack
    finally:
        release_redis_db(db, owner)


@pytest.fixture(autouse=True)
def healthy_stub(rstack: Stack) -> Iterator[None]:
    rstack.faults(outage=False, error_rate=0.0, latency_ms=5)
    yield
    rstack.faults(outage=False, error_rate=0.0, latency_ms=5)


def send_all(stack: Stack, messages: list[dict[str, str]], workers: int = 24) -> list[int]:
    """POST every message through NGINX; their status codes, in order."""

    def one(body: dict[str, str]) -> int:
        return post(stack.url + "/v1/messages", body, timeout=20).status_code

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, messages))


def messages_for(users: list[str], per_user: int) -> list[dict[str, str]]:
    return [
        {"user_id": u, "text": f"question {i} of {u}?", "message_id": f"m-{u}-{i}"}
        for i in range(per_user)
        for u in users
    ]


def all_replies(stack: Stack, users: Iterable[str]) -> list[dict[str, Any]]:
    """Every reply in these users' inboxes, paging through the API from the start."""
    out: list[dict[str, Any]] = []
    for user in users:
        cursor = "0"
        while True:
            page = requests.get(
                f"{stack.url}/v1/users/{user}/replies", params={"after": cursor}, timeout=10
            ).json()
            out += page["replies"]
            if not page["replies"]:
                break
            cursor = page["next"]
    return out


def wait_replies(
    stack: Stack, users: list[str], expected: int, timeout: float = 60
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        replies = all_replies(stack, users)
        if len(replies) >= expected or time.monotonic() > deadline:
            return replies
        time.sleep(0.3)


def count_inbox(stack: Stack, users: list[str]) -> int:
    r = stack.redis()
    return sum(r.xlen(f"bot:{{{u}}}:inbox") for u in users)


def metric(url: str, name: str, labels: str = "") -> float:
    text = requests.get(url, timeout=5).text
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def worker_metrics(stack: Stack) -> str:
    return f"http://127.0.0.1:{stack.env['BOT_WORKER_METRICS_PORT']}/metrics"


def tally(
    sent: list[dict[str, str]], codes: list[int], replies: list[dict[str, Any]]
) -> dict[str, int]:
    per_id = Counter(r["message_id"] for r in replies)
    ids = {m["message_id"] for m in sent}
    return {
        "sent": len(sent),
        "answered_202": codes.count(202),
        "delivered": len(set(per_id) & ids),
        "duplicated": sum(n - 1 for n in per_id.values() if n > 1),
        "lost": len(ids - set(per_id)),
    }


def test_upstream_outage_every_message_queued_and_answered_exactly_once(rstack: Stack) -> None:
    users = [unique("out") for _ in range(50)]
    sent = messages_for(users, 10)
    before = rstack.stub_stats()["failures"]
    retries_before = metric(worker_metrics(rstack), "bot_retry_attempts_total", '{outcome="retry"}')
    rstack.faults(outage=True, latency_ms=5)
    codes = send_all(rstack, sent)
    assert Counter(codes) == {202: 500}, Counter(codes)  # none 5xx, none answered wrongly
    # The outage did happen (the breaker opens on the stub's 503 + Retry-After, so most
    # messages short-circuit without reaching it).
    assert rstack.stub_stats()["failures"] - before > 0
    time.sleep(1.0)  # a retry or two of the worker also fails
    rstack.faults(outage=False, latency_ms=5)
    recovered = time.time()
    replies = wait_replies(rstack, users, 500)
    time.sleep(1.0)  # anything late (a duplicate) would show up now
    replies = all_replies(rstack, users)
    counts = tally(sent, codes, replies)
    last = max(datetime.fromisoformat(r["at"].replace("Z", "+00:00")) for r in replies)
    counts_line = {**counts, "recovery_to_last_delivery_s": round(last.timestamp() - recovered, 2)}
    print("outage test:", counts_line)
    assert counts == {"sent": 500, "answered_202": 500, "delivered": 500} | {
        "duplicated": 0,
        "lost": 0,
    }
    retries = metric(worker_metrics(rstack), "bot_retry_attempts_total", '{outcome="retry"}')
    assert retries - retries_before > 0  # the worker did retry during the outage
    # Replaying a message whose deferred reply exists returns that reply.
    replay = post(rstack.url + "/v1/messages", sent[0])
    assert replay.status_code == 200 and replay.headers["Idempotent-Replayed"] == "true"
    body = replay.json()
    assert body["status"] == "replied" and body["reply"] == next(
        r["reply"] for r in replies if r["message_id"] == sent[0]["message_id"]
    )


def test_worker_killed_mid_batch_loses_and_duplicates_nothing(rstack: Stack) -> None:
    users = [unique("kill") for _ in range(15)]
    sent = messages_for(users, 10)
    rstack.faults(outage=True, latency_ms=5)
    codes = send_all(rstack, sent)
    assert Counter(codes) == {202: 150}
    rstack.faults(outage=False, latency_ms=150)  # slow answers: a batch is in flight a while
    deadline = time.monotonic() + 30
    while (n := count_inbox(rstack, users)) < 20 and time.monotonic() < deadline:
        time.sleep(0.02)
    old = rstack.kill("worker", signal.SIGKILL)
    assert 0 < n < 150, n  # killed mid-batch
    deadline = time.monotonic() + 20
    while rstack.pid("worker") in (0, old) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert rstack.pid("worker") not in (0, old)  # supervisord restarted it
    replies = wait_replies(rstack, users, 150)
    time.sleep(0.5)
    counts = tally(sent, codes, all_replies(rstack, users))
    print("worker SIGKILL test:", counts, "delivered before the kill:", n)
    assert counts["delivered"] == 150 and counts["duplicated"] == 0 and counts["lost"] == 0
    assert len(replies) == 150


def test_broker_gone_outbox_answers_202_and_a_restart_loses_no_job(
    rstack: Stack, rabbit: PrivateRabbit
) -> None:
    users = [unique("gone") for _ in range(10)]
    first, second = messages_for(users, 4), messages_for(users, 8)[40:]
    rstack.faults(outage=True, latency_ms=5)
    codes = send_all(rstack, first)  # these wait in RabbitMQ's delay queues
    assert Counter(codes) == {202: 40}
    rabbit.stop()  # the broker is gone (and with it every connection)
    ready = requests.get(rstack.replica_url(1) + "/readyz", timeout=5)
    # still ready: the outbox takes the jobs (issue 15, item 13)
    assert ready.status_code == 200 and ready.json()["dependencies"]["rabbitmq"] is False
    codes2 = send_all(rstack, second)
    assert Counter(codes2) == {202: 40}  # from the outbox
    outbox = rstack.redis().xlen(outbox_key(rstack.env["BOT_QUEUE_PREFIX"]))
    assert outbox == 40
    rabbit.start()  # the same node back, with its data
    rstack.faults(outage=False, latency_ms=5)
    replies = wait_replies(rstack, users, 80, timeout=60)
    time.sleep(0.5)
    counts = tally(first + second, codes + codes2, all_replies(rstack, users))
    print("broker gone test:", counts)
    assert counts == {"sent": 80, "answered_202": 80, "delivered": 80} | {
        "duplicated": 0,
        "lost": 0,
    }
    assert len(replies) == 80
    assert rstack.redis().xlen(outbox_key(rstack.env["BOT_QUEUE_PREFIX"])) == 0
    assert requests.get(rstack.replica_url(1) + "/readyz", timeout=5).status_code == 200


def bot_cli(stack: Stack, *args: str) -> tuple[int, str]:
    res = run(["bot", *args], env=stack._process_env())
    return res.returncode, res.stdout + res.stderr


def test_max_attempts_dead_letter_apology_then_dlq_replay_answers(rstack: Stack) -> None:
    user = unique("dead")
    sent = [
        {"user_id": user, "text": f"doomed {i}?", "message_id": f"d-{user}-{i}"} for i in (1, 2)
    ]
    rstack.faults(error_rate=1.0, latency_ms=5)
    assert send_all(rstack, sent) == [202, 202]
    replies = wait_replies(rstack, [user], 2, timeout=30)
    assert sorted(r["message_id"] for r in replies) == sorted(m["message_id"] for m in sent)
    assert {r["reply"] for r in replies} == {APOLOGY}  # one apology each
    code, out = bot_cli(rstack, "dlq", "list")
    assert code == 0 and "2 dead-lettered job(s)" in out, out
    assert all(m["message_id"] in out for m in sent)
    rstack.faults(error_rate=0.0, latency_ms=5)
    code, out = bot_cli(rstack, "dlq", "replay", sent[0]["message_id"], "no-such-id")
    assert code == 1 and "replayed " + sent[0]["message_id"] in out and "no-such-id" in out, out
    replies = wait_replies(rstack, [user], 3, timeout=30)
    answers = [r for r in replies if r["message_id"] == sent[0]["message_id"]]
    assert [r["reply"] == APOLOGY for r in answers] == [True, False]  # apology, then answer
    assert "doomed 1?" in answers[1]["reply"]
    code, out = bot_cli(rstack, "dlq", "purge")
    assert code == 0 and "purged 1 " in out, out
    code, out = bot_cli(rstack, "dlq", "list")
    assert code == 0 and "no dead-lettered jobs" in out
    assert metric(worker_metrics(rstack), "bot_retry_attempts_total", '{outcome="dead"}') >= 2
    time.sleep(0.5)
    assert len(all_replies(rstack, [user])) == 3  # nothing more arrived


def test_replies_route_validates_and_long_polls(rstack: Stack) -> None:
    user = unique("poll")
    url = f"{rstack.url}/v1/users/{user}/replies"
    assert requests.get(url, timeout=5).json() == {"replies": [], "next": "0"}
    for bad in ({"after": "nope"}, {"wait": "31"}, {"wait": "x"}, {"limit": "0"}):
        r = requests.get(url, params=bad, timeout=5)
        assert r.status_code == 400 and r.json()["error"]["code"].startswith("invalid_"), bad
    rstack.faults(outage=True, latency_ms=5)
    msg = {"user_id": user, "text": "long poll me?", "message_id": unique("m")}
    assert post(rstack.url + "/v1/messages", msg).status_code == 202
    rstack.faults(outage=False, latency_ms=5)
    started = time.monotonic()
    page = requests.get(url, params={"wait": "20"}, timeout=30).json()
    assert [r["message_id"] for r in page["replies"]] == [msg["message_id"]]
    assert time.monotonic() - started < 15
    assert requests.get(url, params={"after": page["next"]}, timeout=5).json()["replies"] == []
    assert requests.get(url, params={"limit": "1"}, timeout=5).json()["next"] == page["next"]


def test_poison_jobs_and_outbox_entries_reach_the_dlq_once_with_their_reason(
    rstack: Stack, rabbit: PrivateRabbit
) -> None:
    """Bodies that are not jobs, in the work queue and in the outbox, ahead of good jobs: the
    good ones are answered, each bad one is parked once with its reason, the worker counts
    them, and `bot dlq list` shows why."""
    prefix, user = rstack.env["BOT_QUEUE_PREFIX"], unique("poison")
    poison = {"px-1": b"not json", "px-2": b"[1, 2]", "px-3": b'{"message_id": "px-3"}'}
    good = [Job(f"pg-{user}-{i}", user, f"good {i}?", []) for i in range(6)]
    metrics_urls = [worker_metrics(rstack), rstack.metrics_url(1), rstack.metrics_url(2)]

    def dead_count(reason: str, urls: list[str]) -> float:
        labels = f'{{reason="{reason}"}}'
        return sum(metric(url, "bot_retry_dead_letters_total", labels) for url in urls)

    unreadable = dead_count("unreadable", metrics_urls[:1])
    outbox_bad = dead_count("outbox_unreadable", metrics_urls)

    async def publish() -> None:
        connection = await aio_pika.connect(rabbit.url, timeout=10)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            for mid, body in [*poison.items(), *((j.message_id, encode(j, 0.0)) for j in good)]:
                await channel.default_exchange.publish(
                    aio_pika.Message(body, message_id=mid), f"{prefix}.work"
                )

    r = rstack.redis()
    r.xadd(outbox_key(prefix), {"body": "not json either", "mid": "px-outbox"})
    extra = Job(f"pg-{user}-outbox", user, "good from the outbox?", [])
    r.xadd(outbox_key(prefix), {"body": encode(extra, 0.0).decode(), "mid": extra.message_id})
    asyncio.run(publish())
    replies = wait_replies(rstack, [user], len(good) + 1, timeout=30)
    assert sorted(x["message_id"] for x in replies) == sorted(
        [j.message_id for j in good] + [extra.message_id]
    )
    deadline = time.monotonic() + 15
    while True:  # the last bad one may still be on its way to the DLQ
        code, out = bot_cli(rstack, "dlq", "list")
        if "4 dead-lettered job(s)" in out or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert code == 0 and "4 dead-lettered job(s)" in out, out
    lines = {line.split()[0]: line for line in out.splitlines()[1:-1]}
    assert "unreadable: body is not JSON" in lines["px-1"]
    assert "unreadable: body is a JSON array, not an object" in lines["px-2"]
    assert "unreadable: field user_id is missing" in lines["px-3"]
    assert "outbox_unreadable: body is not JSON" in lines["px-outbox"]
    assert dead_count("unreadable", metrics_urls[:1]) - unreadable == 3  # the worker's /metrics
    assert dead_count("outbox_unreadable", metrics_urls) - outbox_bad == 1
    assert r.xlen(outbox_key(prefix)) == 0
    code, out = bot_cli(rstack, "dlq", "replay", "--all")  # nothing replayable in it
    assert code == 0 and "0 job(s) re-queued" in out and out.count("not replayed") == 4, out
    code, out = bot_cli(rstack, "dlq", "purge")
    assert code == 0 and "purged 4 " in out, out
