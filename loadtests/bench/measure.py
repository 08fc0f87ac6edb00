"""One wrk measurement (closed loop, as fast as it goes; or open loop at a fixed rate with
`paced.lua`) and what it cost: requests/s, latency percentiles, CPU per request of the serving
processes, of the replicas alone and of Redis (its own `INFO cpu`)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson
import psutil
import redis

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
    replica_cpu_us_per_req: float | None = None  # the Python replicas alone
    redis_cpu_us_per_req: float | None = None  # Redis's INFO cpu (others' commands included)
    wrk_cpu_us_per_req: float = 0.0  # the load generator's
    machine_busy: float = 0.0  # share of all cores busy during the run (others included)
    others_cores: float = 0.0  # cores busy with anything not charged here (other agents' work)
    target_rps: float | None = None  # the open-loop row's fixed rate
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Charged:
    """Whose CPU a measurement is charged to."""

    pids: list[int]  # every serving process (children found at the start)
    replicas: list[int] | None = None  # the Python replicas among them
    redis_url: str | None = None  # a Redis whose INFO cpu counts


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


def redis_cpu_seconds(url: str | None) -> float | None:
    """Redis's own CPU seconds (`INFO cpu`, every thread), or None when it does not answer."""
    if not url:
        return None
    try:
        client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        with client:
            info: dict[str, Any] = client.info("cpu")  # type: ignore[assignment]
    except (redis.RedisError, OSError):
        return None
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


@dataclass
class _Window:
    cpu: float = 0.0
    replica_cpu: float | None = None
    redis_cpu: float | None = None
    gen_cpu: float = 0.0  # the load generator's: reaped children of this process
    busy: float = 0.0
    others: float = 0.0


@contextlib.contextmanager
def _metered(charged: Charged) -> Iterator[_Window]:
    """CPU spent by `charged` (and the machine) while the block runs."""
    pids = with_children(charged.pids)
    replicas = with_children(charged.replicas) if charged.replicas is not None else None
    w = _Window()
    cpu0 = _cpu_seconds(pids)
    rep0 = _cpu_seconds(replicas) if replicas is not None else 0.0
    redis0 = redis_cpu_seconds(charged.redis_url)
    machine0 = psutil.cpu_times()
    children0 = os.times()
    yield w
    now = os.times()
    w.gen_cpu = (now.children_user - children0.children_user) + (
        now.children_system - children0.children_system
    )
    w.cpu = _cpu_seconds(pids) - cpu0
    if replicas is not None:
        w.replica_cpu = _cpu_seconds(replicas) - rep0
    redis1 = redis_cpu_seconds(charged.redis_url)
    if redis0 is not None and redis1 is not None:
        w.redis_cpu = redis1 - redis0
    machine1 = psutil.cpu_times()
    busy0 = sum(machine0) - machine0.idle - getattr(machine0, "iowait", 0.0)
    busy1 = sum(machine1) - machine1.idle - getattr(machine1, "iowait", 0.0)
    wall = sum(machine1) - sum(machine0)  # every core's
    if wall > 0:
        w.busy = (busy1 - busy0) / wall
        elapsed = wall / (psutil.cpu_count() or 1)
        ours = w.cpu + (w.redis_cpu or 0.0) + w.gen_cpu
        w.others = max(0.0, (busy1 - busy0 - ours) / elapsed)


def _charge(result: Result, w: _Window) -> Result:
    n = max(1, result.requests)

    def per(seconds: float | None) -> float | None:
        return None if seconds is None else round(seconds * 1e6 / n, 1)

    result.cpu_us_per_req = per(w.cpu) or 0.0
    result.replica_cpu_us_per_req = per(w.replica_cpu)
    result.redis_cpu_us_per_req = per(w.redis_cpu)
    result.wrk_cpu_us_per_req = per(w.gen_cpu) or 0.0
    result.machine_busy = round(w.busy, 3)
    result.others_cores = round(w.others, 2)
    if result.non_2xx > 0.01 * n:
        result.notes.append(f"{result.non_2xx} answers were not 2xx")
    if result.socket_errors:
        result.notes.append(f"{result.socket_errors} socket errors")
    return result


def wrk_binary() -> str:
    path = shutil.which("wrk")
    if not path:
        raise RuntimeError("wrk is not installed (Debian package `wrk`; `make install` adds it)")
    return path


def _communicate(cmd: list[str], timeout: float) -> tuple[int, str, str]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return proc.returncode, out.decode(), err.decode()


def run_wrk(
    name: str,
    url: str,
    script: str,
    args: list[str],
    *,
    duration: float,
    connections: int,
    threads: int,
    charged: Charged,
) -> Result:
    """Run wrk once; CPU is measured on `charged` over the same window."""
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
    with _metered(charged) as w:
        code, out, err = _communicate(cmd, duration + 60)
    m = _WRK_JSON.search(out)
    if code != 0 or not m:
        raise RuntimeError(f"wrk failed ({code}): {err[-500:]}")
    data = orjson.loads(m.group(1))
    n = max(1, int(data["requests"]))
    secs = data["duration_us"] / 1e6
    errors = data["errors"]
    lat = data["latency_us"]
    result = Result(
        name=name,
        what="",
        url=url,
        requests=int(data["requests"]),
        seconds=round(secs, 2),
        rps=round(n / secs, 1),
        ok_rps=round((n - errors["status"]) / secs, 1),
        non_2xx=int(errors["status"]),
        socket_errors=sum(int(errors[k]) for k in ("connect", "read", "write", "timeout")),
        p50_ms=round(lat["p50"] / 1000, 2),
        p90_ms=round(lat["p90"] / 1000, 2),
        p99_ms=round(lat["p99"] / 1000, 2),
    )
    return _charge(result, w)
