"""The native runner: `make up | down | status` as contract.md describes.

It renders the NGINX config from its one template and a supervisord config for
`BOT_REPLICAS` replicas into a run directory (``.run/`` by default, ``BOT_RUN_DIR``), starts
supervisord there, waits until every replica is ready and prints the URLs. Redis and RabbitMQ
at `REDIS_URL` / `AMQP_URL` are reused when they answer; otherwise the runner adds its own
(Redis append-only, bounded by `BOT_REDIS_MAXMEMORY` and refusing writes, never evicting, when
full). Run as root, it starts every process that does not need root as the unprivileged user
`botstack` (created when missing): only supervisord, NGINX's master (its workers run as
`nobody`) and RabbitMQ's launcher (it drops to `rabbitmq` itself) keep root. Tests use the same
code with other ports and their own run directory.

    python -m infra.runner up|down|status
"""

from __future__ import annotations

import argparse
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from bot.settings import Settings, SettingsError, load_settings, merged_environ

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


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
    # Keeps root when the runner has it (see `RUN_USER`); everything else runs unprivileged.
    privileged: bool = False
    writable: tuple[Path, ...] = ()  # directories it writes, given to the unprivileged user


@dataclass(frozen=True)
class Paths:
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


# Other parts of the stack (worker, Prometheus, exporters) register a builder here; each
# returns the programs it needs for these settings.
ProgramBuilder = Callable[[Settings, Paths, dict[str, str]], list[Program]]
BUILDERS: list[ProgramBuilder] = []


# The user every unprivileged program runs as when `make up` runs as root.
RUN_USER = "botstack"


def builder(fn: ProgramBuilder) -> ProgramBuilder:
    BUILDERS.append(fn)
    return fn


def bot_command(*args: str) -> str:
    return " ".join([str(VENV_BIN / "bot"), *args])


def render_template(text: str, values: dict[str, object]) -> str:
    """Fill ``{{name}}`` placeholders; an unknown or missing one is an error."""

    def sub(m: re.Match[str]) -> str:
        return str(values[m.group(1)])

    return re.sub(r"\{\{(\w+)\}\}", sub, text)


def render_nginx(
    settings: Settings, paths: Paths, upstream_host: str = "127.0.0.1", resolver: str = ""
) -> str:
    """NGINX's config from its one template.

    `upstream_host` may name each replica (``bot-{i}`` in compose). With a `resolver`, NGINX
    re-resolves those names while it runs, since a recreated container gets a new address.
    """
    resolve = " resolve" if resolver else ""
    lines = [
        f"        server {upstream_host.format(i=i)}:{settings.replica_port(i)}{resolve} "
        "max_fails=2 fail_timeout=3s;"
        for i in range(1, settings.replicas + 1)
    ]
    if resolver:  # `resolve` needs the group in shared memory (NGINX >= 1.27.3)
        lines[:0] = [
            "        zone bot_replicas 256k;",
            f"        resolver {resolver} valid=5s ipv6=off;",
        ]
    servers = "\n".join(lines)
    template = (ROOT / "nginx" / "nginx.conf.template").read_text()
    return render_template(
        template,
        {
            "worker_processes": 2,
            "run_dir": paths.run,
            "log_dir": paths.logs,
            "upstream_servers": servers,
            "public_host": "0.0.0.0",
            "public_port": settings.public_port,
            "status_port": settings.nginx_status_port,
            "addr_rate": settings.edge_rate,
            "addr_burst": settings.edge_burst,
            "addr_conn": settings.edge_conn,
        },
    )


@builder
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
            bot_command("stub"),
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


@builder
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


def _answers(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _dist_port(amqp_port: int) -> int:
    """RabbitMQ's conventional distribution port (AMQP + 20000), unless a node has it."""
    if not _answers("127.0.0.1", amqp_port + 20000):
        return amqp_port + 20000
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@builder
def data_programs(settings: Settings, paths: Paths, env: dict[str, str]) -> list[Program]:
    """Redis and RabbitMQ of our own, only when the configured ones do not answer."""
    progs: list[Program] = []
    redis = urlparse(settings.redis_url)
    if redis.scheme.startswith("redis") and not _answers(
        redis.hostname or "127.0.0.1", redis.port or 6379
    ):
        data = paths.run / "redis"
        data.mkdir(parents=True, exist_ok=True)
        progs.append(
            Program(
                "redis",
                f"{shutil.which('redis-server') or 'redis-server'} --port {redis.port or 6379} "
                f"--bind 127.0.0.1 --appendonly yes --appendfsync everysec --dir {data} "
                f"--save '' --maxmemory {settings.redis_maxmemory} --maxmemory-policy noeviction",
                redis.port or 6379,
                priority=10,
                writable=(data,),
            )
        )
    amqp = urlparse(settings.amqp_url)
    if not _answers(amqp.hostname or "127.0.0.1", amqp.port or 5672):
        port = amqp.port or 5672
        base = paths.run / "rabbitmq"
        base.mkdir(parents=True, exist_ok=True)
        progs.append(
            Program(
                "rabbitmq",
                shutil.which("rabbitmq-server") or "/usr/sbin/rabbitmq-server",
                port,
                priority=10,
                stopwaitsecs=30,
                privileged=True,  # its launcher switches to the `rabbitmq` user itself
                env={
                    "RABBITMQ_NODE_PORT": str(port),
                    "RABBITMQ_NODENAME": f"bot{port}@localhost",
                    "RABBITMQ_DIST_PORT": str(_dist_port(port)),
                    "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
                    "RABBITMQ_LOG_BASE": str(paths.logs),
                    "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
                    # Prometheus scrapes it on 15692 (infra/observability.py).
                    "RABBITMQ_ENABLED_PLUGINS": "rabbitmq_prometheus",
                },
            )
        )
    return progs


@builder
def observability_programs(settings: Settings, paths: Paths, env: dict[str, str]) -> list[Program]:
    """Prometheus, Alertmanager, the alert sink and the exporters (BOT_OBSERVABILITY)."""
    from infra import observability  # it imports this module

    return observability.programs(settings, paths)


def persistence_warning(settings: Settings) -> str | None:
    """One line when a reused Redis keeps nothing on disk."""
    try:
        import redis as redis_sync

        client = redis_sync.Redis.from_url(
            settings.redis_url, socket_timeout=1, decode_responses=True
        )
        conf: dict[str, str] = client.config_get("appendonly")  # type: ignore[assignment]
        aof = conf.get("appendonly")
        client.close()  # type: ignore[no-untyped-call]
    except Exception:
        return None
    if aof != "yes":
        return (
            "warning: Redis at REDIS_URL runs without append-only persistence: preferences, "
            "idempotency records and deferred replies will not survive its restart"
        )
    return None


def run_user(paths: Paths) -> str | None:
    """`RUN_USER` when the runner is root and that user can reach the code and the run dir.

    Creates the (system, login-less) user when missing. A repo or run directory the user cannot
    reach (a checkout under a private home, say) keeps the processes as root, with one line
    saying why.
    """
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(RUN_USER)
    except KeyError:
        # Another `up` may create it at the same moment: its failure is harmless.
        subprocess.run(
            ["useradd", "--system", "--user-group", "--no-create-home", "--home-dir",
             "/nonexistent", "--shell", "/usr/sbin/nologin", RUN_USER],
            check=False, capture_output=True,
        )  # fmt: skip
        pwd.getpwnam(RUN_USER)
    if not reaches(RUN_USER, VENV_BIN / "python", ROOT / "bot" / "__init__.py", paths.run):
        print(
            f"warning: user {RUN_USER} cannot read {ROOT} or {paths.run}: the stack's "
            "processes run as root (make them readable by others to fix it)"
        )
        return None
    return RUN_USER


def reaches(user: str, *paths: Path) -> bool:
    """Whether `user` may enter these directories, run these programs and read these files."""
    test: list[str] = []
    for path in paths:
        test += [*(["-a"] if test else []), "-x" if os.access(path, os.X_OK) else "-r"]
        test.append(str(path))
    return subprocess.run(["runuser", "-u", user, "--", "test", *test], check=False).returncode == 0


def hand_over(programs: list[Program], user: str) -> None:
    """Give each unprivileged program's data directories to `user`."""
    entry = pwd.getpwnam(user)
    for program in programs:
        for top in () if program.privileged else program.writable:
            for path in [top, *top.rglob("*")]:
                os.chown(path, entry.pw_uid, entry.pw_gid, follow_symlinks=False)


def render_supervisor(paths: Paths, programs: list[Program], user: str | None = None) -> str:
    lines = [
        "[unix_http_server]",
        f"file={paths.sock}",
        "",
        "[supervisord]",
        f"logfile={paths.logs / 'supervisord.log'}",
        f"pidfile={paths.pidfile}",
        f"directory={ROOT}",
        "logfile_maxbytes=10MB",
        "logfile_backups=1",
        "",
        "[rpcinterface:supervisor]",
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
        "",
        "[supervisorctl]",
        f"serverurl=unix://{paths.sock}",
    ]
    for p in programs:
        lines += [
            "",
            f"[program:{p.name}]",
            f"# port={p.port or '-'}",
            f"command={p.command}",
            f"priority={p.priority}",
            "autostart=true",
            "autorestart=true",
            "startsecs=1",
            "startretries=10",
            "stopsignal=TERM",
            f"stopwaitsecs={p.stopwaitsecs}",
            "stopasgroup=true",
            "killasgroup=true",
            "redirect_stderr=true",
            f"stdout_logfile={paths.logs / (p.name + '.log')}",
            "stdout_logfile_maxbytes=20MB",
            "stdout_logfile_backups=1",
        ]
        if user and not p.privileged:
            lines.append(f"user={user}")
        if p.env:
            env = ",".join(f'{k}="{v}"' for k, v in p.env.items())
            lines.append(f"environment={env}")
    return "\n".join(lines) + "\n"


def plan(settings: Settings, paths: Paths, env: dict[str, str]) -> list[Program]:
    paths.logs.mkdir(parents=True, exist_ok=True)
    return [p for build in BUILDERS for p in build(settings, paths, env)]


def _supervisorctl(paths: Paths, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(VENV_BIN / "supervisorctl"), "-c", str(paths.conf), *args],
        capture_output=True,
        text=True,
        check=False,
    )


def running(paths: Paths) -> bool:
    return paths.sock.exists() and _supervisorctl(paths, "pid").returncode == 0


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return bool(resp.status < 500)
    except (urllib.error.URLError, OSError):
        return False


def wait_ready(programs: list[Program], settings: Settings, timeout: float = 60) -> list[str]:
    """Wait for every program's readiness URL and every port; returns what is not ready."""
    deadline = time.monotonic() + timeout
    pending = list(programs)
    while pending and time.monotonic() < deadline:
        pending = [
            p
            for p in pending
            if not (
                _ready(p.ready_url)
                if p.ready_url
                else p.port is None or _answers("127.0.0.1", p.port)
            )
        ]
        if pending:
            time.sleep(0.2)
    return [p.name for p in pending]


def up(settings: Settings, paths: Paths, env: dict[str, str], timeout: float = 90) -> int:
    """Start the stack (idempotent) and print its URLs."""
    paths.run.mkdir(parents=True, exist_ok=True)
    if running(paths):
        print(f"stack already running (run dir {paths.run})")
        return status(paths)
    try:
        programs = plan(settings, paths, env)
    except SettingsError as exc:
        print(f"runner: {exc}", file=sys.stderr)
        return 2
    user = run_user(paths)
    if user:
        hand_over(programs, user)
    paths.conf.write_text(render_supervisor(paths, programs, user))
    warning = persistence_warning(settings)
    if warning and not any(p.name == "redis" for p in programs):
        print(warning)
    subprocess.run([str(VENV_BIN / "supervisord"), "-c", str(paths.conf)], env=env, check=True)
    missing = wait_ready(programs, settings, timeout)
    if missing:
        print(f"not ready after {timeout:.0f}s: {', '.join(missing)} (logs in {paths.logs})")
        return 1
    print(f"bot stack up ({settings.replicas} replicas), logs in {paths.logs}")
    print(f"  API          http://127.0.0.1:{settings.public_port}/v1/messages")
    print(f"               /v1/* answers {settings.api_access}")
    for i in range(1, settings.replicas + 1):
        print(
            f"  replica {i}    http://127.0.0.1:{settings.replica_port(i)}  "
            f"metrics http://127.0.0.1:{settings.replica_metrics_port(i)}/metrics"
        )
    print(f"  upstream stub http://127.0.0.1:{settings.stub_port}/admin/stats")
    for p in programs:
        if p.name in ("prometheus", "alertmanager", "alertsink", "worker"):
            print(f"  {p.name:<12} http://127.0.0.1:{p.port}/")
    return 0


def down(paths: Paths) -> int:
    """Stop everything `up` started; harmless when nothing runs."""
    if not running(paths):
        print("stack not running")
        return 0
    _supervisorctl(paths, "stop", "all")
    _supervisorctl(paths, "shutdown")
    pid = paths.pidfile.read_text().strip() if paths.pidfile.exists() else ""
    deadline = time.monotonic() + 30
    while pid and Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    print("stack stopped")
    return 0


def status(paths: Paths) -> int:
    """One line per process: name, state, pid, port."""
    if not running(paths):
        print("stack not running")
        return 3
    ports: dict[str, str] = {}
    name = ""
    for line in paths.conf.read_text().splitlines():
        if line.startswith("[program:"):
            name = line[len("[program:") : -1]
        elif line.startswith("# port=") and name:
            ports[name] = line.split("=", 1)[1]
    out = _supervisorctl(paths, "status").stdout
    for line in out.splitlines():
        parts = line.split()
        if not parts:
            continue
        name, state = parts[0], parts[1] if len(parts) > 1 else "?"
        m = re.search(r"pid (\d+)", line)
        print(
            f"{name:<14} {state:<9} pid={m.group(1) if m else '-':<8} port={ports.get(name, '-')}"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="runner", description=__doc__)
    parser.add_argument("action", choices=["up", "down", "status"])
    args = parser.parse_args(argv)
    env = merged_environ(dotenv=ROOT / ".env")
    try:
        settings = load_settings(env)
    except SettingsError as exc:
        print(f"runner: {exc}", file=sys.stderr)
        return 2
    paths = Paths(Path(env.get("BOT_RUN_DIR", str(ROOT / ".run"))).resolve())
    env["PATH"] = f"{VENV_BIN}:{env.get('PATH', '')}"
    if args.action == "up":
        return up(settings, paths, env)
    if args.action == "down":
        return down(paths)
    return status(paths)


if __name__ == "__main__":
    raise SystemExit(main())
