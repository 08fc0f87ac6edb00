"""One wrk measurement: requests/s, latency percentiles and CPU per request."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson
import psutil

HERE = Path(__file__).resolve().parent
_WRK_JSON = re.compile(r"^WRK_JSON (\{.*\})$", re.M)


@dataclass
class Result:
    name: str
    what: str
    url: str
    requests: int = 0
    seconds: float = 0.0
    rps: float = 0.0  # all answers
    ok_rps: float = 0.0  # 2xx/3xx answers only
    non_2xx: int = 0
    socket_errors: int = 0
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    cpu_us_per_req: float = 0.0  # the serving processes (NGINX, replicas...)
    redis_cpu_us_per_req: float | None = None
    wrk_cpu_us_per_req: float = 0.0
    machine_busy: float = 0.0  # share of all cores busy during the run (others included)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.Error:
            continue
    return total


def with_children(pids: list[int]) -> list[int]:
    out = set(pids)
    for pid in pids:
        try:
            out.update(c.pid for c in psutil.Process(pid).children(recursive=True))
        except psutil.Error:
            continue
    return sorted(out)


def wrk_binary() -> str:
    path = shutil.which("wrk")
    if not path:
        raise RuntimeError("wrk is not installed (Debian package `wrk`; `make install` adds it)")
    return path


def run_wrk(
    name: str,
    what: str,
    url: str,
    script: str,
    args: list[str],
    *,
    duration: float,
    connections: int,
    threads: int,
    pids: list[int],
    redis_pids: list[int] | None = None,
) -> Result:
    """Run wrk once; CPU is measured on `pids` (and their children) over the same window."""
    pids = with_children(pids)
    cmd = [
        wrk_binary(),
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        "--timeout",
        "10s",
        "-s",
        str(HERE / script),
        url,
        "--",
        *args,
    ]
    cpu0 = _cpu_seconds(pids)
    redis0 = _cpu_seconds(redis_pids or [])
    machine0 = psutil.cpu_times()
    children0 = os.times()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=duration + 60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    wrk_cpu = _children_cpu_since(children0)
    cpu1 = _cpu_seconds(pids)
    redis1 = _cpu_seconds(redis_pids or [])
    machine1 = psutil.cpu_times()
    m = _WRK_JSON.search(out.decode())
    if proc.returncode != 0 or not m:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {err.decode()[-500:]}")
    data = orjson.loads(m.group(1))
    n = max(1, int(data["requests"]))
    secs = data["duration_us"] / 1e6
    errors = data["errors"]
    socket_errors = sum(errors[k] for k in ("connect", "read", "write", "timeout"))
    lat = data["latency_us"]
    busy0 = sum(machine0) - machine0.idle - getattr(machine0, "iowait", 0.0)
    busy1 = sum(machine1) - machine1.idle - getattr(machine1, "iowait", 0.0)
    wall = sum(machine1) - sum(machine0)
    result = Result(
        name=name,
        what=what,
        url=url,
        requests=int(data["requests"]),
        seconds=round(secs, 2),
        rps=round(n / secs, 1),
        ok_rps=round((n - errors["status"]) / secs, 1),
        non_2xx=int(errors["status"]),
        socket_errors=int(socket_errors),
        p50_ms=round(lat["p50"] / 1000, 2),
        p90_ms=round(lat["p90"] / 1000, 2),
        p99_ms=round(lat["p99"] / 1000, 2),
        cpu_us_per_req=round((cpu1 - cpu0) * 1e6 / n, 1),
        redis_cpu_us_per_req=round((redis1 - redis0) * 1e6 / n, 1) if redis_pids else None,
        wrk_cpu_us_per_req=round(wrk_cpu * 1e6 / n, 1),
        machine_busy=round((busy1 - busy0) / wall, 3) if wall > 0 else 0.0,
    )
    if errors["status"] > 0.01 * n:
        result.notes.append(f"{errors['status']} answers were not 2xx")
    if socket_errors:
        result.notes.append(f"{socket_errors} socket errors")
    return result


def _children_cpu_since(before: os.times_result) -> float:
    """CPU seconds of child processes (wrk) reaped since `before`."""
    now = os.times()
    return (now.children_user - before.children_user) + (
        now.children_system - before.children_system
    )
