"""Deferred replies: each user's inbox in Redis, one reply per message id.

A Redis stream per user keeps the replies in order and gives cursors for free (entry ids);
a hash beside it records what was delivered per message id, and one Lua script checks and
appends atomically, so a worker that dies between storing a reply and acking its job (and
redelivers it) cannot deliver twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from importlib.resources import files
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from bot.core.types import Reply, ReplyKind
from bot.inbox_watch import InboxWatch
from bot.logging import get_logger
from bot.store import user_key

log = get_logger(__name__)

__all__ = ["APOLOGY", "MAX_WAIT", "PAGE", "Inbox", "Reply", "valid_cursor"]

INBOX_TTL = 7 * 86400  # undelivered replies are kept a week after the last one arrived
MAX_ENTRIES = 1000
PAGE = 100
MAX_WAIT = 30.0
# XREAD BLOCK in slices below the Redis client's 1 s socket timeout.
_BLOCK_SLICE_MS = 700
# A stream entry id: two unsigned 64-bit integers in ASCII digits (re's \d takes any Unicode
# digit, which Redis refuses); `valid_cursor` checks the range too.
_CURSOR_RE = re.compile(r"0|([0-9]{1,20})-([0-9]{1,20})")
_U64_MAX = 2**64 - 1
APOLOGY = (
    "Sorry, I could not get an answer to your message in time. Please ask again in a little while."
)


def valid_cursor(cursor: str) -> bool:
    """Whether Redis takes `cursor` as a stream id (``0`` or ``ms-seq``, each part < 2**64)."""
    m = _CURSOR_RE.fullmatch(cursor)
    return m is not None and (
        m.group(1) is None or (int(m.group(1)) <= _U64_MAX and int(m.group(2)) <= _U64_MAX)
    )


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Inbox:
    """Per-user deferred replies in Redis."""

    def __init__(self, redis: Redis, watch: InboxWatch | None = None) -> None:
        self.redis = redis
        self.watch = watch  # where a replica's long polls wait; without it, each blocks in Redis
        self._deliver = redis.register_script(files("bot").joinpath("inbox.lua").read_text())

    @staticmethod
    def _keys(user_id: str) -> list[str]:
        return [user_key(user_id, "inbox"), user_key(user_id, "inbox:ids")]

    async def deliver(
        self, user_id: str, message_id: str, reply: str, kind: ReplyKind = "answer"
    ) -> bool:
        """Store a reply; False when this message id already has it (nothing stored)."""
        res = await self._deliver(
            keys=self._keys(user_id),
            args=[message_id, kind, reply, _now(), INBOX_TTL, MAX_ENTRIES],
        )
        return bool(res)

    async def delivered(self, user_id: str, message_id: str) -> Reply | None:
        """The reply delivered for a message (the answer, once there is one), or None."""
        raw = await self.redis.hget(self._keys(user_id)[1], message_id)
        if raw is None:
            return None
        # Kept by inbox.lua as {"k": kind, "r": reply, "at": time, "id": stream entry id}.
        seen = orjson.loads(raw)
        return Reply(message_id, seen["r"], seen["at"], seen["k"], seen["id"])

    async def answered(self, user_id: str, message_id: str) -> bool:
        """Whether the message's answer (not only an apology) was delivered."""
        seen = await self.delivered(user_id, message_id)
        return seen is not None and seen.kind == "answer"

    async def page(
        self,
        user_id: str,
        after: str = "0",
        *,
        wait: float = 0.0,
        limit: int = PAGE,
        stop: Callable[[], bool] = lambda: False,
    ) -> tuple[list[Reply], str]:
        """Replies after the cursor, oldest first, and the next cursor.

        With `wait`, block until at least one arrives or `wait` seconds pass (or `stop()`).
        """
        key = self._keys(user_id)[0]
        deadline = time.monotonic() + min(wait, MAX_WAIT)
        if self.watch is not None:
            entries = await self._watched(key, after, limit, deadline, stop)
        else:
            entries = await self._blocking(key, after, limit, deadline, stop)
        replies = _replies(entries)
        return replies, (replies[-1].cursor if replies else after)

    async def follow(
        self, user_id: str, after: str, *, quiet: float, stop: Callable[[], bool]
    ) -> AsyncIterator[list[Reply]]:
        """Pages of replies after the cursor as they come, and an empty page after each
        `quiet` seconds without any, until `stop()`; it ends, too, when Redis fails (the
        follower resumes later from the last cursor it got, on any replica).

        With a watch, it stays registered for the whole follow (its cursor moving on), so a
        thousand idle followers cost the watch's one read nothing more than their keys.
        """
        try:
            if self.watch is None:
                while not stop():
                    replies, after = await self.page(user_id, after, wait=quiet, stop=stop)
                    yield replies
                return
            key = self._keys(user_id)[0]
            with self.watch.watching(key, after) as watcher:
                while not stop():
                    watcher.news.clear()
                    replies = _replies(await self._read(key, watcher.after, PAGE))
                    if replies:
                        watcher.after = replies[-1].cursor
                        yield replies
                    elif not await _news(watcher.news, time.monotonic() + quiet, stop):
                        yield []
        except RedisError as exc:
            log.warning("inbox_follow_failed", error=type(exc).__name__)

    async def _read(self, key: str, after: str, limit: int) -> list[Any]:
        res = await self.redis.xread({key: after}, count=limit)
        return list(res[0][1]) if res else []

    async def _watched(
        self, key: str, after: str, limit: int, deadline: float, stop: Callable[[], bool]
    ) -> list[Any]:
        """Read; if nothing is there, wait in this process for the watch to say there may be."""
        assert self.watch is not None
        entries = await self._read(key, after, limit)
        if entries or deadline <= time.monotonic() or stop():
            return entries
        with self.watch.watch(key, after) as news:
            while not entries and await _news(news, deadline, stop):
                news.clear()
                entries = await self._read(key, after, limit)
            if not entries:  # the last look: an entry may have come just as the watch began
                entries = await self._read(key, after, limit)
        return entries

    async def _blocking(
        self, key: str, after: str, limit: int, deadline: float, stop: Callable[[], bool]
    ) -> list[Any]:
        """XREAD BLOCK on the shared pool, in slices (the worker and tests, without a watch)."""
        while True:
            left_ms = int((deadline - time.monotonic()) * 1000)
            block = min(_BLOCK_SLICE_MS, left_ms) if left_ms > 0 and not stop() else None
            res = await self.redis.xread({key: after}, count=limit, block=block or None)
            entries = res[0][1] if res else []
            if entries or block is None:
                return list(entries)
            await asyncio.sleep(0)


def _replies(entries: list[Any]) -> list[Reply]:
    return [
        Reply(f["m"], f["r"], f["at"], f.get("k", "answer"), entry_id) for entry_id, f in entries
    ]


async def _news(news: asyncio.Event, deadline: float, stop: Callable[[], bool]) -> bool:
    """Wait until `news` is set (True), or `deadline` passes or `stop()` (False).

    In slices, so a draining replica lets its waiters go within one."""
    while not stop():
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(min(left, _BLOCK_SLICE_MS / 1000)):
                await news.wait()
        if news.is_set():
            return True
    return False
