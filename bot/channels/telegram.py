"""Telegram: a webhook update in (`parse_update`), a `sendMessage` out (`TelegramSender`).

Two pure conversions and one HTTP call; no business logic. The bot token is part of the
Bot API's URL, so no URL, request or exception text of a send ever reaches a log line.
"""

from __future__ import annotations

import hmac
from typing import Any

import aiohttp
import orjson

from bot.channels.sending import Sent, classify
from bot.channels.wire import Inbound, Outbound
from bot.errors import Unauthorized
from bot.settings import Settings

CHANNEL = "telegram"
SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"
SEND_TIMEOUT = 10.0


def verify(settings: Settings, presented: str | None) -> None:
    """The webhook's secret token, compared in constant time; `Unauthorized` otherwise."""
    expected = settings.telegram_webhook_secret.encode()
    given = (presented or "").encode()
    if not hmac.compare_digest(expected, given):
        raise Unauthorized("missing or wrong X-Telegram-Bot-Api-Secret-Token")


def update_id(update: Any) -> int | None:
    """The update's id, or None when the body is not an update at all."""
    if not isinstance(update, dict):
        return None
    uid = update.get("update_id")
    return uid if isinstance(uid, int) and not isinstance(uid, bool) else None


def parse_update(update: dict[str, Any]) -> Inbound | None:
    """The text message an update carries, as the core's input; None for anything else
    (stickers, edits, joins, callbacks): acknowledged and ignored."""
    message = update.get("message")
    if not isinstance(message, dict):
        return None
    chat, text = message.get("chat"), message.get("text")
    if not isinstance(chat, dict) or not isinstance(text, str) or not text.strip():
        return None
    chat_id = chat.get("id")
    if not isinstance(chat_id, int) or isinstance(chat_id, bool):
        return None
    return Inbound(CHANNEL, f"tg:{chat_id}", str(chat_id), f"tg:{update['update_id']}", text)


class TelegramSender:
    """`sendMessage` to one chat, its result classified for the delivery loop."""

    def __init__(self, http: aiohttp.ClientSession, api_url: str, token: str) -> None:
        self.http = http
        self._url = f"{api_url.rstrip('/')}/bot{token}/sendMessage"

    async def send(self, out: Outbound) -> Sent:
        body = {"chat_id": out.conversation, "text": out.text}
        try:
            async with self.http.post(
                self._url,
                data=orjson.dumps(body),
                headers={"Content-Type": "application/json"},
                timeout=aiohttp.ClientTimeout(total=SEND_TIMEOUT),
            ) as resp:
                status = resp.status
                raw = await resp.read()
        except TimeoutError:
            return Sent("transient", "timeout")
        except aiohttp.ClientError as exc:
            return Sent("transient", type(exc).__name__)
        if 200 <= status < 300:
            return Sent("ok")
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            data = {}
        data = data if isinstance(data, dict) else {}
        description = str(data.get("description", ""))[:200]
        if status == 429:
            params = data.get("parameters")
            after = params.get("retry_after") if isinstance(params, dict) else None
            seconds = float(after) if isinstance(after, int | float) else 1.0
            return Sent("paused", f"429: {description}", retry_after=seconds)
        return classify(status, description)
