"""Auto-pipelining against the real Redis: one batch per event-loop tick, each command its own
answer or error, NOSCRIPT, a dead or silent Redis, blocking commands on their own."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from bot import metrics
from bot.autopipe import AutoPipelineRedis
from bot.runtime import make_redis
from tests.support import HoldingProxy


def _batches() -> tuple[float, float]:
    """(batches, commands) sent so far by every auto-pipelined client of this process."""
    count = total = 0.0
    for metric in metrics.REDIS_BATCH.collect():
        for sample in metric.samples:
            if sample.name.endswith("_count"):
                count = sample.value
            elif sample.name.endswith("_sum"):
                total = sample.value
    return count, total


def _client(url: str, timeout: float = 1.0) -> AutoPipelineRedis:
    client = make_redis(url, socket_timeout=timeout, auto_pipeline=True)
    assert isinstance(client, AutoPipelineRedis)
    return client


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[AutoPipelineRedis]:
    batching = _client(redis_url)
    yield batching
    await batching.aclose()


async def test_commands_of_one_tick_go_as_one_batch_each_with_its_own_answer(
    client: AutoPipelineRedis,
) -> None:
    keys = [f"ap:{uuid.uuid4().hex}" for _ in range(50)]
    await asyncio.gather(*(client.set(k, i) for i, k in enumerate(keys)))
    before = _batches()
    values = await asyncio.gather(*(client.get(k) for k in keys))
    after = _batches()
    assert values == [str(i) for i in range(50)]
    assert (after[0] - before[0], after[1] - before[1]) == (1, 50)


async def test_an_error_reaches_only_the_command_that_caused_it(client: AutoPipelineRedis) -> None:
    text, counter = f"ap:{uuid.uuid4().hex}", f"ap:{uuid.uuid4().hex}"
    await client.set(text, "not a number")
    results = await asyncio.gather(
        client.incr(counter), client.incr(text), client.incr(counter), return_exceptions=True
    )
    assert results[0] == 1 and results[2] == 2
    assert isinstance(results[1], ResponseError) and "not an integer" in str(results[1])


async def test_a_script_redis_does_not_know_is_loaded_once_and_answers_everyone(
    client: AutoPipelineRedis,
) -> None:
    # A script text nobody loaded before: every first EVALSHA gets NOSCRIPT.
    script = client.register_script(f"-- {uuid.uuid4().hex}\nreturn tonumber(ARGV[1]) * 2")
    before = _batches()
    results = await asyncio.gather(*(script(args=[i]) for i in range(20)))
    after = _batches()
    assert results == [i * 2 for i in range(20)]
    # The EVALSHAs, then the SCRIPT LOADs, then the EVALSHAs again: three batches.
    assert after[0] - before[0] == 3


async def test_a_dead_redis_fails_every_command_of_the_batch_with_a_redis_error() -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))  # a port of our own that nothing listens on: refused
        client = _client(f"redis://127.0.0.1:{held.getsockname()[1]}/0")
        try:
            results = await asyncio.gather(
                *(client.get(f"k{i}") for i in range(5)), return_exceptions=True
            )
            assert all(isinstance(r, RedisConnectionError) for r in results), results
        finally:
            await client.aclose()


async def test_a_silent_redis_fails_the_batch_within_its_timeout() -> None:
    proxy = HoldingProxy(6379)
    proxy.hold.set()  # accepts, answers nothing
    client = _client(f"redis://127.0.0.1:{proxy.port}/0", timeout=0.3)
    try:
        started = time.monotonic()
        results = await asyncio.gather(
            *(client.get(f"k{i}") for i in range(5)), return_exceptions=True
        )
        took = time.monotonic() - started
        assert all(isinstance(r, RedisTimeoutError) for r in results), results
        assert 0.25 <= took < 1.5, took
        # Every fallback of the bot catches RedisError: a timeout is one.
        assert all(isinstance(r, RedisError) for r in results)
    finally:
        proxy.hold.clear()
        proxy.close()
        await client.aclose()


async def test_a_blocking_read_does_not_hold_up_the_commands_beside_it(
    client: AutoPipelineRedis,
) -> None:
    stream, key = f"ap:{uuid.uuid4().hex}", f"ap:{uuid.uuid4().hex}"
    await client.set(key, "v")
    blocking = asyncio.ensure_future(client.xread({stream: "$"}, block=600))
    started = time.monotonic()
    assert await client.get(key) == "v"
    assert time.monotonic() - started < 0.3
    assert await blocking in ([], None)


async def test_a_caller_that_goes_away_leaves_the_batch_to_the_others(
    client: AutoPipelineRedis,
) -> None:
    key = f"ap:{uuid.uuid4().hex}"
    await client.set(key, "v")
    gone = asyncio.ensure_future(client.get(key))
    kept = asyncio.ensure_future(client.get(key))
    await asyncio.sleep(0)
    gone.cancel()
    assert await kept == "v"
    with pytest.raises(asyncio.CancelledError):
        await gone
