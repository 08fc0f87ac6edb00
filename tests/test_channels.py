"""Chat channels (issue 18): Telegram in through the webhook, out through the delivery path.

In-process: a replica (`create_app`) and the channels' worker (`ChannelWorker`) on the test's
loop, against the real Redis and RabbitMQ; the stub plays Telegram's Bot API and records every
send. Updates are built with python-telegram-bot's own types.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import aio_pika
import pytest
import telegram
from redis.asyncio import Redis

from bot import runtime
from bot.api.keys import SETTINGS, STATE
from bot.channels import admin, sending, topology
from bot.channels.intake import dedupe_key
from bot.channels.runner import ChannelWorker
from bot.core.service import BotService
from bot.inbox import Inbox
from bot.settings import Settings
from bot.store import Store
from bot.upstream import build_answerer
from tests.support import AMQP_URL, AppClient, Upstream

SECRET = "s3cret-token_for-tests"
TOKEN = "123456:test-token"
HEADER = "X-Telegram-Bot-Api-Secret-Token"
MakeClient = Callable[..., Awaitable[AppClient]]


def channel_env(upstream: Upstream, **overrides: str) -> dict[str, str]:
    return {
        "TELEGRAM_BOT_TOKEN": TOKEN,
        "TELEGRAM_WEBHOOK_SECRET": SECRET,
        "TELEGRAM_API_URL": upstream.url,
        "BOT_TELEGRAM_CHAT_RATE": "50/second",
        "BOT_TELEGRAM_RATE": "1000/second",
        "BOT_RETRY_BASE_DELAY": "0.05",
        "BOT_RETRY_MAX_DELAY": "0.2",
        **overrides,
    }


def update(update_id: int, chat_id: int, text: str | None = None) -> dict[str, Any]:
    """A Bot API update as Telegram sends it: a text message, or a sticker when text is None."""
    chat = telegram.Chat(id=chat_id, type=telegram.Chat.PRIVATE)
    user = telegram.User(id=chat_id, first_name="Ada", is_bot=False)
    sticker = None
    if text is None:
        sticker = telegram.Sticker(
            "file-1", "uniq-1", 512, 512, False, False, telegram.Sticker.REGULAR
        )
    message = telegram.Message(
        message_id=update_id,
        date=datetime.now(UTC),
        chat=chat,
        from_user=user,
        text=text,
        sticker=sticker,
    )
    return telegram.Update(update_id=update_id, message=message).to_dict()


def new_id() -> int:
    return uuid.uuid4().int % 10**9


async def post(client: AppClient, body: dict[str, Any], secret: str | None = SECRET) -> Any:
    headers = {HEADER: secret} if secret is not None else {}
    return await client.post("/channels/telegram", json=body, headers=headers)


async def sent(
    upstream: Upstream, chat_id: int | str, platform: str = "telegram"
) -> list[dict[str, Any]]:
    resp = await _stub_get(upstream, f"/admin/{platform}/sent")
    return [s for s in resp if s["conversation"] == str(chat_id)]


async def _stub_get(upstream: Upstream, path: str) -> Any:
    import aiohttp

    async with aiohttp.ClientSession() as s, s.get(upstream.url + path) as r:
        return await r.json()


async def _stub_post(upstream: Upstream, path: str, body: Any) -> Any:
    import aiohttp

    async with aiohttp.ClientSession() as s, s.post(upstream.url + path, json=body) as r:
        return await r.json()


async def wait_sent(
    upstream: Upstream,
    chat_id: int | str,
    n: int,
    timeout: float = 10.0,
    status: Any = 200,
    platform: str = "telegram",
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        got = [
            s
            for s in await sent(upstream, chat_id, platform)
            if status is None or s["status"] == status
        ]
        if len(got) >= n or time.monotonic() > deadline:
            return got
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def channel_worker(settings: Settings) -> AsyncIterator[ChannelWorker]:
    """The channels' processor and delivery, as `bot worker` runs them, on this loop."""
    async with (
        runtime.redis_client(settings.redis_url) as redis,
        runtime.http_client(limit=50) as http,
    ):
        store = Store.from_settings(settings, redis)
        answerer = build_answerer(settings, redis, http)
        service = BotService.from_settings(
            settings, store, answerer, deferrer=None, inbox=Inbox(redis)
        )
        worker = ChannelWorker(settings, redis, http, service)
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop))
        try:
            yield worker
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)


async def connected(client: AppClient) -> AppClient:
    """The replica once its broker is up (before that, webhooks get 503: the platform retries)."""
    checks = dict(client.app[STATE].readiness)
    for _ in range(200):
        if await checks["rabbitmq"]():
            return client
        await asyncio.sleep(0.05)
    raise AssertionError("the replica's broker never connected")


@pytest.fixture
async def tg(make_app_client: MakeClient, upstream: Upstream) -> AppClient:
    return await connected(await make_app_client(**channel_env(upstream)))


async def test_telegram_disabled_without_its_secrets_is_404_json(app_client: AppClient) -> None:
    resp = await post(app_client, update(new_id(), 1, "hi"))
    assert resp.status == 404
    assert (await resp.json())["error"]["code"] == "not_found"


@pytest.mark.parametrize("secret", [None, "", "wrong", SECRET + "x"])
async def test_wrong_or_missing_secret_is_401_and_nothing_taken(
    tg: AppClient, redis: Redis, secret: str | None
) -> None:
    uid = new_id()
    resp = await post(tg, update(uid, 7, "hi"), secret)
    assert resp.status == 401
    assert (await resp.json())["error"]["code"] == "unauthorized"
    assert await redis.exists(dedupe_key("telegram", str(uid))) == 0


async def test_update_without_text_is_acked_and_ignored(tg: AppClient, redis: Redis) -> None:
    uid = new_id()
    resp = await post(tg, update(uid, 7, None))
    assert resp.status == 200 and await resp.json() == {}
    assert await redis.exists(dedupe_key("telegram", str(uid))) == 0


async def test_not_an_update_is_400_json(tg: AppClient) -> None:
    resp = await tg.post("/channels/telegram", json=[1], headers={HEADER: SECRET})
    assert resp.status == 400
    resp = await tg.post("/channels/telegram", data=b"{", headers={HEADER: SECRET})
    assert resp.status in (400, 415)


async def test_message_answered_on_its_chat(tg: AppClient, upstream: Upstream) -> None:
    chat = new_id()
    async with channel_worker(tg.app[SETTINGS]):
        resp = await post(tg, update(new_id(), chat, "/echo hello there"))
        assert resp.status == 200 and await resp.json() == {}
        got = await wait_sent(upstream, chat, 1)
    assert [s["text"] for s in got] == ["hello there"]


async def test_same_update_twice_and_across_replicas_answered_once(
    make_app_client: MakeClient, upstream: Upstream
) -> None:
    env = channel_env(upstream)
    one = await connected(await make_app_client(**env))
    two = await connected(await make_app_client(**env))
    chat, seq_id, conc_id = new_id(), new_id(), new_id()
    async with channel_worker(one.app[SETTINGS]):
        first = update(seq_id, chat, "/echo once")
        assert (await post(one, first)).status == 200
        assert (await post(two, first)).status == 200  # Telegram's redelivery: a duplicate
        twice = update(conc_id, chat, "/echo twice")
        answers = await asyncio.gather(*(post(c, twice) for c in (one, two, one, two)))
        # Each is acked (200) or told to come back (503, another replica was queueing it).
        assert sorted({r.status for r in answers}) in ([200], [200, 503])
        assert 200 in {r.status for r in answers}
        await wait_sent(upstream, chat, 2)
        await asyncio.sleep(0.5)  # room for a second copy, if one were coming
    assert [s["text"] for s in await sent(upstream, chat)] == ["once", "twice"]


async def test_webhook_acked_within_a_second_while_the_upstream_hangs(
    tg: AppClient, upstream: Upstream
) -> None:
    upstream.faults(latency_ms=30_000)
    started = time.monotonic()
    resp = await post(tg, update(new_id(), new_id(), "what is a pulsar?"))
    elapsed = time.monotonic() - started
    assert resp.status == 200
    assert elapsed < 1.0


async def test_chat_answered_in_order_while_another_chat_is_paused_by_429(
    tg: AppClient, upstream: Upstream
) -> None:
    fast, paused = new_id(), new_id()
    await _stub_post(
        upstream,
        "/admin/telegram/script",
        {"chat_id": str(paused), "responses": [{"status": 429, "retry_after": 2}]},
    )
    async with channel_worker(tg.app[SETTINGS]):
        assert (await post(tg, update(new_id(), paused, "/echo paused"))).status == 200
        await wait_sent(upstream, paused, 1, status=429)
        for i in range(10):
            assert (await post(tg, update(new_id(), fast, f"/echo m{i}"))).status == 200
        fast_sent = await wait_sent(upstream, fast, 10)
        paused_sent = await wait_sent(upstream, paused, 2, status=None)
    assert [s["text"] for s in fast_sent] == [f"m{i}" for i in range(10)]
    first, second = paused_sent
    assert (first["status"], second["status"]) == (429, 200)
    # Paused for exactly the retry-after (not less), and the other chat was not held by it.
    assert 2.0 <= second["at"] - first["at"] < 3.5
    assert fast_sent[-1]["at"] < second["at"]


async def test_blocked_chat_dead_lettered_with_reason_never_retried(
    tg: AppClient, upstream: Upstream
) -> None:
    chat = new_id()
    await _stub_post(
        upstream,
        "/admin/telegram/script",
        {"chat_id": str(chat), "responses": [{"status": 403, "description": "bot was blocked"}]},
    )
    settings = tg.app[SETTINGS]
    uid = new_id()
    async with channel_worker(settings):
        assert (await post(tg, update(uid, chat, "/echo hi"))).status == 200
        await wait_sent(upstream, chat, 1, status=403)
        await asyncio.sleep(0.5)
    assert [s["status"] for s in await sent(upstream, chat)] == [403]
    reasons = await _dead_reasons(settings, f"tg:{uid}")
    assert reasons == ["permanent: 403: bot was blocked"]


async def test_server_errors_retried_until_sent(tg: AppClient, upstream: Upstream) -> None:
    chat = new_id()
    script = [{"status": 502}, {"status": 500}]
    await _stub_post(
        upstream, "/admin/telegram/script", {"chat_id": str(chat), "responses": script}
    )
    async with channel_worker(tg.app[SETTINGS]):
        assert (await post(tg, update(new_id(), chat, "/echo at last"))).status == 200
        got = await wait_sent(upstream, chat, 1)
    assert [s["status"] for s in await sent(upstream, chat)] == [502, 500, 200]
    assert [s["text"] for s in got] == ["at last"]


async def test_send_that_times_out_retried_until_sent(
    tg: AppClient, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sending, "SEND_TIMEOUT", 0.3)  # the platform's call, whole (10 s)
    chat = new_id()
    await _stub_post(
        upstream, "/admin/telegram/script", {"chat_id": str(chat), "responses": [{"hang_ms": 3000}]}
    )
    async with channel_worker(tg.app[SETTINGS]):
        assert (await post(tg, update(new_id(), chat, "/echo after a hang"))).status == 200
        got = await wait_sent(upstream, chat, 1)
    assert [s["status"] for s in await sent(upstream, chat)] == ["hang", 200]
    assert [s["text"] for s in got] == ["after a hang"]


async def test_rate_limited_user_gets_one_polite_message(
    make_app_client: MakeClient, upstream: Upstream
) -> None:
    env = channel_env(upstream, BOT_RATE_LIMIT="1/minute", BOT_RATE_BURST="1")
    tg = await connected(await make_app_client(**env))
    chat = new_id()
    async with channel_worker(tg.app[SETTINGS]):
        for i in range(5):
            assert (await post(tg, update(new_id(), chat, f"/echo n{i}"))).status == 200
        await wait_sent(upstream, chat, 3)
        await asyncio.sleep(0.5)
    texts = [s["text"] for s in await sent(upstream, chat)]
    assert texts[:2] == ["n0", "n1"]
    assert len(texts) == 3 and "faster than I can answer" in texts[2]


async def _dead_reasons(settings: Settings, message_id: str) -> list[str]:
    """The reasons of the dead-lettered sends of `message_id` (others, other tests' in the
    session's shared queue, are put back once the whole queue was read)."""
    connection = await aio_pika.connect(AMQP_URL)
    reasons: list[str] = []
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(topology.dead(settings.queue_prefix), passive=True)
        others = []
        while (msg := await queue.get(fail=False, no_ack=False)) is not None:
            if msg.message_id == message_id:
                reasons.append(str((msg.headers or {}).get("reason")))
                await msg.ack()
            else:
                others.append(msg)
        for msg in others:
            await msg.nack(requeue=True)
    return reasons


async def test_channels_status_names_every_queue_and_its_depth(
    tg: AppClient, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = tg.app[SETTINGS]
    assert await asyncio.to_thread(admin.status, settings) == 0
    out = capsys.readouterr().out
    assert "enabled: telegram" in out
    for name in topology.names(settings.queue_prefix, ("telegram",)):
        [line] = [line for line in out.splitlines() if line.startswith(name + " ")]
        assert line.split()[-1].isdigit(), line  # declared by the replica: a depth
