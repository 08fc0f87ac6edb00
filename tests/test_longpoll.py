"""Long polls share one blocking Redis reader per replica, and still wake on a reply."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import orjson
from redis.asyncio import Redis

from bot.inbox import Inbox
from tests.support import Stack, unique


async def _blocked_clients(redis: Redis, db: int) -> int:
    """Connections to `db` blocked in XREAD right now (the outbox relays block in XREADGROUP)."""
    clients = await redis.client_list()
    return sum(
        1
        for c in clients
        if c.get("db") == str(db) and c.get("cmd") == "xread" and "b" in c.get("flags", "")
    )


async def test_long_polls_block_one_redis_connection_per_replica_and_wake_on_a_reply(
    stack: Stack,
) -> None:
    """150 waiting polls held 150 blocked Redis connections (each its own XREAD BLOCK, again
    every 0.7 s); now each replica blocks one, and a reply still reaches its poll at once."""
    db = int(stack.env["REDIS_URL"].rsplit("/", 1)[1])
    redis = Redis.from_url(stack.env["REDIS_URL"], decode_responses=True)
    users = [unique("lp") for _ in range(150)]
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def poll(user: str) -> dict[str, object]:
            url = f"{stack.url}/v1/users/{user}/replies?wait=15"
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=30)) as r:
                assert r.status == 200, await r.text()
                body: dict[str, object] = orjson.loads(await r.read())
                return body

        polls = [asyncio.create_task(poll(u)) for u in users]
        try:
            await asyncio.sleep(2.0)  # every poll is in and waiting
            assert not any(p.done() for p in polls)
            blocked = []
            for _ in range(5):
                blocked.append(await _blocked_clients(redis, db))
                await asyncio.sleep(0.3)
            assert max(blocked) <= stack.settings.replicas, blocked

            started = time.monotonic()
            assert await Inbox(redis).deliver(users[7], "m-late", "the late answer")
            body = await asyncio.wait_for(polls[7], timeout=10)
            woke_after = time.monotonic() - started
            assert [r["reply"] for r in body["replies"]] == ["the late answer"]  # type: ignore[attr-defined]
            # Well inside the 15 s wait: the reply woke the poll, the wait did not run out.
            assert woke_after < 5, woke_after
            assert not any(p.done() for i, p in enumerate(polls) if i != 7)
            print(
                f"blocked connections while 150 polls waited: {blocked}; woke in {woke_after:.3f}s"
            )
        finally:
            for p in polls:
                p.cancel()
            await asyncio.gather(*polls, return_exceptions=True)
            await redis.aclose()
