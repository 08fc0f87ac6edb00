"""On-call end to end: a private stack with Prometheus (1 s scrape), Alertmanager and the sink.

One stack for the module (Prometheus and its friends cost seconds to start): every target is
up, a burst of real traffic gives every *Bot overview* query data, every metric a rule or a
dashboard names exists, and real faults (a stopped replica, an upstream outage) fire their
alerts all the way to the local sink and `python -m infra.alertsink show`.
"""

from __future__ import annotations

import os
import re
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from tests.conftest import OWNER
from tests.support import Stack, claim_redis_db, post, release_redis_db, run, stack_env, unique
from tests.test_observability_config import dashboard_exprs

pytestmark = pytest.mark.system
ROOT = Path(__file__).resolve().parent.parent
PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "bool", "offset", "inf", "nan",
}  # fmt: skip


@pytest.fixture(scope="module")
def obs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    owner = f"{OWNER}-obs"
    db = claim_redis_db(owner)
    rules = fast_rules(tmp_path_factory.mktemp("rules"))
    env = stack_env(
        db,
        BOT_OBSERVABILITY="true",
        BOT_PROMETHEUS_RULES_DIR=str(rules),
        BOT_SCRAPE_INTERVAL="1",
        BOT_REPLICAS="3",
        BOT_RATE_LIMIT="100/second",
        BOT_RATE_BURST="1000",
        # The stub asked as an LLM, so the LLM panels and rules have their series too.
        UPSTREAM_KIND="openai",
        UPSTREAM_MODEL="gpt-4o-mini",
        UPSTREAM_FIRST_TOKEN_TIMEOUT="1",
        UPSTREAM_TOTAL_TIMEOUT="2",
        UPSTREAM_DAILY_BUDGET="100",
        BOT_BREAKER_MIN_CALLS="3",
        BOT_BREAKER_CONSECUTIVE="2",
        BOT_BREAKER_OPEN_SECONDS="60",
    )
    stack = Stack(tmp_path_factory.mktemp("obs") / "run", env)
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()
        release_redis_db(db, owner)


def prom(stack: Stack, path: str, **params: str) -> Any:
    url = f"http://127.0.0.1:{stack.env['BOT_PROMETHEUS_PORT']}{path}"
    resp = requests.get(url, params=params, timeout=5)
    resp.raise_for_status()
    return resp.json()["data"]


def query(stack: Stack, expr: str) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = prom(stack, "/api/v1/query", query=expr)["result"]
    return result


def sink_alerts(stack: Stack) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{stack.settings.alertsink_port}/alerts"
    alerts: list[dict[str, Any]] = requests.get(url, timeout=5).json()["alerts"]
    return alerts


def wait_for(what: str, check: Any, timeout: float = 30, every: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}: {check()}")


def metric_names(expr: str) -> set[str]:
    """Metric names an expression reads: identifiers outside label matchers, not functions."""
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\"[^\"]*\"", " ", expr)
    bare = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", bare)
    names = set(re.findall(r"(?<![\w:])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()", bare))
    return {n for n in names if n.lower() not in PROMQL_WORDS and not re.fullmatch(r"\d.*", n)}


def fast_rules(into: Path) -> Path:
    """The test's copy of the rules: every alert's `for:` 1 s (given to Prometheus at start)."""
    into.mkdir(parents=True, exist_ok=True)
    for source in (ROOT / "prometheus/rules").glob("*.yml"):
        rules = yaml.safe_load(source.read_text())
        for group in rules["groups"]:
            for rule in group["rules"]:
                if "alert" in rule:
                    rule["for"] = "1s"
        (into / source.name).write_text(yaml.safe_dump(rules))
    return into


def test_every_target_is_up_and_a_scrape_is_cheap(obs: Stack) -> None:
    def all_up() -> list[dict[str, Any]] | None:
        targets: list[dict[str, Any]] = prom(obs, "/api/v1/targets")["activeTargets"]
        return targets if targets and all(t["health"] == "up" for t in targets) else None

    targets = wait_for("every target up", all_up, timeout=20)
    jobs = {t["labels"]["job"] for t in targets}
    assert {"bot", "nginx", "nginx-log", "redis", "prometheus", "alertmanager"} <= jobs
    replicas = sorted(t["labels"]["replica"] for t in targets if t["labels"]["job"] == "bot")
    assert replicas == ["bot-1", "bot-2", "bot-3"]
    # /metrics is never reachable through NGINX.
    assert requests.get(obs.url + "/metrics", timeout=5).status_code == 404

    times, sizes = [], []
    for _ in range(30):
        start = time.perf_counter()
        resp = requests.get(obs.metrics_url(1), timeout=5, headers={"Accept-Encoding": "gzip"})
        times.append((time.perf_counter() - start) * 1000)
        sizes.append(len(resp.content))
    plain = len(requests.get(obs.metrics_url(1), timeout=5).content)
    print(
        f"\nscrape of a replica: median {statistics.median(times):.2f} ms, "
        f"max {max(times):.2f} ms, {plain} bytes ({sizes[-1]} as received)"
    )
    assert plain < 200_000  # bounded: no label carries a user id or a raw path


def test_bot_overview_queries_return_data_after_traffic(obs: Stack) -> None:
    user = unique()
    for i in range(30):
        post(obs.url + "/v1/messages", {"user_id": user, "text": f"/echo {i}"}).raise_for_status()
    for i in range(6):  # three questions, each asked twice: upstream calls and cache hits
        post(obs.url + "/v1/messages", {"user_id": user, "text": f"what is {i % 3}?"})
    # One question the LLM refuses for good (an apology, no retry, no breaker failure): the
    # provider errors panel has a series.
    requests.post(obs.stub_url + "/admin/llm", json={"status": 400, "times": 1}, timeout=5)
    post(obs.url + "/v1/messages", {"user_id": unique(), "text": "a question it refuses?"})
    requests.get(obs.url + "/v1/nowhere", timeout=5)
    time.sleep(3)  # a few scrapes and rule evaluations

    exprs = dashboard_exprs("bot-overview.json")

    def empty() -> list[str] | None:
        missing = [e for e in exprs if not query(obs, e)]
        return missing or None

    deadline = time.monotonic() + 15
    missing = empty()
    while missing and time.monotonic() < deadline:
        time.sleep(1)
        missing = empty()
    assert not missing, f"Bot overview panels without data: {missing}"


def test_every_metric_a_rule_or_dashboard_names_exists(obs: Stack) -> None:
    rules = [
        rule
        for path in (ROOT / "prometheus/rules").glob("*.yml")
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
    ]
    recorded = {r["record"] for r in rules if "record" in r}
    exprs = [r["expr"] for r in rules]
    exprs += dashboard_exprs("bot-overview.json") + dashboard_exprs("infrastructure.json")
    named = set().union(*(metric_names(e) for e in exprs)) - recorded - {"ALERTS", "vector"}
    if not query(obs, 'up{job="rabbitmq"}'):
        # This machine's broker has no rabbitmq_prometheus plugin (a stack's own broker has).
        named = {n for n in named if not n.startswith("rabbitmq_")}
    present = set(prom(obs, "/api/v1/label/__name__/values"))
    assert named, "no metric names found"
    assert not named - present, f"named but never scraped: {sorted(named - present)}"


def test_stopping_a_replica_fires_bot_replica_down_through_alertmanager(obs: Stack) -> None:
    obs.ctl("stop", "bot-3")

    def delivered() -> dict[str, Any] | None:
        return next(
            (
                a
                for a in sink_alerts(obs)
                if a["alertname"] == "BotReplicaDown"
                and a["status"] == "firing"
                and a["labels"].get("replica") == "bot-3"
            ),
            None,
        )

    alert = wait_for("BotReplicaDown at the sink", delivered, timeout=40)
    assert alert["severity"] == "page"
    assert alert["receiver"] == "page"
    assert alert["runbook_url"] == "docs/runbooks.md#botreplicadown"
    # Prometheus's ALERTS series can miss one evaluation on a loaded machine: read it until
    # it shows the firing alert, then check it is bot-3 alone.
    firing = wait_for(
        "ALERTS to show BotReplicaDown",
        lambda: query(obs, 'ALERTS{alertname="BotReplicaDown",alertstate="firing"}'),
        timeout=15,
    )
    assert [a["metric"]["replica"] for a in firing] == ["bot-3"]

    env = {**os.environ, **obs.env, "BOT_DOTENV": "/dev/null"}
    shown = run([str(ROOT / ".venv/bin/python"), "-m", "infra.alertsink", "show"], env=env)
    assert shown.returncode == 0, shown.stderr
    assert re.search(r"firing\s+page\s+BotReplicaDown .*replica=bot-3", shown.stdout), shown.stdout


def test_upstream_outage_fires_upstream_circuit_open_through_alertmanager(obs: Stack) -> None:
    obs.faults(outage=True)
    try:
        user = unique()
        for i in range(12):  # distinct questions: no cache hit hides the outage
            post(obs.url + "/v1/messages", {"user_id": user, "text": f"outage question {i}?"})
        assert obs.stub_stats()["failures"] > 0  # the outage happened

        def delivered() -> dict[str, Any] | None:
            return next(
                (
                    a
                    for a in sink_alerts(obs)
                    if a["alertname"] == "UpstreamCircuitOpen"
                    and a["status"] == "firing"
                    and a["labels"]["job"] == "bot"  # the worker's breaker opens too
                ),
                None,
            )

        alert = wait_for("UpstreamCircuitOpen at the sink", delivered)
        assert alert["severity"] == "page"
        assert query(obs, "max(bot_circuit_state) > 0")
    finally:
        obs.faults(outage=False)
