"""Redis-backed per-user state: admission (idempotency + rate limit + context), records,
conversation context and preferences.

Keys carry the user id in a hash tag (``bot:{u-42}:prefs``) so that everything of one user
lands on one shard if Redis is ever clustered, which keeps the multi-key scripts legal.

Bounds (docs/scaling.md has the bytes): a record holds one reply (capped by
`bot.answers.MAX_REPLY_CHARS`) for `BOT_IDEMPOTENCY_TTL`; the context keeps `CONTEXT_SIZE`
entries of at most `CONTEXT_TEXT_MAX` characters a side for `CONTEXT_TTL`; prefs hold at most
`MAX_PREFS` keys and expire `PREFS_TTL` after their last use. Every key has a TTL.

When Redis is full (``maxmemory`` with ``noeviction``) a write raises `StorageFull` (a 503
``storage_full``); the scripts write nothing before their first refused write, and replays of
what is stored still work (reads are never refused).

Liveness: a replica running `Heartbeat` puts its id in every claim it takes, so a request
waiting on a claim whose holder's heartbeat is gone (the process died mid-answer) takes it
over at once instead of waiting for the lease to lapse.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from importlib.resources import files
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import OutOfMemoryError, RedisError

from bot import runtime
from bot.core.types import Admission, Context, OutcomeKind, RateState, Record
from bot.errors import BadRequest, Unavailable
from bot.logging import get_logger
from bot.ratelimit import Policy
from bot.settings import Settings

log = get_logger(__name__)

CONTEXT_SIZE = 10
CONTEXT_TTL = 1800
CONTEXT_TEXT_MAX = 1024  # characters of the question and of the answer kept per entry
MAX_PREFS = 100
# Prefs are the one thing users set on purpose, so they outlive everything else, but a user
# id nobody uses any more (or one of a flood of made-up ones) does not keep them for ever.
PREFS_TTL = 180 * 86400

# HSET fields only when the hash stays within the key limit; one script, so two replicas
# adding keys at once cannot together exceed it. Returns the number of keys, or -1.
_PREFS_SET = """
local new = 0
for i = 1, #ARGV - 2, 2 do
  if redis.call("HEXISTS", KEYS[1], ARGV[i]) == 0 then new = new + 1 end
end
if redis.call("HLEN", KEYS[1]) + new > tonumber(ARGV[#ARGV - 1]) then return -1 end
for i = 1, #ARGV - 2, 2 do redis.call("HSET", KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call("EXPIRE", KEYS[1], ARGV[#ARGV])
return redis.call("HLEN", KEYS[1])
"""
# Delete the claim only if it is still ours (its lease may have passed to another replica).
_RELEASE = """
if redis.call("GET", KEYS[1]) == ARGV[1] then return redis.call("DEL", KEYS[1]) end
return 0
"""


class TooManyPrefs(BadRequest):
    """Setting these preferences would exceed `MAX_PREFS` keys (400, whoever asked)."""

    code = "too_many_prefs"

    def __init__(self) -> None:
        super().__init__(f"at most {MAX_PREFS} preferences per user")


class StorageFull(Unavailable):
    """Redis refused a write: it is at ``maxmemory`` and evicts nothing (503, retry later)."""

    code = "storage_full"


@contextlib.contextmanager
def refusing_when_full() -> Iterator[None]:
    """Turn Redis's OOM refusal into `StorageFull` (a clear 503, not a dependency outage)."""
    try:
        yield
    except OutOfMemoryError:
        log.warning("redis_full")
        raise StorageFull("storage is full; try again later", 30) from None


class Heartbeat:
    """This process's liveness in Redis: a key refreshed every `period`, gone `ttl` after
    the process stops refreshing it.

    The TTL is several periods, so a replica whose event loop lags for a while is not taken
    for dead; if it is (a long stall), the first-writer-wins record still leaves one reply.
    Until it has beaten once (or in processes that never run it, like the retry worker), the
    tokens it issues carry no owner and are never taken over: their leases lapse instead.
    """

    def __init__(
        self,
        redis: Redis,
        *,
        period: float = 0.25,
        ttl: float = 1.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.redis = redis
        self.owner = uuid.uuid4().hex[:16]
        self.period = period
        self.ttl_ms = int(ttl * 1000)
        self.active = False
        self._clock = clock  # how long a heartbeat has been missing (a test's own clock)
        self._missing: dict[str, float] = {}  # owner -> when its heartbeat was first missed

    @staticmethod
    def key(owner: str) -> str:
        return f"bot:hb:{owner}"

    def token(self) -> str:
        """A fresh claim or lock token naming this process (while it beats)."""
        return f"{self.owner if self.active else ''}.{uuid.uuid4().hex}"

    async def gone(self, token: str) -> bool:
        """Whether the process that issued `token` has stopped beating (so it died)."""
        owner, named, _ = token.removeprefix("P").partition(".")
        if not named or not owner or owner == self.owner:
            return False  # issued by a process without a heartbeat (or by this one)
        try:
            alive = bool(await self.redis.exists(self.key(owner)))
        except RedisError:
            return False  # cannot tell: wait for the lease instead
        now = self._clock()
        if alive:
            self._missing.pop(owner, None)
            return False
        if len(self._missing) > 1024:
            self._missing.clear()  # bounded: a few replicas' ids are ever in it
        # Gone only when missing for a beat and a half: a live process whose key vanished
        # (a flushed or restarted Redis) puts it back within one period.
        return now - self._missing.setdefault(owner, now) >= 1.5 * self.period

    async def beat(self) -> None:
        key = self.key(self.owner)
        # PEXPIRE first: Redis allows it even when full, so a full Redis does not make every
        # replica look dead to the others.
        if not await self.redis.pexpire(key, self.ttl_ms):
            await self.redis.set(key, "1", px=self.ttl_ms)
        self.active = True

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Beat in the background for the life of the block."""

        async def run() -> None:
            failing = False
            while True:
                try:
                    await self.beat()
                    failing = False
                except RedisError as exc:
                    if not failing:
                        log.warning("heartbeat_failed", error=type(exc).__name__)
                    failing = True
                await asyncio.sleep(self.period)

        task = asyncio.create_task(run())
        log.info("heartbeat_started", owner=self.owner)  # names this replica in its claims
        try:
            yield
        finally:
            await runtime.cancel_and_wait(task)
            self.active = False


def user_key(user_id: str, kind: str) -> str:
    return f"bot:{{{user_id}}}:{kind}"


def record_key(user_id: str, message_id: str) -> str:
    return f"bot:{{{user_id}}}:msg:{message_id}"


# A record as kept in Redis: {"status": 200 | 202, "body": {...}}. The numbers are that stored
# form's (the first versions wrote HTTP codes), kept so that replicas of different versions
# read each other's records during a rolling deploy; nothing outside this module sees them.
_STORED_STATUS: dict[OutcomeKind, int] = {"replied": 200, "queued": 202}


def encode_record(record: Record) -> bytes:
    """A record in its stored form."""
    return orjson.dumps({"status": _STORED_STATUS[record.kind], "body": record.body})


def decode_record(raw: str | bytes) -> Record:
    """Inverse of `encode_record`."""
    data = orjson.loads(raw)
    return Record(
        "queued" if data["status"] == _STORED_STATUS["queued"] else "replied", data["body"]
    )


class Store:
    """Per-user state in Redis. Every method is one round trip."""

    def __init__(
        self, redis: Redis, policy: Policy, *, lease_ms: int = 10_000, record_ttl: int = 86400
    ) -> None:
        self.redis = redis
        self.policy = policy
        self.lease_ms = lease_ms
        self.record_ttl = record_ttl
        self.heartbeat = Heartbeat(redis)
        self._admit = redis.register_script(files("bot").joinpath("admit.lua").read_text())
        self._finish = redis.register_script(files("bot").joinpath("finish.lua").read_text())
        self._prefs_set = redis.register_script(_PREFS_SET)
        self._release = redis.register_script(_RELEASE)

    @classmethod
    def from_settings(cls, settings: Settings, redis: Redis) -> Store:
        """The per-user policy, the claim lease and how long records are kept."""
        return cls(
            redis,
            Policy.from_settings(settings),
            lease_ms=settings.lease_ms,
            record_ttl=settings.idempotency_ttl,
        )

    async def admit(
        self,
        user_id: str,
        message_id: str,
        *,
        want_context: bool,
        limit: bool = True,
        answered: tuple[Record, dict[str, Any]] | None = None,
        take_over: str = "",
    ) -> Admission:
        """Look up, rate-limit and claim a message; fetch the context when asked.

        With `answered` (the record and context entry of an answer known in advance), an
        admitted message is stored at once (`kind == "stored"`) instead of claimed. With
        `take_over` (a claim seen pending whose holder's heartbeat is gone), that claim is
        taken over if it is still the one holding the message.
        """
        # A message answered in advance is stored, never claimed: no claim token to make.
        token = self.heartbeat.token() if answered is None else ""
        finished: list[str | int | bytes] = []
        if answered is not None:
            record, entry = answered
            finished = [
                encode_record(record),
                self.record_ttl,
                orjson.dumps(entry),
                CONTEXT_SIZE,
                CONTEXT_TTL,
            ]
        with refusing_when_full():
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
                    take_over,
                    *finished,
                ],
            )
        kind = res[0]
        if kind == "done":
            rate = RateState(int(res[2]), int(res[3]) / 1e6) if limit else None
            return Admission("done", record=decode_record(res[1]), rate=rate)
        if kind == "pending":
            return Admission("pending", token=res[2], pending_ms=int(res[1]))
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
        record: Record,
        context_entry: dict[str, Any] | None,
    ) -> Record | None:
        """Store the answer for replays and append the exchange to the context, atomically.

        First writer wins: returns None when stored, or the record another request stored
        first (after a takeover), which is then this message's one answer.
        """
        with refusing_when_full():
            current = await self._finish(
                keys=[record_key(user_id, message_id), user_key(user_id, "ctx")],
                args=[
                    encode_record(record),
                    self.record_ttl,
                    orjson.dumps(context_entry) if context_entry is not None else "",
                    CONTEXT_SIZE,
                    CONTEXT_TTL,
                ],
            )
        return decode_record(current) if current else None

    async def release(self, user_id: str, message_id: str, token: str) -> None:
        """Give up a claim (the message was not answered), so a retry can take it."""
        await self._release(keys=[record_key(user_id, message_id)], args=["P" + token])

    async def context(self, user_id: str) -> Context:
        """The user's recent exchanges, oldest first."""
        raw = await self.redis.lrange(user_key(user_id, "ctx"), 0, -1)
        return [orjson.loads(c) for c in reversed(raw)]

    # Preferences -------------------------------------------------------------------------

    async def prefs(self, user_id: str) -> dict[str, str]:
        """All of the user's preferences (a use: their TTL starts again)."""
        name = user_key(user_id, "prefs")
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(name)
        pipe.expire(name, PREFS_TTL)  # allowed even when Redis is full
        result: dict[str, str] = (await pipe.execute())[0]
        return result

    async def pref(self, user_id: str, key: str) -> str | None:
        """One preference (a use: their TTL starts again)."""
        name = user_key(user_id, "prefs")
        pipe = self.redis.pipeline(transaction=False)
        pipe.hget(name, key)
        pipe.expire(name, PREFS_TTL)
        result: str | None = (await pipe.execute())[0]
        return result

    async def set_prefs(self, user_id: str, values: dict[str, str]) -> dict[str, str]:
        """Merge `values` into the user's preferences; all or nothing."""
        if values:
            args: list[str | int] = [x for kv in values.items() for x in kv]
            with refusing_when_full():
                n = await self._prefs_set(
                    keys=[user_key(user_id, "prefs")], args=[*args, MAX_PREFS, PREFS_TTL]
                )
            if int(n) < 0:
                raise TooManyPrefs()
        return await self.prefs(user_id)

    async def del_prefs(self, user_id: str, *keys: str) -> int:
        """Delete some keys, or all when none are given; returns how many were removed."""
        name = user_key(user_id, "prefs")
        if keys:
            return int(await self.redis.hdel(name, *keys))
        return int(await self.redis.delete(name))
