"""The upstream answer cache: shared in Redis, single-flight across replicas, stale on error.

An answer is kept under a hash of the normalised question (case-folded, whitespace
collapsed) and the upstream kind. It is fresh for `BOT_CACHE_TTL` and kept
`BOT_CACHE_STALE_TTL` longer as a stale copy, served only when the upstream fails or its
circuit is open (`X-Cache: STALE`).

Only answers computed without conversation context are shared. A question asked with
context (the user's recent exchanges, which the upstream sees) is answered by the upstream
for that user alone: it is neither looked up nor stored, so one user's conversation can
never reach another user's answer, and nobody can plant an answer for a common question by
asking it inside a conversation of their own. Keying by a hash of the context instead would
be just as safe, but nearly every such key would be new (the context changes with every
exchange), so the entries would cost Redis memory for a day and never be hit. Such
questions count as misses.

Single-flight: the first lookup that misses also takes a short Redis lock (a random token,
expiring after the upstream timeout plus a margin) in the same script, and makes the one
upstream call; everyone else, on any replica, polls the same script with a backoff until
the answer is stored, the holder records a failure, or the lock lapses (the holder died) and
the poller takes it over. A replica that runs a heartbeat (`bot.store.Heartbeat`) names
itself in its lock, so a poller takes over the lock of a holder whose heartbeat is gone at
once, rather than when the lock lapses. Within a process, concurrent lookups of one key
share a single flight, so a replica polls Redis once per key however many users wait on it.

Waiters receive the same stream: the holder's answer, as the upstream streams it, goes to
every asker in its process that wants the pieces (one who joins late first gets what came so
far) and, paced (`PIECE_INTERVAL`), to a Redis stream beside the lock, which the waiters on
other replicas read in the same script call they poll with, and hand on to their own askers.
The pieces stop at `MAX_REPLY_CHARS`; the stream lapses with the lock; the holder adds its
last pieces before it stores the answer, so a waiter's pieces add up to the answer it gets.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
import uuid
from collections.abc import Awaitable, Callable
from importlib.resources import files
from typing import TYPE_CHECKING, Any, get_args

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from bot import metrics
from bot.answers import ASK, MAX_REPLY_CHARS, Answer, Answerer, Ask, Sink
from bot.core.types import CacheResult
from bot.errors import UpstreamRejected, UpstreamUnavailable
from bot.logging import get_logger

if TYPE_CHECKING:
    from bot.store import Heartbeat

log = get_logger(__name__)

_SCRIPT = files("bot").joinpath("cache.lua").read_text()
PIECE_INTERVAL = 0.05  # seconds between a holder's writes of its pieces for other replicas
SINK_TIMEOUT = 2.0  # an asker that takes longer than this for a piece hears no more of them


def normalise(question: str) -> str:
    """The form two questions must share to share an answer."""
    return " ".join(question.casefold().split())


def cache_id(question: str, kind: str) -> str:
    """The cache's id for `question` asked of upstream `kind`."""
    return hashlib.sha256(f"{kind}\n{normalise(question)}".encode()).hexdigest()[:32]


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class _Publisher:
    """Hands a holder's pieces to the waiters on other replicas: at most one write in flight
    and one every `interval`, the pieces that came meanwhile joined into one."""

    def __init__(self, write: Callable[[str], Awaitable[bool]], interval: float) -> None:
        self._write = write
        self._interval = interval
        self._pending: list[str] = []
        self._task: asyncio.Task[None] | None = None
        self._closed = asyncio.Event()
        self._failed = False

    def add(self, piece: str) -> None:
        if self._failed:
            return
        self._pending.append(piece)
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while self._pending and not self._failed:
            text = "".join(self._pending)
            self._pending.clear()
            self._failed = not await self._write(text)
            if not self._closed.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._interval):
                        await self._closed.wait()
        self._task = None

    async def close(self) -> None:
        """Write what is left now, and wait for it."""
        self._closed.set()
        if self._task is not None:
            await self._task


class _Flight:
    """One question being answered in this process: its task, and the askers of its pieces."""

    def __init__(self) -> None:
        self.task: asyncio.Task[Answer] | None = None
        self.publisher: _Publisher | None = None  # set while this process holds the call
        self._pieces: list[str] = []
        self._chars = 0
        self._sinks: list[Sink] = []
        self._lock = asyncio.Lock()  # each asker gets the pieces once and in order

    async def join(self, sink: Sink) -> None:
        """`sink` hears the pieces from now on, after those that came already (as one)."""
        async with self._lock:
            if self._pieces and not await self._send(sink, "".join(self._pieces)):
                return
            self._sinks.append(sink)

    def leave(self, sink: Sink) -> None:
        with contextlib.suppress(ValueError):
            self._sinks.remove(sink)

    async def emit(self, piece: str) -> None:
        """A piece of the answer: to every asker here and, when this process holds the
        call, to the waiters elsewhere."""
        piece = piece[: MAX_REPLY_CHARS - self._chars]
        if not piece:
            return
        self._chars += len(piece)
        async with self._lock:
            self._pieces.append(piece)
            if self.publisher is not None:
                self.publisher.add(piece)
            for sink in list(self._sinks):
                if not await self._send(sink, piece):
                    self.leave(sink)

    @staticmethod
    async def _send(sink: Sink, piece: str) -> bool:
        # One slow or broken asker must not hold up the answer for the others.
        try:
            async with asyncio.timeout(SINK_TIMEOUT):
                await sink(piece)
        except Exception as exc:
            log.warning("answer_piece_not_delivered", error=type(exc).__name__)
            return False
        return True


class CachedAnswerer:
    """An `Answerer` that consults the shared cache before asking `inner`, once per question."""

    def __init__(
        self,
        redis: Redis,
        inner: Answerer,
        *,
        kind: str,
        ttl: float,
        stale_ttl: float,
        lock_seconds: float,
        wait_seconds: float,
        poll: tuple[float, float] = (0.01, 0.1),
    ) -> None:
        self.inner = inner
        self.kind = kind
        self.ttl_ms = int(ttl * 1000)
        self.keep_ms = max(int((ttl + stale_ttl) * 1000), 1000)
        self.lock_ms = max(int(lock_seconds * 1000), 100)
        self.wait_seconds = wait_seconds
        self.poll = poll
        self.heartbeat: Heartbeat | None = None  # set by a replica that runs one
        self._script = redis.register_script(_SCRIPT)
        self._flights: dict[str, _Flight] = {}
        self._lookups = {
            cache: metrics.CACHE_LOOKUPS.labels(result=cache.lower())
            for cache in get_args(CacheResult)
        }

    async def answer(self, question: str, context: list[dict[str, Any]], ask: Ask = ASK) -> Answer:
        if context:
            return await self._private(question, context, ask)
        kind = self.kind if not ask.model else f"{self.kind.partition(':')[0]}:{ask.model}"
        cid = cache_id(question, kind)
        flight = self._flights.get(cid)
        if flight is None:
            # The askers in this process share the flight; each that has a sink hears its
            # pieces as they stream.
            flight = _Flight()
            task = asyncio.ensure_future(self._resolve(cid, question, ask.model, flight))
            flight.task = task
            self._flights[cid] = flight
            task.add_done_callback(lambda done: self._landed(cid, flight, done))
        assert flight.task is not None
        try:
            if ask.sink is not None:
                await flight.join(ask.sink)
            # Shielded: a caller that goes away must not cancel the others' flight.
            answer = await asyncio.shield(flight.task)
        except (UpstreamUnavailable, UpstreamRejected):
            self._lookups["MISS"].inc()
            raise
        finally:
            if ask.sink is not None:
                flight.leave(ask.sink)
        self._lookups[answer.cache].inc()
        return answer

    async def _private(self, question: str, context: list[dict[str, Any]], ask: Ask) -> Answer:
        """A question asked with context: this user's own answer, never shared (see above)."""
        self._lookups["MISS"].inc()
        answer = await self.inner.answer(question, context, ask)
        return Answer(answer.text, "MISS", answer.incomplete)

    def _landed(self, cid: str, flight: _Flight, task: asyncio.Task[Answer]) -> None:
        if self._flights.get(cid) is flight:
            del self._flights[cid]
        if not task.cancelled():
            task.exception()  # retrieved: every caller may have gone

    async def _resolve(self, cid: str, question: str, model: str, flight: _Flight) -> Answer:
        keys = [
            f"cache:{{{cid}}}:a",
            f"cache:{{{cid}}}:lock",
            f"cache:{{{cid}}}:err",
            f"cache:{{{cid}}}:s",
        ]
        ask = Ask(model, flight.emit)
        token = self.heartbeat.token() if self.heartbeat is not None else uuid.uuid4().hex
        stale: str | None = None
        since = 0
        deadline = 0.0
        delay = self.poll[0]
        steal = ""
        read = "-"  # the last piece of the holder's answer read
        while True:
            try:
                res = await self._script(
                    keys=keys,
                    args=["lookup", token, self.lock_ms, self.ttl_ms, since, steal, read],
                )
            except RedisError as exc:
                # No cache and no single-flight without Redis, but the question still
                # deserves its answer: ask the upstream directly.
                log.warning("cache_unavailable", error=type(exc).__name__)
                return await self.inner.answer(question, [], ask)
            status = _str(res[0])
            if len(res) > 4 and res[4]:
                read = await self._relay(res[4], flight)
            if res[1] is not None:
                if status == "hit":
                    return Answer(_str(res[1]), "HIT" if since == 0 else "MISS")
                stale = _str(res[1])
            if status == "lead":
                return await self._lead(keys, token, question, ask, stale, flight)
            if status == "failed":
                marker = orjson.loads(res[3])
                if "answer" in marker:  # an incomplete answer: the same for every waiter
                    return Answer(marker["answer"], "MISS", marker["incomplete"])
                if "rejected" in marker:
                    raise UpstreamRejected(*marker["rejected"])
                return self._fallback(stale, marker["reason"], marker.get("retry_after"))
            if since == 0:
                since = int(res[2])
                deadline = time.monotonic() + self.wait_seconds
            elif time.monotonic() >= deadline:
                return self._fallback(stale, "timed out waiting for the upstream call", None)
            holder = _str(res[3]) if len(res) > 3 and res[3] else ""
            steal = holder if await self._gone(holder) else ""
            if steal:
                continue  # its holder died: take the lock over now
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, self.poll[1])

    @staticmethod
    async def _relay(entries: list[Any], flight: _Flight) -> str:
        """Hand the pieces read from the holder's stream on; the id of the last."""
        for i in range(0, len(entries) - 1, 2):
            await flight.emit(_str(entries[i + 1]))
        return _str(entries[-2])

    async def _gone(self, holder: str) -> bool:
        return bool(holder) and self.heartbeat is not None and await self.heartbeat.gone(holder)

    async def _lead(
        self,
        keys: list[str],
        token: str,
        question: str,
        ask: Ask,
        stale: str | None,
        flight: _Flight,
    ) -> Answer:
        async def write(text: str) -> bool:
            try:
                return bool(
                    await self._script(keys=keys, args=["piece", token, text, self.lock_ms])
                )
            except RedisError as exc:
                log.warning("cache_write_failed", op="piece", error=type(exc).__name__)
                return False

        publisher = flight.publisher = _Publisher(write, PIECE_INTERVAL)
        try:
            try:
                answer = await self.inner.answer(question, [], ask)
            finally:
                # Every piece is in Redis before the answer is: a waiter's add up to it.
                flight.publisher = None
                await publisher.close()
        except UpstreamUnavailable as exc:
            marker = orjson.dumps({"reason": exc.reason, "retry_after": exc.retry_after})
            await self._run(keys, "fail", token, marker, self.lock_ms)
            return self._fallback(stale, exc.reason, exc.retry_after)
        except UpstreamRejected as exc:
            # Refused for good: the waiters get the same refusal, not a call of their own.
            rejected = {"reason": str(exc), "rejected": [exc.status, exc.code, exc.message]}
            await self._run(keys, "fail", token, orjson.dumps(rejected), self.lock_ms)
            raise
        if not answer.cacheable:
            # Not the whole answer (cut, empty, refused): never stored, but handed to the
            # waiters of this one call through its failure marker, which no later lookup sees.
            marker = orjson.dumps(
                {
                    "reason": answer.incomplete,
                    "answer": answer.text,
                    "incomplete": answer.incomplete,
                }
            )
            await self._run(keys, "fail", token, marker, self.lock_ms)
            return Answer(answer.text, "MISS", answer.incomplete)
        await self._run(keys, "store", token, answer.text, self.keep_ms)
        return Answer(answer.text, "MISS")

    async def _run(self, keys: list[str], *args: Any) -> None:
        try:
            await self._script(keys=keys, args=args)
        except RedisError as exc:
            # The answer still goes out; waiters find the lock lapsing and take over.
            log.warning("cache_write_failed", op=args[0], error=type(exc).__name__)

    def _fallback(self, stale: str | None, reason: str, retry_after: float | None) -> Answer:
        """The stale copy when there is one; otherwise the failure, for the caller to defer."""
        if stale is None:
            raise UpstreamUnavailable(reason, retry_after)
        log.info("cache_served_stale", reason=reason)
        return Answer(stale, "STALE")
