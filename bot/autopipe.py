"""Auto-pipelining: the Redis commands a process's coroutines issue in one event-loop tick go
to Redis together, as one pipeline (what coredis, ioredis and go-redis call auto-pipelining).

redis-py pays per command: a pool checkout with a readability probe, a write, a read under a
timeout. A replica answering many messages at once issues many commands in the same tick
(one admission script each); sent as one batch they cost one checkout, one write and one read
of all the answers, and Redis itself reads and answers them in one go.

What stays as it was:

- each command's own answer or error: a `ResponseError` (``NOSCRIPT``, ``OOM``, ...) goes to
  the command that caused it, never to its neighbours (`redis.commands.core.AsyncScript`
  then loads its script and sends it again: one ``SCRIPT LOAD`` batch after a Redis restart,
  not one per command);
- a batch that fails as a whole (connection refused or lost, or no answer within
  `timeout`) fails each of its commands with a `RedisError` (`ConnectionError`,
  `TimeoutError`), the errors the callers' fallbacks already handle;
- blocking commands (``XREAD … BLOCK``, ``BLPOP``…) would hold a batch up: they go alone, on
  the ordinary pool, as do explicit pipelines and transactions.

Each batch runs under one `asyncio.timeout` on a pool of its own without a socket timeout,
instead of redis-py's per-command timeouts (``asyncio.wait_for`` on every write, a timeout
on every read). The batch sizes are `bot_redis_batch_commands` in ``/metrics``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from typing import Any

from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.client import Pipeline
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import EncodableT, KeyT, ScriptTextT

from bot import metrics

__all__ = ["AutoPipelineRedis"]

# Commands that wait in Redis for something to happen: never batched with others.
_BLOCKING = frozenset(
    {
        *("BLPOP", "BRPOP", "BRPOPLPUSH", "BLMOVE", "BLMPOP", "BZPOPMIN", "BZPOPMAX", "BZMPOP"),
        *("WAIT", "WAITAOF", "SUBSCRIBE", "PSUBSCRIBE", "SSUBSCRIBE", "MONITOR"),
    }
)
_MAYBE_BLOCKING = frozenset(("XREAD", "XREADGROUP"))
MAX_BATCH = 512  # commands in one pipeline; more in one tick make several
_Queued = tuple[tuple[Any, ...], dict[str, Any], "asyncio.Future[Any]"]  # command, options, answer


def _blocks(args: tuple[Any, ...]) -> bool:
    name = _word(args[0])
    if name in _BLOCKING:
        return True
    return name in _MAYBE_BLOCKING and any(_word(a) == "BLOCK" for a in args[1:])


def _word(arg: Any) -> str:
    """A command's word as redis-py gives it (``"GET"``, ``b"BLOCK"``), upper case."""
    if isinstance(arg, bytes):
        return arg.decode(errors="replace").upper()
    return arg.upper() if isinstance(arg, str) else ""


class AutoPipelineRedis(Redis):
    """A Redis client that batches the commands of one event-loop tick into one pipeline.

    Build it with `from_url` as any client, then `batching(timeout)`; everything else
    (scripts, explicit pipelines, `aclose`) is the ordinary client's.
    """

    _batch_pool: ConnectionPool
    _timeout: float
    _queue: list[_Queued]
    _batches: set[asyncio.Task[None]]

    def batching(self, timeout: float) -> AutoPipelineRedis:
        """Start batching, each batch answered within `timeout` seconds or failed."""
        pool = self.connection_pool
        kwargs = {**pool.connection_kwargs, "socket_timeout": None}
        self._batch_pool = ConnectionPool(
            connection_class=pool.connection_class, max_connections=pool.max_connections, **kwargs
        )
        self._timeout = timeout
        self._queue = []
        self._batches = set()
        return self

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        if _blocks(args):
            return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[Any] = loop.create_future()
        if not self._queue:
            loop.call_soon(self._flush)
        self._queue.append((args, options, answer))
        return await answer

    def _flush(self) -> None:
        queue, self._queue = self._queue, []
        for start in range(0, len(queue), MAX_BATCH):
            task = asyncio.ensure_future(self._send(queue[start : start + MAX_BATCH]))
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)

    async def _send(self, batch: list[_Queued]) -> None:
        metrics.REDIS_BATCH.observe(len(batch))
        pipe = Pipeline(self._batch_pool, self.response_callbacks, False, None)
        for args, options, _ in batch:
            pipe.execute_command(*args, **options)
        failure: RedisError | None = None
        results: list[Any] = []
        try:
            async with asyncio.timeout(self._timeout):
                results = await pipe.execute(raise_on_error=False)
        except TimeoutError:
            failure = RedisTimeoutError(f"Redis did not answer within {self._timeout} s")
        except RedisError as exc:
            failure = exc
        except OSError as exc:
            failure = RedisConnectionError(str(exc))
        finally:
            if failure is None and len(results) != len(batch):  # cancelled (shutdown)
                failure = RedisConnectionError("the batch was cancelled")
            for i, (_, _, answer) in enumerate(batch):
                if answer.done():  # its caller went away
                    continue
                if failure is not None:
                    answer.set_exception(_copy(failure))
                elif isinstance(results[i], Exception):
                    answer.set_exception(results[i])
                else:
                    answer.set_result(results[i])

    def register_script(self, script: ScriptTextT) -> AsyncScript:  # type: ignore[override]
        return _Script(self, script)

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        # Batches still in flight fail (their callers get a ConnectionError) and close their
        # connections before the pools go: awaited, so nothing is left to a closed loop.
        batches = list(getattr(self, "_batches", ()))
        for task in batches:
            task.cancel()
        await asyncio.gather(*batches, return_exceptions=True)
        await super().aclose(close_connection_pool)
        if hasattr(self, "_batch_pool"):
            await self._batch_pool.disconnect()


class _Script(AsyncScript):
    """redis-py's script, called on its own client without the `isinstance(client,
    Pipeline)` check that costs a `typing.Protocol` instance check every call."""

    async def __call__(
        self,
        keys: Sequence[KeyT] | None = None,
        args: Iterable[EncodableT] | None = None,
        client: Redis | None = None,
    ) -> Any:
        if client is not None:
            return await super().__call__(keys, args, client)
        keys = keys or []
        words: tuple[Any, ...] = (*keys, *(args or ()))
        redis = self.registered_client
        try:
            return await redis.evalsha(self.sha, len(keys), *words)
        except NoScriptError:  # a Redis restarted or flushed: load it, then again
            self.sha = await redis.script_load(self.script)
            return await redis.evalsha(self.sha, len(keys), *words)


def _copy(exc: RedisError) -> RedisError:
    """One exception object per waiter (each gets its own traceback)."""
    try:
        return type(exc)(*exc.args)
    except Exception:  # an exception type with a constructor of its own
        return exc
