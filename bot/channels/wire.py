"""What the channel queues carry: an update to answer (`Inbound`), a message to send
(`Outbound`). Plain data and strict codecs, no I/O; and the bytes a webhook's header verifies."""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson

# Queues of each direction are sharded by conversation: one shard's consumer is the only one
# (single active consumer), so a conversation's messages are handled by one process in order.
SHARDS = 2
MAX_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class Inbound:
    """One platform update, as the core will see it."""

    channel: str  # telegram | slack | discord
    user_id: str  # the core's user: tg:{chat_id}, ...
    conversation: str  # where the answer goes (a Telegram chat id)
    message_id: str  # the core's idempotency key: tg:{update_id}
    text: str
    extra: dict[str, str] = field(default_factory=dict)  # what the answer's send needs

    def answer(self, ident: str, text: str) -> Outbound:
        """The message that answers this update (`ident` unique per message sent)."""
        return Outbound(self.channel, self.conversation, ident, text, self.user_id, self.extra)

    @property
    def lane(self) -> str:
        return f"{self.channel}:{self.conversation}"


@dataclass(frozen=True, slots=True)
class Outbound:
    """One message to send to a conversation; `id` is unique per message sent."""

    channel: str
    conversation: str
    id: str
    text: str
    user_id: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def lane(self) -> str:
        return f"{self.channel}:{self.conversation}"


def header_bytes(value: str | None) -> bytes:
    """A request header's value as bytes to verify: any str encodes, so a hostile byte only
    fails the comparison it is in (a 401), never the request (a 500).

    aiohttp hands a header's non-UTF-8 bytes over as surrogates (`surrogateescape`), which
    a plain `.encode()` refuses; `surrogatepass` also takes a lone surrogate from elsewhere
    (a serverless event's JSON)."""
    return (value or "").encode("utf-8", "surrogatepass")


def shard(lane: str) -> int:
    """The shard of a conversation: stable across processes and restarts."""
    return zlib.crc32(lane.encode()) % SHARDS


def encode(item: Inbound | Outbound) -> bytes:
    return orjson.dumps(asdict(item))


def _load(body: bytes) -> dict[str, Any]:
    if len(body) > MAX_BYTES:
        raise ValueError("body over the size limit")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ValueError("body is not JSON") from None
    if not isinstance(data, dict):
        raise ValueError("body is not a JSON object")
    return data


def _texts(data: dict[str, Any], names: tuple[str, ...]) -> list[str]:
    values = [data.get(n) for n in names]
    for name, value in zip(names, values, strict=True):
        if not isinstance(value, str):
            raise ValueError(f"field {name} is not a string")
    return [str(v) for v in values]


def _extra(data: dict[str, Any]) -> dict[str, str]:
    extra = data.get("extra") or {}
    if not isinstance(extra, dict) or not all(isinstance(v, str) for v in extra.values()):
        raise ValueError("field extra is not an object of strings")
    return {str(k): v for k, v in extra.items()}


def decode_inbound(body: bytes) -> Inbound:
    """Inverse of `encode` for an `Inbound`; ValueError on anything else."""
    data = _load(body)
    channel, user_id, conversation, message_id, text = _texts(
        data, ("channel", "user_id", "conversation", "message_id", "text")
    )
    return Inbound(channel, user_id, conversation, message_id, text, _extra(data))


def decode_outbound(body: bytes) -> Outbound:
    """Inverse of `encode` for an `Outbound`; ValueError on anything else."""
    data = _load(body)
    channel, conversation, ident, text, user_id = _texts(
        data, ("channel", "conversation", "id", "text", "user_id")
    )
    return Outbound(channel, conversation, ident, text, user_id, _extra(data))
