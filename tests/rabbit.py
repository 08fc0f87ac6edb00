"""A private RabbitMQ node for tests that stop or restart the broker.

The machine's shared node must never be stopped, so such tests boot a node of their own on
free ports (its own node name, data and log directories, no plugins); it boots in ~6 s and
keeps durable queues and persistent messages across `restart`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

from tests.support import free_port

SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"


def _answers(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
        return True
    return False


class PrivateRabbit:
    """`start`, `stop` (graceful), `restart`; the URL stays the same."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.port = free_port()
        self.dist_port = free_port()
        self.name = f"bottest{self.port}@localhost"
        self.proc: subprocess.Popen[bytes] | None = None
        base.mkdir(parents=True, exist_ok=True)
        (base / "rabbitmq.conf").write_text(
            f"listeners.tcp.local = 127.0.0.1:{self.port}\nloopback_users = none\n"
        )
        (base / "enabled_plugins").write_text("[].\n")
        cookie = base / ".erlang.cookie"
        cookie.write_text(uuid.uuid4().hex)
        cookie.chmod(0o400)

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def start(self, timeout: float = 60) -> None:
        env = {
            **os.environ,
            "HOME": str(self.base),
            "RABBITMQ_CONF_ENV_FILE": "/dev/null",
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONFIG_FILE": str(self.base / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(self.base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.base / "log"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }
        log = (self.base / "server.out").open("ab")
        self.proc = subprocess.Popen(
            [SERVER], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while not _answers(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                out = (self.base / "server.out").read_text()[-2000:]
                raise RuntimeError(f"private RabbitMQ did not start:\n{out}")
            time.sleep(0.1)

    def stop(self, timeout: float = 30) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)

    def restart(self) -> None:
        self.stop()
        self.start()
