"""Discord: interactions in (a PING, or an application command such as `/ask question:…`),
the deferred answer out by editing the interaction's original response.

Requests are verified as Discord documents: Ed25519 (PyNaCl) over
`{X-Signature-Timestamp}{raw body}` with the application's public key.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import aiohttp

from bot.channels.sending import JSON_HEADERS, Sent, call, classify, json_object
from bot.channels.wire import Inbound, Outbound, header_bytes
from bot.errors import Unauthorized

if TYPE_CHECKING:
    from nacl.signing import VerifyKey

CHANNEL = "discord"
PING, APPLICATION_COMMAND = 1, 2
PONG, DEFERRED = {"type": 1}, {"type": 5}
MAX_CONTENT = 2000  # Discord's limit on a message's content
_SNOWFLAKE = re.compile(r"[0-9]{1,20}")
_TOKEN = re.compile(r"[A-Za-z0-9_.-]{1,512}")
# The command `bot channels discord register-commands` registers.
COMMANDS = [
    {
        "name": "ask",
        "description": "Ask the bot a question",
        "type": 1,
        "options": [
            {"type": 3, "name": "question", "description": "your question", "required": True}
        ],
    }
]


class Verifier:
    """Ed25519 signatures of one application's public key; without a key (Discord not
    enabled), every request is refused.

    PyNaCl (libsodium) is loaded only for a key: a deployment without Discord, a Lambda
    function's cold start included, never loads it.
    """

    def __init__(self, public_key_hex: str | None) -> None:
        self._key: VerifyKey | None = None
        self._refused: tuple[type[Exception], ...] = (ValueError,)
        if public_key_hex:
            from nacl.exceptions import BadSignatureError
            from nacl.signing import VerifyKey

            self._key = VerifyKey(bytes.fromhex(public_key_hex))
            self._refused = (ValueError, BadSignatureError)

    def verify(self, headers: Mapping[str, str], body: bytes) -> None:
        """Raises `Unauthorized` unless the request is signed by the application's key."""
        if self._key is None:
            raise Unauthorized("missing or wrong X-Signature-Ed25519")
        stamp = header_bytes(headers.get("X-Signature-Timestamp"))
        try:
            # fromhex refuses any non-hex character (a surrogate included) with a ValueError,
            # and PyNaCl a signature of the wrong length with its ValueError.
            signature = bytes.fromhex(headers.get("X-Signature-Ed25519", ""))
            self._key.verify(stamp + body, signature)
        except self._refused:
            raise Unauthorized("missing or wrong X-Signature-Ed25519") from None


def _snowflake(value: Any) -> str | None:
    return value if isinstance(value, str) and _SNOWFLAKE.fullmatch(value) else None


def parse_interaction(data: Any) -> tuple[int, Inbound | None] | None:
    """(type, the command as a message or None) for an interaction; None when malformed."""
    kind = data.get("type") if isinstance(data, dict) else None
    if not isinstance(kind, int) or isinstance(kind, bool):  # true == 1 would be a PING
        return None
    if kind != APPLICATION_COMMAND:
        return kind, None
    ident, token = _snowflake(data.get("id")), data.get("token")
    member = data.get("member")
    user = member.get("user") if isinstance(member, dict) else data.get("user")
    uid = _snowflake(user.get("id")) if isinstance(user, dict) else None
    channel = _snowflake(data.get("channel_id"))
    command = data.get("data")
    if not (ident and uid and channel and isinstance(token, str) and _TOKEN.fullmatch(token)):
        return None
    if not isinstance(command, dict) or not isinstance(command.get("name"), str):
        return None
    options = command.get("options") or []
    if not isinstance(options, list):
        return None
    values = [str(o.get("value", "")) for o in options if isinstance(o, dict)]
    name = command["name"]
    text = " ".join(values) if name == "ask" else " ".join([f"/{name}", *values])
    if not text.strip():
        text = "/help"
    update = Inbound(CHANNEL, f"discord:{uid}", channel, f"discord:{ident}", text, {"token": token})
    return kind, update


class DiscordSender:
    """Edits an interaction's original response (its webhook needs no bot token)."""

    def __init__(self, http: aiohttp.ClientSession, api_url: str, application_id: str) -> None:
        self.http = http
        self._base = f"{api_url.rstrip('/')}/webhooks/{application_id}"

    async def send(self, out: Outbound) -> Sent:
        url = f"{self._base}/{out.extra.get('token', '')}/messages/@original"
        body = {"content": out.text[:MAX_CONTENT]}
        answer = await call(self.http, "PATCH", url, body, JSON_HEADERS)
        if isinstance(answer, Sent):
            return answer
        if 200 <= answer.status < 300:
            return Sent("ok")
        status, data, header = answer.status, json_object(answer.raw), answer.retry_after
        if status == 429:
            after = data.get("retry_after", header)
            try:
                seconds = float(after) if after is not None else 1.0
            except ValueError:
                seconds = 1.0
            return Sent("paused", "429: rate limited", retry_after=seconds)
        return classify(status, str(data.get("message", ""))[:200])
