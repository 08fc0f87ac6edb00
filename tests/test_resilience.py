"""Balancing, replica failure and graceful drain, through a real NGINX (stacks of their own)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from collections.abc import Callable

import aiohttp
import pytest
import requests

from infra import runner
from tests.support import Stack, post, unique

pytestmark = pytest.mark.system


def _ports_answering(stack: Stack) -> dict[str, int]:
    time.sleep(1.5)  # NGINX flushes its access log every second
    return Counter(
        e["upstream_addr"].split(":")[-1] for e in stack.access_log() if e["uri"] == "/v1/messages"
    )


def test_requests_spread_over_every_replica(stack: Stack) -> None:
    for _ in range(60):
        assert post(stack.url + "/v1/messages", {"user_id": unique(), "text": "/echo x"}).ok
    seen = _ports_answering(stack)
    ports = {str(stack.settings.replica_port(i)) for i in (1, 2, 3)}
    assert ports <= set(seen), seen
    assert min(seen[p] for p in ports) >= 5, seen


async def _hammer(url: str, clients: int, seconds: float) -> Counter[int]:
    """`clients` concurrent users sending /echo for `seconds`; counts statuses (0 = error)."""
    codes: Counter[int] = Counter()
    deadline = time.monotonic() + seconds
    timeout = aiohttp.ClientTimeout(total=15)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def client() -> None:
            user = unique()
            while time.monotonic() < deadline:
                try:
                    async with session.post(url, json={"user_id": user, "text": "/echo ping"}) as r:
                        await r.read()
                        codes[r.status] += 1
                except aiohttp.ClientError:
                    codes[0] += 1

        await asyncio.gather(*(client() for _ in range(clients)))
    return codes


async def test_replica_killed_under_load_loses_no_request(
    make_stack: Callable[..., Stack],
) -> None:
    # one client address at full speed: open NGINX's per-address guard too
    stack = make_stack(
        BOT_RATE_LIMIT="1000/second",
        BOT_RATE_BURST="1000",
        BOT_EDGE_RATE="1000000",
        BOT_EDGE_BURST="1000000",
    )
    victim = stack.pid("bot-2")

    async def kill_later() -> None:
        await asyncio.sleep(3)
        os.kill(victim, signal.SIGKILL)

    codes, _ = await asyncio.gather(
        _hammer(stack.url + "/v1/messages", clients=50, seconds=10), kill_later()
    )
    assert not os.path.exists(f"/proc/{victim}") or victim != stack.pid("bot-2")
    assert set(codes) == {200}, codes
    assert codes[200] > 500

    # supervisord restarted it; it takes traffic again
    stack.wait_ready("bot-2")
    assert stack.pid("bot-2") not in (0, victim)
    before = _ports_answering(stack)[str(stack.settings.replica_port(2))]
    for _ in range(30):
        assert post(stack.url + "/v1/messages", {"user_id": unique(), "text": "/echo x"}).ok
    after = _ports_answering(stack)[str(stack.settings.replica_port(2))]
    assert after > before


async def test_sigterm_lets_inflight_requests_finish(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(BOT_REPLICAS="1")
    stack.faults(latency_ms=1500)
    url = stack.replica_url(1) + "/v1/messages"
    async with aiohttp.ClientSession() as session:

        async def ask(i: int) -> int:
            body = {"user_id": unique(), "text": f"slow question {i} {unique()}"}
            async with session.post(url, json=body) as r:
                await r.read()
                return r.status

        tasks = [asyncio.create_task(ask(i)) for i in range(10)]
        await asyncio.sleep(0.5)
        stack.kill("bot-1", signal.SIGTERM)
        started = time.monotonic()
        statuses = await asyncio.gather(*tasks)
    assert statuses == [200] * 10
    assert time.monotonic() - started < 5
    assert "replica_draining" in stack.logs("bot-1")


def test_up_twice_then_down_leaves_nothing(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(BOT_REPLICAS="2")
    pids = [stack.pid(n) for n in ("bot-1", "bot-2", "nginx", "stub")]
    assert all(pids)
    # a second `up` is harmless: same processes, still serving
    assert runner.up(stack.settings, stack.paths, dict(os.environ)) == 0
    assert [stack.pid(n) for n in ("bot-1", "bot-2", "nginx", "stub")] == pids
    assert post(stack.url + "/v1/messages", {"user_id": unique(), "text": "/echo x"}).ok
    stack.stop()
    s = stack.settings
    ports = [
        s.public_port,
        s.replica_port(1),
        s.replica_port(2),
        s.replica_metrics_port(1),
        s.replica_metrics_port(2),
        s.stub_port,
    ]
    for port in ports:
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{port}/", timeout=2)
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}"), pid
