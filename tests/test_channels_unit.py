"""The channels' pure parts: verification against the platforms' own code, parsing, codecs,
lanes. No Redis, no RabbitMQ."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest
import telegram
from nacl.encoding import HexEncoder
from nacl.signing import SigningKey
from slack_sdk.signature import SignatureVerifier as SdkVerifier

from bot.channels import discord, slack
from bot.channels import telegram as tg
from bot.channels.lanes import Lanes
from bot.channels.sending import classify
from bot.channels.wire import Inbound, decode_inbound, decode_outbound, encode, shard
from bot.errors import Unauthorized
from bot.settings import SettingsError, load_settings

SECRET = "8f742231b10e8888abcd99yyyzzz85a5"


@pytest.mark.parametrize("skew", [0, -299, 299])
def test_slack_signature_made_by_slack_sdk_is_accepted(skew: int) -> None:
    now = time.time()
    body = b'{"type":"event_callback"}'
    stamp = str(int(now + skew))
    sdk = SdkVerifier(SECRET)
    signature = sdk.generate_signature(timestamp=stamp, body=body)
    assert signature is not None
    headers = {"X-Slack-Request-Timestamp": stamp, "X-Slack-Signature": signature}
    slack.SignatureVerifier(SECRET, clock=lambda: now).verify(headers, body)
    assert sdk.is_valid(body, stamp, signature) == (abs(skew) < 300)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"X-Slack-Request-Timestamp": "abc", "X-Slack-Signature": "v0=00"},
        {"X-Slack-Request-Timestamp": "1000", "X-Slack-Signature": "v0=00"},
        # Each of these raised something else (a 500): str.isdigit() passes "²", which int()
        # refuses; 400 digits overflow the float arithmetic, 5000 int()'s digit limit; a
        # header's non-UTF-8 byte reaches the verifier as a surrogate (aiohttp), and a
        # serverless event's JSON may carry a lone one.
        {"X-Slack-Request-Timestamp": "\u00b2", "X-Slack-Signature": "v0=00"},
        {"X-Slack-Request-Timestamp": "9" * 400, "X-Slack-Signature": "v0=00"},
        {"X-Slack-Request-Timestamp": "9" * 5000, "X-Slack-Signature": "v0=00"},
        {"X-Slack-Request-Timestamp": "\u0661" * 10, "X-Slack-Signature": "v0=00"},
        {"X-Slack-Request-Timestamp": str(int(time.time())), "X-Slack-Signature": "v0=\udcff"},
        {"X-Slack-Request-Timestamp": str(int(time.time())), "X-Slack-Signature": "\ud800"},
    ],
)
def test_slack_signature_refused(headers: dict[str, str]) -> None:
    with pytest.raises(Unauthorized):
        slack.SignatureVerifier(SECRET).verify(headers, b"{}")


@pytest.mark.parametrize("presented", [None, "", "\udcff\udcfe", "s3cret\u00e9", "\ud800"])
def test_telegram_secret_refused_whatever_the_header_holds(presented: str | None) -> None:
    settings = load_settings({"TELEGRAM_WEBHOOK_SECRET": "s3cret"}, dotenv=Path("/dev/null"))
    with pytest.raises(Unauthorized):
        tg.verify(settings, presented)


def test_slack_stale_timestamp_refused_even_when_signed() -> None:
    now = time.time()
    stamp = str(int(now - 301))
    signature = SdkVerifier(SECRET).generate_signature(timestamp=stamp, body=b"x")
    assert signature is not None
    headers = {"X-Slack-Request-Timestamp": stamp, "X-Slack-Signature": signature}
    with pytest.raises(Unauthorized):
        slack.SignatureVerifier(SECRET, clock=lambda: now).verify(headers, b"x")


def test_discord_signature_by_pynacl() -> None:
    key = SigningKey.generate()
    verifier = discord.Verifier(key.verify_key.encode(HexEncoder).decode())
    body, stamp = b'{"type":1}', "1700000000"
    good = {
        "X-Signature-Timestamp": stamp,
        "X-Signature-Ed25519": key.sign(stamp.encode() + body).signature.hex(),
    }
    verifier.verify(good, body)
    for bad in (
        {},
        {**good, "X-Signature-Timestamp": "1700000001"},
        {**good, "X-Signature-Ed25519": "nothex"},
        {**good, "X-Signature-Ed25519": "\udcff" * 128},
        {**good, "X-Signature-Timestamp": "\ud800"},
    ):
        with pytest.raises(Unauthorized):
            verifier.verify(bad, body)
    with pytest.raises(Unauthorized):
        verifier.verify(good, body + b" ")


def _message(**kw: object) -> dict[str, object]:
    chat = telegram.Chat(id=-100123, type=telegram.Chat.SUPERGROUP)
    message = telegram.Message(message_id=1, date=datetime.now(UTC), chat=chat, **kw)  # type: ignore[arg-type]
    return telegram.Update(update_id=77, message=message).to_dict()


def test_telegram_update_parsed_to_the_chat_user() -> None:
    update = tg.parse_update(_message(text="hello"))
    assert update == Inbound("telegram", "tg:-100123", "-100123", "tg:77", "hello")
    assert tg.parse_update(_message(text="   ")) is None
    edited = telegram.Update(
        update_id=78,
        edited_message=telegram.Message(
            message_id=1,
            date=datetime.now(UTC),
            chat=telegram.Chat(id=5, type=telegram.Chat.PRIVATE),
            text="edited",
        ),
    ).to_dict()
    assert tg.parse_update(edited) is None
    assert tg.update_id(edited) == 78 and tg.update_id({"update_id": True}) is None


def test_slack_event_parsing_ignores_bots_and_subtypes() -> None:
    base = {"type": "event_callback", "team_id": "T1", "event_id": "Ev1"}
    msg = {"type": "app_mention", "user": "U1", "channel": "C1", "text": "<@UBOT> hi there"}
    assert slack.parse_event({**base, "event": msg}) == (
        "Ev1",
        Inbound("slack", "slack:T1:U1", "C1", "slack:Ev1", "hi there"),
    )
    assert slack.parse_event({**base, "event": {**msg, "bot_id": "B1"}}) == ("Ev1", None)
    assert slack.parse_event({**base, "event": {**msg, "subtype": "bot_message"}}) == ("Ev1", None)
    assert slack.parse_event({**base, "event": {"type": "reaction_added"}}) == ("Ev1", None)
    assert slack.parse_event({"type": "event_callback"}) is None
    form = {"team_id": "T1", "user_id": "U1", "channel_id": "C1", "trigger_id": "t"}
    hosts = slack.allowed_hosts("https://slack.com/api")
    assert slack.parse_command({**form, "response_url": "https://hooks.slack.com/x"}, hosts)
    for url in ("https://[::1", "https://[abc]/x", "http://169.254.169.254/"):  # urlsplit raised
        assert slack.parse_command({**form, "response_url": url}, hosts) is None


def test_discord_interaction_parsing() -> None:
    data = {
        "type": 2,
        "id": "42",
        "token": "tok",
        "channel_id": "7",
        "user": {"id": "9"},
        "data": {"name": "ask", "options": [{"name": "question", "value": "why?"}]},
    }
    kind, update = discord.parse_interaction(data) or (0, None)
    assert kind == 2 and update is not None
    assert (update.user_id, update.message_id, update.text) == ("discord:9", "discord:42", "why?")
    assert update.extra == {"token": "tok"}
    assert discord.parse_interaction({"type": 1}) == (1, None)
    assert discord.parse_interaction({**data, "id": 42}) is None
    assert discord.parse_interaction([]) is None
    assert discord.parse_interaction({"type": True}) is None  # not a PING (true == 1)
    for options in (5, True, "abc", {"value": "x"}):  # iterating 5 raised (a 500)
        assert (
            discord.parse_interaction({**data, "data": {"name": "ask", "options": options}}) is None
        )


def test_wire_round_trip_and_refusals() -> None:
    update = Inbound("slack", "slack:T:U", "C", "slack:cmd:1", "hi", {"response_url": "https://x"})
    assert decode_inbound(encode(update)) == update
    out = update.answer("id-1", "answer")
    assert decode_outbound(encode(out)) == out
    assert shard(out.lane) == shard(update.lane)
    for body in (b"[]", b"{", orjson.dumps({"channel": 1}), orjson.dumps({"extra": []})):
        with pytest.raises(ValueError):
            decode_inbound(body)


def test_classify_retries_server_errors_only() -> None:
    assert classify(502, "bad gateway").kind == "transient"
    assert classify(403, "Forbidden: bot was blocked by the user").kind == "permanent"
    assert classify(400, "Bad Request: chat not found").kind == "permanent"


async def test_lanes_keep_order_per_key_and_run_keys_side_by_side() -> None:
    lanes, seen = Lanes(), []

    def work(key: str, i: int, delay: float):  # type: ignore[no-untyped-def]
        async def run() -> None:
            await asyncio.sleep(delay)
            seen.append((key, i))

        return run

    tasks = [lanes.submit("a", work("a", i, 0.03 - i * 0.01)) for i in range(3)]
    tasks.append(lanes.submit("b", work("b", 0, 0)))
    await asyncio.gather(*tasks)
    assert [i for k, i in seen if k == "a"] == [0, 1, 2]
    assert seen[0] == ("b", 0)  # not held behind the slow first message of "a"
    assert len(lanes) == 0


def test_channel_settings_validated_and_secret() -> None:
    env = {"TELEGRAM_BOT_TOKEN": "1:abc", "TELEGRAM_WEBHOOK_SECRET": "ok_secret-1"}
    settings = load_settings(env, dotenv=Path("/dev/null"))
    assert settings.channels == ("telegram",)
    assert "1:abc" in settings.secrets and "ok_secret-1" in settings.secrets
    with pytest.raises(SettingsError, match=r"TELEGRAM_WEBHOOK_SECRET='\*\*\*'"):
        load_settings({"TELEGRAM_WEBHOOK_SECRET": "has space"}, dotenv=Path("/dev/null"))
    with pytest.raises(SettingsError):
        load_settings({"DISCORD_PUBLIC_KEY": "xyz"}, dotenv=Path("/dev/null"))
