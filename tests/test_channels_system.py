"""Chat channels on a real stack (NGINX, 3 replicas, the worker, the stub as Telegram's Bot
API, Slack's Web API and Discord's) on a Redis of its own, which one test stops: the
worker killed mid-stream loses nothing (Telegram, Slack, Discord), a deferred answer reaches
its chat, hostile bytes in anything a webhook reads get a JSON 4xx (and the next user is
answered), the webhooks serve non-loopback clients without BOT_API_KEYS, Redis away means 503
and then exactly once; and every key the stack wrote in its Redis is documented and expires
(but the outbox)."""

from __future__ import annotations

import hashlib
import hmac
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlencode

import orjson
import pytest
import requests

from tests.support import PrivateRedis, Stack, key_families, stack_dir, stack_env
from tests.test_channels import HEADER, SECRET, TOKEN, new_id, update
from tests.test_channels_slack_discord import (
    SLACK_SECRET,
    discord_headers,
    event,
    interaction,
    slack_channel,
    slack_env,
    slack_headers,
    slash_form,
    snowflake,
)
from tests.test_hostile_api import _non_loopback_address, assert_json_error, raw, send_json


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


# Hostile bytes at the webhooks, through NGINX ---------------------------------------------------

TG, EVENTS = "/channels/telegram", "/channels/slack/events"
COMMANDS, DISCORD = "/channels/slack/commands", "/channels/discord/interactions"
TG_BODY = orjson.dumps(update(1, 1, "/echo never taken"))
EVENT_BODY = event("Ev0hostile", "C0HOSTILE", "/echo never taken")
COMMAND_BODY = urlencode(slash_form("https://hooks.slack.com", "h", "/echo never taken")).encode()
DISCORD_BODY = interaction("1", "tok-hostile", "/echo never taken")
BAD_DISCORD = orjson.loads(DISCORD_BODY)


def signed(path: str, body: bytes) -> dict[str, str]:
    """The headers its platform sends with `body`: the secret, or a fresh signature of it."""
    if path == TG:
        return {HEADER: SECRET, "Content-Type": "application/json"}
    if path == DISCORD:
        return discord_headers(body)
    kind = "application/x-www-form-urlencoded" if path == COMMANDS else "application/json"
    # Slack's v0 signature by hand: slack_sdk's signer takes only bodies that decode as UTF-8.
    stamp = str(int(time.time()))
    mac = hmac.new(SLACK_SECRET.encode(), b"v0:" + stamp.encode() + b":" + body, hashlib.sha256)
    return {
        "X-Slack-Request-Timestamp": stamp,
        "X-Slack-Signature": "v0=" + mac.hexdigest(),
        "Content-Type": kind,
    }


def webhook_request(path: str, body: bytes, odd: dict[str, bytes] | None = None) -> bytes:
    """A raw POST of `body`, signed as its platform would, then `odd` header values as is."""
    headers = {k: v.encode() for k, v in signed(path, body).items()} | (odd or {})
    lines = [b"POST " + path.encode() + b" HTTP/1.1", b"Host: bot", b"Connection: close"]
    lines += [k.encode() + b": " + v for k, v in headers.items()]
    lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


# (route, body, header values replaced by raw bytes, status, error code). Every header each
# route reads, and bodies that are not what the platform sends (signed all the same: only the
# platform, or whoever holds its secret, gets that far).
HOSTILE_WEBHOOKS = [
    (TG, TG_BODY, {HEADER: b"\xff\xfe"}, 401, "unauthorized"),
    (TG, TG_BODY, {HEADER: SECRET.encode() + b"\xc3\xa9"}, 401, "unauthorized"),
    (TG, TG_BODY, {HEADER: b"\xed\xa0\x80"}, 401, "unauthorized"),  # an encoded surrogate
    (TG, TG_BODY, {"Content-Type": b"text/\xff"}, 415, "unsupported_media_type"),
    (TG, TG_BODY, {"Content-Encoding": b"\xff"}, 415, "unsupported_content_encoding"),
    (TG, b"[1]", {}, 400, "invalid_body"),
    (TG, b'{"update_id":"7"}', {}, 400, "invalid_body"),
    (TG, b'{"update_id":true}', {}, 400, "invalid_body"),
    (TG, b'{"update_id":18446744073709551616}', {}, 400, "invalid_body"),
    (TG, b'{"update_id":1e999}', {}, 400, "invalid_json"),
    (TG, b'{"update_id":1,"message":{"text":"\\ud800"}}', {}, 400, "invalid_json"),
    (TG, b"\xff\xfe{}", {}, 400, "invalid_json"),
    (EVENTS, EVENT_BODY, {"X-Slack-Signature": b"v0=\xff\xfe"}, 401, "unauthorized"),
    (EVENTS, EVENT_BODY, {"X-Slack-Signature": b"v0=" + b"0" * 63 + b"\xc3\xa9"}, 401, None),
    (EVENTS, EVENT_BODY, {"X-Slack-Request-Timestamp": b"\xc2\xb2"}, 401, "unauthorized"),
    (EVENTS, EVENT_BODY, {"X-Slack-Request-Timestamp": b"\xd9\xa3" * 10}, 401, "unauthorized"),
    (EVENTS, EVENT_BODY, {"X-Slack-Request-Timestamp": b"9" * 400}, 401, "unauthorized"),
    (EVENTS, EVENT_BODY, {"X-Slack-Request-Timestamp": b"9" * 5000}, 401, "unauthorized"),
    (EVENTS, EVENT_BODY, {"X-Slack-Request-Timestamp": b"\xff"}, 401, "unauthorized"),
    (EVENTS, b"[]", {}, 400, "invalid_body"),
    (EVENTS, b"\xff", {}, 400, "invalid_json"),
    (EVENTS, b'{"type":"event_callback","event_id":["x"],"event":"y"}', {}, 400, "invalid_body"),
    (EVENTS, b'{"type":"url_verification","challenge":7}', {}, 400, "invalid_body"),
    (COMMANDS, b"team_id=\xff\xfe", {}, 400, "invalid_body"),
    (COMMANDS, b"%FF%FE=%00&team_id=%ED%A0%80", {}, 400, "invalid_body"),
    (COMMANDS, COMMAND_BODY.replace(b"hooks.slack.com", b"%5B%3A%3A1"), {}, 400, "invalid_body"),
    (DISCORD, DISCORD_BODY, {"X-Signature-Ed25519": b"\xff" * 64}, 401, "unauthorized"),
    (DISCORD, DISCORD_BODY, {"X-Signature-Ed25519": b"0" * 126 + b"\xc3\xa9"}, 401, None),
    (DISCORD, DISCORD_BODY, {"X-Signature-Timestamp": b"\xff\xfe"}, 401, "unauthorized"),
    (DISCORD, b"[]", {}, 400, "invalid_body"),
    (DISCORD, b'{"type":true}', {}, 400, "invalid_body"),
    (DISCORD, orjson.dumps({**BAD_DISCORD, "data": {"name": 5}}), {}, 400, "invalid_body"),
    (
        DISCORD,
        orjson.dumps({**BAD_DISCORD, "data": {"name": "ask", "options": 5}}),
        {},
        400,
        "invalid_body",
    ),
]


def answered(stack: Stack, path: str) -> None:
    """A good request from a new user on `path` is taken and its answer sent."""
    mark = uuid.uuid4().hex[:12]
    if path == TG:
        chat = new_id()
        deliver(stack, update(new_id(), chat, f"/echo {mark}"))
        assert wait_sends(stack, chat, 1) == [mark]
        return
    platform = "discord" if path == DISCORD else "slack"
    if path == EVENTS:
        where = slack_channel()
        body = event("Ev" + uuid.uuid4().hex[:10], where, f"/echo {mark}", user="U" + where)
    elif path == COMMANDS:
        hook = uuid.uuid4().hex
        where = f"hook:{hook}"
        body = urlencode(slash_form(stack.stub_url, hook, f"/echo {mark}")).encode()
    else:
        where = "tok-" + uuid.uuid4().hex
        body = interaction(snowflake(), where, f"/echo {mark}", user=snowflake())
    deliver_signed(stack, path, body, lambda b: signed(path, b))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        got = [s["text"] for s in platform_sends(stack, platform) if s["conversation"] == where]
        if got:
            break
        time.sleep(0.05)
    assert got == [mark]


@pytest.mark.parametrize(
    ("path", "body", "odd", "status", "code"),
    HOSTILE_WEBHOOKS,
    ids=[f"{p.rsplit('/', 1)[-1]}-{i}" for i, (p, *_) in enumerate(HOSTILE_WEBHOOKS)],
)
def test_hostile_bytes_at_a_webhook_get_4xx_json_never_5xx(
    tgstack: tuple[Stack, PrivateRedis],
    path: str,
    body: bytes,
    odd: dict[str, bytes],
    status: int,
    code: str | None,
) -> None:
    """Raw bytes as NGINX passes them (non-UTF-8 in a header included): the replica's JSON
    error, 401 for what is not the platform, 400 for what is not its update; and the route
    still answers the next user."""
    stack, _ = tgstack
    got, _, answer = raw(stack.settings.public_port, webhook_request(path, body, odd))
    assert_json_error(got, answer, status, code or "unauthorized")
    answered(stack, path)


def test_webhooks_answer_non_loopback_clients_without_api_keys(
    tgstack: tuple[Stack, PrivateRedis],
) -> None:
    """Without BOT_API_KEYS the /v1 routes serve loopback clients only; the platforms' webhooks
    (verified by their own secrets) are reached from any address."""
    stack, _ = tgstack
    address, port = _non_loopback_address(), stack.settings.public_port
    chat = new_id()
    body = orjson.dumps(update(new_id(), chat, "/echo from afar"))
    status, _, answer = raw(port, webhook_request(TG, body), host=address, source=address)
    assert (status, orjson.loads(answer)) == (200, {})
    assert wait_sends(stack, chat, 1) == ["from afar"]
    message = send_json(b"/v1/messages", b'{"user_id":"u1","text":"/echo hi"}')
    status, _, answer = raw(port, message, host=address, source=address)
    assert_json_error(status, answer, 403, "api_keys_required")


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


def test_every_key_in_a_stacks_redis_is_documented_and_expires_but_the_outbox(
    tgstack: tuple[Stack, PrivateRedis],
) -> None:
    """An API user sets prefs, asks a question and one answered later; a chat sends a message
    (besides what the tests above left). Every key in the stack's Redis is of a family
    docs/scaling.md lists, and has a TTL unless its family has none. (The per-API-key limit's
    key, on a stack with keys: test_hostile_api.py's keyed stack.)"""
    stack, _ = tgstack
    api = stack.url + "/v1"
    user = f"u-{uuid.uuid4().hex[:12]}"

    def ask(text: str) -> requests.Response:
        body = {"user_id": user, "text": text}
        return requests.post(f"{api}/messages", json=body, timeout=15)

    prefs = requests.put(f"{api}/users/{user}/prefs", json={"prefs": {"lang": "en"}}, timeout=5)
    assert prefs.ok, prefs.text
    assert ask(f"what is {uuid.uuid4().hex}?").status_code == 200
    stack.faults(outage=True)
    try:
        later = ask(f"what is {uuid.uuid4().hex} later?")
        assert later.status_code == 202, later.text
    finally:
        stack.faults(outage=False)
    deadline = time.monotonic() + 30
    replies: list[Any] = []
    while not replies and time.monotonic() < deadline:
        got = requests.get(f"{api}/users/{user}/replies?wait=10", timeout=20)
        replies = got.json()["replies"]
    assert replies, "the deferred answer never reached the inbox"
    chat = new_id()
    deliver(stack, update(new_id(), chat, "/echo every key"))
    assert wait_sends(stack, chat, 1) == ["every key"]
    r = stack.redis()
    families = key_families({key: r.pttl(key) for key in r.scan_iter()})
    print("keys by family:", dict(families))
    assert families.keys() >= {
        "bot:{user}:msg:<id>",
        "bot:{user}:ctx",
        "bot:{user}:rl",
        "bot:{user}:prefs",
        "bot:{user}:inbox",
        "bot:{user}:inbox:ids",
        "bot:{user}:job:<id>",
        "cache:{id}:a",
        "bot:hb:<replica>",
        "bot:outbox:<prefix>",
        "chan:seen:<channel>:<update>",
        "chan:route:<message id>",
        "chan:sent:<channel>:<id>",
    }
