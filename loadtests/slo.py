"""Verdicts: a scenario's objectives checked against what its run saw.

Pure functions of a `Tally` (and the post-run findings: inboxes, memory), so a saved run
can be judged again with other objectives (`python -m loadtests.run --judge DIR`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from loadtests import channels, hostile, webchat
from loadtests.config import Objectives
from loadtests.shapes import AFTER, ATTACK, OVERLOAD, RECOVERY, STREAMS_OPEN
from loadtests.tally import Tally, percentile

# Outcome names the users record (see loadtests/locustfile.py).
REQUESTS = "requests"  # every request, inbox polls included
ANSWERED = "answered"  # a JSON answer came back
NO_JSON = "no_json"  # connection error, timeout, or a body that is not JSON
SHED = "shed"  # 503 `overloaded` with Retry-After
OTHER_5XX = "other_5xx"
BAD_4XX = "bad_4xx"  # a 4xx to a valid request that is not a rate limit
LIMITED_NORMAL = "limited_normal"
LIMITED_ABUSE = "limited_abuse"
ABUSE_REQUESTS = "abuse_requests"
QUEUED = "queued"
REPLIED = "replied"
QUESTIONS = "questions"  # questions answered 200
CACHED = "cached"  # ... of which from the cache
POLLS = "polls"
DELIVERED_SEEN = "delivered_seen"
DELIVERED_DUP = "delivered_dup"
SURGE = "surge:"  # prefix of the spike's surge users' outcomes (judged apart)
SUCCESS_STATUSES = (200, 202)
GATEWAY_STATUSES = (502, 504)


@dataclass
class Check:
    name: str
    objective: str
    actual: Any
    passed: bool


@dataclass
class Verdict:
    scenario: str
    passed: bool
    checks: list[Check]
    figures: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def phase_figures(tally: Tally, phase: str) -> dict[str, Any]:
    """Requests, answers per second and latency of one phase."""
    secs = tally.phase_seconds(phase)
    hist = tally.hist([phase])
    n = tally.total(REQUESTS, [phase])
    answered = tally.total(ANSWERED, [phase])
    return {
        "seconds": round(secs, 1),
        "requests": n,
        "rps": round(n / secs, 1) if secs else 0.0,
        "answered_rps": round(answered / secs, 1) if secs else 0.0,
        "p50_ms": percentile(hist, 0.50),
        "p99_ms": percentile(hist, 0.99),
        "shed": tally.total(SHED, [phase]),
        "other_5xx": tally.total(OTHER_5XX, [phase]),
        "no_json": tally.total(NO_JSON, [phase]),
        "limited_normal": tally.total(LIMITED_NORMAL, [phase]),
        "success_share": round(success_share(tally, [phase]), 5),
        "users": tally.notes.get("phase_users", {}).get(phase),
    }


def success_share(tally: Tally, phases: list[str] | None = None, prefix: str = "") -> float:
    """Share of requests answered 200/202 (1.0 when there were none)."""
    n = tally.total(prefix + REQUESTS, phases)
    ok = sum(tally.total(f"{prefix}status:{s}", phases) for s in SUCCESS_STATUSES)
    return ok / n if n else 1.0


def gateway_errors(tally: Tally) -> int:
    """502/504 answers to anyone: well-behaved, surge and hostile clients alike."""
    return sum(
        tally.total(f"{prefix}status:{s}") for prefix in ("", SURGE) for s in GATEWAY_STATUSES
    ) + tally.total(hostile.GATEWAY)


def recovery_seconds(tally: Tally, obj: Objectives) -> float | None:
    """Seconds from the overload's end until every later second of the run was back within
    the steady objective (no failed answer, p99 <= `recovery_p99_ms`); None if never."""
    overload = tally.phases.get(OVERLOAD)
    recovery = tally.phases.get(RECOVERY)
    if not overload or not recovery:
        return None
    end = overload[1]
    good_from: int | None = None
    for sec in range(int(end), int(recovery[1]) + 1):
        good, bad, p99 = tally.second_figures(sec)
        if not good + bad:
            continue  # a second without answers tells nothing
        if bad or p99 > obj.recovery_p99_ms:
            good_from = None
        elif good_from is None:
            good_from = sec
    return None if good_from is None else round(max(0.0, good_from - end), 1)


def phase_ok(tally: Tally, phase: str, obj: Objectives) -> bool:
    """Did one phase meet the latency and error objectives (the ramp's step test)."""
    f = phase_figures(tally, phase)
    n = max(1, f["requests"])
    return bool(
        f["p99_ms"] <= obj.p99_ms
        and f["shed"] / n <= obj.max_shed_share
        and f["other_5xx"] <= obj.max_other_5xx
        and f["no_json"] <= obj.max_no_json
    )


def knee(tally: Tally, obj: Objectives) -> dict[str, Any]:
    """The last ramp step (in order) that met the objectives, and the first that did not."""
    steps = sorted((p for p in tally.phases if p.startswith("step-")), key=_step_no)
    last_ok: str | None = None
    broke: str | None = None
    for step in steps:
        if phase_ok(tally, step, obj):
            last_ok = step
        else:
            broke = step
            break
    out: dict[str, Any] = {"knee_phase": last_ok, "broke_at": broke, "reached_end": broke is None}
    if last_ok:
        f = phase_figures(tally, last_ok)
        out.update(knee_users=f["users"], knee_rps=f["answered_rps"], knee_p99_ms=f["p99_ms"])
    else:
        out.update(knee_users=0, knee_rps=0.0, knee_p99_ms=None)
    return out


def _step_no(phase: str) -> int:
    try:
        return int(phase.split("-")[1])
    except (IndexError, ValueError):
        return 0


def memory_growth(samples: dict[str, list[list[float]]]) -> dict[str, dict[str, float]]:
    """Per process: RSS (MB) after warm-up, at the end, and the growth in between.

    The first fifth of the samples is warm-up (imports, pools, caches filling); the start and
    end values are means of the next and the last quarter, so one GC pause does not decide.
    """
    out: dict[str, dict[str, float]] = {}
    for name, points in samples.items():
        rss = [mb for _, mb in points]
        if len(rss) < 5:
            continue
        body = rss[len(rss) // 5 :]
        q = max(1, len(body) // 4)
        start = sum(body[:q]) / q
        end = sum(body[-q:]) / q
        half = body[len(body) // 2 :]
        out[name] = {
            "start_mb": round(start, 1),
            "end_mb": round(end, 1),
            "peak_mb": round(max(rss), 1),
            "growth_mb": round(end - start, 1),
            "still_growing": float(half[-1] > half[0] and end > start),
        }
    return out


def evaluate(
    scenario: str, tally: Tally, obj: Objectives, findings: dict[str, Any] | None = None
) -> Verdict:
    """Check every objective that applies to `scenario`."""
    findings = findings or {}
    checks: list[Check] = []

    def check(name: str, objective: str, actual: Any, passed: bool) -> None:
        checks.append(Check(name, objective, actual, bool(passed)))

    phases: list[str] | None = None
    ramp: dict[str, Any] = {}
    if scenario == "ramp":
        ramp = knee(tally, obj)
        steps = sorted((p for p in tally.phases if p.startswith("step-")), key=_step_no)
        last = ramp["knee_phase"]
        # Latency and sheds are judged up to the knee: past it they break by design.
        phases = steps[: steps.index(last) + 1] if last else []
    if OVERLOAD in tally.phases:
        # Past capacity, sheds and slow answers are by design: that phase has checks of its own.
        phases = [p for p in tally.phases if p != OVERLOAD]
    if scenario == "hostile":
        # The calm phase is the baseline shown beside; the objectives hold while under attack.
        phases = [ATTACK, AFTER]
    if scenario == "webchat":
        # Judged once every stream is open (opening them is a burst of sessions of its own).
        phases = [p for p in tally.phases if p != STREAMS_OPEN]
    requests = tally.total(REQUESTS)
    scoped = max(1, tally.total(REQUESTS, phases))
    hist = tally.hist(phases)
    p99 = percentile(hist, 0.99)

    check(
        "answered",
        "every request gets a JSON answer",
        tally.total(NO_JSON),
        tally.total(NO_JSON) <= obj.max_no_json,
    )
    check(
        "no_unexpected_5xx",
        "no 5xx other than `overloaded` sheds with Retry-After",
        tally.total(OTHER_5XX),
        tally.total(OTHER_5XX) <= obj.max_other_5xx,
    )
    shed_share = tally.total(SHED, phases) / scoped
    check(
        "shed_share",
        f"sheds <= {obj.max_shed_share:.1%} of requests",
        f"{shed_share:.2%}",
        shed_share <= obj.max_shed_share,
    )
    check(
        "p99",
        f"p99 of answers <= {obj.p99_ms:.0f} ms",
        f"{p99:.0f} ms",
        p99 <= obj.p99_ms and bool(hist),
    )
    check(
        "no_bad_4xx",
        "no 4xx to a valid request other than a rate limit",
        tally.total(BAD_4XX),
        tally.total(BAD_4XX) == 0,
    )
    check(
        "normal_users_not_limited",
        f"well-behaved users limited <= {obj.max_normal_limited} times",
        tally.total(LIMITED_NORMAL),
        tally.total(LIMITED_NORMAL) <= obj.max_normal_limited,
    )
    gateway = gateway_errors(tally)
    check(
        "no_gateway_errors",
        f"<= {obj.max_gateway_errors} 502/504 to anyone (hostile and surge clients included)",
        gateway,
        gateway <= obj.max_gateway_errors,
    )
    if obj.min_success_share:
        share = success_share(tally)
        check(
            "well_behaved_success",
            f"well-behaved requests answered 200/202 >= {obj.min_success_share:.1%}",
            f"{share:.3%} of {tally.total(REQUESTS)}",
            share >= obj.min_success_share,
        )
    if scenario == "hostile":
        _hostile_checks(tally, obj, findings, check)
    if OVERLOAD in tally.phases:
        _overload_checks(tally, obj, check)
    if scenario == "webchat":
        _webchat_checks(tally, obj, check)
    if obj.ordered_once:
        _channel_checks(findings.get("channels") or {}, check)
    if scenario == "abuse":
        n = tally.total(LIMITED_ABUSE)
        check("abusers_limited", "the spammers are rate limited", n, n >= obj.min_abuse_limited)
    if scenario == "ramp":
        check(
            "knee",
            f"the knee is at >= {obj.min_knee_rps:.0f} answers/s",
            f"{ramp['knee_rps']} answers/s ({ramp['knee_users']} users)",
            ramp["knee_rps"] >= obj.min_knee_rps,
        )
    if obj.min_queued:
        n = tally.total(QUEUED)
        check("outage_queued", f">= {obj.min_queued} messages queued (202)", n, n >= obj.min_queued)
    if obj.exactly_once:
        inbox = findings.get("inbox") or {}
        missing = len(inbox.get("missing", []))
        dup = len(inbox.get("duplicated", [])) + tally.total(DELIVERED_DUP)
        check(
            "exactly_once",
            "every 202'd message delivered exactly once",
            f"{inbox.get('delivered', 0)}/{inbox.get('queued', 0)} delivered, "
            f"{missing} missing, {dup} duplicated",
            bool(inbox) and missing == 0 and dup == 0,
        )
    if scenario == "soak":
        growth = memory_growth(findings.get("memory", {}))
        bad = {
            name: g["growth_mb"]
            for name, g in growth.items()
            if g["growth_mb"] > obj.max_mem_growth_mb
            and g["growth_mb"] > obj.max_mem_growth_share * g["start_mb"]
            and g["still_growing"]
        }
        check(
            "memory_bounded",
            f"no process grows > {obj.max_mem_growth_mb:.0f} MB and "
            f"> {obj.max_mem_growth_share:.0%} after warm-up, still growing",
            bad or f"{len(growth)} processes flat",
            bool(growth) and not bad,
        )

    figures: dict[str, Any] = {
        "requests": requests,
        "answered": tally.total(ANSWERED),
        "p50_ms": percentile(tally.hist(), 0.50),
        "p99_ms": percentile(tally.hist(), 0.99),
        "shed": tally.total(SHED),
        "other_5xx": tally.total(OTHER_5XX),
        "no_json": tally.total(NO_JSON),
        "limited_normal": tally.total(LIMITED_NORMAL),
        "limited_abuse": tally.total(LIMITED_ABUSE),
        "abuse_requests": tally.total(ABUSE_REQUESTS),
        "queued": tally.total(QUEUED),
        "questions": tally.total(QUESTIONS),
        "cache_hit_ratio": round(tally.total(CACHED) / max(1, tally.total(QUESTIONS)), 3),
        "polls": tally.total(POLLS),
        "phases": {p: phase_figures(tally, p) for p in tally.phases},
    }
    if ramp:
        figures["ramp"] = ramp
    if scenario == "hostile":
        figures["hostile"] = hostile_figures(tally)
    if OVERLOAD in tally.phases:
        figures["overload"] = overload_figures(tally, obj)
    if scenario == "webchat":
        figures["webchat"] = webchat_figures(tally)
    if scenario == "channels":
        figures["channels"] = channel_figures(tally, findings.get("channels") or {})
    if scenario == "soak" or findings.get("memory"):
        figures["memory"] = memory_growth(findings.get("memory", {}))
    return Verdict(scenario, all(c.passed for c in checks), checks, figures)


Checker = Callable[[str, str, Any, bool], None]


def _hostile_checks(
    tally: Tally, obj: Objectives, findings: dict[str, Any], check: Checker
) -> None:
    """The hostile clients ran, got answers per the contract, and left the stack serving."""
    sent = tally.total(hostile.REQUESTS)
    broken = tally.notes.get("hostile_broken") or []
    check(
        "hostile_clients_ran",
        "every hostile client ran through the attack",
        f"{sent} hostile requests" + (f"; broken: {', '.join(broken)}" if broken else ""),
        sent > 0 and not broken,
    )
    bad = tally.total(hostile.SERVER_ERROR) + tally.total(hostile.BAD_ERROR)
    check(
        "hostile_answers_per_contract",
        "hostile requests get 4xx or a 503 with Retry-After, errors JSON, a 405 with Allow",
        f"{tally.total(hostile.SERVER_ERROR)} server errors, "
        f"{tally.total(hostile.BAD_ERROR)} malformed errors",
        bad == 0,
    )
    after = phase_figures(tally, AFTER)
    check(
        "serves_normally_after",
        f"after the attack: well-behaved >= {obj.min_success_share:.1%} 200/202 and "
        f"p99 <= {obj.p99_ms:.0f} ms",
        f"{after['success_share']:.2%} of {after['requests']}, p99 {after['p99_ms']:.0f} ms",
        after["requests"] > 0
        and after["success_share"] >= obj.min_success_share
        and after["p99_ms"] <= obj.p99_ms,
    )
    probe = findings.get("probe") or {}
    check(
        "probe_after",
        "health, readiness, a message and an inbox answer 200 from every client address",
        probe.get("failures") or f"{probe.get('ok', 0)} probes answered",
        bool(probe) and not probe.get("failures"),
    )


def _channel_checks(sends: dict[str, Any], check: Checker) -> None:
    """From the stub's record: every acked message answered, none twice, each chat in order."""
    missing, dup = sends.get("missing", 0), sends.get("duplicates", 0)
    disorder = sends.get("out_of_order_chats", 0)
    check(
        "channels_once_in_order",
        "every acked webhook answered once, each chat's answers in its order",
        f"{sends.get('delivered', 0)}/{sends.get('expected', 0)} answered, {missing} missing, "
        f"{dup} duplicates, {disorder} chats out of order",
        bool(sends.get("expected")) and missing == 0 and dup == 0 and disorder == 0,
    )


def channel_figures(tally: Tally, sends: dict[str, Any]) -> dict[str, Any]:
    hist = tally.hist()
    # The spike itself: from the first answered webhook to the last, and its busiest second.
    busy = {sec: sum(tally.second_figures(sec)[:2]) for sec in tally.timeline}
    return {
        "webhooks_seconds": max(busy) - min(busy) + 1 if busy else 0,
        "webhooks_peak_per_s": max(busy.values(), default=0),
        "platforms": sends.get("platforms") or tally.notes.get(channels.PLATFORMS_NOTE, []),
        "acked": tally.total(channels.ACKED),
        "resent": tally.total(channels.RESENT),
        "ack_p50_ms": percentile(hist, 0.50),
        "ack_p99_ms": percentile(hist, 0.99),
        "ack_max_ms": max(hist, default=0),
        **{k: sends.get(k, 0) for k in _SEND_FIGURES},
        "all_sent_after_s": sends.get("all_sent_after_s"),
        "examples": sends.get("examples", []),
    }


_SEND_FIGURES = (
    "chats",
    "expected",
    "delivered",
    "missing",
    "duplicates",
    "unexpected",
    "out_of_order_chats",
    "rate_limited_sends",
)


def _webchat_checks(tally: Tally, obj: Objectives, check: Checker) -> None:
    """The idle streams were all opened and held to the end, none dropped while judged."""
    target = int(tally.notes.get(webchat.TARGET, 0))
    held = int(tally.notes.get(webchat.OPEN_AT_END, 0))
    drops = tally.total(webchat.DROPS, [p for p in tally.phases if p != STREAMS_OPEN])
    check(
        "streams_held",
        f"idle event streams open at the end >= {obj.min_streams_share:.0%} of "
        "those asked for, none dropped once open",
        f"{held}/{target} open, {drops} dropped",
        bool(target) and held >= obj.min_streams_share * target and drops == 0,
    )


def webchat_figures(tally: Tally) -> dict[str, Any]:
    return {
        "streams_target": tally.notes.get(webchat.TARGET, 0),
        "streams_open_peak": tally.notes.get(webchat.OPEN_PEAK, 0),
        "streams_open_at_end": tally.notes.get(webchat.OPEN_AT_END, 0),
        "streams_opened": tally.total(webchat.OPENED),
        "stream_drops": tally.total(webchat.DROPS),
        "keepalives": tally.total(webchat.KEEPALIVES),
    }


def hostile_figures(tally: Tally) -> dict[str, Any]:
    """Per hostile kind, how many answers of each status; well-behaved calm vs attack."""
    kinds: dict[str, dict[str, int]] = {}
    for counts in tally.counts.values():
        for outcome, n in counts.items():
            if outcome.startswith("hostile:"):
                _, kind, status = outcome.split(":", 2)
                by_status = kinds.setdefault(kind, {})
                by_status[status] = by_status.get(status, 0) + n
    calm, attack = phase_figures(tally, "calm"), phase_figures(tally, ATTACK)
    return {
        "requests": tally.total(hostile.REQUESTS),
        "closed_without_answer": tally.total(hostile.CLOSED),
        "long_polls_held": tally.total(hostile.LONG_POLLS_HELD),
        "long_polls_open_peak": tally.notes.get(hostile.POLLS_OPEN_PEAK, 0),
        "stop_seconds": tally.notes.get("hostile_stop_seconds"),
        "by_kind": kinds,
        "well_behaved": {
            name: {k: f[k] for k in ("requests", "success_share", "p50_ms", "p99_ms")}
            for name, f in (
                ("calm", calm),
                ("attack", attack),
                ("after", phase_figures(tally, AFTER)),
            )
        },
    }


def _overload_checks(tally: Tally, obj: Objectives, check: Checker) -> None:
    """The surge went past capacity, was shed explicitly, and the stack came back in time."""
    shed = tally.total(SURGE + SHED)
    check(
        "overload_reached",
        "the surge went past capacity (the stack shed some of it)",
        f"{shed} surge requests shed of {tally.total(SURGE + REQUESTS)}",
        shed > 0,
    )
    unexplained = tally.total(SURGE + OTHER_5XX) + tally.total(SURGE + NO_JSON)
    check(
        "sheds_explicit",
        "every refusal is a 503 `overloaded` JSON with Retry-After (or a 429), never 502/504",
        f"{unexplained} other 5xx or answers without JSON",
        unexplained == 0,
    )
    rec = recovery_seconds(tally, obj)
    check(
        "recovery",
        f"back within the steady objective (p99 <= {obj.recovery_p99_ms:.0f} ms, no failure) "
        f"<= {obj.max_recovery_s:.0f} s after the overload",
        "never" if rec is None else f"{rec} s",
        rec is not None and rec <= obj.max_recovery_s,
    )


def overload_figures(tally: Tally, obj: Objectives) -> dict[str, Any]:
    """The surge's peak, what the stack answered and shed, and the users beside it."""
    secs = max(0.001, tally.phase_seconds(OVERLOAD))
    surge_n = tally.total(SURGE + REQUESTS, [OVERLOAD])
    surge_ok = sum(tally.total(f"{SURGE}status:{s}", [OVERLOAD]) for s in SUCCESS_STATUSES)
    users_ok = sum(tally.total(f"status:{s}", [OVERLOAD]) for s in SUCCESS_STATUSES)
    offered = surge_n + tally.total(REQUESTS, [OVERLOAD])
    during, after = phase_figures(tally, OVERLOAD), phase_figures(tally, RECOVERY)
    return {
        "surge_users": tally.notes.get("surge_users"),
        "offered_rps": round(offered / secs, 1),
        "answered_2xx_rps": round((surge_ok + users_ok) / secs, 1),
        "surge_shed_share": round(tally.total(SURGE + SHED, [OVERLOAD]) / max(1, surge_n), 4),
        "surge_limited": tally.total(SURGE + LIMITED_NORMAL, [OVERLOAD]),
        "recovery_s": recovery_seconds(tally, obj),
        "well_behaved_during": {k: during[k] for k in ("requests", "success_share", "p99_ms")},
        "well_behaved_after": {k: after[k] for k in ("requests", "success_share", "p99_ms")},
    }
