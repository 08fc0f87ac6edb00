"""Telegram's pacing (issue 18): a group chat's 20/min, and the overall 30/s shared by every
delivering process (a schedule in Redis), against the real Redis and RabbitMQ; the stub
plays Telegram's Bot API and records when each send reached it."""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from redis.asyncio import Redis

from bot.api.keys import SETTINGS
from bot.channels import topology
from bot.channels.pace import SharedPace
from bot.channels.wire import Outbound, encode, shard
from bot.settings import Settings, load_settings
from infra.common import drop_queues
from tests.support import AMQP_URL, AppClient, Upstream, free_port
from tests.test_channels import (
    MakeClient,
    channel_env,
    channel_worker,
    connected,
    new_id,
    post,
    update,
    wait_sent,
)

ROOT = Path(__file__).resolve().parent.parent


async def test_group_chat_paced_at_its_group_rate_private_chat_not(
    make_app_client: MakeClient, upstream: Upstream
) -> None:
    env = channel_env(upstream, BOT_TELEGRAM_GROUP_RATE="2/second")
    tg = await connected(await make_app_client(**env))
    group, private = -new_id(), new_id()
    async with channel_worker(tg.app[SETTINGS]):
        for i in range(3):
            assert (await post(tg, update(new_id(), group, f"/echo g{i}"))).status == 200
            assert (await post(tg, update(new_id(), private, f"/echo p{i}"))).status == 200
        group_sent = await wait_sent(upstream, group, 3)
        private_sent = await wait_sent(upstream, private, 3)
    assert [s["text"] for s in group_sent] == ["g0", "g1", "g2"]
    gaps = [b["at"] - a["at"] for a, b in itertools.pairwise(group_sent)]
    assert min(gaps) >= 0.45, gaps  # 2/second here (20/minute by default)
    # A private chat keeps its own (much faster) per-chat rate.
    assert private_sent[-1]["at"] - private_sent[0]["at"] < 0.45


async def test_chat_pace_outlives_the_worker_that_sent_its_last_message(
    make_app_client: MakeClient, upstream: Upstream
) -> None:
    """A chat that just got an answer, whose worker then restarts: the new one (no memory
    of that send) still waits the chat's interval, kept in Redis, before its next send."""
    env = channel_env(upstream, BOT_TELEGRAM_CHAT_RATE="30/minute")  # 2 s per chat
    tg = await connected(await make_app_client(**env))
    chat = new_id()
    async with channel_worker(tg.app[SETTINGS]):
        assert (await post(tg, update(new_id(), chat, "/echo before"))).status == 200
        await wait_sent(upstream, chat, 1)
        first_seen = time.monotonic()
    async with channel_worker(tg.app[SETTINGS]):
        assert (await post(tg, update(new_id(), chat, "/echo after"))).status == 200
        # Restarted and given the next message well inside the interval: the wait below is
        # the pace's, not a slow restart's.
        assert time.monotonic() - first_seen < 1.2
        got = await wait_sent(upstream, chat, 2)
    assert [s["text"] for s in got] == ["before", "after"]
    assert got[1]["at"] - got[0]["at"] >= 1.95


async def test_pace_falls_back_to_the_process_when_redis_is_down() -> None:
    """No Redis: the channel's pace is kept in the process (the conversation's by Delivery's
    own), and no send waits on, or fails for, the missing schedule."""
    down = Redis(port=free_port(), socket_connect_timeout=0.2)
    pace = SharedPace(down, {"telegram": "token"})
    try:
        started = time.monotonic()
        for _ in range(3):
            await pace.wait("telegram", 0.2, "42", 5.0)
        took = time.monotonic() - started
    finally:
        await down.aclose()
    assert 0.35 <= took < 1.5, took  # two channel intervals; not the conversation's 5 s


def _worker_env(settings: Settings, prefix: str) -> dict[str, str]:
    return {
        **os.environ,
        "BOT_DOTENV": "/dev/null",
        "REDIS_URL": settings.redis_url,
        "AMQP_URL": AMQP_URL,
        "BOT_QUEUE_PREFIX": prefix,
        "BOT_UPSTREAM_URL": settings.upstream_url,
        "TELEGRAM_BOT_TOKEN": settings.telegram_bot_token,
        "TELEGRAM_WEBHOOK_SECRET": settings.telegram_webhook_secret,
        "TELEGRAM_API_URL": settings.telegram_api_url,
        "BOT_TELEGRAM_CHAT_RATE": "50/second",
        "BOT_TELEGRAM_RATE": str(settings.telegram_rate),
        "BOT_LOG_LEVEL": "warning",
    }


@pytest.fixture
def other_prefix() -> Iterator[str]:
    prefix = f"test-pace-{uuid.uuid4().hex[:8]}"
    yield prefix
    env = {"BOT_QUEUE_PREFIX": prefix, "AMQP_URL": AMQP_URL, **channel_env_secrets()}
    drop_queues(load_settings(env, dotenv=Path("/dev/null")))


def channel_env_secrets() -> dict[str, str]:
    return {"TELEGRAM_BOT_TOKEN": "1:x", "TELEGRAM_WEBHOOK_SECRET": "x"}


async def _publish(outs: list[tuple[str, Outbound]]) -> None:
    """Straight onto each prefix's outbound queues, as its processor would (declared by then)."""
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        for prefix, out in outs:
            name = topology.outbound(prefix, out.channel, shard(out.lane))
            message = aio_pika.Message(encode(out), message_id=out.id, delivery_mode=2)
            await channel.default_exchange.publish(message, routing_key=name)


async def _declared(prefix: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        while True:
            channel = await connection.channel()
            try:
                for n in range(2):
                    await channel.declare_queue(
                        topology.outbound(prefix, "telegram", n), passive=True
                    )
                return
            except aio_pika.exceptions.ChannelClosed:
                assert time.monotonic() < deadline, "the other worker never declared its queues"
                await asyncio.sleep(0.2)


async def test_overall_rate_shared_by_two_delivering_processes(
    make_app_client: MakeClient, upstream: Upstream, other_prefix: str
) -> None:
    """Two deliverers (this test's process and a `bot worker` of another queue prefix), one
    bot: together they keep to BOT_TELEGRAM_RATE, not twice it."""
    rate = 10
    tg: AppClient = await connected(
        await make_app_client(**channel_env(upstream, BOT_TELEGRAM_RATE=f"{rate}/second"))
    )
    settings = tg.app[SETTINGS]
    port = free_port()
    other = subprocess.Popen(
        [sys.executable, "-m", "bot.cli", "worker", "--metrics-port", str(port)],
        env=_worker_env(settings, other_prefix),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    per_side = 20
    try:
        await _declared(other_prefix)
        async with channel_worker(settings):
            sides = {
                p: [str(new_id()) for _ in range(per_side)]
                for p in (settings.queue_prefix, other_prefix)
            }
            # One message to each side in turn: both are sending all along.
            await _publish(
                [
                    (prefix, Outbound("telegram", chats[i], f"pace-{chats[i]}", "paced"))
                    for i in range(per_side)
                    for prefix, chats in sides.items()
                ]
            )
            every = [c for chats in sides.values() for c in chats]
            deadline = time.monotonic() + 30
            while True:
                record = [s for s in await _sends(upstream) if s["conversation"] in every]
                if len(record) >= 2 * per_side or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
    finally:
        other.terminate()
        _, err = other.communicate(timeout=30)
    assert len(record) == 2 * per_side, err.decode()[-2000:]
    times = sorted(s["at"] for s in record)
    mine = [s["at"] for s in record if s["conversation"] in sides[settings.queue_prefix]]
    theirs = [s["at"] for s in record if s["conversation"] in sides[other_prefix]]
    # Both delivered, at the same time...
    assert min(mine) < max(theirs) and min(theirs) < max(mine)
    # ...and any `rate + 1` sends in a row span about a second: the rate, for both together
    # (each on its own would have sent 2 * rate a second).
    spans = [b - a for a, b in zip(times, times[rate:], strict=False)]
    assert min(spans) >= 0.85, spans
    assert times[-1] - times[0] >= (2 * per_side - 1) / rate * 0.9


async def _sends(upstream: Upstream) -> list[dict[str, Any]]:
    import aiohttp

    async with aiohttp.ClientSession() as s, s.get(upstream.url + "/admin/telegram/sent") as r:
        data: list[dict[str, Any]] = await r.json()
        return data
