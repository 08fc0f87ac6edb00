"""What the runner, the benchmark and the tests share: paths, ports, templates, a stack's
environment and dropping its queues.

It imports nothing else from `infra`, `loadtests` or `tests`, so each of them can use it
without an import cycle: the runner starts stacks from it, the benchmark and the tests start
private ones on free ports with the same helpers.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import socket
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
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


def _ephemeral_low() -> int:
    """The first port the kernel hands out to outgoing connections (Linux: 32768)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


# Single free ports come from below the kernel's ephemeral range and below the stacks' port
# blocks: a port from the ephemeral range (`bind(0)`) may be taken by any outgoing connection
# between the moment it is chosen and the moment it is bound (parallel test workers, connecting
# to Redis and RabbitMQ all the time, made that happen), and one inside another stack's block
# may be that stack's before it binds it.
_PORTS_FROM, _BLOCKS_FROM = 10000, 20000


def free_port() -> int:
    """A free port below the stacks' blocks and the ephemeral range."""
    for _ in range(500):
        port = random.randrange(_PORTS_FROM, min(_BLOCKS_FROM, _ephemeral_low()))
        if port_free(port):
            return port
    raise RuntimeError("no free port")


def free_port_block(size: int = 300) -> int:
    """A base port whose `size` following ports are all free."""
    for _ in range(200):
        base = random.randrange(_BLOCKS_FROM, 60000 - size, 10)
        if all(port_free(base + i) for i in range(0, size)):
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
    """Delete a stack's retry queues (its own `BOT_QUEUE_PREFIX`) once the stack is down, so
    private stacks leave nothing behind on a shared broker. Best effort: a broker that is gone
    has nothing to clean."""
    import aio_pika

    from bot.channels import topology as channel_topology
    from bot.retries.topology import Topology, delete

    async def drop() -> None:
        connection = await aio_pika.connect(settings.amqp_url, timeout=3)
        async with connection:
            channel = await connection.channel()
            await delete(channel, settings.queue_prefix, Topology.from_settings(settings).levels)
            for name in channel_topology.names(settings.queue_prefix, settings.channels):
                await channel.queue_delete(name)

    # In a thread of its own: the caller may be running an event loop (an async test).
    with contextlib.suppress(Exception), ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, drop()).result(timeout=30)
