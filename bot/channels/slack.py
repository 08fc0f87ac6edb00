"""Slack: Events API and slash commands in, `chat.postMessage` or the command's
`response_url` out. Pure conversions and one HTTP call; no business logic.

Requests are verified as Slack documents (and `slack_sdk.signature` does): the header
`X-Slack-Signature` is `v0=` + HMAC-SHA256 of `v0:{X-Slack-Request-Timestamp}:{raw body}` under
the signing secret, compared in constant time, and the timestamp is within 300 s of now.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson

from bot.channels.sending import JSON_HEADERS, Sent, call, classify
from bot.channels.wire import Inbound, Outbound, header_bytes
from bot.errors import Unauthorized

CHANNEL = "slack"
MAX_SKEW = 300
_MENTION_RE = re.compile(r"^\s*<@[A-Z0-9]+>\s*")
_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_STAMP_RE = re.compile(r"[0-9]{1,16}")  # Unix seconds
# Web API errors that no retry can fix (the rest of `ok: false` are retried as transient).
_PERMANENT = frozenset(
    {
        "channel_not_found",
        "not_in_channel",
        "is_archived",
        "msg_too_long",
        "no_text",
        "invalid_auth",
        "account_inactive",
        "token_revoked",
        "not_authed",
        "missing_scope",
        "restricted_action",
        "cannot_dm_bot",
        "user_not_found",
        "expired_url",
        "used_url",
        "invalid_blocks",
    }
)


class SignatureVerifier:
    """Slack's v0 request signature, with an injectable clock (tests)."""

    def __init__(self, secret: str, clock: Callable[[], float] = time.time) -> None:
        self._secret = secret.encode()
        self._clock = clock

    def verify(self, headers: Mapping[str, str], body: bytes) -> None:
        """Raises `Unauthorized` unless signed by the secret within the last 300 s."""
        stamp = headers.get("X-Slack-Request-Timestamp", "")
        # ASCII digits of a sane length only: `str.isdigit()` passes "²" (which int() refuses)
        # and int() takes Arabic-Indic digits; thousands of digits overflow the float
        # arithmetic (or int()'s digit limit).
        if not _STAMP_RE.fullmatch(stamp) or abs(self._clock() - int(stamp)) > MAX_SKEW:
            raise Unauthorized("missing or stale X-Slack-Request-Timestamp")
        base = b"v0:" + stamp.encode() + b":" + body
        expected = b"v0=" + hmac.new(self._secret, base, hashlib.sha256).hexdigest().encode()
        if not hmac.compare_digest(expected, header_bytes(headers.get("X-Slack-Signature"))):
            raise Unauthorized("missing or wrong X-Slack-Signature")


def _ident(value: Any) -> str | None:
    return value if isinstance(value, str) and _ID_RE.fullmatch(value) else None


def parse_event(payload: dict[str, Any]) -> tuple[str, Inbound | None] | None:
    """(event_id, the message it carries or None when ignored) for an `event_callback`;
    None when the payload is not one. Bot messages and subtypes (edits, joins) are ignored."""
    event_id = _ident(payload.get("event_id"))
    event = payload.get("event")
    if event_id is None or not isinstance(event, dict):
        return None
    if event.get("type") not in ("message", "app_mention"):
        return event_id, None
    if event.get("bot_id") or event.get("subtype"):
        return event_id, None
    team = _ident(payload.get("team_id") or event.get("team"))
    user, channel, text = _ident(event.get("user")), _ident(event.get("channel")), event.get("text")
    if team is None or user is None or channel is None or not isinstance(text, str):
        return event_id, None
    text = _MENTION_RE.sub("", text)
    if not text.strip():
        return event_id, None
    return event_id, Inbound(CHANNEL, f"slack:{team}:{user}", channel, f"slack:{event_id}", text)


def parse_command(
    form: Mapping[str, str], allowed_hosts: tuple[str, ...]
) -> tuple[str, Inbound] | None:
    """(dedupe key, the command as a message) for a slash command; None when malformed.

    The answer goes to `response_url`, which must be on one of `allowed_hosts` (Slack's
    hooks host, or the configured API's): a signed request still must not make the bot post
    anywhere else."""
    team, user = _ident(form.get("team_id")), _ident(form.get("user_id"))
    channel, trigger = _ident(form.get("channel_id")), form.get("trigger_id", "")
    url, text = form.get("response_url", ""), form.get("text", "")
    if team is None or user is None or channel is None or not trigger:
        return None
    try:
        parts = urlsplit(url)
    except ValueError:  # "https://[::1": an unclosed or invalid bracketed host
        return None
    if parts.scheme not in ("https", "http") or parts.netloc not in allowed_hosts:
        return None
    key = hashlib.sha256(trigger.encode()).hexdigest()[:32]
    update = Inbound(
        CHANNEL,
        f"slack:{team}:{user}",
        channel,
        f"slack:cmd:{key}",
        text.strip() or "/help",
        {"response_url": url},
    )
    return key, update


def allowed_hosts(api_url: str) -> tuple[str, ...]:
    """Where a response_url may point: Slack's hooks, and the configured API's host."""
    return ("hooks.slack.com", urlsplit(api_url).netloc)


class SlackSender:
    """`chat.postMessage`, or a slash command's `response_url`."""

    def __init__(self, http: aiohttp.ClientSession, api_url: str, token: str) -> None:
        self.http = http
        self._post = f"{api_url.rstrip('/')}/chat.postMessage"
        self._auth = {"Authorization": f"Bearer {token}"}

    async def send(self, out: Outbound) -> Sent:
        url = out.extra.get("response_url")
        if url:
            body: dict[str, Any] = {"response_type": "in_channel", "text": out.text}
            headers = JSON_HEADERS
        else:
            url, body = self._post, {"channel": out.conversation, "text": out.text}
            headers = {"Content-Type": "application/json; charset=utf-8", **self._auth}
        answer = await call(self.http, "POST", url, body, headers)
        if isinstance(answer, Sent):
            return answer
        status, raw, retry = answer.status, answer.raw, answer.retry_after
        if status == 429:
            seconds = float(retry) if retry and retry.replace(".", "", 1).isdigit() else 1.0
            return Sent("paused", "429: ratelimited", retry_after=seconds)
        if status >= 300:
            return classify(status, raw.decode("utf-8", "replace")[:200])
        try:
            data = orjson.loads(raw) if raw else {"ok": True}
        except orjson.JSONDecodeError:
            data = {"ok": raw.strip() == b"ok"}  # a response_url answers plain "ok"
        if not isinstance(data, dict) or data.get("ok", True):
            return Sent("ok")
        error = str(data.get("error", "unknown"))[:100]
        if error in _PERMANENT:
            return Sent("permanent", f"{status}: {error}")
        return Sent("transient", f"{status}: {error}")
