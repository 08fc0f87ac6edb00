"""What the native runner supervises: one `Program` per process, built from the settings.

Each builder returns the programs one part of the stack needs (`core_programs`: NGINX, the
replicas and the upstream stub; `worker_programs`; `data_programs`: Redis and RabbitMQ of our
own when the configured ones do not answer). The runner lists the builders it runs, the
observability ones included (`infra/observability.py`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from bot.settings import Settings
from infra.common import VENV_BIN, Paths, answers, free_port, port_free
from infra.nginxconf import render_nginx


@dataclass(frozen=True)
class Program:
    """One supervised process."""

    name: str
    command: str
    port: int | None = None
    env: dict[str, str] = field(default_factory=dict)
    stopwaitsecs: int = 15
    priority: int = 500
    ready_url: str | None = None  # GET answering < 500 means started
    # Keeps root when the runner has it (see `infra.users.RUN_USER`); everything else runs
    # unprivileged.
    privileged: bool = False
    writable: tuple[Path, ...] = ()  # directories it writes, given to the user it runs as
    # Run as root, the runner runs it as this user of its own (RabbitMQ as `rabbitmq`, as
    # Debian's service does) rather than `RUN_USER`.
    owner: str | None = None


ProgramBuilder = Callable[[Settings, Paths, dict[str, str]], list[Program]]

# Port of RabbitMQ's rabbitmq_prometheus plugin (its default; a broker has one).
RABBITMQ_PROMETHEUS_PORT = 15692


def bot_command(*args: str) -> str:
    """The `bot` console script of this venv with `args`."""
    return " ".join([str(VENV_BIN / "bot"), *args])


def module_command(module: str, *args: str) -> str:
    """`python -m module args` with this venv's interpreter (the stack's own tools)."""
    return " ".join([str(VENV_BIN / "python"), "-m", module, *args])


def core_programs(settings: Settings, paths: Paths, env: dict[str, str]) -> list[Program]:
    """NGINX, the replicas and the upstream stub."""
    nginx_conf = paths.run / "nginx.conf"
    (paths.run / "nginx-tmp").mkdir(parents=True, exist_ok=True)
    nginx_conf.write_text(render_nginx(settings, paths))
    progs = [
        Program(
            f"bot-{i}",
            bot_command("serve", "--replica", str(i)),
            settings.replica_port(i),
            ready_url=f"http://127.0.0.1:{settings.replica_port(i)}/readyz",
        )
        for i in range(1, settings.replicas + 1)
    ]
    progs.append(
        Program(
            "stub",
            module_command("infra.stub"),
            settings.stub_port,
            priority=100,
            ready_url=f"http://127.0.0.1:{settings.stub_port}/healthz",
        )
    )
    progs.append(
        Program(
            "nginx",
            f"{shutil.which('nginx') or '/usr/sbin/nginx'} -c {nginx_conf} -p {paths.run}",
            settings.public_port,
            priority=900,
            privileged=True,  # the master; its workers drop to `nobody`
        )
    )
    return progs


def worker_programs(settings: Settings, paths: Paths, env: dict[str, str]) -> list[Program]:
    """The retry worker (bot/retries): answers queued jobs; /metrics on its own port."""
    port = settings.worker_metrics_port
    return [
        Program(
            "worker",
            bot_command("worker"),
            port,
            # SIGTERM lets in-flight jobs finish within the drain timeout, then requeues.
            stopwaitsecs=int(settings.drain_timeout) + 5,
            ready_url=f"http://127.0.0.1:{port}/metrics",
        )
    ]


def _dist_port(amqp_port: int) -> int:
    """RabbitMQ's conventional distribution port (AMQP + 20000), unless a node has it or it
    is past the last port (an AMQP port above 45535): then a free one."""
    conventional = amqp_port + 20000
    if conventional <= 65535 and not answers("127.0.0.1", conventional):
        return conventional
    return free_port()


def data_programs(settings: Settings, paths: Paths, env: dict[str, str]) -> list[Program]:
    """Redis and RabbitMQ of our own, only when the configured ones do not answer."""
    progs: list[Program] = []
    redis = urlparse(settings.redis_url)
    if redis.scheme.startswith("redis") and not answers(
        redis.hostname or "127.0.0.1", redis.port or 6379
    ):
        data = paths.run / "redis"
        data.mkdir(parents=True, exist_ok=True)
        progs.append(
            Program(
                "redis",
                f"{shutil.which('redis-server') or 'redis-server'} --port {redis.port or 6379} "
                # Bounded (BOT_REDIS_MAXMEMORY): past it writes fail and the replicas answer
                # 503; nothing stored is evicted (prefs, records and the outbox must survive).
                f"--bind 127.0.0.1 --appendonly yes --appendfsync everysec --dir {data} "
                f"--save '' --maxmemory {settings.redis_maxmemory} --maxmemory-policy noeviction",
                redis.port or 6379,
                priority=10,
                writable=(data,),
            )
        )
    amqp = urlparse(settings.amqp_url)
    if not answers(amqp.hostname or "127.0.0.1", amqp.port or 5672):
        progs.append(_rabbitmq(paths, amqp.port or 5672))
    return progs


# The server script behind Debian's /usr/sbin/rabbitmq-server. That launcher switches users
# with `su` (whose node then outlives supervisord's stop) and refuses anyone but root and
# `rabbitmq`; supervisord runs the script itself, as `rabbitmq` when it is root.
RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
# Where a RabbitMQ of our own records the port of its own epmd, for `down` to stop it.
EPMD_PORT_FILE = "epmd.port"


def _rabbitmq(paths: Paths, port: int) -> Program:
    """A RabbitMQ node of our own, with an epmd of its own on a free port.

    Its own epmd: Erlang leaves epmd running after the node stops, and one on the standard
    port may serve other nodes of the machine; ours is stopped by `down` (`stop_epmd`).
    """
    base = paths.run / "rabbitmq"
    (base / "log").mkdir(parents=True, exist_ok=True)
    # Files of its own: the machine's /etc/rabbitmq (a listener on 5672, a node name, its
    # plugin list, which the broker rewrites) belongs to the machine's broker.
    conf = f"listeners.tcp.local = 127.0.0.1:{port}\n"
    if not port_free(RABBITMQ_PROMETHEUS_PORT):
        # Another broker's plugin has it (the node would not boot): ours goes unscraped
        # (`observability.rabbitmq_metrics_target`), the bot's own RabbitMQ gauges remain.
        conf += f"prometheus.tcp.port = {free_port()}\n"
    (base / "rabbitmq.conf").write_text(conf)
    epmd_port = free_port()
    (paths.run / EPMD_PORT_FILE).write_text(f"{epmd_port}\n")
    return Program(
        "rabbitmq",
        RABBITMQ_SERVER,
        port,
        priority=10,
        stopwaitsecs=30,
        writable=(base,),
        owner="rabbitmq",
        env={
            "HOME": str(base),  # its Erlang cookie
            "ERL_EPMD_PORT": str(epmd_port),
            "RABBITMQ_NODE_PORT": str(port),
            "RABBITMQ_NODENAME": f"bot{port}@localhost",
            "RABBITMQ_DIST_PORT": str(_dist_port(port)),
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            # Its own log directory: the launcher drops to `rabbitmq`, which may not write
            # the runner's logs/ (supervisord's, owned by whoever ran `make up`).
            "RABBITMQ_LOG_BASE": str(base / "log"),
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_CONF_ENV_FILE": "/dev/null",
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
            # Prometheus scrapes it on 15692 (infra/observability.py).
            "RABBITMQ_ENABLED_PLUGINS": "rabbitmq_prometheus",
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        },
    )


def stop_epmd(paths: Paths) -> None:
    """Stop the epmd our RabbitMQ started (once the node is down it serves no one)."""
    port_file = paths.run / EPMD_PORT_FILE
    if not port_file.exists():
        return
    port = port_file.read_text().strip()
    if answers("127.0.0.1", int(port)):
        epmd = shutil.which("epmd") or "epmd"
        subprocess.run(
            [epmd, "-kill"], env={**os.environ, "ERL_EPMD_PORT": port}, capture_output=True,
            check=False,
        )  # fmt: skip
    port_file.unlink(missing_ok=True)
