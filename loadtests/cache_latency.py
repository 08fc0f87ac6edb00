"""Latency of a cache hit beside a miss, through NGINX, against a running stack.

    .venv/bin/python -m loadtests.cache_latency [--url http://127.0.0.1:8080] [--hits 1000]

Misses are new questions (each costs one upstream call, ~300 ms with the stub's default
latency); hits repeat one warmed question. Requests go one at a time over one keep-alive
connection, so the figures are latency, not queueing. Prints p50/p99 of each and their
ratio; never fails on a timing.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid

import aiohttp


def percentile(values: list[float], q: float) -> float:
    """The `q` quantile (0..1) of `values`, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _timed(session: aiohttp.ClientSession, url: str, text: str) -> tuple[float, str]:
    body = {"user_id": f"bench-{uuid.uuid4().hex[:10]}", "text": text}
    started = time.perf_counter()
    async with session.post(url + "/v1/messages", json=body) as resp:
        await resp.read()
        elapsed = time.perf_counter() - started
        if resp.status != 200:
            raise RuntimeError(f"unexpected status {resp.status}")
        return elapsed * 1000, resp.headers.get("X-Cache", "")


async def measure(url: str, hits: int, misses: int) -> dict[str, list[float]]:
    """Milliseconds per request, by X-Cache result."""
    run = uuid.uuid4().hex[:8]
    out: dict[str, list[float]] = {"HIT": [], "MISS": []}
    connector = aiohttp.TCPConnector(limit=1)
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        for i in range(misses):
            ms, cache = await _timed(session, url, f"bench {run} miss {i}")
            out.setdefault(cache, []).append(ms)
        warm = f"bench {run} hit"
        await _timed(session, url, warm)
        for _ in range(hits):
            ms, cache = await _timed(session, url, warm)
            out.setdefault(cache, []).append(ms)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--hits", type=int, default=1000)
    parser.add_argument("--misses", type=int, default=30)
    args = parser.parse_args()
    results = asyncio.run(measure(args.url.rstrip("/"), args.hits, args.misses))
    p50 = {}
    for cache in ("HIT", "MISS"):
        values = results.get(cache) or [float("nan")]
        p50[cache] = statistics.median(values)
        print(
            f"{cache:<4} n={len(results.get(cache, [])):<5} p50={p50[cache]:8.2f} ms "
            f"p99={percentile(values, 0.99):8.2f} ms"
        )
    print(f"miss/hit p50 ratio: {p50['MISS'] / p50['HIT']:.0f}x")


if __name__ == "__main__":
    main()
