"""The load tests' verdict logic, and a 20-second `steady` run against a real stack."""

from __future__ import annotations

import os
import sys
from collections import Counter
from pathlib import Path

import orjson
import pytest

from loadtests import slo
from loadtests.config import Objectives, load_config
from loadtests.shapes import plan_for
from loadtests.tally import Tally, percentile
from tests.support import Stack, run

ROOT = Path(__file__).resolve().parent.parent


def _tally(phases: dict[str, tuple[int, int, int]]) -> Tally:
    """phase -> (requests, latency ms of each, sheds), each phase 10 s long."""
    t = Tally()
    for i, (name, (n, ms, shed)) in enumerate(phases.items()):
        t.phases[name] = [100.0 + 10 * i, 110.0 + 10 * i]
        t.count(name, slo.REQUESTS, n)
        t.count(name, slo.ANSWERED, n)
        t.count(name, slo.SHED, shed)
        t.latency[name] = Counter({ms: n - shed})
    return t


def test_percentile_of_histogram() -> None:
    assert percentile({10: 98, 500: 1, 900: 1}, 0.99) == 500
    assert percentile({10: 98, 500: 1, 900: 1}, 0.50) == 10
    assert percentile({}, 0.99) == 0


def test_tally_merges_worker_reports() -> None:
    worker, master = Tally(), Tally()
    worker.count("run", slo.REQUESTS, 3)
    worker.observe("run", 123.4)
    worker.queue("u1", "m1")
    master.merge(orjson.loads(orjson.dumps(worker.drain())))
    assert master.total(slo.REQUESTS) == 3 and master.hist() == {120: 1}
    assert master.queued == {"u1": ["m1"]} and worker.total(slo.REQUESTS) == 0


def test_verdict_fails_on_unexpected_5xx_and_slow_p99() -> None:
    t = _tally({"run": (100, 50, 0)})
    assert slo.evaluate("steady", t, Objectives()).passed
    t.count("run", slo.OTHER_5XX)
    failed = {
        c.name for c in slo.evaluate("steady", t, Objectives(p99_ms=10)).checks if not c.passed
    }
    assert failed == {"no_unexpected_5xx", "p99"}


def test_ramp_knee_is_the_last_step_within_objectives() -> None:
    t = _tally({"step-1": (100, 50, 0), "step-2": (200, 80, 0), "step-3": (300, 4000, 30)})
    verdict = slo.evaluate("ramp", t, Objectives(p99_ms=1000, min_knee_rps=15))
    ramp = verdict.figures["ramp"]
    assert ramp["knee_phase"] == "step-2" and ramp["broke_at"] == "step-3"
    assert ramp["knee_rps"] == 20.0 and verdict.passed  # past the knee does not count


def test_outage_needs_every_queued_message_delivered_once() -> None:
    t = _tally({"outage": (10, 5, 0)})
    t.count("outage", slo.QUEUED, 2)
    obj = Objectives(exactly_once=True, min_queued=1)
    inbox = {"queued": 2, "delivered": 2, "missing": [], "duplicated": []}
    assert slo.evaluate("outage", t, obj, {"inbox": inbox}).passed
    inbox = {"queued": 2, "delivered": 1, "missing": ["m2"], "duplicated": []}
    assert not slo.evaluate("outage", t, obj, {"inbox": inbox}).passed
    assert not slo.evaluate("outage", t, obj, {}).passed  # no inbox check: no pass


def test_soak_fails_on_memory_that_keeps_growing() -> None:
    t = _tally({"run": (100, 5, 0)})
    flat = {"bot-1[1]": [[float(i), 100.0 + (i % 2)] for i in range(40)]}
    leak = {"bot-1[1]": [[float(i), 100.0 + 5 * i] for i in range(40)]}
    assert slo.evaluate("soak", t, Objectives(), {"memory": flat}).passed
    assert not slo.evaluate("soak", t, Objectives(), {"memory": leak}).passed


def test_spike_plan_goes_ten_times_up_within_ten_seconds_and_back() -> None:
    cfg = load_config("spike", {"BOT_DOTENV": "/dev/null"})
    plan = plan_for(cfg)
    base, peak = plan.at(0), plan.at(cfg.spike_baseline + cfg.spike_rise + 1)
    assert base and peak and peak.users == 10 * base.users
    assert (peak.users - base.users) / peak.spawn_rate <= 10
    end = plan.at(plan.length - 1)
    assert end and end.users == base.users and plan.at(plan.length) is None


def test_load_is_only_sent_to_loopback() -> None:
    with pytest.raises(ValueError, match=r"127\.0\.0\.1"):
        load_config("steady", {"BOT_DOTENV": "/dev/null", "LOAD_TARGET_URL": "http://10.0.0.1"})


@pytest.mark.system
def test_steady_smoke_passes_and_an_impossible_objective_fails(
    stack: Stack, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        **stack.env,
        "BOT_DOTENV": "/dev/null",
        "LOAD_DURATION": "20",
        "LOAD_REPORT_DIR": str(tmp_path),
    }
    done = run([sys.executable, "-m", "loadtests.run", "steady"], env=env, cwd=ROOT, timeout=150)
    assert done.returncode == 0, done.stdout + done.stderr
    (report,) = tmp_path.glob("steady-*")
    summary = orjson.loads((report / "summary.json").read_bytes())
    assert summary["passed"] and summary["figures"]["requests"] > 50
    assert (report / "locust.html").exists() and (report / "locust_stats.csv").exists()

    # The same run judged against an objective nothing can meet must fail.
    env["LOAD_P99_MS"] = "0.001"
    judged = run([sys.executable, "-m", "loadtests.run", "--judge", str(report)], env=env, cwd=ROOT)
    assert judged.returncode == 1, judged.stdout + judged.stderr
    assert "FAIL" in judged.stdout
    summary = orjson.loads((report / "summary.json").read_bytes())
    assert [c["name"] for c in summary["checks"] if not c["passed"]] == ["p99"]
