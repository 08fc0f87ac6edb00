"""Chat channels on a real stack (NGINX, 3 replicas, the worker, the stub as Telegram's Bot
API, Slack's Web API and Discord's) on a Redis of its own, which the last test stops: the
worker killed mid-stream loses nothing (Telegram, Slack, Discord), a deferred answer reaches
its chat, Redis away means 503 and then exactly once."""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests

from tests.support import PrivateRedis, Stack, stack_dir, stack_env
from tests.test_channels import HEADER, SECRET, TOKEN, new_id, update
from tests.test_channels_slack_discord import (
    discord_headers,
    event,
    interaction,
    slack_channel,
    slack_env,
    slack_headers,
    snowflake,
)


@pytest.fixture(scope="module")
def tgstack() -> Iterator[tuple[Stack, PrivateRedis]]:
    with stack_dir() as base:
        rds = PrivateRedis(base / "redis")
        rds.start()
        env = stack_env(0, REDIS_URL=rds.url, BOT_RETRY_BASE_DELAY="0.2", BOT_RETRY_MAX_DELAY="1")
        env.update(
            TELEGRAM_BOT_TOKEN=TOKEN,
            TELEGRAM_WEBHOOK_SECRET=SECRET,
            TELEGRAM_API_URL=f"http://127.0.0.1:{env['BOT_STUB_PORT']}",
            BOT_TELEGRAM_CHAT_RATE="20/second",
        )
        env.update(slack_env(env["TELEGRAM_API_URL"]), BOT_SLACK_CHANNEL_RATE="20/second")
        stack = Stack(base / "run", env)
        stack.start()
        try:
            yield stack, rds
        finally:
            stack.stop()
            rds.stop()


def webhook(stack: Stack, body: dict[str, Any]) -> requests.Response:
    return requests.post(
        stack.url + "/channels/telegram", json=body, headers={HEADER: SECRET}, timeout=10
    )


def deliver(stack: Stack, body: dict[str, Any], timeout: float = 30) -> None:
    """As Telegram does: resend until the webhook answers 200."""
    deadline = time.monotonic() + timeout
    while (status := webhook(stack, body).status_code) != 200:
        assert status == 503 and time.monotonic() < deadline, status
        time.sleep(0.2)


def sends(stack: Stack, chat: int) -> list[str]:
    record = requests.get(stack.stub_url + "/admin/telegram/sent", timeout=5).json()
    return [s["text"] for s in record if s["conversation"] == str(chat) and s["status"] == 200]


def wait_sends(stack: Stack, chat: int, n: int, timeout: float = 30) -> list[str]:
    """The chat's sends once `n` different texts are among them (a repeat is not one more)."""
    deadline = time.monotonic() + timeout
    while len(set(got := sends(stack, chat))) < n and time.monotonic() < deadline:
        time.sleep(0.1)
    return got


def test_worker_killed_mid_stream_loses_nothing(tgstack: tuple[Stack, PrivateRedis]) -> None:
    stack, _ = tgstack
    chats = [new_id() for _ in range(3)]
    for i in range(10):
        for chat in chats:
            deliver(stack, update(new_id(), chat, f"/echo {chat} {i}"))
        if i == 3:
            wait_sends(stack, chats[0], 1)
            old = stack.kill("worker", signal.SIGKILL)
    for chat in chats:
        got = wait_sends(stack, chat, 10)
        want = [f"{chat} {i}" for i in range(10)]
        firsts = list(dict.fromkeys(got))
        print("worker SIGKILL:", chat, "sent", len(got), "distinct", len(firsts))
        assert firsts == want  # nothing lost, in order
        assert len(got) - len(firsts) <= 1  # at most the one in flight at the kill
    assert stack.pid("worker") not in (0, old)  # it died, and its successor did the rest


def deliver_signed(
    stack: Stack, path: str, body: bytes, sign: Callable[[bytes], dict[str, str]]
) -> None:
    """As Slack and Discord do: resend (signed afresh) until the webhook answers 200."""
    deadline = time.monotonic() + 30
    while True:
        headers = {"Content-Type": "application/json", **sign(body)}
        status = requests.post(stack.url + path, data=body, headers=headers, timeout=10).status_code
        if status == 200:
            return
        assert status == 503 and time.monotonic() < deadline, status
        time.sleep(0.2)


def platform_sends(stack: Stack, platform: str) -> list[dict[str, Any]]:
    record = requests.get(f"{stack.stub_url}/admin/{platform}/sent", timeout=5).json()
    return [s for s in record if s["status"] == 200]


def test_slack_and_discord_worker_killed_mid_stream_lose_nothing(
    tgstack: tuple[Stack, PrivateRedis],
) -> None:
    stack, _ = tgstack
    channels = [slack_channel() for _ in range(2)]
    tokens = ["tok-" + uuid.uuid4().hex for _ in range(10)]
    for i in range(10):
        for ch in channels:
            body = event("Ev" + uuid.uuid4().hex[:10], ch, f"/echo {ch} {i}", user="U" + ch)
            deliver_signed(stack, "/channels/slack/events", body, slack_headers)
        body = interaction(snowflake(), tokens[i], f"/echo d {i}")
        deliver_signed(stack, "/channels/discord/interactions", body, discord_headers)
        if i == 3:
            deadline = time.monotonic() + 30
            while not platform_sends(stack, "slack") and time.monotonic() < deadline:
                time.sleep(0.1)
            old = stack.kill("worker", signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        slack = [s for s in platform_sends(stack, "slack") if s["conversation"] in channels]
        discord = [s for s in platform_sends(stack, "discord") if s["conversation"] in tokens]
        if (
            len({(s["conversation"], s["text"]) for s in slack}) == 20
            and len({s["conversation"] for s in discord}) == 10
        ):
            break
        time.sleep(0.2)
    for ch in channels:
        got = [s["text"] for s in slack if s["conversation"] == ch]
        firsts = list(dict.fromkeys(got))
        print("worker SIGKILL, slack:", ch, "sent", len(got), "distinct", len(firsts))
        assert firsts == [f"{ch} {i}" for i in range(10)]  # nothing lost, in order
        assert len(got) - len(firsts) <= 1  # at most the one in flight at the kill
    # Discord: one channel (one lane), an interaction token per question.
    got = [s["text"] for s in discord]
    firsts = list(dict.fromkeys(got))
    print("worker SIGKILL, discord: sent", len(got), "distinct", len(firsts))
    assert firsts == [f"d {i}" for i in range(10)]
    assert len(got) - len(firsts) <= 1
    assert stack.pid("worker") not in (0, old)


def test_deferred_answer_reaches_its_chat(tgstack: tuple[Stack, PrivateRedis]) -> None:
    stack, _ = tgstack
    chat = new_id()
    stack.faults(outage=True)
    try:
        deliver(stack, update(new_id(), chat, "what is a quasar?"))
        time.sleep(1.5)
        assert sends(stack, chat) == []
    finally:
        stack.faults(outage=False)
    got = wait_sends(stack, chat, 1)
    assert len(got) == 1 and "You asked: what is a quasar?" in got[0]


def test_redis_down_is_503_then_processed_once(tgstack: tuple[Stack, PrivateRedis]) -> None:
    stack, rds = tgstack
    chat = new_id()
    body = update(new_id(), chat, "/echo after the outage")
    rds.stop()
    try:
        assert webhook(stack, body).status_code == 503
    finally:
        rds.start()
    deliver(stack, body)
    deliver(stack, body)  # a redelivery after the first 200: a duplicate
    assert wait_sends(stack, chat, 1) == ["after the outage"]
    time.sleep(1)
    assert sends(stack, chat) == ["after the outage"]
