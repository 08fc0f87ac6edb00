"""`make bench`: how fast the running stack is beside what this machine can do at all.

In one run, with wrk (64 connections by default), it measures:

- `nginx_static`: an NGINX of our own answering a static JSON body (the NGINX ceiling);
- `bare_replica`: one bare aiohttp+uvloop replica, hit directly (the Python ceiling);
- `replicas_via_nginx`: the stack's own NGINX config in front of `BOT_REPLICAS` bare replicas;
- `echo`: `/echo` through the running stack's NGINX (the full path);
- `cache_hit`: one question every request asks, through the running stack (cache hits);
- `limiter_on` / `limiter_off`: `/echo` on two private stacks alike but for
  `BOT_RATE_LIMIT_ENABLED` (NGINX's per-address guard raised on both, so only the limiter differs);
- a py-spy profile of replica 1 under the `/echo` load (its top frames).

Every request comes from a user nobody has seen before, so per-user limits never reject
benchmark traffic. Prints requests/s, p50/p99, CPU per request and the ratios; saves
`reports/bench-<time>.json`. Settings: BENCH_DURATION (s, default 10), BENCH_WARMUP (2),
BENCH_CONNECTIONS (64), BENCH_THREADS (2), BENCH_PRIVATE_STACKS (true), BENCH_PROFILE (true).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import orjson
import requests

from bot.settings import Settings, SettingsError, load_settings, merged_environ
from infra import runner
from loadtests.bench.measure import HERE, Result, run_wrk
from loadtests.observe import listening_pids, stack_processes

QUESTION = "what is a pulsar, for the benchmark?"
_OPEN_EDGE = {"BOT_EDGE_RATE": "1000000", "BOT_EDGE_BURST": "1000000", "BOT_EDGE_CONN": "60000"}


@dataclass(frozen=True)
class BenchConfig:
    stack: Settings
    env: dict[str, str]
    duration: float
    warmup: float
    connections: int
    threads: int
    private_stacks: bool
    profile: bool
    report_root: Path

    @property
    def target(self) -> str:
        return f"http://127.0.0.1:{self.stack.public_port}"


def load_bench_config() -> BenchConfig:
    env = merged_environ(dotenv=runner.ROOT / ".env")
    stack = load_settings(env)

    def flag(name: str, default: bool) -> bool:
        return env.get(name, str(default)).strip().lower() in ("1", "true", "yes", "on")

    return BenchConfig(
        stack=stack,
        env=env,
        duration=float(env.get("BENCH_DURATION", "10")),
        warmup=float(env.get("BENCH_WARMUP", "2")),
        connections=int(env.get("BENCH_CONNECTIONS", "64")),
        threads=int(env.get("BENCH_THREADS", "2")),
        private_stacks=flag("BENCH_PRIVATE_STACKS", True),
        profile=flag("BENCH_PROFILE", True),
        report_root=Path(env.get("BENCH_REPORT_DIR", str(runner.ROOT / "reports"))),
    )


def _free_port_block(size: int) -> int:
    from tests.support import free_port_block

    return free_port_block(size)


def _wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if runner._answers("127.0.0.1", port, 0.2):
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing answers on port {port}")


@contextlib.contextmanager
def _processes(cmds: list[list[str]], ports: list[int]) -> Iterator[list[int]]:
    procs = [
        subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for c in cmds
    ]
    try:
        for port in ports:
            _wait_port(port)
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


def _nginx() -> str:
    return shutil.which("nginx") or "/usr/sbin/nginx"


@contextlib.contextmanager
def nginx_static(tmp: Path) -> Iterator[tuple[str, list[int]]]:
    port = _free_port_block(1)
    run_dir = tmp / "nginx-static"
    run_dir.mkdir()
    conf = runner.render_template(
        (HERE / "nginx-static.conf.template").read_text(),
        {"worker_processes": 2, "run_dir": run_dir, "port": port},
    )
    (run_dir / "nginx.conf").write_text(conf)
    cmd = [_nginx(), "-c", str(run_dir / "nginx.conf"), "-p", str(run_dir)]
    with _processes([cmd], [port]) as pids:
        yield f"http://127.0.0.1:{port}/", pids


@contextlib.contextmanager
def bare_replicas(n: int) -> Iterator[tuple[list[int], list[int]]]:
    base = _free_port_block(n)
    ports = [base + i for i in range(n)]
    cmds = [[sys.executable, "-m", "loadtests.bench.hello", str(p)] for p in ports]
    with _processes(cmds, ports) as pids:
        yield ports, pids


@contextlib.contextmanager
def replicas_via_nginx(cfg: BenchConfig, tmp: Path) -> Iterator[tuple[str, list[int]]]:
    """The stack's NGINX config, rendered by the runner, in front of bare replicas."""
    n = cfg.stack.replicas
    base = _free_port_block(300)
    settings = dataclasses.replace(
        cfg.stack,
        public_port=base,
        port_base=base + 1,
        metrics_port_base=base + 100,
        edge_rate=1_000_000,
        edge_burst=1_000_000,
        edge_conn=60_000,  # NGINX: must stay below 65536
    )
    paths = runner.Paths(tmp / "nginx-proxy")
    paths.logs.mkdir(parents=True)
    (paths.run / "nginx-tmp").mkdir()
    (paths.run / "nginx.conf").write_text(runner.render_nginx(settings, paths))
    ports = [settings.replica_port(i) for i in range(1, n + 1)]
    cmds = [[sys.executable, "-m", "loadtests.bench.hello", str(p)] for p in ports]
    cmds.append([_nginx(), "-c", str(paths.run / "nginx.conf"), "-p", str(paths.run)])
    with _processes(cmds, [*ports, base]) as pids:
        yield f"http://127.0.0.1:{base}", pids


@contextlib.contextmanager
def private_stack(cfg: BenchConfig, tmp: Path, limiter: bool) -> Iterator[Settings]:
    """A stack like the running one on free ports, with NGINX's per-address guard opened."""
    from tests.support import stack_env

    ports = stack_env(
        0,
        REDIS_URL=cfg.stack.redis_url,
        AMQP_URL=cfg.stack.amqp_url,
        BOT_REPLICAS=str(cfg.stack.replicas),
        BOT_QUEUE_PREFIX=f"bench-{uuid.uuid4().hex[:8]}",
        BOT_RATE_LIMIT_ENABLED="true" if limiter else "false",
        BOT_DOTENV="/dev/null",
        PATH=f"{runner.VENV_BIN}:{cfg.env.get('PATH', '')}",
        **_OPEN_EDGE,
    )
    env = {**cfg.env, **ports, "LOG_FORMAT": cfg.env.get("LOG_FORMAT", "json")}
    settings = load_settings(env)
    paths = runner.Paths(tmp / f"stack-{'on' if limiter else 'off'}")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = runner.up(settings, paths, env, timeout=90)
    try:
        if code != 0:
            raise RuntimeError(f"private stack did not start: {out.getvalue()[-500:]}")
        yield settings
    finally:
        with contextlib.redirect_stdout(io.StringIO()):
            runner.down(paths)
        _drop_queues(settings)


def _drop_queues(settings: Settings) -> None:
    """The private stack's retry queues, gone with it."""
    try:
        import aio_pika

        from bot.retries.topology import Topology, delete
    except ImportError:
        return

    async def drop() -> None:
        topo = Topology.from_settings(settings)
        conn = await aio_pika.connect(settings.amqp_url, timeout=5)
        async with conn:
            await delete(await conn.channel(), topo.prefix, topo.levels)

    with contextlib.suppress(Exception):
        asyncio.run(drop())


def _redis_pids(settings: Settings) -> list[int]:
    url = urlparse(settings.redis_url)
    return listening_pids(url.port or 6379) if url.scheme.startswith("redis") else []


def _probe(url: str, text: str) -> requests.Response:
    body = {"user_id": f"bench-probe-{uuid.uuid4().hex[:8]}", "text": text}
    resp = requests.post(f"{url}/v1/messages", json=body, timeout=15)
    if resp.status_code != 200:
        raise RuntimeError(f"{url} answered {resp.status_code} to {text!r}: {resp.text[:200]}")
    return resp


class Bench:
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
        pids: list[int],
        *,
        args: tuple[str, ...] = (),
        redis: list[int] | None = None,
    ) -> Result:
        c = self.cfg
        if c.warmup > 0:
            self._wrk(name, url, script, [self.run_id + "w", *args], c.warmup)
        result = self._wrk(name, url, script, [self.run_id, *args], c.duration, pids, redis)
        result.what = what
        if result.non_2xx > 0.01 * result.requests and url.startswith(c.target):
            result.notes.append(
                f"NGINX's per-address guard (BOT_EDGE_RATE={c.stack.edge_rate}/s) caps one "
                "client; the private-stack rows have it opened"
            )
        self.results[name] = result
        print(_row(result), flush=True)
        return result

    def _wrk(
        self,
        name: str,
        url: str,
        script: str,
        args: list[str],
        duration: float,
        pids: list[int] | None = None,
        redis: list[int] | None = None,
    ) -> Result:
        return run_wrk(
            name,
            "",
            url,
            script,
            args,
            duration=duration,
            connections=self.cfg.connections,
            threads=self.cfg.threads,
            pids=pids or [],
            redis_pids=redis,
        )

    def run(self) -> dict[str, Any]:
        c = self.cfg
        try:
            _probe(c.target, "/echo ping")
        except (requests.RequestException, RuntimeError) as exc:
            raise RuntimeError(
                f"the stack does not answer at {c.target}: {exc}; `make up`?"
            ) from None
        print(_header(), flush=True)
        stack_pids = list(stack_processes(c.stack))
        redis = _redis_pids(c.stack)
        with tempfile.TemporaryDirectory(prefix="bench-") as tmp_name:
            tmp = Path(tmp_name)
            with nginx_static(tmp) as (url, pids):
                self.measure(
                    "nginx_static", "NGINX answering a static body", url, "static.lua", pids
                )
            with bare_replicas(1) as (ports, pids):
                url = f"http://127.0.0.1:{ports[0]}"
                self.measure("bare_replica", "one bare aiohttp replica", url, "echo.lua", pids)
            with replicas_via_nginx(c, tmp) as (url, pids):
                what = f"stack NGINX config -> {c.stack.replicas} bare replicas"
                self.measure("replicas_via_nginx", what, url, "echo.lua", pids)
            what = "/echo through the running stack"
            self.measure("echo", what, c.target, "echo.lua", stack_pids, redis=redis)
            self.cache_hit("cache_hit", "the running stack", c.target, stack_pids, c.stack)
            amqp = urlparse(c.stack.amqp_url)
            if c.private_stacks and not runner._answers(amqp.hostname or "", amqp.port or 5672):
                # The runner would start a RabbitMQ of its own on that port: not for a bench.
                print("skipping the private stacks: RabbitMQ at AMQP_URL does not answer")
            elif c.private_stacks:
                for on in (True, False):
                    with private_stack(c, tmp, on) as s:
                        name = f"limiter_{'on' if on else 'off'}"
                        url = f"http://127.0.0.1:{s.public_port}"
                        what = f"/echo, private stack, rate limiter {'on' if on else 'off'}"
                        pids = list(stack_processes(s))
                        self.measure(name, what, url, "echo.lua", pids, redis=_redis_pids(s))
                        if on:
                            self.cache_hit("cache_hit_open", "private stack", url, pids, s)
        profile = self.profile() if c.profile else None
        return self.summary(profile)

    def cache_hit(
        self, name: str, where: str, url: str, pids: list[int], settings: Settings
    ) -> None:
        """One question every request asks, after a first ask put it in the cache."""
        _probe(url, QUESTION)
        cache = _probe(url, QUESTION).headers.get("X-Cache", "?")
        what = f"one question through {where}"
        redis = _redis_pids(settings)
        r = self.measure(name, what, url, "question.lua", pids, args=(QUESTION,), redis=redis)
        r.notes.append(f"X-Cache of a probe: {cache}")

    def profile(self) -> dict[str, Any] | None:
        """py-spy on replica 1 while wrk sends `/echo` through the running stack."""
        spy = shutil.which("py-spy", path=str(runner.VENV_BIN)) or shutil.which("py-spy")
        pid = next((p for p, n in stack_processes(self.cfg.stack).items() if n == "bot-1"), 0)
        if not spy or not pid:
            return {"skipped": "py-spy or replica 1 not found"}
        out = self.cfg.report_root / f"bench-{time.strftime('%Y%m%d-%H%M%S')}-profile.txt"
        out.parent.mkdir(parents=True, exist_ok=True)
        secs = max(2, round(self.cfg.duration))
        cmd = [spy, "record", "-p", str(pid), "-d", str(secs), "-r", "100", "-f", "raw"]
        cmd += ["-o", str(out), "--nonblocking"]
        spy_proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(0.5)
        self._wrk("profile", self.cfg.target, "echo.lua", [self.run_id + "p"], secs)
        _, err = spy_proc.communicate(timeout=60)
        if not out.exists():
            return {"skipped": f"py-spy failed: {err.decode()[-300:]}"}
        return {"file": str(out), **top_frames(out.read_text())}

    def summary(self, profile: dict[str, Any] | None) -> dict[str, Any]:
        r = self.results

        def ratio(a: str, b: str) -> float | None:
            if a in r and b in r and r[b].ok_rps:
                return round(r[a].ok_rps / r[b].ok_rps, 3)
            return None

        def uncapped(name: str, fallback: str) -> str:
            # A row NGINX's per-address guard capped says nothing about the stack's speed.
            row = r.get(name)
            return name if row and row.non_2xx <= 0.01 * row.requests else fallback

        full = uncapped("echo", "limiter_on")
        hit = uncapped("cache_hit", "cache_hit_open")
        ratios = {
            f"{full} / nginx_static": ratio(full, "nginx_static"),
            f"{full} / bare_replica": ratio(full, "bare_replica"),
            f"{full} / replicas_via_nginx": ratio(full, "replicas_via_nginx"),
            f"{hit} / nginx_static": ratio(hit, "nginx_static"),
            f"{hit} / {full}": ratio(hit, full),
            "limiter_on / limiter_off": ratio("limiter_on", "limiter_off"),
        }
        return {
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "target": self.cfg.target,
            "replicas": self.cfg.stack.replicas,
            "duration_s": self.cfg.duration,
            "connections": self.cfg.connections,
            "threads": self.cfg.threads,
            "cores": _cores(),
            "results": {k: v.to_json() for k, v in r.items()},
            "full_path_row": full,
            "cache_hit_row": hit,
            "ratios": ratios,
            "profile": profile,
        }


def top_frames(raw: str, n: int = 12) -> dict[str, Any]:
    """Where replica 1's CPU went, from py-spy's raw (collapsed) stacks.

    `by_component`: each sample charged to the deepest frame outside the standard library
    (a send() inside asyncio's streams is the Redis client's or aiohttp's cost), named by
    package, or by module inside `bot`; `bot_inclusive`: the bot's own functions with
    everything they call; `self`: the leaf functions.
    """
    own: Counter[str] = Counter()
    component: Counter[str] = Counter()
    bot: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        k = int(count)
        total += k
        frames = stack.split(";")
        own[_frame(frames[-1])] += k
        component[next((c for c in map(_component, reversed(frames)) if c), "event loop")] += k
        for f in {_frame(f) for f in frames if "(bot/" in f and "cli.py" not in f}:
            bot[f] += k

    def top(c: Counter[str]) -> list[list[Any]]:
        return [[f, round(v / max(1, total), 3)] for f, v in c.most_common(n)]

    return {
        "samples": total,
        "by_component": top(component),
        "bot_inclusive": top(bot),
        "self": top(own),
    }


_STDLIB = ("asyncio/", "typing", "uuid", "abc", "enum", "functools", "contextlib", "<frozen")


def _component(frame: str) -> str | None:
    """`redis`, `aiohttp`, `bot.api.middleware`...; None for the standard library."""
    where = frame.partition(" (")[2].rpartition(":")[0]
    if not where or where.startswith(_STDLIB) or "/" not in where:
        return None
    top, _, rest = where.partition("/")
    if top == "bot" and rest in ("serve.py", "cli.py"):
        return None  # the process's root frames: their own time is the event loop's
    if top == "bot":
        return "bot." + rest.removesuffix(".py").replace("/", ".")
    if top in ("uvloop", "runpy"):
        return None
    return top


def _frame(f: str) -> str:
    # "func (path/to/module.py:123)" -> "func (path/to/module.py)"
    name, _, where = f.partition(" (")
    return f"{name} ({where.rstrip(')').rpartition(':')[0]})" if where else name


def _cores() -> int:
    import os

    return os.cpu_count() or 0


def _header() -> str:
    return (
        f"{'measurement':<20} {'req/s':>9} {'ok req/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'cpu us/req':>10} {'redis us':>9} {'wrk us':>7} {'busy':>5}  notes"
    )


def _row(r: Result) -> str:
    redis = "-" if r.redis_cpu_us_per_req is None else f"{r.redis_cpu_us_per_req:.0f}"
    return (
        f"{r.name:<20} {r.rps:>9.0f} {r.ok_rps:>9.0f} {r.p50_ms:>8.2f} {r.p99_ms:>8.2f} "
        f"{r.cpu_us_per_req:>10.0f} {redis:>9} {r.wrk_cpu_us_per_req:>7.0f} "
        f"{r.machine_busy:>5.0%}  {'; '.join(r.notes)}"
    )


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
    print("ratios (ok req/s):")
    for k, v in summary["ratios"].items():
        print(f"  {k:<36} {'-' if v is None else f'{v:.3f}'}")
    prof = summary.get("profile") or {}
    if prof.get("by_component"):
        print(f"profile of replica 1 under /echo ({prof['samples']} samples, {prof['file']}):")
        for f, share in prof["by_component"][:8]:
            print(f"  component {share:>6.1%}  {f}")
        for f, share in prof["bot_inclusive"][:10]:
            print(f"  bot code  {share:>6.1%}  {f}")
    cfg.report_root.mkdir(parents=True, exist_ok=True)
    out = cfg.report_root / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
