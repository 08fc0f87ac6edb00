"""One blocking XREAD per replica for all of its long polls.

A long poll (``GET …/replies?wait=``) used to hold a pooled Redis connection in
``XREAD BLOCK`` for its whole wait, in 0.7 s slices: a thousand polls meant a thousand Redis
connections opened at once (the burst stalled the replica's event loop for seconds) and
about 1,400 XREADs a second. Here one loop reads every watched stream on one connection of
its own and wakes the polls whose stream got an entry; a poll reads its page itself, once
woken. A stream that joins while the loop blocks interrupts the block (``CLIENT UNBLOCK``), so
the loop reads it from the poll's cursor at once and nothing is missed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

from redis.asyncio import Redis
from redis.exceptions import RedisError
from redis.typing import KeyT, StreamIdT

from bot import runtime
from bot.logging import get_logger

log = get_logger(__name__)

BLOCK_MS = 1000  # the loop's block; its own connection's socket timeout is above it
_RETRY_S = 0.5  # after a Redis error, before the loop reads again


def _order(cursor: str) -> tuple[int, int]:
    ms, _, seq = cursor.partition("-")
    return int(ms), int(seq or 0)


class Watcher:
    """One poll's (or event stream's) interest in one stream, from its cursor on; a stream
    that follows the inbox moves `after` on as it reads."""

    __slots__ = ("after", "news")

    def __init__(self, after: str) -> None:
        self.after = after
        self.news = asyncio.Event()


class InboxWatch:
    """Wakes long polls when their inbox stream gets an entry; one Redis read for them all."""

    def __init__(self, reader: Redis, control: Redis, block_ms: int = BLOCK_MS) -> None:
        self._reader = reader  # a single-connection client: the loop's XREAD blocks on it
        self._control = control  # the shared pool: CLIENT UNBLOCK goes through it
        self._block_ms = block_ms
        self._watchers: dict[str, set[Watcher]] = {}
        self._reading: frozenset[str] = frozenset()
        self._blocked_id: int | None = None  # the reader's client id while it blocks
        self._changed = asyncio.Event()

    @contextmanager
    def watch(self, key: str, after: str) -> Iterator[asyncio.Event]:
        """Watch stream `key` past `after`; the event is set when it may have news."""
        with self.watching(key, after) as watcher:
            yield watcher.news

    @contextmanager
    def watching(self, key: str, after: str) -> Iterator[Watcher]:
        """Watch stream `key` past `after` for as long as the block runs (its `news` is set
        when it may have some); the caller moves `after` on as it reads."""
        watcher = Watcher(after)
        self._watchers.setdefault(key, set()).add(watcher)
        if key not in self._reading:
            self._changed.set()
            self._interrupt()
        try:
            yield watcher
        finally:
            watchers = self._watchers.get(key)
            if watchers is not None:
                watchers.discard(watcher)
                if not watchers:
                    del self._watchers[key]

    def _interrupt(self) -> None:
        """End the loop's current block, so it reads the new stream too (once per block)."""
        client_id, self._blocked_id = self._blocked_id, None
        if client_id is not None:
            task = asyncio.ensure_future(self._control.client_unblock(client_id))
            task.add_done_callback(_retrieve)

    async def run(self) -> None:
        """Read every watched stream until cancelled."""
        client_id: int | None = None
        while True:
            if not self._watchers:
                self._reading = frozenset()
                self._changed.clear()
                await self._changed.wait()
                continue
            streams: dict[KeyT, StreamIdT] = {
                key: min((w.after for w in watchers), key=_order)
                for key, watchers in self._watchers.items()
            }
            self._reading = frozenset(self._watchers)
            self._changed.clear()
            try:
                if client_id is None:
                    client_id = int(await self._reader.client_id())
                self._blocked_id = client_id
                res = await self._reader.xread(streams, count=1, block=self._block_ms)
            except RedisError as exc:
                client_id = None  # a new connection gets a new id
                log.warning("inbox_watch_read_failed", error=type(exc).__name__)
                await asyncio.sleep(_RETRY_S)
                continue
            finally:
                self._blocked_id = None
            for key, _ in res or []:
                for watcher in self._watchers.get(key, ()):
                    watcher.news.set()
            if res:
                await asyncio.sleep(0)  # let the woken polls read and leave before reading again


def _retrieve(task: asyncio.Future[object]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.debug("inbox_watch_unblock_failed", error=type(task.exception()).__name__)


@contextlib.asynccontextmanager
async def running(watch: InboxWatch) -> AsyncIterator[InboxWatch]:
    """The watch's loop, cancelled and awaited on exit."""
    task = asyncio.create_task(watch.run())
    try:
        yield watch
    finally:
        await runtime.cancel_and_wait(task)
