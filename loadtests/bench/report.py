"""The benchmark's report: a table row per measurement, the ratios, the saved JSON."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import orjson

from loadtests.bench.config import BenchConfig
from loadtests.bench.measure import Result


def header() -> str:
    """cpu us/req: every serving process; bot us: the Python replicas alone; redis us: Redis's
    INFO cpu (anything else using that Redis included); gen us: wrk's own; busy: the share of
    the machine's cores busy; others: cores busy with work not charged here (another agent's
    tests on a shared machine: rows with others near 0 are the ones to trust)."""
    return (
        f"{'measurement':<20} {'req/s':>9} {'ok req/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'cpu us/req':>10} {'bot us':>7} {'redis us':>9} {'gen us':>7} {'busy':>5} "
        f"{'others':>6}  notes"
    )


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def row(r: Result) -> str:
    return (
        f"{r.name:<20} {r.rps:>9.0f} {r.ok_rps:>9.0f} {r.p50_ms:>8.2f} {r.p99_ms:>8.2f} "
        f"{r.cpu_us_per_req:>10.0f} {_us(r.replica_cpu_us_per_req):>7} "
        f"{_us(r.redis_cpu_us_per_req):>9} {r.wrk_cpu_us_per_req:>7.0f} "
        f"{r.machine_busy:>5.0%} {r.others_cores:>6.2f}  {'; '.join(r.notes)}"
    )


def summary(
    cfg: BenchConfig, r: dict[str, Result], profile: dict[str, Any] | None
) -> dict[str, Any]:
    """Every row, and the ratios of the full path to the machine's ceilings."""

    def ratio(a: str, b: str) -> float | None:
        if a in r and b in r and r[b].ok_rps:
            return round(r[a].ok_rps / r[b].ok_rps, 3)
        return None

    def uncapped(name: str, fallback: str) -> str:
        # A row NGINX's per-address guard capped says nothing about the stack's speed.
        found = r.get(name)
        return name if found and found.non_2xx <= 0.01 * found.requests else fallback

    full = uncapped("echo", "limiter_on")
    hit = uncapped("cache_hit", "cache_hit_open")
    ratios = {
        f"{full} / nginx_static": ratio(full, "nginx_static"),
        f"{full} / bare_replica": ratio(full, "bare_replica"),
        f"{full} / replicas_via_nginx": ratio(full, "replicas_via_nginx"),
        f"{hit} / nginx_static": ratio(hit, "nginx_static"),
        f"{hit} / {full}": ratio(hit, full),
        "limiter_on / limiter_off": ratio("limiter_on", "limiter_off"),
    }
    goals = _goals(r, full, hit)
    return {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "target": cfg.target,
        "replicas": cfg.stack.replicas,
        "duration_s": cfg.duration,
        "connections": cfg.connections,
        "threads": cfg.threads,
        "cores": os.cpu_count() or 0,
        "results": {k: v.to_json() for k, v in r.items()},
        "full_path_row": full,
        "cache_hit_row": hit,
        "ratios": ratios,
        "goals": goals,
        "profile": profile,
    }


def _goals(r: dict[str, Result], full: str, hit: str) -> dict[str, float | None]:
    """The hot path's figures that issue 17 sets goals for (in `docs/scaling.md`)."""
    half = r.get("half_load")
    return {
        f"replica cpu us/msg ({full})": r[full].replica_cpu_us_per_req if full in r else None,
        f"replica cpu us/msg ({hit})": r[hit].replica_cpu_us_per_req if hit in r else None,
        f"redis cpu us/msg ({full})": r[full].redis_cpu_us_per_req if full in r else None,
        "half_load p50 ms": half.p50_ms if half else None,
        "half_load p99 ms": half.p99_ms if half else None,
    }


def print_summary(summary: dict[str, Any]) -> None:
    print("ratios (ok req/s):")
    for k, v in summary["ratios"].items():
        print(f"  {k:<36} {'-' if v is None else f'{v:.3f}'}")
    print("per message:")
    for k, v in summary.get("goals", {}).items():
        print(f"  {k:<36} {'-' if v is None else f'{v:.1f}'}")
    prof = summary.get("profile") or {}
    if prof.get("by_component"):
        print(f"profile of replica 1 under /echo ({prof['samples']} samples, {prof['file']}):")
        for f, share in prof["by_component"][:8]:
            print(f"  component {share:>6.1%}  {f}")
        for f, share in prof["bot_inclusive"][:10]:
            print(f"  bot code  {share:>6.1%}  {f}")
        for f, share in prof["self"][:10]:
            print(f"  self      {share:>6.1%}  {f}")


def save(report_root: Path, summary: dict[str, Any]) -> Path:
    """``reports/bench-<time>.json``."""
    report_root.mkdir(parents=True, exist_ok=True)
    out = report_root / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
    return out
