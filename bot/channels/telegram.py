"""Telegram: a webhook update in (`parse_update`), a `sendMessage` out (`TelegramSender`).

Two pure conversions and one HTTP call; no business logic. The bot token is part of the
Bot API's URL, so no URL, request or exception text of a send ever reaches a log line.
"""

from __future__ import annotations

import hmac
from typing import Any

import aiohttp

from bot.channels.sending import JSON_HEADERS, Sent, call, classify, json_object
from bot.channels.wire import Inbound, Outbound, header_bytes
from bot.errors import Unauthorized
from bot.settings import Settings

CHANNEL = "telegram"
SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"


def verify(settings: Settings, presented: str | None) -> None:
    """The webhook's secret token, compared in constant time; `Unauthorized` otherwise."""
    expected = settings.telegram_webhook_secret.encode()
    if not hmac.compare_digest(expected, header_bytes(presented)):
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
        answer = await call(self.http, "POST", self._url, body, JSON_HEADERS)
        if isinstance(answer, Sent):
            return answer
        if 200 <= answer.status < 300:
            return Sent("ok")
        status, data = answer.status, json_object(answer.raw)
        description = str(data.get("description", ""))[:200]
        if status == 429:
            params = data.get("parameters")
            after = params.get("retry_after") if isinstance(params, dict) else None
            seconds = float(after) if isinstance(after, int | float) else 1.0
            return Sent("paused", f"429: {description}", retry_after=seconds)
        return classify(status, description)
