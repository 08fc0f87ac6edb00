"""The native runner: `make up | down | status` as contract.md describes.

It renders the NGINX config from its one template and a supervisord config for
`BOT_REPLICAS` replicas into a run directory (``.run/`` by default, ``BOT_RUN_DIR``), refuses
ports another process already holds, starts supervisord there, waits until every process is
ready (and Prometheus lists its targets) and prints the URLs. Redis and RabbitMQ at
`REDIS_URL` / `AMQP_URL` are reused when they answer; otherwise the runner adds its own (Redis
append-only, bounded by `BOT_REDIS_MAXMEMORY` and refusing writes, never evicting, when full;
RabbitMQ with its own config and epmd, which `down` stops too). Run as root, it starts every
process that does not need root as the unprivileged user `botstack` (created when missing),
its RabbitMQ as `rabbitmq`: only supervisord and NGINX's master (its workers run as `nobody`)
keep root. Tests use the same code with other ports and their own run directory.

What it runs is in `infra/programs.py` and `infra/observability.py`, who runs it as whom in
`infra/users.py`, supervisord in `infra/supervise.py`.

    python -m infra.runner up|down|status
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from bot.settings import Settings, SettingsError, load_settings, merged_environ
from infra import observability
from infra.common import ROOT, VENV_BIN, Paths, answers, port_free
from infra.programs import (
    Program,
    ProgramBuilder,
    core_programs,
    data_programs,
    stop_epmd,
    worker_programs,
)
from infra.supervise import running, start, status, stop
from infra.users import hand_over, run_user

# Everything `make up` runs, in this order of planning.
BUILDERS: tuple[ProgramBuilder, ...] = (
    core_programs,
    worker_programs,
    data_programs,
    observability.observability_programs,
)


def plan(settings: Settings, paths: Paths, env: dict[str, str]) -> list[Program]:
    paths.logs.mkdir(parents=True, exist_ok=True)
    return [p for build in BUILDERS for p in build(settings, paths, env)]


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
                else p.port is None or answers("127.0.0.1", p.port)
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
    # Someone else's service (Debian's own prometheus on 9090, say) would pass for ours, and
    # one that holds a port without answering (a broker out of file descriptors) would make
    # ours fail to bind: either is named here rather than found 90 s later.
    taken = [f"{p.port} ({p.name})" for p in programs if p.port and not port_free(p.port)]
    if taken:
        print(
            f"runner: another process already holds port {', '.join(taken)}: stop it, or "
            "give the stack other ports (BOT_*_PORT, REDIS_URL, AMQP_URL in .env)",
            file=sys.stderr,
        )
        return 1
    user = run_user(paths)
    hand_over(programs, user)
    warning = persistence_warning(settings)
    if warning and not any(p.name == "redis" for p in programs):
        print(warning)
    webchat_secret(paths, env)
    start(paths, programs, env, user)
    deadline = time.monotonic() + timeout
    missing = wait_ready(programs, settings, timeout)
    if not missing and any(p.name == "prometheus" for p in programs):
        # Someone opening Prometheus right after `make up` should find every target listed.
        left = max(1.0, deadline - time.monotonic())
        if not observability.wait_targets_loaded(settings, paths, left):
            missing = ["prometheus (scrape targets not loaded)"]
    if missing:
        print(f"not ready after {timeout:.0f}s: {', '.join(missing)} (logs in {paths.logs})")
        return 1
    print(f"bot stack up ({settings.replicas} replicas), logs in {paths.logs}")
    print(f"  web chat     http://127.0.0.1:{settings.public_port}/chat/")
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


WEBCHAT_SECRET_FILE = "webchat.secret"


def webchat_secret(paths: Paths, env: dict[str, str]) -> None:
    """Give the replicas a `BOT_WEBCHAT_SECRET` when none is set: one generated into the run
    directory the first time and kept there, so sessions outlive a restart of the stack."""
    if env.get("BOT_WEBCHAT_SECRET") or env.get("BOT_WEBCHAT_SECRET_FILE"):
        return
    path = paths.run / WEBCHAT_SECRET_FILE
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
    env["BOT_WEBCHAT_SECRET"] = path.read_text().strip()


def down(paths: Paths) -> int:
    """Stop everything `up` started (supervisord, its processes, our RabbitMQ's epmd)."""
    code = stop(paths)
    stop_epmd(paths)
    return code


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
