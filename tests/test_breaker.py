"""The circuit breaker: its state machine on a fake clock, then a real outage through a stack."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
import requests
from aiohttp import web
from prometheus_client import REGISTRY

from bot.answers import ASK, Answer, Ask
from bot.breaker import CLOSED, HALF_OPEN, OPEN, BreakerAnswerer, CircuitBreaker
from bot.errors import UpstreamUnavailable
from bot.settings import load_settings
from bot.upstream import UpstreamClient
from infra.stub import create_stub_app
from tests.support import Stack, unique


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def breaker(clock: Clock, **kw: Any) -> CircuitBreaker:
    opts: dict[str, Any] = {
        "window": 10.0,
        "min_calls": 4,
        "failure_ratio": 0.5,
        "consecutive": 5,
        "open_seconds": 3.0,
    }
    opts.update(kw)
    return CircuitBreaker(clock=clock, **opts)


def gauge() -> float:
    return REGISTRY.get_sample_value("bot_circuit_state") or 0.0


def test_opens_on_failure_ratio_only_with_enough_calls() -> None:
    clock = Clock()
    b = breaker(clock)
    b.success()
    b.failure()
    b.failure()
    assert b.state == CLOSED  # 2 of 3 failed, but fewer than min_calls
    b.success()
    b.failure()
    assert b.state == OPEN  # 3 of 5 failed
    assert gauge() == 1


def test_failures_outside_the_window_do_not_count() -> None:
    clock = Clock()
    b = breaker(clock)
    for ok in (False, False, True, True):  # 2 of 4: one more failure would open it
        b.success() if ok else b.failure()
    assert b.state == CLOSED
    clock.now += 11  # the window rolled past them
    b.success()
    b.failure()
    assert b.state == CLOSED  # 1 of 2 in the window (3 of 6 had the old ones counted)


def test_opens_on_consecutive_failures_below_min_calls() -> None:
    clock = Clock()
    b = breaker(clock, min_calls=100, consecutive=3)
    b.failure()
    b.failure()
    assert b.state == CLOSED
    b.failure()
    assert b.state == OPEN


def test_open_short_circuits_then_half_open_lets_one_probe_through() -> None:
    clock = Clock()
    b = breaker(clock, consecutive=1)
    b.failure()
    with pytest.raises(UpstreamUnavailable) as err:
        b.acquire()
    assert err.value.retry_after == 3.0
    clock.now += 3
    assert b.state == HALF_OPEN and gauge() == 2
    b.acquire()  # the probe
    with pytest.raises(UpstreamUnavailable):
        b.acquire()  # only one at a time
    b.failure()
    assert b.state == OPEN  # the probe failed: open again, for the full time
    clock.now += 2.9
    assert b.state == OPEN
    clock.now += 0.1
    b.acquire()
    b.success()
    assert b.state == CLOSED and gauge() == 0
    b.acquire()
    b.acquire()


def test_cancelled_probe_frees_the_slot() -> None:
    clock = Clock()
    b = breaker(clock, consecutive=1)
    b.failure()
    clock.now += 3
    b.acquire()
    b.release()
    b.acquire()


def test_retry_after_opens_at_once_for_that_long() -> None:
    clock = Clock()
    b = breaker(clock)
    b.failure(retry_after=7)
    assert b.state == OPEN
    clock.now += 6.9
    assert b.state == OPEN
    clock.now += 0.1
    assert b.state == HALF_OPEN


def test_a_call_started_before_the_circuit_opened_cannot_close_it() -> None:
    clock = Clock()
    b = breaker(clock, consecutive=2)
    slow = b.acquire()  # a slow call goes out while the circuit is closed
    b.failure(b.acquire())
    b.failure(b.acquire())
    assert b.state == OPEN
    b.success(slow)  # ... and succeeds late, while the circuit is open
    assert b.state == OPEN and gauge() == 1
    clock.now += 3
    assert b.state == HALF_OPEN
    b.success(slow)  # nor while half-open: only the probe's verdict counts
    assert b.state == HALF_OPEN
    probe = b.acquire()
    b.failure(slow)  # a late failure from before does not re-open it either
    assert b.state == HALF_OPEN
    b.success(probe)
    assert b.state == CLOSED


def test_a_late_verdict_from_an_earlier_closed_period_is_ignored() -> None:
    clock = Clock()
    b = breaker(clock, consecutive=2, open_seconds=1)
    old = b.acquire()
    b.failure(b.acquire())
    b.failure(b.acquire())
    clock.now += 1
    b.success(b.acquire())  # the probe closes it: a new closed period
    assert b.state == CLOSED
    b.failure(old)  # the pre-outage call fails late: not part of the new period's streak
    b.failure(b.acquire())
    assert b.state == CLOSED


class Flaky:
    def __init__(self) -> None:
        self.calls = 0
        self.fail = True

    async def answer(self, question: str, context: list[dict[str, Any]], ask: Ask = ASK) -> Answer:
        self.calls += 1
        if self.fail:
            raise UpstreamUnavailable("upstream answered 500")
        return Answer("ok")


async def test_answerer_counts_short_circuits_and_never_calls_while_open() -> None:
    clock = Clock()
    inner = Flaky()
    guarded = BreakerAnswerer(inner, breaker(clock, consecutive=2))
    sample = {"outcome": "short_circuited"}
    before = REGISTRY.get_sample_value("bot_upstream_requests_total", sample) or 0.0
    for _ in range(5):
        with pytest.raises(UpstreamUnavailable):
            await guarded.answer("q", [])
    assert inner.calls == 2
    after = REGISTRY.get_sample_value("bot_upstream_requests_total", sample) or 0.0
    assert after - before == 3
    clock.now += 3
    inner.fail = False
    assert (await guarded.answer("q", [])).text == "ok"
    assert guarded.breaker.state == CLOSED


async def test_a_slow_real_call_that_succeeds_after_an_outage_opened_the_circuit_keeps_it_open(
    unused_tcp_port: int,
) -> None:
    """Real HTTP calls to the stub: one slow call goes out, an outage (503 + Retry-After)
    opens the circuit meanwhile, and the slow call's late 200 must not close it."""
    runner = web.AppRunner(create_stub_app(latency_ms=600))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", unused_tcp_port).start()
    settings = load_settings({"UPSTREAM_URL": f"http://127.0.0.1:{unused_tcp_port}"})
    try:
        async with aiohttp.ClientSession() as session:
            b = breaker(Clock(), consecutive=3, open_seconds=30)
            guarded = BreakerAnswerer(
                UpstreamClient(session, settings.upstream_url, settings.upstream_timeout), b
            )
            slow = asyncio.create_task(guarded.answer("slow", []))
            await asyncio.sleep(0.2)  # it is past the stub's fault check, sleeping
            async with session.post(
                f"http://127.0.0.1:{unused_tcp_port}/admin/faults", json={"outage": True}
            ) as r:
                assert r.status == 200
            with pytest.raises(UpstreamUnavailable):
                await guarded.answer("now", [])  # 503 with Retry-After: open at once
            assert b.state == OPEN
            assert (await slow).text.endswith("You asked: slow")  # the late success...
            assert b.state == OPEN  # ... leaves it open
            with pytest.raises(UpstreamUnavailable, match="circuit is open"):
                await guarded.answer("again", [])
    finally:
        await runner.cleanup()


# --- a real outage, through the replicas of a private stack -------------------------------


def _circuit_states(stack: Stack) -> list[int]:
    states = []
    for i in (1, 2, 3):
        for line in requests.get(stack.metrics_url(i), timeout=5).text.splitlines():
            if line.startswith("bot_circuit_state "):
                states.append(int(float(line.split()[1])))
    return states


async def _ask(session: aiohttp.ClientSession, url: str) -> tuple[int, float]:
    started = time.monotonic()
    body = {"user_id": unique(), "text": f"what is {unique('q')}?"}  # never cached
    async with session.post(url + "/v1/messages", json=body) as resp:
        await resp.read()
        return resp.status, time.monotonic() - started


@pytest.mark.system
async def test_breaker_opens_under_outage_short_circuits_and_closes_after_recovery(
    make_stack: Callable[..., Stack],
) -> None:
    timeout, open_seconds = 0.5, 1.5
    stack = make_stack(
        BOT_UPSTREAM_TIMEOUT=str(timeout),
        BOT_BREAKER_CONSECUTIVE="3",
        BOT_BREAKER_WINDOW="10",
        BOT_BREAKER_OPEN_SECONDS=str(open_seconds),
        BOT_RATE_LIMIT="100/second",
    )
    stack.ctl("stop", "worker")  # only the replicas' own calls may reach the stub
    replicas = [stack.replica_url(i) for i in (1, 2, 3)]
    stack.faults(latency_ms=3000)  # the upstream hangs: every call waits for the timeout
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        # Trip: three concurrent questions per replica, each timing out.
        started = time.monotonic()
        tripping = await asyncio.gather(*(_ask(session, u) for u in replicas for _ in range(3)))
        assert all(s in (202, 503) for s, _ in tripping), tripping
        assert _circuit_states(stack) == [1, 1, 1]
        assert time.monotonic() - started < 10  # opened within the window
        calls_when_open = stack.stub_stats()["calls"]
        assert calls_when_open == 9

        # Open, then half-open probes, the upstream still hanging: 3 s of steady traffic.
        results: list[tuple[int, float]] = []
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            results += await asyncio.gather(*(_ask(session, u) for u in replicas))
            await asyncio.sleep(0.05)
        probes = stack.stub_stats()["calls"] - calls_when_open
        slow = [d for _, d in results if d >= timeout * 0.8]
        assert all(s in (202, 503) for s, _ in results)
        assert len(results) > 30
        # Only half-open probes reach the stub (≤ 2 cycles of open + probe in 3 s per
        # replica) and only they wait for the timeout; everything else fails at once.
        assert 1 <= probes <= 3 * 2, probes
        assert len(slow) <= probes, (len(slow), probes)

        # Recovery: the next probe succeeds and the circuit closes.
        stack.faults(latency_ms=20)
        await asyncio.sleep(open_seconds + timeout)
        for url in replicas:
            recovered = False
            for _ in range(40):
                status, _ = await _ask(session, url)
                if status == 200:
                    recovered = True
                    break
                await asyncio.sleep(0.1)
            assert recovered, url
    assert _circuit_states(stack) == [0, 0, 0]
