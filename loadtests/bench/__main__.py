"""`make bench`: how fast the running stack is beside what this machine can do at all.

In one run, with wrk (64 connections by default), it measures:

- `nginx_static`: an NGINX of our own answering a static JSON body (the NGINX ceiling);
- `bare_replica`: one bare aiohttp+uvloop replica, hit directly (the Python ceiling);
- `replicas_via_nginx`: the stack's own NGINX config in front of `BOT_REPLICAS` bare replicas;
- `echo`: `/echo` through the running stack's NGINX (the full path);
- `cache_hit`: one question every request asks, through the running stack (cache hits);
- `limiter_on` / `limiter_off`: `/echo` on two private stacks alike but for
  `BOT_RATE_LIMIT_ENABLED` (NGINX's per-address guard raised on both, so only the limiter differs);
- `half_load`: `/echo` at a fixed rate, half of what the full path reached flat out (open
  loop: `paced.lua`), for the latency of a stack at half its capacity;
- a py-spy profile of replica 1 under the `/echo` load (its top frames).

Every request comes from a user nobody has seen before, so per-user limits never reject
benchmark traffic. Prints requests/s, p50/p99, CPU per request (every serving process; the
replicas alone; Redis by its `INFO cpu`) and the ratios; saves
`reports/bench-<time>.json`. Settings: BENCH_DURATION (s, default 10), BENCH_WARMUP (2),
BENCH_CONNECTIONS (64), BENCH_THREADS (2), BENCH_PRIVATE_STACKS (true), BENCH_PROFILE (true).

This module runs the sequence; `config` reads the settings, `stacks` starts what is measured,
`measure` runs wrk, `profile` runs py-spy and reads its stacks, `report` renders the
results.
"""

from __future__ import annotations

import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import requests

from bot.settings import Settings, SettingsError
from loadtests.bench import profile, report
from loadtests.bench.config import BenchConfig, load_bench_config
from loadtests.bench.measure import Charged, Result, run_wrk
from loadtests.bench.stacks import (
    bare_replicas,
    broker_answers,
    nginx_static,
    private_stack,
    probe,
    replicas_via_nginx,
)
from loadtests.observe import stack_processes

QUESTION = "what is a pulsar, for the benchmark?"


class Bench:
    """One benchmark run: each measurement in turn, then the profile."""

    def __init__(self, cfg: BenchConfig) -> None:
        self.cfg = cfg
        self.run_id = uuid.uuid4().hex[:8]
        self.results: dict[str, Result] = {}

    def measure(
        self,
        name: str,
        what: str,
        url: str,
        script: str,
        charged: Charged,
        *,
        args: tuple[str, ...] = (),
    ) -> Result:
        c = self.cfg
        if c.warmup > 0:
            self._wrk(name, url, script, [self.run_id + "w", *args], c.warmup, Charged([]))
        result = self._wrk(name, url, script, [self.run_id, *args], c.duration, charged)
        result.what = what
        if result.non_2xx > 0.01 * result.requests and url.startswith(c.target):
            result.notes.append(
                f"NGINX's per-address guard (BOT_EDGE_RATE={c.stack.edge_rate}/s) caps one "
                "client; the private-stack rows have it opened"
            )
        return self._keep(result)

    def _keep(self, result: Result) -> Result:
        self.results[result.name] = result
        print(report.row(result), flush=True)
        return result

    def _wrk(
        self, name: str, url: str, script: str, args: list[str], duration: float, charged: Charged
    ) -> Result:
        return run_wrk(
            name,
            url,
            script,
            args,
            duration=duration,
            connections=self.cfg.connections,
            threads=self.cfg.threads,
            charged=charged,
        )

    def run(self) -> dict[str, Any]:
        c = self.cfg
        try:
            probe(c.target, "/echo ping")
        except (requests.RequestException, RuntimeError) as exc:
            raise RuntimeError(
                f"the stack does not answer at {c.target}: {exc}; `make up`?"
            ) from None
        print(report.header(), flush=True)
        stack = charged_to(c.stack)
        with tempfile.TemporaryDirectory(prefix="bench-") as tmp_name:
            tmp = Path(tmp_name)
            with nginx_static(tmp) as (url, pids):
                what = "NGINX answering a static body"
                self.measure("nginx_static", what, url, "static.lua", Charged(pids))
            with bare_replicas(1) as (ports, pids):
                url = f"http://127.0.0.1:{ports[0]}"
                what = "one bare aiohttp replica"
                self.measure("bare_replica", what, url, "echo.lua", Charged(pids, pids))
            with replicas_via_nginx(c, tmp) as (url, pids, bare):
                what = f"stack NGINX config -> {c.stack.replicas} bare replicas"
                self.measure("replicas_via_nginx", what, url, "echo.lua", Charged(pids, bare))
            what = "/echo through the running stack"
            full = self.measure("echo", what, c.target, "echo.lua", stack)
            if not capped(full):
                self.half_load(full, stack)
            self.cache_hit("cache_hit", "the running stack", c.target, stack)
            if c.private_stacks and not broker_answers(c.stack):
                # The runner would start a RabbitMQ of its own on that port: not for a bench.
                print("skipping the private stacks: RabbitMQ at AMQP_URL does not answer")
            elif c.private_stacks:
                for on in (True, False):
                    with private_stack(c, tmp, on) as s:
                        name = f"limiter_{'on' if on else 'off'}"
                        url = f"http://127.0.0.1:{s.public_port}"
                        what = f"/echo, private stack, rate limiter {'on' if on else 'off'}"
                        charged = charged_to(s)
                        top = self.measure(name, what, url, "echo.lua", charged)
                        if on:
                            if "half_load" not in self.results:  # the running stack was capped
                                self.half_load(top, charged)
                            self.cache_hit("cache_hit_open", "private stack", url, charged)
        spy = self.profile() if c.profile else None
        return report.summary(c, self.results, spy)

    def cache_hit(self, name: str, where: str, url: str, charged: Charged) -> None:
        """One question every request asks, after a first ask put it in the cache."""
        probe(url, QUESTION)
        cache = probe(url, QUESTION).headers.get("X-Cache", "?")
        what = f"one question through {where}"
        r = self.measure(name, what, url, "question.lua", charged, args=(QUESTION,))
        r.notes.append(f"X-Cache of a probe: {cache}")

    def half_load(self, top: Result, charged: Charged) -> None:
        """`/echo` at a fixed rate, half of what `top` reached flat out (open loop)."""
        c = self.cfg
        rate = max(2.0, top.ok_rps / 2)
        per_thread = f"{rate / c.threads:.1f}"
        if c.warmup > 0:
            args = [self.run_id + "hw", per_thread]
            self._wrk("half_load", top.url, "paced.lua", args, c.warmup, Charged([]))
        args = [self.run_id + "h", per_thread]
        result = self._wrk("half_load", top.url, "paced.lua", args, c.duration, charged)
        result.what = f"/echo at a fixed {rate:.0f}/s, half of {top.name} (open loop)"
        result.target_rps = round(rate, 1)
        if result.ok_rps < 0.95 * rate:
            result.notes.append(f"fell behind the {rate:.0f}/s asked")
        self._keep(result)

    def profile(self) -> dict[str, Any]:
        """py-spy on replica 1 while wrk sends `/echo` through the running stack."""
        pid = next((p for p, n in stack_processes(self.cfg.stack).items() if n == "bot-1"), 0)
        out = self.cfg.report_root / f"bench-{time.strftime('%Y%m%d-%H%M%S')}-profile.txt"

        def load(seconds: int) -> object:
            args = [self.run_id + "p"]
            return self._wrk("profile", self.cfg.target, "echo.lua", args, seconds, Charged([]))

        return profile.record(pid, max(2, round(self.cfg.duration)), out, load)


def capped(r: Result) -> bool:
    """Whether NGINX's per-address guard refused part of the row (so it says nothing of speed)."""
    return r.non_2xx > 0.01 * r.requests


def charged_to(settings: Settings) -> Charged:
    """A stack's processes, its replicas among them, and its Redis."""
    procs = stack_processes(settings)
    replicas = [p for p, n in procs.items() if n.startswith("bot-")]
    return Charged(list(procs), replicas, settings.redis_url)


def main() -> int:
    try:
        cfg = load_bench_config()
    except (SettingsError, ValueError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    try:
        summary = Bench(cfg).run()
    except RuntimeError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    report.print_summary(summary)
    print(f"saved {report.save(cfg.report_root, summary)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
