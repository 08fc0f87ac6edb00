"""Redis-backed per-user state: admission (idempotency + rate limit + context), records,
conversation context and preferences.

Keys carry the user id in a hash tag (``bot:{u-42}:prefs``) so that everything of one user
lands on one shard if Redis is ever clustered, which keeps the multi-key scripts legal.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from importlib.resources import files
from typing import Any

import orjson
from redis.asyncio import Redis

from bot.ratelimit import Policy, RateState

CONTEXT_SIZE = 10
CONTEXT_TTL = 1800
MAX_PREFS = 100

# HSET fields only when the hash stays within the key limit; one script, so two replicas
# adding keys at once cannot together exceed it. Returns the number of keys, or -1.
_PREFS_SET = """
local new = 0
for i = 1, #ARGV - 1, 2 do
  if redis.call("HEXISTS", KEYS[1], ARGV[i]) == 0 then new = new + 1 end
end
if redis.call("HLEN", KEYS[1]) + new > tonumber(ARGV[#ARGV]) then return -1 end
for i = 1, #ARGV - 1, 2 do redis.call("HSET", KEYS[1], ARGV[i], ARGV[i + 1]) end
return redis.call("HLEN", KEYS[1])
"""
# Delete the claim only if it is still ours (its lease may have passed to another replica).
_RELEASE = """
if redis.call("GET", KEYS[1]) == ARGV[1] then return redis.call("DEL", KEYS[1]) end
return 0
"""


class TooManyPrefs(Exception):
    """Setting these preferences would exceed `MAX_PREFS` keys."""


def user_key(user_id: str, kind: str) -> str:
    return f"bot:{{{user_id}}}:{kind}"


def record_key(user_id: str, message_id: str) -> str:
    return f"bot:{{{user_id}}}:msg:{message_id}"


@dataclass(slots=True)
class Admission:
    """The outcome of `Store.admit`."""

    kind: str  # ok | stored | done | pending | limited
    token: str = ""
    record: dict[str, Any] | None = None
    rate: RateState | None = None
    context: list[dict[str, Any]] = field(default_factory=list)
    pending_ms: int = 0


class Store:
    """Per-user state in Redis. Every method is one round trip."""

    def __init__(
        self, redis: Redis, policy: Policy, *, lease_ms: int = 10_000, record_ttl: int = 86400
    ) -> None:
        self.redis = redis
        self.policy = policy
        self.lease_ms = lease_ms
        self.record_ttl = record_ttl
        self._admit = redis.register_script(files("bot").joinpath("admit.lua").read_text())
        self._prefs_set = redis.register_script(_PREFS_SET)
        self._release = redis.register_script(_RELEASE)

    async def admit(
        self,
        user_id: str,
        message_id: str,
        *,
        want_context: bool,
        limit: bool = True,
        answered: tuple[dict[str, Any], dict[str, Any]] | None = None,
    ) -> Admission:
        """Look up, rate-limit and claim a message; fetch the context when asked.

        With `answered` (the record and context entry of an answer known in advance), an
        admitted message is stored at once (`kind == "stored"`) instead of claimed.
        """
        token = uuid.uuid4().hex
        finished: list[str | int | bytes] = []
        if answered is not None:
            record, entry = answered
            finished = [
                orjson.dumps(record),
                self.record_ttl,
                orjson.dumps(entry),
                CONTEXT_SIZE,
                CONTEXT_TTL,
            ]
        res = await self._admit(
            keys=[
                record_key(user_id, message_id),
                user_key(user_id, "rl"),
                user_key(user_id, "ctx"),
            ],
            args=[
                self.policy.interval_us,
                self.policy.burst,
                token,
                self.lease_ms,
                int(want_context),
                int(limit),
                *finished,
            ],
        )
        kind = res[0]
        if kind == "done":
            rate = RateState(int(res[2]), int(res[3]) / 1e6) if limit else None
            return Admission("done", record=orjson.loads(res[1]), rate=rate)
        if kind == "pending":
            return Admission("pending", pending_ms=int(res[1]))
        if kind == "limited":
            retry, reset = int(res[1]) / 1e6, int(res[2]) / 1e6
            return Admission("limited", rate=RateState(0, reset, retry))
        rate = RateState(int(res[1]), int(res[2]) / 1e6) if limit else None
        if kind == "stored":
            return Admission("stored", rate=rate)
        ctx = [orjson.loads(c) for c in reversed(res[3])]
        return Admission("ok", token=token, rate=rate, context=ctx)

    async def finish(
        self,
        user_id: str,
        message_id: str,
        record: dict[str, Any],
        context_entry: dict[str, Any] | None,
    ) -> None:
        """Store the answer for replays and append the exchange to the context, atomically."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(record_key(user_id, message_id), orjson.dumps(record), ex=self.record_ttl)
        if context_entry is not None:
            ctx = user_key(user_id, "ctx")
            pipe.lpush(ctx, orjson.dumps(context_entry))
            pipe.ltrim(ctx, 0, CONTEXT_SIZE - 1)
            pipe.expire(ctx, CONTEXT_TTL)
        await pipe.execute()

    async def release(self, user_id: str, message_id: str, token: str) -> None:
        """Give up a claim (the message was not answered), so a retry can take it."""
        await self._release(keys=[record_key(user_id, message_id)], args=["P" + token])

    async def record(self, user_id: str, message_id: str) -> dict[str, Any] | str | None:
        """The stored record, ``"pending"`` while claimed, or None."""
        raw = await self.redis.get(record_key(user_id, message_id))
        if raw is None:
            return None
        if raw.startswith("P"):
            return "pending"
        result: dict[str, Any] = orjson.loads(raw)
        return result

    async def wait_record(
        self, user_id: str, message_id: str, deadline: float, poll: float = 0.02
    ) -> dict[str, Any] | None:
        """Wait for another request's record; None when its claim lapsed or time ran out."""
        while time.monotonic() < deadline:
            rec = await self.record(user_id, message_id)
            if rec is None:
                return None
            if rec != "pending":
                assert isinstance(rec, dict)
                return rec
            await asyncio.sleep(poll)
        return None

    async def context(self, user_id: str) -> list[dict[str, Any]]:
        """The user's recent exchanges, oldest first."""
        raw = await self.redis.lrange(user_key(user_id, "ctx"), 0, -1)
        return [orjson.loads(c) for c in reversed(raw)]

    # Preferences -------------------------------------------------------------------------

    async def prefs(self, user_id: str) -> dict[str, str]:
        result: dict[str, str] = await self.redis.hgetall(user_key(user_id, "prefs"))
        return result

    async def pref(self, user_id: str, key: str) -> str | None:
        result: str | None = await self.redis.hget(user_key(user_id, "prefs"), key)
        return result

    async def set_prefs(self, user_id: str, values: dict[str, str]) -> dict[str, str]:
        """Merge `values` into the user's preferences; all or nothing."""
        if values:
            args: list[str | int] = [x for kv in values.items() for x in kv]
            n = await self._prefs_set(keys=[user_key(user_id, "prefs")], args=[*args, MAX_PREFS])
            if int(n) < 0:
                raise TooManyPrefs(f"at most {MAX_PREFS} preferences per user")
        return await self.prefs(user_id)

    async def del_prefs(self, user_id: str, *keys: str) -> int:
        """Delete some keys, or all when none are given; returns how many were removed."""
        name = user_key(user_id, "prefs")
        if keys:
            return int(await self.redis.hdel(name, *keys))
        return int(await self.redis.delete(name))
