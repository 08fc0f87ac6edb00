"""Fixtures: real Redis (a DB of the run's own), real stacks on private ports."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer
from redis.asyncio import Redis

from bot.app import create_app
from bot.settings import Settings, load_settings
from infra.common import drop_queues
from infra.stub import create_stub_app
from tests.support import (
    AMQP_URL,
    AppClient,
    Stack,
    Upstream,
    claim_redis_db,
    release_redis_db,
    reset_redis_db,
    stack_dir,
    stack_env,
)

OWNER = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="session")
def redis_db() -> Iterator[int]:
    """A Redis DB number of this test run's own (flushed before and after)."""
    db = claim_redis_db(OWNER)
    yield db
    release_redis_db(db, OWNER)


@pytest.fixture
def redis_url(redis_db: int) -> Iterator[str]:
    """The run's DB, empty when the test starts: emptied before as well as after, so that
    nothing a test did not write (a background writer of an earlier test) is there."""
    reset_redis_db(redis_db)
    yield f"redis://127.0.0.1:6379/{redis_db}"
    reset_redis_db(redis_db)


@pytest.fixture
async def redis(redis_url: str) -> Redis:
    client = Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    """One 3-replica stack shared by the tests that only send traffic (unique users each), on
    a Redis DB of its own: on the in-process tests' DB, what it cached (schemathesis sends the
    document's "what is a pulsar?") was there when a later test asked the same and expected a
    miss, and their resets emptied the stack's DB under it."""
    owner = f"{OWNER}-stack"
    db = claim_redis_db(owner)
    # Generous limits: rate limiting has tests (and stacks) of its own.
    env = stack_env(db, BOT_RATE_LIMIT="100/second", BOT_RATE_BURST="1000")
    try:
        with stack_dir() as base:
            s = Stack(base / "run", env)
            s.start()
            yield s
            s.stop()
    finally:
        release_redis_db(db, owner)


@pytest.fixture
def make_stack() -> Iterator[Callable[..., Stack]]:
    """Start private stacks with settings of the test's own; each gets its own Redis DB."""
    started: list[tuple[Stack, int, str]] = []
    with stack_dir() as base:

        def make(**overrides: str) -> Stack:
            owner = f"{OWNER}-{len(started)}"
            db = claim_redis_db(owner)
            s = Stack(base / f"run{len(started)}", stack_env(db, **overrides))
            started.append((s, db, owner))
            s.start()
            return s

        yield make
        for s, db, owner in started:
            with contextlib.suppress(Exception):
                s.stop()
            release_redis_db(db, owner)


# In-process layer: the replica's app and the upstream stub served by pytest-aiohttp on this
# test's event loop, against the real Redis (this run's DB) and RabbitMQ (a queue prefix of the
# test's own). No NGINX, no processes: for the HTTP contract of one replica.


@pytest.fixture
async def upstream(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> Upstream:
    return Upstream(await aiohttp_server(create_stub_app(latency_ms=0)))


@pytest.fixture(scope="session")
def app_queues() -> Iterator[list[Settings]]:
    """The settings of every in-process app of the run, whose queues are deleted once at its
    end. The apps share one queue prefix: each declares the existing queues again, instead of
    a set of quorum queues for every test (each live one holds three of the shared broker's
    file handles, which run out at about 300 queues: docs/runbooks.md, RabbitMQDown)."""
    made: list[Settings] = []
    yield made
    dropped = set()
    for settings in made:
        # On the shared broker: a test may have pointed its app at a proxy it has since cut.
        shared = replace(settings, amqp_url=AMQP_URL)
        key = (shared.queue_prefix, shared.retry_base_delay, shared.retry_max_delay)
        if key not in dropped:
            dropped.add(key)
            drop_queues(shared)


@pytest.fixture(scope="session")
def app_queue_prefix() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def make_app_client(
    aiohttp_client: Callable[..., Awaitable[AppClient]],
    redis_url: str,
    upstream: Upstream,
    app_queues: list[Settings],
    app_queue_prefix: str,
) -> Callable[..., Awaitable[AppClient]]:
    """Build `create_app(settings)` clients with settings of the test's own (env overrides)."""

    async def make(**overrides: str) -> AppClient:
        env = {
            "REDIS_URL": redis_url,
            "AMQP_URL": AMQP_URL,
            "UPSTREAM_URL": upstream.url,
            "BOT_QUEUE_PREFIX": app_queue_prefix,
            "BOT_RATE_LIMIT": "100/second",
            "BOT_RATE_BURST": "1000",
            **overrides,
        }
        settings = load_settings(env, dotenv=Path("/dev/null"))
        app_queues.append(settings)
        return await aiohttp_client(create_app(settings))

    return make


@pytest.fixture
async def app_client(
    make_app_client: Callable[..., Awaitable[AppClient]],
) -> AppClient:
    """One replica (`create_app`) in-process with the stack's default settings."""
    return await make_app_client()


# `make test` hands whole files to its workers in collection order (pytest-xdist's loadfile):
# the files that take longest go first, so that none of them starts last and runs alone.
SLOW_FILES_FIRST = (  # by their time on 4 workers, slowest first (--durations=0)
    "test_schemathesis",
    "test_loadtest_smoke",
    "test_retries_system",
    "test_edge",
    "test_make",
    "test_webchat_browser",
    "test_resilience",
    "test_channels_system",
    "test_retries",
    "test_observability_stack",
    "test_hostile_api",
    "test_ratelimit",
    "test_llm",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))
