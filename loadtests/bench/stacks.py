"""What the benchmark measures against: NGINX alone, bare replicas, the stack's NGINX config in
front of bare replicas, and private stacks started with the native runner.

Each is a context manager that starts its processes on free ports, yields where to send load
(and which pids to charge CPU to), and stops them after.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import redis
import requests

from bot.retries.outbox import outbox_key
from bot.settings import Settings, load_settings
from infra import runner
from infra.common import (
    VENV_BIN,
    Paths,
    answers,
    drop_queues,
    free_port_block,
    render_template,
    stack_env,
)
from infra.nginxconf import render_nginx
from loadtests.bench.config import BenchConfig
from loadtests.bench.measure import HERE

# NGINX's per-address guard opened, so only the stack itself limits one load generator.
OPEN_EDGE = {"BOT_EDGE_RATE": "1000000", "BOT_EDGE_BURST": "1000000", "BOT_EDGE_CONN": "60000"}


def _wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if answers("127.0.0.1", port, 0.2):
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
    port = free_port_block(1)
    run_dir = tmp / "nginx-static"
    run_dir.mkdir()
    conf = render_template(
        (HERE / "nginx-static.conf.template").read_text(),
        {"worker_processes": 2, "run_dir": run_dir, "port": port},
    )
    (run_dir / "nginx.conf").write_text(conf)
    cmd = [_nginx(), "-c", str(run_dir / "nginx.conf"), "-p", str(run_dir)]
    with _processes([cmd], [port]) as pids:
        yield f"http://127.0.0.1:{port}/", pids


@contextlib.contextmanager
def bare_replicas(n: int) -> Iterator[tuple[list[int], list[int]]]:
    base = free_port_block(n)
    ports = [base + i for i in range(n)]
    cmds = [[sys.executable, "-m", "loadtests.bench.hello", str(p)] for p in ports]
    with _processes(cmds, ports) as pids:
        yield ports, pids


@contextlib.contextmanager
def replicas_via_nginx(cfg: BenchConfig, tmp: Path) -> Iterator[tuple[str, list[int], list[int]]]:
    """The stack's NGINX config, rendered as the runner does, in front of bare replicas
    (yields the URL, every pid, the replicas' pids)."""
    n = cfg.stack.replicas
    base = free_port_block(300)
    settings = dataclasses.replace(
        cfg.stack,
        public_port=base,
        port_base=base + 1,
        metrics_port_base=base + 100,
        edge_rate=1_000_000,
        edge_burst=1_000_000,
        edge_conn=60_000,  # NGINX: must stay below 65536
    )
    paths = Paths(tmp / "nginx-proxy")
    paths.logs.mkdir(parents=True)
    (paths.run / "nginx-tmp").mkdir()
    (paths.run / "nginx.conf").write_text(render_nginx(settings, paths))
    ports = [settings.replica_port(i) for i in range(1, n + 1)]
    cmds = [[sys.executable, "-m", "loadtests.bench.hello", str(p)] for p in ports]
    cmds.append([_nginx(), "-c", str(paths.run / "nginx.conf"), "-p", str(paths.run)])
    with _processes(cmds, [*ports, base]) as pids:
        yield f"http://127.0.0.1:{base}", pids, pids[:n]


def broker_answers(settings: Settings) -> bool:
    """Whether the RabbitMQ at AMQP_URL answers (else the runner would start one of its own)."""
    amqp = urlparse(settings.amqp_url)
    return answers(amqp.hostname or "", amqp.port or 5672)


@contextlib.contextmanager
def private_stack(cfg: BenchConfig, tmp: Path, limiter: bool) -> Iterator[Settings]:
    """A stack like the running one on free ports, with NGINX's per-address guard opened."""
    ports = stack_env(
        cfg.stack.redis_url,
        cfg.stack.amqp_url,
        BOT_REPLICAS=str(cfg.stack.replicas),
        BOT_QUEUE_PREFIX=f"bench-{uuid.uuid4().hex[:8]}",
        BOT_RATE_LIMIT_ENABLED="true" if limiter else "false",
        BOT_DOTENV="/dev/null",
        PATH=f"{VENV_BIN}:{cfg.env.get('PATH', '')}",
        **OPEN_EDGE,
    )
    env = {**cfg.env, **ports, "LOG_FORMAT": cfg.env.get("LOG_FORMAT", "json")}
    settings = load_settings(env)
    paths = Paths(tmp / f"stack-{'on' if limiter else 'off'}")
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
        drop_queues(settings)
        # Its outbox stream too: the private stacks share the running stack's Redis.
        with contextlib.suppress(redis.RedisError), redis.Redis.from_url(settings.redis_url) as r:
            r.delete(outbox_key(settings.queue_prefix))


def probe(url: str, text: str) -> requests.Response:
    """One message through `url`; a stack that does not answer 200 stops the benchmark."""
    body = {"user_id": f"bench-probe-{uuid.uuid4().hex[:8]}", "text": text}
    resp = requests.post(f"{url}/v1/messages", json=body, timeout=15)
    if resp.status_code != 200:
        raise RuntimeError(f"{url} answered {resp.status_code} to {text!r}: {resp.text[:200]}")
    return resp
