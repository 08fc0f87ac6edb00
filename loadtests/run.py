"""Run one load scenario headless against the running stack and judge it.

    python -m loadtests.run SCENARIO          # make loadtest SCENARIO=spike
    python -m loadtests.run --judge DIR       # judge a saved run again (objectives from env)

Writes locust's CSV and HTML, the raw tally and `summary.json` to
``reports/<scenario>-<time>/``, prints a short summary and exits 1 when a check fails
(2 when the run itself could not happen).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import orjson
import requests

from bot.settings import SettingsError
from loadtests import channels, observe, slo
from loadtests.config import SCENARIOS, ConfigError, LoadConfig, load_config
from loadtests.shapes import plan_for
from loadtests.tally import Tally

LOCUSTFILE = Path(__file__).with_name("locustfile.py")


def _preflight(cfg: LoadConfig) -> str | None:
    try:
        resp = requests.get(f"{cfg.target}/healthz", timeout=3)
    except requests.RequestException as exc:
        return f"the stack does not answer at {cfg.target} ({type(exc).__name__}); `make up`?"
    if resp.status_code != 200:
        return f"{cfg.target}/healthz answered {resp.status_code}"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def run_locust(cfg: LoadConfig, run_dir: Path) -> int:
    """Locust, headless, playing the scenario's shape; its output goes to locust.log."""
    length = plan_for(cfg).length
    cmd = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--host",
        cfg.target,
        "--csv",
        str(run_dir / "locust"),
        "--html",
        str(run_dir / "locust.html"),
        "--only-summary",
        "--exit-code-on-error",
        "0",
        "--stop-timeout",
        "5",
        "--loglevel",
        "WARNING",
        # A bound even if the shape misbehaves.
        "--run-time",
        f"{int(length) + 30}s",
    ]
    if cfg.processes > 1 or cfg.scenario in ("hostile", "webchat"):
        # Master and workers. The hostile clients (and webchat's idle streams) run in the
        # master, which plays the shape but runs no user: what they cost the load generator
        # never shows as user latency.
        # On a port of its own: locust's fixed 5557 is taken by any other run on the machine.
        port = _free_port()
        cmd += ["--processes", str(cfg.processes)]
        cmd += ["--master-bind-port", str(port), "--master-port", str(port)]
    env = {
        **os.environ,
        "LOAD_SCENARIO": cfg.scenario,
        "LOAD_RUN_DIR": str(run_dir),
    }
    with (run_dir / "locust.log").open("wb") as log:
        proc = subprocess.run(
            cmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=length + 120, check=False
        )
    return proc.returncode


def judge(cfg: LoadConfig, raw: dict[str, Any]) -> slo.Verdict:
    tally = Tally.from_json(raw["tally"])
    return slo.evaluate(cfg.scenario, tally, cfg.objectives, raw.get("findings"))


def report(cfg: LoadConfig, run_dir: Path, raw: dict[str, Any]) -> int:
    """Judge, write summary.json, print the summary; the exit code."""
    verdict = judge(cfg, raw)
    summary = {
        "scenario": cfg.scenario,
        "passed": verdict.passed,
        "target": cfg.target,
        "started": raw.get("started"),
        "seconds": raw.get("seconds"),
        "checks": [c.__dict__ for c in verdict.checks],
        "figures": verdict.figures,
        "prometheus": raw.get("findings", {}).get("prometheus"),
        "inbox": raw.get("findings", {}).get("inbox"),
        "probe": raw.get("findings", {}).get("probe"),
        "channels": raw.get("findings", {}).get("channels"),
        "examples": raw["tally"].get("examples", []),
        "config": cfg.public(),
        "report_dir": str(run_dir),
    }
    (run_dir / "summary.json").write_bytes(
        orjson.dumps(summary, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS)
    )
    print(render(summary))
    return 0 if verdict.passed else 1


def render(summary: dict[str, Any]) -> str:
    f = summary["figures"]
    lines = [
        f"scenario {summary['scenario']} against {summary['target']}: "
        f"{'PASSED' if summary['passed'] else 'FAILED'}",
        f"  {f['requests']} requests in {summary.get('seconds') or 0:.0f} s, "
        f"p50 {f['p50_ms']:.0f} ms, p99 {f['p99_ms']:.0f} ms, cache hits "
        f"{f['cache_hit_ratio']:.0%} of {f['questions']} answered questions, queued {f['queued']}",
    ]
    for name, p in f.get("phases", {}).items():
        lines.append(
            f"  phase {name:<9} users {p['users'] or '-':>4}  {p['rps']:>7.1f} req/s  "
            f"p50 {p['p50_ms']:>5.0f} ms  p99 {p['p99_ms']:>5.0f} ms  shed {p['shed']}  "
            f"5xx {p['other_5xx']}  no-json {p['no_json']}"
        )
    if f.get("abuse_requests"):
        lines.append(
            f"  abusers: {f['abuse_requests']} requests, {f['limited_abuse']} rate limited"
        )
    if "ramp" in f:
        r = f["ramp"]
        lines.append(
            f"  knee: {r['knee_rps']} answers/s at {r['knee_users']} users "
            f"({'not reached' if r['reached_end'] else 'broke at ' + str(r['broke_at'])})"
        )
    if "hostile" in f:
        h = f["hostile"]
        for name, w in h["well_behaved"].items():
            lines.append(
                f"  well-behaved {name:<7} {w['requests']:>6} requests  "
                f"{w['success_share']:.3%} 200/202  p50 {w['p50_ms']:.0f} ms  "
                f"p99 {w['p99_ms']:.0f} ms"
            )
        lines.append(
            f"  hostile: {h['requests']} requests, {h['long_polls_open_peak']} long polls open "
            f"at the peak, {h['long_polls_held']} held >= 5 s, "
            f"{h['closed_without_answer']} closed without an answer, all stopped in "
            f"{h['stop_seconds']} s"
        )
        for kind, by_status in sorted(h["by_kind"].items()):
            statuses = ", ".join(f"{s}: {n}" for s, n in sorted(by_status.items()))
            lines.append(f"    {kind:<13} {statuses}")
    if "webchat" in f:
        w = f["webchat"]
        lines.append(
            f"  webchat: {w['streams_open_at_end']}/{w['streams_target']} idle event streams "
            f"open at the end (peak {w['streams_open_peak']}), {w['stream_drops']} dropped, "
            f"{w['keepalives']} keep-alives read"
        )
    if "overload" in f:
        o = f["overload"]
        d, a = o["well_behaved_during"], o["well_behaved_after"]
        lines.append(
            f"  overload: {o['surge_users']} surge users, offered {o['offered_rps']} req/s, "
            f"answered 200/202 {o['answered_2xx_rps']}/s, surge shed {o['surge_shed_share']:.1%}, "
            f"recovered in {o['recovery_s']} s"
        )
        lines.append(
            f"  well-behaved during {d['success_share']:.2%} 200/202, p99 {d['p99_ms']:.0f} ms; "
            f"after {a['success_share']:.2%}, p99 {a['p99_ms']:.0f} ms"
        )
    if "channels" in f:
        c = f["channels"]
        lines.append(
            f"  channels {', '.join(c['platforms'])}: {c['acked']} webhooks acked within "
            f"{c['webhooks_seconds']} s (peak {c['webhooks_peak_per_s']}/s; p50 "
            f"{c['ack_p50_ms']:.0f} ms, p99 {c['ack_p99_ms']:.0f} ms, {c['resent']} resent); "
            f"{c['delivered']}/{c['expected']} answered in {c['chats']} chats, "
            f"{c['missing']} missing, {c['duplicates']} duplicates, "
            f"{c['out_of_order_chats']} chats out of order, all sent "
            f"{c['all_sent_after_s']} s after the start"
        )
    for name, m in (f.get("memory") or {}).items() if summary["scenario"] == "soak" else ():
        lines.append(
            f"  memory {name:<20} {m['start_mb']:>7.1f} -> {m['end_mb']:>7.1f} MB "
            f"(peak {m['peak_mb']:.1f})"
        )
    for c in summary["checks"]:
        mark = "ok  " if c["passed"] else "FAIL"
        lines.append(f"  [{mark}] {c['objective']}: {c['actual']}")
    prom = summary.get("prometheus")
    if prom:
        lines.append(
            f"  prometheus ({prom['window']}): {prom.get('requests')} requests, "
            f"5xx {prom.get('http_5xx')}, shed {prom.get('shed')}, "
            f"cache hit ratio {prom.get('cache_hit_ratio')}"
        )
    for e in summary.get("examples", [])[:5]:
        lines.append(f"  e.g. {e}")
    lines.append(
        f"  report: {summary['report_dir']}/ (locust.html, locust_stats.csv, summary.json)"
    )
    return "\n".join(lines)


def run(cfg: LoadConfig) -> int:
    problem = _preflight(cfg)
    if problem:
        print(f"loadtest: {problem}", file=sys.stderr)
        return 2
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(cfg.report_root) / f"{cfg.scenario}-{stamp}"
    run_dir.mkdir(parents=True, exist_ok=True)
    print(
        f"loadtest {cfg.scenario}: ~{plan_for(cfg).length:.0f} s against {cfg.target}, "
        f"report in {run_dir}/",
        flush=True,
    )
    if cfg.scenario == "spike" and cfg.spike_overload:
        _warn_edge_guard(cfg)
    if cfg.scenario == "channels":
        print(f"  chats on {', '.join(channels.platforms(cfg))}", flush=True)
    sampler = observe.MemorySampler(cfg)
    sampler.start()
    started = time.time()
    try:
        code = run_locust(cfg, run_dir)
    finally:
        if cfg.scenario == "outage":
            _recover_stub(cfg)
    tally_file = run_dir / "tally.json"
    if not tally_file.exists():
        sampler.stop()
        print(f"loadtest: locust exited {code} without results; see {run_dir}/locust.log")
        return 2
    tally_json = orjson.loads(tally_file.read_bytes())
    findings: dict[str, Any] = {}
    if cfg.objectives.exactly_once:
        findings["inbox"] = observe.check_inboxes(cfg, Tally.from_json(tally_json).queued)
    if cfg.scenario == "channels":
        expected = Tally.from_json(tally_json).queued
        tag = channels.run_tag(str(run_dir))
        findings["channels"] = channels.check_sends(cfg, expected, tag, started)
    if cfg.scenario == "hostile":
        addresses = Tally.from_json(tally_json).notes.get("hostile_addresses") or []
        findings["probe"] = observe.probe(cfg, addresses)
    findings["memory"] = sampler.stop()
    ended = time.time()
    findings["prometheus"] = observe.prometheus_view(cfg, started, ended)
    raw = {
        "scenario": cfg.scenario,
        "tally": tally_json,
        "findings": findings,
        "started": started,
        "seconds": ended - started,
    }
    (run_dir / "raw.json").write_bytes(orjson.dumps(raw))
    return report(cfg, run_dir, raw)


def _warn_edge_guard(cfg: LoadConfig) -> None:
    """The surge comes from 127.0.0.1 like the users: NGINX's per-address guard may cap it."""
    conns = cfg.users + cfg.spike_overload_users
    if conns > cfg.stack.edge_conn:
        print(
            f"loadtest: the overload holds {conns} connections from one address, over NGINX's "
            f"BOT_EDGE_CONN={cfg.stack.edge_conn}: its 429s will reach the users too. Run it "
            f"against a smaller stack (BOT_REPLICAS=2 BOT_MAX_INFLIGHT=16) or set "
            f"LOAD_SPIKE_OVERLOAD_USERS",
            file=sys.stderr,
        )


def _recover_stub(cfg: LoadConfig) -> None:
    try:
        requests.post(f"{cfg.stub}/admin/faults", json={"outage": False}, timeout=5)
    except requests.RequestException as exc:
        print(f"loadtest: could not end the stub's outage: {exc}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="loadtests.run", description=__doc__)
    parser.add_argument("scenario", nargs="?", choices=SCENARIOS)
    parser.add_argument("--judge", metavar="DIR", help="judge a saved run again")
    args = parser.parse_args(argv)
    try:
        if args.judge:
            run_dir = Path(args.judge)
            raw = orjson.loads((run_dir / "raw.json").read_bytes())
            return report(load_config(args.scenario or raw["scenario"]), run_dir, raw)
        if not args.scenario:
            parser.error("a scenario is needed: " + ", ".join(SCENARIOS))
        return run(load_config(args.scenario))
    except (ConfigError, SettingsError) as exc:
        print(f"loadtest: {exc}", file=sys.stderr)
        return 2
    except Exception:
        # A broken run is not a failed verdict: 2, never 1.
        traceback.print_exc()
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
