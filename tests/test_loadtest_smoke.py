"""The load tests' verdict logic, a 20-second `steady` run against a real stack, and short
`hostile` and `channels` runs against private ones."""

from __future__ import annotations

import os
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from loadtests import channels, hostile, slo, webchat
from loadtests.config import HOSTILE_KINDS, ConfigError, Objectives, load_config
from loadtests.shapes import (
    AFTER,
    ATTACK,
    OVERLOAD,
    RECOVERY,
    STREAMS_OPEN,
    Plan,
    Step,
    plan_for,
)
from loadtests.tally import Tally, percentile
from tests.support import Stack, claim_redis_db, release_redis_db, run, stack_dir, stack_env, unique

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


def _steps(plan: Plan) -> list[Step]:
    """The plan's step at every second."""
    return [s for t in range(int(plan.length)) if (s := plan.at(t)) is not None]


def test_spike_overload_goes_past_what_the_stack_holds_in_flight_and_comes_back() -> None:
    env = {"BOT_DOTENV": "/dev/null", "BOT_REPLICAS": "2", "BOT_MAX_INFLIGHT": "16"}
    cfg = load_config("spike", env)
    plan = plan_for(cfg)
    phases = [s.phase for s in _steps(plan)]
    assert list(dict.fromkeys(phases)) == [
        "baseline",
        "rise",
        "hold",
        "between",
        OVERLOAD,
        RECOVERY,
    ]
    surge = next(s for s in _steps(plan) if s.surge)
    assert surge.surge == 3 * 2 * 16 and surge.users == cfg.users
    assert surge.surge / surge.spawn_rate <= 2  # a spike, not a ramp
    # Without the overload, the spike is the absorbable one alone.
    short = plan_for(load_config("spike", {**env, "LOAD_SPIKE_OVERLOAD": "0"}))
    assert not any(s.surge for s in _steps(short))
    assert short.length == plan.length - cfg.spike_between - cfg.spike_overload


def test_hostile_plan_runs_hostile_clients_only_between_calm_phases() -> None:
    cfg = load_config("hostile", {"BOT_DOTENV": "/dev/null", "LOAD_HOSTILE_CALM": "5"})
    plan = plan_for(cfg)
    steps = [(s.phase, s.hostile) for s in _steps(plan)]
    assert list(dict.fromkeys(steps)) == [("calm", False), (ATTACK, True), (AFTER, False)]
    assert plan.length == 10 + cfg.duration and plan.at(plan.length) is None
    with pytest.raises(ConfigError, match="LOAD_HOSTILE_KINDS"):
        load_config("hostile", {"BOT_DOTENV": "/dev/null", "LOAD_HOSTILE_KINDS": "nope"})


def test_webchat_plan_holds_streams_through_a_judged_run_after_they_open() -> None:
    env = {"BOT_DOTENV": "/dev/null", "LOAD_WEBCHAT_OPEN": "10", "LOAD_DURATION": "30"}
    plan = plan_for(load_config("webchat", env))
    steps = [(s.phase, s.streams) for s in _steps(plan)]
    assert list(dict.fromkeys(steps)) == [(STREAMS_OPEN, True), ("run", True)]
    assert plan.length == 15 + 30 and plan.at(plan.length) is None


def _webchat_run(held: int, drops_in_run: int = 0, ms: float = 50, open_ms: float = 50) -> Tally:
    t = Tally()
    for i, (phase, latency) in enumerate(((STREAMS_OPEN, open_ms), ("run", ms))):
        t.phases[phase] = [i * 100.0, (i + 1) * 100.0]
        t.count(phase, slo.REQUESTS, 1000)
        t.count(phase, slo.ANSWERED, 1000)
        for _ in range(1000):
            t.observe(phase, latency)
    t.count(STREAMS_OPEN, webchat.DROPS, 3)  # refused while opening: not judged
    t.count("run", webchat.DROPS, drops_in_run)
    t.notes[webchat.TARGET] = 2000
    t.notes[webchat.OPEN_AT_END] = held
    return t


def test_webchat_verdict_needs_the_streams_held_and_the_message_path_in_objective() -> None:
    obj = load_config("webchat", {"BOT_DOTENV": "/dev/null"}).objectives
    assert slo.evaluate("webchat", _webchat_run(2000), obj).passed
    failed = {
        c.name for c in slo.evaluate("webchat", _webchat_run(1900), obj).checks if not c.passed
    }
    assert failed == {"streams_held"}
    failed = {
        c.name
        for c in slo.evaluate("webchat", _webchat_run(2000, drops_in_run=1), obj).checks
        if not c.passed
    }
    assert failed == {"streams_held"}
    slow = slo.evaluate("webchat", _webchat_run(2000, ms=5000), obj)
    assert {c.name for c in slow.checks if not c.passed} == {"p99"}
    # While the streams open (a burst of sessions), the message path is not judged.
    assert slo.evaluate("webchat", _webchat_run(2000, open_ms=5000), obj).passed


def _timeline(t: Tally, start: int, seconds: list[tuple[int, int, int]]) -> None:
    """Per second from `start`: (good answers, bad answers, latency ms of each)."""
    for i, (good, bad, ms) in enumerate(seconds):
        for n, ok in ((good, True), (bad, False)):
            for _ in range(n):
                t.second(start + i + 0.5, ok, ms)


def test_recovery_counts_until_every_later_second_is_back_in_objective() -> None:
    t = _tally({OVERLOAD: (100, 50, 10), RECOVERY: (100, 50, 0)})
    t.phases[OVERLOAD] = [100.0, 110.0]
    t.phases[RECOVERY] = [110.0, 130.0]
    # Slow at 110-111, a failure at 113, good from 114 on: back 4 s after the overload.
    _timeline(t, 110, [(5, 0, 3000), (5, 0, 2000), (5, 0, 50), (4, 1, 50)] + [(5, 0, 50)] * 16)
    obj = Objectives(recovery_p99_ms=1500, max_recovery_s=10)
    assert slo.recovery_seconds(t, obj) == 4.0
    t.count(slo.SURGE + OVERLOAD, slo.REQUESTS)  # no surge outcome in the overload: not past
    checks = {c.name: c.passed for c in slo.evaluate("spike", t, obj).checks}
    assert checks["recovery"] and not checks["overload_reached"]
    assert not slo.evaluate("spike", t, Objectives(max_recovery_s=3)).passed
    _timeline(t, 129, [(0, 1, 50)])  # a failure in the last second: never back
    assert slo.recovery_seconds(t, obj) is None


def test_overload_sheds_must_be_explicit_and_never_gateway_errors() -> None:
    t = _tally({OVERLOAD: (100, 50, 10), RECOVERY: (100, 50, 0)})
    t.count(OVERLOAD, slo.SURGE + slo.REQUESTS, 50)
    t.count(OVERLOAD, slo.SURGE + slo.SHED, 20)
    _timeline(t, int(t.phases[RECOVERY][0]), [(5, 0, 50)] * 10)
    verdict = slo.evaluate("spike", t, Objectives())
    assert verdict.passed, verdict.checks
    assert verdict.figures["overload"]["surge_shed_share"] == 0.4
    t.count(OVERLOAD, slo.SURGE + "status:502")
    t.count(OVERLOAD, slo.SURGE + slo.OTHER_5XX)
    failed = {c.name for c in slo.evaluate("spike", t, Objectives()).checks if not c.passed}
    assert failed == {"no_gateway_errors", "sheds_explicit"}


def _hostile_run(well_behaved_ok: int, failed: int = 0) -> Tally:
    t = _tally({"calm": (10, 20, 0), ATTACK: (10, 20, 0), AFTER: (10, 20, 0)})
    for phase in ("calm", ATTACK, AFTER):
        t.count(phase, "status:200", 10)
    t.count(ATTACK, slo.REQUESTS, well_behaved_ok - 10 + failed)
    t.count(ATTACK, "status:200", well_behaved_ok - 10)
    t.count(ATTACK, hostile.REQUESTS, 500)
    t.count(ATTACK, "hostile:bad_params:400", 500)
    return t


def test_hostile_verdict_needs_well_behaved_success_no_gateway_error_and_a_clean_after() -> None:
    obj = Objectives(min_success_share=0.999)
    probe = {"probe": {"ok": 8, "failures": []}}
    assert slo.evaluate("hostile", _hostile_run(3000), obj, probe).passed
    # One failure in 1000 well-behaved requests is too many.
    checks = slo.evaluate("hostile", _hostile_run(997, failed=3), obj, probe).checks
    assert [c.name for c in checks if not c.passed] == ["well_behaved_success"]
    t = _hostile_run(3000)
    t.count(ATTACK, hostile.GATEWAY)
    t.count(ATTACK, hostile.SERVER_ERROR)
    failed = {c.name for c in slo.evaluate("hostile", t, obj, probe).checks if not c.passed}
    assert failed == {"no_gateway_errors", "hostile_answers_per_contract"}
    stuck = {"probe": {"ok": 7, "failures": ["127.0.0.3 GET /healthz: 503"]}}
    failed = {
        c.name
        for c in slo.evaluate("hostile", _hostile_run(3000), obj, stuck).checks
        if not c.passed
    }
    assert failed == {"probe_after"}
    assert not slo.evaluate("hostile", _hostile_run(3000), obj, {}).passed  # no probe: no pass


def test_hostile_answers_are_judged_against_the_contract() -> None:
    def answer(raw: bytes) -> str | None:
        return hostile.contract_problem(hostile.parse(raw))

    json_405 = b'HTTP/1.1 405 X\r\nAllow: GET\r\n\r\n{"error": {"code": "m", "message": "m"}}'
    assert answer(json_405) is None
    assert answer(json_405.replace(b"Allow: GET\r\n", b"")) == "405 without Allow"
    assert answer(b"HTTP/1.1 405 Not Allowed\r\n\r\n<html>405</html>") == "error body is not JSON"
    shed = b'HTTP/1.1 503 X\r\nRetry-After: 1\r\n\r\n{"error": {"code": "o", "message": "o"}}'
    assert answer(shed) is None
    assert answer(shed.replace(b"Retry-After: 1\r\n", b"")) == "server error"
    assert answer(b'HTTP/1.1 502 X\r\n\r\n{"error": {"code": "b", "message": "b"}}') == (
        "gateway error"
    )
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
    assert hostile.parse(chunked).body == b"{}" and answer(chunked) is None


def test_load_is_only_sent_to_loopback() -> None:
    with pytest.raises(ValueError, match=r"127\.0\.0\.1"):
        load_config("steady", {"BOT_DOTENV": "/dev/null", "LOAD_TARGET_URL": "http://10.0.0.1"})


def _run_scenario(
    name: str, stack: Stack, tmp_path: Path, **settings: str
) -> tuple[dict[str, str], Path, dict[str, Any]]:
    """Run `make loadtest SCENARIO=name` against `stack`; it must pass. Its environment,
    report folder and summary."""
    env = {
        **os.environ,
        **stack.env,
        "BOT_DOTENV": "/dev/null",
        "LOAD_REPORT_DIR": str(tmp_path),
        **settings,
    }
    done = run([sys.executable, "-m", "loadtests.run", name], env=env, cwd=ROOT, timeout=150)
    assert done.returncode == 0, done.stdout + done.stderr
    (report,) = tmp_path.glob(f"{name}-*")
    summary: dict[str, Any] = orjson.loads((report / "summary.json").read_bytes())
    return env, report, summary


@pytest.mark.system
def test_steady_smoke_passes_and_an_impossible_objective_fails(
    stack: Stack, tmp_path: Path
) -> None:
    env, report, summary = _run_scenario("steady", stack, tmp_path, LOAD_DURATION="20")
    assert summary["passed"] and summary["figures"]["requests"] > 50
    assert (report / "locust.html").exists() and (report / "locust_stats.csv").exists()

    # The same run judged against an objective nothing can meet must fail.
    env["LOAD_P99_MS"] = "0.001"
    judged = run([sys.executable, "-m", "loadtests.run", "--judge", str(report)], env=env, cwd=ROOT)
    assert judged.returncode == 1, judged.stdout + judged.stderr
    assert "FAIL" in judged.stdout
    summary = orjson.loads((report / "summary.json").read_bytes())
    assert [c["name"] for c in summary["checks"] if not c["passed"]] == ["p99"]


@pytest.mark.system
def test_hostile_clients_leave_well_behaved_users_unharmed(
    make_stack: Callable[..., Stack], tmp_path: Path
) -> None:
    """The short form of `make loadtest SCENARIO=hostile`, against a private default stack.

    The latency objective is generous here (this box runs the whole suite beside it); the
    full run judges against the steady scenario's. Everything else is the full verdict.
    """
    stack = make_stack()
    _, _, summary = _run_scenario(
        "hostile", stack, tmp_path, LOAD_HOSTILE_CALM="4", LOAD_DURATION="14", LOAD_P99_MS="5000"
    )
    figures = summary["figures"]["hostile"]
    # Every kind of hostile client ran, and the long polls reached the per-address limit.
    assert set(figures["by_kind"]) == set(HOSTILE_KINDS)
    assert figures["long_polls_open_peak"] >= stack.settings.edge_conn // 2
    assert figures["well_behaved"]["attack"]["requests"] > 100


def test_channels_verdict_counts_missing_duplicated_and_reordered_answers() -> None:
    expected = {"telegram 1": ["0", "1", "2"], "slack C1": ["0", "1"]}
    fine = [("telegram 1", 0), ("slack C1", 0), ("telegram 1", 1), ("slack C1", 1)]
    found = channels.verdict_of(expected, [*fine, ("telegram 1", 2)])
    assert (found["missing"], found["duplicates"], found["out_of_order_chats"]) == (0, 0, 0)
    found = channels.verdict_of(expected, [("telegram 1", 1), ("telegram 1", 0), *fine])
    assert (found["missing"], found["duplicates"], found["out_of_order_chats"]) == (1, 2, 1)
    obj = Objectives(ordered_once=True)
    t = _tally({"spike": (10, 50, 0)})
    assert not slo.evaluate("channels", t, obj, {"channels": found}).passed
    assert not slo.evaluate("channels", t, obj, {}).passed  # no record read: no pass
    good = channels.verdict_of(expected, [*fine, ("telegram 1", 2)])
    verdict = slo.evaluate("channels", t, obj, {"channels": good})
    assert verdict.passed, verdict.checks
    assert verdict.figures["channels"]["ack_p99_ms"] == 50


@pytest.fixture
def channel_stack() -> Iterator[tuple[Stack, str]]:
    """A private stack with the three channels on, the stub playing their APIs; and the seed
    of the Ed25519 key its DISCORD_PUBLIC_KEY verifies."""
    from nacl.encoding import HexEncoder
    from nacl.signing import SigningKey

    key = SigningKey.generate()
    owner = unique("chanload")
    db = claim_redis_db(owner)
    try:
        with stack_dir() as base:
            env = stack_env(db, BOT_RATE_LIMIT="100/second", BOT_RATE_BURST="100")
            stub = f"http://127.0.0.1:{env['BOT_STUB_PORT']}"
            env.update(
                TELEGRAM_BOT_TOKEN="123:load",
                TELEGRAM_WEBHOOK_SECRET="load-secret",
                TELEGRAM_API_URL=stub,
                SLACK_SIGNING_SECRET="load-slack-secret",
                SLACK_BOT_TOKEN="xoxb-load",
                SLACK_API_URL=stub + "/slack/api",
                DISCORD_PUBLIC_KEY=key.verify_key.encode(HexEncoder).decode(),
                DISCORD_APPLICATION_ID="123456789012345678",
                DISCORD_API_URL=stub + "/discord/api",
            )
            stack = Stack(base / "run", env)
            stack.start()
            try:
                yield stack, bytes(key).hex()
            finally:
                stack.stop()
    finally:
        release_redis_db(db, owner)


@pytest.mark.system
def test_channels_smoke_every_answer_once_and_in_order(
    channel_stack: tuple[Stack, str], tmp_path: Path
) -> None:
    """The short form of `make loadtest SCENARIO=channels`: signed webhooks of 30 chats on the
    three platforms at once, judged on the stub's record of sends. The ack objective is
    generous here (the suite runs beside it); the full run judges against 1 s."""
    stack, seed = channel_stack
    _, _, summary = _run_scenario(
        "channels",
        stack,
        tmp_path,
        LOAD_CHANNELS_CHATS="30",
        LOAD_CHANNELS_MESSAGES="3",
        LOAD_DURATION="8",
        LOAD_DELIVERY_TIMEOUT="40",
        LOAD_DISCORD_SIGNING_KEY=seed,
        LOAD_P99_MS="5000",
    )
    figures = summary["figures"]["channels"]
    assert sorted(figures["platforms"]) == ["discord", "slack", "telegram"]
    assert figures["expected"] == 90 and figures["delivered"] == 90, figures
    assert figures["duplicates"] == 0 and figures["out_of_order_chats"] == 0
    print("channels smoke:", {k: v for k, v in figures.items() if k != "examples"})


def test_channels_scenario_refuses_a_stack_it_cannot_judge() -> None:
    base = {"BOT_DOTENV": "/dev/null", "BOT_STUB_PORT": "8099"}
    with pytest.raises(ConfigError, match="needs a channel enabled"):
        channels.platforms(load_config("channels", base))
    tg = {**base, "TELEGRAM_BOT_TOKEN": "1:x", "TELEGRAM_WEBHOOK_SECRET": "secret"}
    with pytest.raises(ConfigError, match="TELEGRAM_API_URL"):
        channels.platforms(load_config("channels", tg))  # the real Bot API: no record to read
    on_stub = {**tg, "TELEGRAM_API_URL": "http://127.0.0.1:8099"}
    assert channels.platforms(load_config("channels", on_stub)) == ("telegram",)
