"""Slack and Discord (issue 18) on the channels' core, in-process like tests/test_channels.py.

Signatures are made by the platforms' maintained code: `slack_sdk`'s signer, PyNaCl's
Ed25519 keys; the stub plays Slack's Web API, a slash command's response_url and Discord's
interaction webhooks.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import orjson
import pytest
from nacl.encoding import HexEncoder
from nacl.signing import SigningKey
from redis.asyncio import Redis
from slack_sdk.signature import SignatureVerifier

from bot.api.keys import SETTINGS
from bot.channels import admin
from bot.channels.intake import dedupe_key
from bot.settings import load_settings
from tests.support import AppClient, Upstream
from tests.test_channels import (
    MakeClient,
    _dead_reasons,
    _stub_post,
    channel_env,
    channel_worker,
    connected,
    sent,
    wait_sent,
)

SLACK_SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
DISCORD_KEY = SigningKey.generate()
APP_ID = "123456789012345678"


def slack_env(stub_url: str) -> dict[str, str]:
    """Slack and Discord enabled, their APIs played by the stub at `stub_url`."""
    return {
        "SLACK_SIGNING_SECRET": SLACK_SECRET,
        "SLACK_BOT_TOKEN": "xoxb-test-token",
        "SLACK_API_URL": stub_url + "/slack/api",
        "BOT_SLACK_CHANNEL_RATE": "50/second",
        "DISCORD_PUBLIC_KEY": DISCORD_KEY.verify_key.encode(HexEncoder).decode(),
        "DISCORD_APPLICATION_ID": APP_ID,
        "DISCORD_API_URL": stub_url + "/discord/api",
    }


@pytest.fixture
async def client(make_app_client: MakeClient, upstream: Upstream) -> AppClient:
    return await connected(
        await make_app_client(**channel_env(upstream), **slack_env(upstream.url))
    )


def slack_headers(body: bytes, secret: str = SLACK_SECRET, skew: float = 0) -> dict[str, str]:
    stamp = str(int(time.time() + skew))
    signature = SignatureVerifier(secret).generate_signature(timestamp=stamp, body=body)
    assert signature is not None
    return {"X-Slack-Request-Timestamp": stamp, "X-Slack-Signature": signature}


def event(event_id: str, channel: str, text: str, **fields: Any) -> bytes:
    inner = {"type": "message", "user": "U0USER", "channel": channel, "text": text, **fields}
    payload = {"type": "event_callback", "team_id": "T0TEAM", "event_id": event_id}
    return orjson.dumps({**payload, "event": inner})


async def slack_post(
    client: AppClient, path: str, body: bytes, headers: dict[str, str], form: bool = False
) -> Any:
    kind = "application/x-www-form-urlencoded" if form else "application/json"
    return await client.post(path, data=body, headers={**headers, "Content-Type": kind})


def slash_form(stub_url: str, hook: str, text: str) -> dict[str, str]:
    """A slash command's form as Slack posts it, answered on the stub's response_url."""
    return {
        "team_id": "T0TEAM",
        "user_id": "U0USER",
        "channel_id": "C0CHAN",
        "command": "/bot",
        "text": text,
        "trigger_id": "trig." + hook,
        "response_url": f"{stub_url}/slack/hooks/{hook}",
    }


def discord_headers(body: bytes, key: SigningKey = DISCORD_KEY) -> dict[str, str]:
    stamp = str(int(time.time()))
    signature = key.sign(stamp.encode() + body).signature.hex()
    return {
        "X-Signature-Ed25519": signature,
        "X-Signature-Timestamp": stamp,
        "Content-Type": "application/json",
    }


def interaction(ident: str, token: str, question: str, user: str = "111222333444555666") -> bytes:
    return orjson.dumps(
        {
            "type": 2,
            "id": ident,
            "application_id": APP_ID,
            "token": token,
            "channel_id": "998877665544332211",
            "member": {"user": {"id": user}},
            "data": {
                "name": "ask",
                "type": 1,
                "options": [{"name": "question", "type": 3, "value": question}],
            },
        }
    )


def snowflake() -> str:
    return str(uuid.uuid4().int % 10**18)


async def test_slack_url_verification_only_when_signed(client: AppClient) -> None:
    body = orjson.dumps({"type": "url_verification", "challenge": "c-42", "token": "x"})
    path = "/channels/slack/events"
    resp = await slack_post(client, path, body, slack_headers(body))
    assert resp.status == 200 and await resp.json() == {"challenge": "c-42"}
    for headers in (
        {},
        slack_headers(body, secret="not-the-secret"),
        slack_headers(body, skew=-301),  # stale
        slack_headers(body + b" "),  # signed another body
    ):
        resp = await slack_post(client, path, body, headers)
        assert resp.status == 401
        assert (await resp.json())["error"]["code"] == "unauthorized"


async def test_slack_event_answered_once_across_retries(
    client: AppClient, upstream: Upstream, redis: Redis
) -> None:
    channel, event_id = "C" + uuid.uuid4().hex[:8].upper(), "Ev" + uuid.uuid4().hex[:10]
    body = event(event_id, channel, "/echo from slack")
    path = "/channels/slack/events"
    async with channel_worker(client.app[SETTINGS]):
        resp = await slack_post(client, path, body, slack_headers(body))
        assert resp.status == 200
        retry = {**slack_headers(body), "X-Slack-Retry-Num": "1", "X-Slack-Retry-Reason": "x"}
        assert (await slack_post(client, path, body, retry)).status == 200
        # A bot's own message and an edit are acked and ignored.
        for ignored in (
            event("Ev" + uuid.uuid4().hex[:10], channel, "/echo me", bot_id="B1"),
            event("Ev" + uuid.uuid4().hex[:10], channel, "/echo x", subtype="message_changed"),
        ):
            resp = await slack_post(client, path, ignored, slack_headers(ignored))
            assert resp.status == 200
        got = await wait_sent(upstream, channel, 1, platform="slack")
        await asyncio.sleep(0.5)
    assert [s["text"] for s in await sent(upstream, channel, "slack")] == ["from slack"]
    assert got[0]["auth"] == "Bearer xoxb-test-token"
    assert await redis.get(dedupe_key("slack", event_id)) == "done"


async def test_slack_unsigned_event_is_not_taken(client: AppClient, redis: Redis) -> None:
    event_id = "Ev" + uuid.uuid4().hex[:10]
    body = event(event_id, "C1", "/echo hi")
    resp = await slack_post(client, "/channels/slack/events", body, slack_headers(b"{}"))
    assert resp.status == 401
    assert await redis.exists(dedupe_key("slack", event_id)) == 0


async def test_slack_slash_command_answered_on_its_response_url(
    client: AppClient, upstream: Upstream
) -> None:
    hook = uuid.uuid4().hex
    form = slash_form(upstream.url, hook, "/echo slash")
    body = urlencode(form).encode()
    async with channel_worker(client.app[SETTINGS]):
        resp = await slack_post(
            client, "/channels/slack/commands", body, slack_headers(body), form=True
        )
        assert resp.status == 200 and (await resp.json())["response_type"] == "ephemeral"
        got = await wait_sent(upstream, f"hook:{hook}", 1, platform="slack")
    assert [s["text"] for s in got] == ["slash"]
    # A response_url on any other host is refused: the bot posts only to Slack (or its stub).
    evil = urlencode({**form, "response_url": "http://169.254.169.254/x"}).encode()
    resp = await slack_post(
        client, "/channels/slack/commands", evil, slack_headers(evil), form=True
    )
    assert resp.status == 400


async def test_discord_ping_and_bad_signature(client: AppClient) -> None:
    body = orjson.dumps({"type": 1, "id": snowflake(), "application_id": APP_ID})
    resp = await client.post(
        "/channels/discord/interactions", data=body, headers=discord_headers(body)
    )
    assert resp.status == 200 and await resp.json() == {"type": 1}
    for headers in (
        {"Content-Type": "application/json"},
        discord_headers(body, SigningKey.generate()),
        {**discord_headers(body), "X-Signature-Ed25519": "zz"},
    ):
        resp = await client.post("/channels/discord/interactions", data=body, headers=headers)
        assert resp.status == 401


async def test_discord_command_deferred_then_edited_once(
    client: AppClient, upstream: Upstream
) -> None:
    ident, token = snowflake(), "tok-" + uuid.uuid4().hex
    body = interaction(ident, token, "/echo from discord")
    async with channel_worker(client.app[SETTINGS]):
        replies = await asyncio.gather(
            *(
                client.post(
                    "/channels/discord/interactions", data=body, headers=discord_headers(body)
                )
                for _ in range(3)
            )
        )
        assert {r.status for r in replies} <= {200, 503} and 200 in {r.status for r in replies}
        for reply in replies:
            if reply.status == 200:
                assert await reply.json() == {"type": 5}
        await wait_sent(upstream, token, 1, platform="discord")
        await asyncio.sleep(0.5)
    assert [s["text"] for s in await sent(upstream, token, "discord")] == ["from discord"]


async def test_discord_429_pauses_then_edits(client: AppClient, upstream: Upstream) -> None:
    ident, token = snowflake(), "tok-" + uuid.uuid4().hex
    await _stub_post(
        upstream,
        "/admin/discord/script",
        {"conversation": token, "responses": [{"status": 429, "retry_after": 1.5}]},
    )
    body = interaction(ident, token, "/echo later")
    async with channel_worker(client.app[SETTINGS]):
        resp = await client.post(
            "/channels/discord/interactions", data=body, headers=discord_headers(body)
        )
        assert resp.status == 200 and await resp.json() == {"type": 5}
        got = await wait_sent(upstream, token, 2, status=None, platform="discord")
    assert [s["status"] for s in got] == [429, 200]
    assert got[1]["at"] - got[0]["at"] >= 1.5


async def test_cli_sets_the_webhook_and_registers_commands(upstream: Upstream) -> None:
    env = {**channel_env(upstream), **slack_env(upstream.url)}
    settings = load_settings(env, dotenv=Path("/dev/null"))
    url = "https://bot.example.test/channels/telegram"
    for _ in range(2):  # idempotent: the same call each time
        assert await asyncio.to_thread(admin.set_webhook, settings, url, True) == 0
    calls = await sent(upstream, "setWebhook")
    assert len(calls) == 2 and calls[0]["text"] == calls[1]["text"]
    body = orjson.loads(calls[0]["text"])
    assert body["secret_token"] == settings.telegram_webhook_secret
    assert body["allowed_updates"] == ["message"] and body["drop_pending_updates"] is True
    assert await asyncio.to_thread(admin.set_webhook, settings, "http://plain", False) == 2
    with_token = replace(settings, discord_bot_token="bot-token")
    assert await asyncio.to_thread(admin.register_commands, with_token) == 0
    [registered] = await sent(upstream, f"commands:{APP_ID}", "discord")
    assert registered["auth"] == "Bot bot-token"
    assert [c["name"] for c in orjson.loads(registered["text"])] == ["ask"]


def slack_channel() -> str:
    return "C" + uuid.uuid4().hex[:8].upper()


async def test_slack_429_pauses_only_its_channel_and_status_lists_it(
    client: AppClient, upstream: Upstream, capsys: pytest.CaptureFixture[str]
) -> None:
    paused, flowing = slack_channel(), slack_channel()
    await _stub_post(
        upstream,
        "/admin/slack/script",
        {"conversation": paused, "responses": [{"status": 429, "retry_after": 2}]},
    )
    path = "/channels/slack/events"
    settings = client.app[SETTINGS]
    async with channel_worker(settings):
        body = event("Ev" + uuid.uuid4().hex[:10], paused, "/echo held")
        assert (await slack_post(client, path, body, slack_headers(body))).status == 200
        await wait_sent(upstream, paused, 1, status=429, platform="slack")
        # While it waits, the operator sees it (and the other channel is not paused).
        assert await asyncio.to_thread(admin.status, settings) == 0
        out = capsys.readouterr().out
        assert f"slack:{paused} for " in out and "paused slack: 1" in out
        for i in range(10):
            body = event("Ev" + uuid.uuid4().hex[:10], flowing, f"/echo m{i}")
            assert (await slack_post(client, path, body, slack_headers(body))).status == 200
        flowing_sent = await wait_sent(upstream, flowing, 10, platform="slack")
        paused_sent = await wait_sent(upstream, paused, 2, status=None, platform="slack")
    assert [s["text"] for s in flowing_sent] == [f"m{i}" for i in range(10)]
    first, second = paused_sent
    assert (first["status"], second["status"], second["text"]) == (429, 200, "held")
    # Paused for exactly Slack's Retry-After, and the other channel was not held by it.
    assert 2.0 <= second["at"] - first["at"] < 3.5
    assert flowing_sent[-1]["at"] < second["at"]
    assert await asyncio.to_thread(admin.status, settings) == 0
    assert "paused slack: 0" in capsys.readouterr().out  # the pause is over


async def test_slack_and_discord_acked_within_3s_while_the_upstream_hangs(
    client: AppClient, upstream: Upstream
) -> None:
    upstream.faults(latency_ms=30_000)
    body = event("Ev" + uuid.uuid4().hex[:10], slack_channel(), "what is a pulsar?")
    started = time.monotonic()
    resp = await slack_post(client, "/channels/slack/events", body, slack_headers(body))
    assert resp.status == 200 and time.monotonic() - started < 3.0
    form = slash_form(upstream.url, uuid.uuid4().hex, "what is a quasar?")
    body = urlencode(form).encode()
    started = time.monotonic()
    resp = await slack_post(
        client, "/channels/slack/commands", body, slack_headers(body), form=True
    )
    assert resp.status == 200 and time.monotonic() - started < 3.0
    body = interaction(snowflake(), "tok-" + uuid.uuid4().hex, "what is a magnetar?")
    started = time.monotonic()
    resp = await client.post(
        "/channels/discord/interactions", data=body, headers=discord_headers(body)
    )
    assert resp.status == 200 and await resp.json() == {"type": 5}
    assert time.monotonic() - started < 3.0


async def test_slack_event_left_claimed_by_a_dead_replica_is_processed_after_its_lease(
    client: AppClient, upstream: Upstream, redis: Redis
) -> None:
    """A replica that died between the claim and the queue leaves a lease, not a final mark:
    Slack's retry is told to come back (503) while the lease holds, then processed once."""
    channel, event_id = slack_channel(), "Ev" + uuid.uuid4().hex[:10]
    await redis.set(dedupe_key("slack", event_id), "token-of-a-dead-replica", px=600)
    body = event(event_id, channel, "/echo not lost")
    path = "/channels/slack/events"
    async with channel_worker(client.app[SETTINGS]):
        assert (await slack_post(client, path, body, slack_headers(body))).status == 503
        await asyncio.sleep(0.7)
        retry = {**slack_headers(body), "X-Slack-Retry-Num": "1", "X-Slack-Retry-Reason": "x"}
        assert (await slack_post(client, path, body, retry)).status == 200
        await wait_sent(upstream, channel, 1, platform="slack")
        await asyncio.sleep(0.3)
    assert [s["text"] for s in await sent(upstream, channel, "slack")] == ["not lost"]
    assert await redis.get(dedupe_key("slack", event_id)) == "done"


async def test_slack_and_discord_permanent_errors_dead_lettered_never_retried(
    client: AppClient, upstream: Upstream
) -> None:
    channel, event_id = slack_channel(), "Ev" + uuid.uuid4().hex[:10]
    token = "tok-" + uuid.uuid4().hex
    ident = snowflake()
    gone = [{"status": 400, "description": "channel_not_found"}]
    await _stub_post(upstream, "/admin/slack/script", {"conversation": channel, "responses": gone})
    unknown = [{"status": 404, "description": "Unknown Webhook"}]
    await _stub_post(
        upstream, "/admin/discord/script", {"conversation": token, "responses": unknown}
    )
    settings = client.app[SETTINGS]
    async with channel_worker(settings):
        body = event(event_id, channel, "/echo to nowhere")
        assert (
            await slack_post(client, "/channels/slack/events", body, slack_headers(body))
        ).status == 200
        body = interaction(ident, token, "/echo to nowhere")
        resp = await client.post(
            "/channels/discord/interactions", data=body, headers=discord_headers(body)
        )
        assert resp.status == 200
        await wait_sent(upstream, channel, 1, status=400, platform="slack")
        await wait_sent(upstream, token, 1, status=404, platform="discord")
        await asyncio.sleep(0.5)
    assert [s["status"] for s in await sent(upstream, channel, "slack")] == [400]
    assert [s["status"] for s in await sent(upstream, token, "discord")] == [404]
    assert await _dead_reasons(settings, f"slack:{event_id}") == [
        "permanent: 200: channel_not_found"
    ]
    assert await _dead_reasons(settings, f"discord:{ident}") == ["permanent: 404: Unknown Webhook"]


async def test_slack_event_at_two_replicas_at_once_answered_once(
    make_app_client: MakeClient, upstream: Upstream
) -> None:
    env = {**channel_env(upstream), **slack_env(upstream.url)}
    one = await connected(await make_app_client(**env))
    two = await connected(await make_app_client(**env))
    channel = slack_channel()
    body = event("Ev" + uuid.uuid4().hex[:10], channel, "/echo just once")
    path = "/channels/slack/events"
    async with channel_worker(one.app[SETTINGS]):
        answers = await asyncio.gather(
            *(slack_post(c, path, body, slack_headers(body)) for c in (one, two, one, two))
        )
        # Each is acked (200) or told to come back (503: another replica was queueing it).
        assert {r.status for r in answers} <= {200, 503} and 200 in {r.status for r in answers}
        await wait_sent(upstream, channel, 1, platform="slack")
        await asyncio.sleep(0.5)  # room for a second copy, if one were coming
    assert [s["text"] for s in await sent(upstream, channel, "slack")] == ["just once"]


def limited_env(upstream: Upstream) -> dict[str, str]:
    """Slack and Discord, and a user rate limit of two messages, then one a minute."""
    env = channel_env(upstream, BOT_RATE_LIMIT="1/minute", BOT_RATE_BURST="1")
    return {**env, **slack_env(upstream.url)}


def assert_one_polite_note(texts: list[str]) -> None:
    """Two answers, then one note for the three messages dropped in the window."""
    assert texts[:2] == ["n0", "n1"], texts
    assert len(texts) == 3 and "faster than I can answer" in texts[2], texts


async def test_rate_limited_slack_user_gets_one_polite_message(
    make_app_client: MakeClient, upstream: Upstream
) -> None:
    client = await connected(await make_app_client(**limited_env(upstream)))
    channel, user = slack_channel(), "U" + uuid.uuid4().hex[:8].upper()
    path = "/channels/slack/events"
    async with channel_worker(client.app[SETTINGS]):
        for i in range(5):
            body = event("Ev" + uuid.uuid4().hex[:10], channel, f"/echo n{i}", user=user)
            assert (await slack_post(client, path, body, slack_headers(body))).status == 200
        await wait_sent(upstream, channel, 3, platform="slack")
        await asyncio.sleep(0.5)  # room for a second note, if one were coming
    assert_one_polite_note([s["text"] for s in await sent(upstream, channel, "slack")])


async def test_rate_limited_discord_user_gets_one_polite_message(
    make_app_client: MakeClient, upstream: Upstream
) -> None:
    """Each command is its own interaction: the note edits the first limited one's response,
    the other limited ones get nothing."""
    client = await connected(await make_app_client(**limited_env(upstream)))
    user, tokens = snowflake(), [f"tok-{uuid.uuid4().hex}" for _ in range(5)]
    path = "/channels/discord/interactions"
    async with channel_worker(client.app[SETTINGS]):
        for i, token in enumerate(tokens):
            body = interaction(snowflake(), token, f"/echo n{i}", user=user)
            resp = await client.post(path, data=body, headers=discord_headers(body))
            assert resp.status == 200 and await resp.json() == {"type": 5}
        await wait_sent(upstream, tokens[2], 1, platform="discord")
        await asyncio.sleep(0.5)
    edits = [await sent(upstream, token, "discord") for token in tokens]
    assert [len(e) for e in edits] == [1, 1, 1, 0, 0]
    assert_one_polite_note([e[0]["text"] for e in edits[:3]])
