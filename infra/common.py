"""What the runner, the benchmark and the tests share: paths, ports, templates, a stack's
environment and dropping its queues.

It imports nothing else from `infra`, `loadtests` or `tests`, so each of them can use it
without an import cycle: the runner starts stacks from it, the benchmark and the tests start
private ones on free ports with the same helpers.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import random
import re
import socket
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from bot.settings import Settings, SettingsError, load_settings

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Paths:
    """A stack's run directory: its configs, logs and supervisord's socket."""

    run: Path

    @property
    def logs(self) -> Path:
        return self.run / "logs"

    @property
    def conf(self) -> Path:
        return self.run / "supervisord.conf"

    @property
    def sock(self) -> Path:
        return self.run / "supervisor.sock"

    @property
    def pidfile(self) -> Path:
        return self.run / "supervisord.pid"


def settings_or_exit(prog: str) -> Settings:
    """The stack's settings, or one line on stderr and exit status 2 when a value is bad."""
    try:
        return load_settings()
    except SettingsError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def answers(host: str, port: int, timeout: float = 1.0) -> bool:
    """Whether something accepts TCP connections on `host:port`."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def port_free(port: int) -> bool:
    """Whether `port` can be bound on every interface (nothing listens there)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def _ephemeral_range() -> tuple[int, int]:
    """The ports the kernel hands out to outgoing connections (Linux: 32768-60999)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[:2]
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


# Single free ports come from below the kernel's ephemeral range and below the stacks' port
# blocks: a port from the ephemeral range (`bind(0)`) may be taken by any outgoing connection
# between the moment it is chosen and the moment it is bound (parallel test workers, connecting
# to Redis and RabbitMQ all the time, made that happen), and one inside another stack's block
# may be that stack's before it binds it.
_PORTS_FROM, _BLOCKS_FROM = 10000, 20000


def free_port() -> int:
    """A free port below the stacks' blocks and the ephemeral range."""
    for _ in range(500):
        port = random.randrange(_PORTS_FROM, min(_BLOCKS_FROM, _ephemeral_range()[0]))
        if port_free(port):
            return port
    raise RuntimeError("no free port")


# Port blocks are slots of BLOCK_SIZE ports, outside the kernel's ephemeral range (an outgoing
# connection to Redis or RabbitMQ took a stack's stub port before the stub bound it). A block
# chosen is leased for BLOCK_LEASE_S in one file every process on the machine reads under a
# lock, so concurrent test workers never pick the same block in the seconds before its stack
# binds it; after that, `port_free` sees the bound ports.
BLOCK_SIZE = 300
BLOCK_LEASE_S = 30.0
_LEASES = Path(tempfile.gettempdir()) / "bot-port-blocks.json"


def _block_slots() -> list[int]:
    low, high = _ephemeral_range()
    below = range(_BLOCKS_FROM, low - BLOCK_SIZE + 1, BLOCK_SIZE)
    above = range(high + 1, 65536 - BLOCK_SIZE + 1, BLOCK_SIZE)
    return [*below, *above]


def free_port_block(size: int = BLOCK_SIZE) -> int:
    """A base port whose `size` (at most BLOCK_SIZE) following ports are all free, leased to
    this caller for BLOCK_LEASE_S against every other process choosing one."""
    if size > BLOCK_SIZE:
        raise ValueError(f"a port block holds at most {BLOCK_SIZE} ports")
    with open(_LEASES, "a+", encoding="utf-8") as leases:
        fcntl.flock(leases, fcntl.LOCK_EX)
        leases.seek(0)
        now = time.time()
        try:
            held = {int(b): t for b, t in json.loads(leases.read() or "{}").items()}
        except (ValueError, AttributeError):
            held = {}
        held = {b: t for b, t in held.items() if now - t < BLOCK_LEASE_S}
        slots = [b for b in _block_slots() if b not in held]
        random.shuffle(slots)
        for base in slots:
            if all(port_free(base + i) for i in range(size)):
                held[base] = now
                leases.seek(0)
                leases.truncate()
                leases.write(json.dumps(held))
                return base
    raise RuntimeError("no free port block")


def render_template(text: str, values: dict[str, object]) -> str:
    """Fill ``{{name}}`` placeholders; an unknown or missing one is an error."""

    def sub(m: re.Match[str]) -> str:
        return str(values[m.group(1)])

    return re.sub(r"\{\{(\w+)\}\}", sub, text)


def stack_env(redis_url: str, amqp_url: str, **overrides: str) -> dict[str, str]:
    """Settings for a private stack on a block of free ports, with a queue prefix of its own."""
    base = free_port_block()
    env = {
        "BOT_PUBLIC_PORT": str(base),
        "BOT_PORT_BASE": str(base + 1),
        "BOT_METRICS_PORT_BASE": str(base + 100),
        "BOT_WORKER_METRICS_PORT": str(base + 200),
        "BOT_STUB_PORT": str(base + 201),
        "BOT_PROMETHEUS_PORT": str(base + 202),
        "BOT_ALERTMANAGER_PORT": str(base + 203),
        "UPSTREAM_URL": f"http://127.0.0.1:{base + 201}",
        "REDIS_URL": redis_url,
        "AMQP_URL": amqp_url,
        "BOT_QUEUE_PREFIX": f"test-{uuid.uuid4().hex[:8]}",
        "BOT_REPLICAS": "3",
        "LOG_FORMAT": "json",
        # Prometheus, Alertmanager and the exporters only where a caller asks for them.
        "BOT_OBSERVABILITY": "false",
    }
    env.update(overrides)
    return env


def drop_queues(settings: Settings) -> None:
    """Delete a stack's queues (its own `BOT_QUEUE_PREFIX`) once the stack is down, so private
    stacks leave nothing behind on a shared broker. Best effort: a broker that is gone has
    nothing to clean.

    Every queue the prefix may have, not only those `settings` declare: the retry levels of
    the default delays too, and every channel's queues (a process of the prefix may have run
    with other settings). Each quorum queue left behind holds three of RabbitMQ 3.10's file
    handles for good: with the default 1024 descriptors, about 300 of them and the broker
    accepts no connection at all (docs/runbooks.md)."""
    import aio_pika

    from bot.channels import topology as channel_topology
    from bot.metrics import CHANNELS
    from bot.retries.topology import Topology

    default = load_settings({}, dotenv=Path("/dev/null"))
    names = dict.fromkeys(
        [
            *Topology.from_settings(settings).all,
            *Topology.from_settings(replace(default, queue_prefix=settings.queue_prefix)).all,
            *channel_topology.names(settings.queue_prefix, CHANNELS),
        ]
    )

    async def drop() -> None:
        connection = await aio_pika.connect(settings.amqp_url, timeout=3)
        async with connection:
            channel = await connection.channel()
            for name in names:  # deleting a queue that is not there is no error
                await channel.queue_delete(name)

    # In a thread of its own: the caller may be running an event loop (an async test).
    with contextlib.suppress(Exception), ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, drop()).result(timeout=30)
