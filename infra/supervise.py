"""supervisord for the native runner: its config, starting it, asking it, stopping it."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

from infra.common import ROOT, VENV_BIN, Paths
from infra.programs import Program
from infra.users import user_of


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
        if run_as := user_of(p, user):
            lines.append(f"user={run_as}")
        if p.env:
            env = ",".join(f'{k}="{v}"' for k, v in p.env.items())
            lines.append(f"environment={env}")
    return "\n".join(lines) + "\n"


def supervisorctl(paths: Paths, *args: str) -> subprocess.CompletedProcess[str]:
    """Ask the stack's supervisord (`status`, `pid NAME`, `stop NAME`...)."""
    return subprocess.run(
        [str(VENV_BIN / "supervisorctl"), "-c", str(paths.conf), *args],
        capture_output=True,
        text=True,
        check=False,
    )


def running(paths: Paths) -> bool:
    return paths.sock.exists() and supervisorctl(paths, "pid").returncode == 0


def start(paths: Paths, programs: list[Program], env: dict[str, str], user: str | None) -> None:
    """Write supervisord's config for `programs` and start it (it daemonizes)."""
    paths.conf.write_text(render_supervisor(paths, programs, user))
    subprocess.run([str(VENV_BIN / "supervisord"), "-c", str(paths.conf)], env=env, check=True)


def stop(paths: Paths) -> int:
    """Stop every supervised process and supervisord; harmless when nothing runs."""
    if not running(paths):
        print("stack not running")
        return 0
    # Its pid before the shutdown: supervisord may remove its pidfile before it exits.
    pid = paths.pidfile.read_text().strip() if paths.pidfile.exists() else ""
    supervisorctl(paths, "stop", "all")
    supervisorctl(paths, "shutdown")
    deadline = time.monotonic() + 30
    while pid and Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    if pid and Path(f"/proc/{pid}").exists():
        print(f"supervisord (pid {pid}) is still stopping after 30 s", file=sys.stderr)
        return 1
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
    out = supervisorctl(paths, "status").stdout
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
