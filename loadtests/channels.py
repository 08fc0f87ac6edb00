"""The `channels` scenario: signed platform webhooks from many chats at once, and the verdict
taken from what the platforms received (the stub's record of sends).

Each locust user is one chat of one platform (Telegram, Slack, Discord in turn, among those
the stack has enabled and the load can sign for). It sends `channels_messages` messages one
after the other, each once the one before was acked (as Telegram sends one chat's updates),
resending a refused one (503, no answer) as the platforms do. Payloads and signatures come
from the platforms' own libraries: python-telegram-bot's `Update`, `slack_sdk`'s signer,
PyNaCl's Ed25519. Every message is `/echo <tag> <chat> <seq>`, so its answer names its chat
and place; after the run `check_sends` reads the stub's record and counts, per chat, the
answers missing, sent twice, and out of order.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import requests

from loadtests.config import ConfigError, LoadConfig

PLATFORMS = ("telegram", "slack", "discord")
ROUTES = {
    "telegram": "/channels/telegram",
    "slack": "/channels/slack/events",
    "discord": "/channels/discord/interactions",
}
_IDS = itertools.count(random.randrange(10**8, 9 * 10**8))
_JSON = {"Content-Type": "application/json"}

# Tally outcomes and notes.
ACKED = "channel_acked"  # webhooks answered 200 (each message counted once)
RESENT = "channel_resent"  # webhooks sent again after a refusal (503, no answer)
PLATFORMS_NOTE = "channels_platforms"  # a note: the platforms in play


def platforms(cfg: LoadConfig) -> tuple[str, ...]:
    """The channels the run can drive: enabled on the stack, answered through the stub (the
    verdict reads its record), and signable here (Discord needs LOAD_DISCORD_SIGNING_KEY)."""
    stack = cfg.stack
    apis = {
        "telegram": stack.telegram_api_url,
        "slack": stack.slack_api_url,
        "discord": stack.discord_api_url,
    }
    usable = []
    for name in stack.channels:
        if not apis[name].startswith(cfg.stub):
            raise ConfigError(
                f"the channels scenario reads the stub's record of sends: point "
                f"{name.upper()}_API_URL at {cfg.stub} (it is {apis[name]})"
            )
        if name == "discord" and not cfg.discord_signing_key:
            continue
        usable.append(name)
    if not usable:
        raise ConfigError(
            "the channels scenario needs a channel enabled on the stack (TELEGRAM_BOT_TOKEN and "
            "TELEGRAM_WEBHOOK_SECRET, SLACK_*, or DISCORD_* with LOAD_DISCORD_SIGNING_KEY)"
        )
    return tuple(usable)


@dataclass(frozen=True)
class Webhook:
    path: str
    body: bytes
    headers: dict[str, str]


class Signer:
    """Builds one platform's signed webhook for `/echo <text>` in a chat."""

    def __init__(self, cfg: LoadConfig) -> None:
        self.cfg = cfg
        self._discord: Any = None
        if cfg.discord_signing_key:
            from nacl.signing import SigningKey

            self._discord = SigningKey(bytes.fromhex(cfg.discord_signing_key))

    def chat(self, platform: str) -> str:
        """A fresh chat of `platform`, as the platform names it."""
        n = next(_IDS)
        if platform == "telegram":
            return str(n)
        if platform == "slack":
            return f"C{n:X}"
        return str(10**17 + n)  # a Discord channel snowflake

    def webhook(self, platform: str, chat: str, text: str) -> Webhook:
        """The request the platform would send for one new message (its own update, event
        or interaction id; a resend is the same body, `signed` afresh)."""
        if platform == "telegram":
            return self._telegram(int(chat), text)
        if platform == "slack":
            return self._slack(chat, text)
        return self._discord_interaction(chat, text)

    def signed(self, platform: str, hook: Webhook) -> Webhook:
        """`hook` with the signature headers of now (Slack and Discord sign a timestamp)."""
        stamp = str(int(time.time()))
        headers = {**hook.headers}
        if platform == "slack":
            from slack_sdk.signature import SignatureVerifier

            signer = SignatureVerifier(self.cfg.stack.slack_signing_secret)
            signature = signer.generate_signature(timestamp=stamp, body=hook.body)
            headers.update(
                {"X-Slack-Request-Timestamp": stamp, "X-Slack-Signature": signature or ""}
            )
        elif platform == "discord":
            signature = self._discord.sign(stamp.encode() + hook.body).signature.hex()
            headers.update({"X-Signature-Ed25519": signature, "X-Signature-Timestamp": stamp})
        return Webhook(hook.path, hook.body, headers)

    def _telegram(self, chat_id: int, text: str) -> Webhook:
        import telegram

        n = next(_IDS)
        message = telegram.Message(
            message_id=n,
            date=datetime.now(UTC),
            chat=telegram.Chat(id=chat_id, type=telegram.Chat.PRIVATE),
            from_user=telegram.User(id=chat_id, first_name="Load", is_bot=False),
            text=text,
        )
        body = orjson.dumps(telegram.Update(update_id=n, message=message).to_dict())
        headers = {
            "X-Telegram-Bot-Api-Secret-Token": self.cfg.stack.telegram_webhook_secret,
            "Content-Type": "application/json",
        }
        return Webhook(ROUTES["telegram"], body, headers)

    def _slack(self, channel: str, text: str) -> Webhook:
        event = {"type": "message", "user": "U" + channel[1:], "channel": channel, "text": text}
        payload = {
            "type": "event_callback",
            "team_id": "TLOAD",
            "event_id": f"Ev{next(_IDS):X}",
            "event_time": int(time.time()),
            "event": event,
        }
        return Webhook(ROUTES["slack"], orjson.dumps(payload), _JSON)

    def _discord_interaction(self, channel: str, text: str) -> Webhook:
        n = next(_IDS)
        payload = {
            "type": 2,
            "id": str(2 * 10**17 + n),
            "application_id": self.cfg.stack.discord_application_id,
            "token": f"tok-{n}-{random.getrandbits(32):08x}",
            "channel_id": channel,
            "member": {"user": {"id": str(3 * 10**17 + int(channel) % 10**17)}},
            "data": {
                "name": "ask",
                "type": 1,
                "options": [{"name": "question", "type": 3, "value": text}],
            },
        }
        return Webhook(ROUTES["discord"], orjson.dumps(payload), _JSON)


def run_tag(run_dir: str) -> str:
    """What marks one run's messages apart from any other's in the stub (every locust
    process and the judge derive it from the run's folder)."""
    return "lt" + hashlib.sha256(run_dir.encode()).hexdigest()[:10]


def message_text(tag: str, platform: str, chat: str, seq: int) -> str:
    return f"/echo {tag} {platform} {chat} {seq}"


def chat_key(platform: str, chat: str) -> str:
    return f"{platform} {chat}"


def _answers(record: list[dict[str, Any]], tag: str) -> list[tuple[str, int]]:
    """(chat key, seq) of every 2xx send of this run's messages, in the order they were sent."""
    out = []
    for send in record:
        parts = str(send.get("text", "")).split()
        if send.get("status") != 200 or len(parts) != 4 or parts[0] != tag:
            continue
        try:
            out.append((chat_key(parts[1], parts[2]), int(parts[3])))
        except ValueError:
            continue
    return out


def verdict_of(expected: dict[str, list[str]], sent: list[tuple[str, int]]) -> dict[str, Any]:
    """Missing, duplicated, unexpected answers and chats out of order, from the sends seen."""
    want = {(chat, int(seq)) for chat, seqs in expected.items() for seq in seqs}
    counts = Counter(sent)
    firsts: dict[str, list[int]] = {}
    for key in dict.fromkeys(sent):  # first sends, in order
        firsts.setdefault(key[0], []).append(key[1])
    out_of_order = sorted(c for c, seqs in firsts.items() if seqs != sorted(seqs))
    return {
        "chats": len(expected),
        "expected": len(want),
        "delivered": len(want & set(counts)),
        "missing": len(want - set(counts)),
        "duplicates": sum(n - 1 for n in counts.values()),
        "unexpected": len(set(counts) - want),
        "out_of_order_chats": len(out_of_order),
        "examples": [f"out of order: {c} {firsts[c][:10]}" for c in out_of_order[:3]]
        + [f"missing: {c} {s}" for c, s in sorted(want - set(counts))[:3]]
        + [f"sent {n} times: {k}" for k, n in counts.items() if n > 1][:3],
    }


def check_sends(
    cfg: LoadConfig, expected: dict[str, list[str]], tag: str, started: float
) -> dict[str, Any]:
    """Wait (up to `delivery_timeout`) until the stub has every acked message's answer, then
    judge the record; plus when the last answer was sent, counted from the run's start."""
    used = sorted({chat.split()[0] for chat in expected})
    deadline = time.monotonic() + cfg.delivery_timeout
    while True:
        record: list[dict[str, Any]] = []
        for platform in used:
            resp = requests.get(f"{cfg.stub}/admin/{platform}/sent", timeout=30)
            resp.raise_for_status()
            record += resp.json()
        found = verdict_of(expected, _answers(record, tag))
        if found["missing"] == 0 or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    # A late duplicate would come within a second or two of its first copy.
    time.sleep(2.0)
    record = []
    for platform in used:
        record += requests.get(f"{cfg.stub}/admin/{platform}/sent", timeout=30).json()
    mine = [s for s in record if str(s.get("text", "")).startswith(tag + " ")]
    found = verdict_of(expected, _answers(mine, tag))
    ats = [float(s["at"]) for s in mine if s.get("status") == 200]
    found["all_sent_after_s"] = round(max(ats) - started, 1) if ats else None
    found["platforms"] = used
    found["rate_limited_sends"] = sum(1 for s in mine if s.get("status") == 429)
    return found
