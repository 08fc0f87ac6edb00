"""Prometheus, Alertmanager and Grafana configs: they parse, their rules are unit-tested.

No stack here: promtool and amtool check what the runner renders, promtool runs the rule unit
tests, and every dashboard query is parsed by promtool as a recording rule.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from bot.settings import load_settings
from infra import dashboards, observability
from infra.common import Paths
from tests.support import run

ROOT = Path(__file__).resolve().parent.parent
CONTRACT_ALERTS = {
    "BotReplicaDown",
    "BotHighErrorRate",
    "BotHighLatency",
    "BotRateLimitSurge",
    "UpstreamCircuitOpen",
    "RetryBacklogGrowing",
    "DeadLettersPresent",
    "RedisDown",
    "RabbitMQDown",
    "NginxUpstreamErrors",
}
# Beyond the contract's list: the LLM upstream's (issue 19), both tickets, and the chat
# channels' delivery alert (issue 18).
ALERTS = CONTRACT_ALERTS | {
    "UpstreamQuotaExhausted",
    "UpstreamBudgetExceeded",
    "ChannelDeliveryFailing",
}


def alert_rules() -> list[dict[str, object]]:
    groups = yaml.safe_load((ROOT / "prometheus/rules/alerts.yml").read_text())["groups"]
    return [rule for g in groups for rule in g["rules"]]


def dashboard_exprs(name: str) -> list[str]:
    """Every panel query of a committed dashboard, Grafana variables filled in."""
    board = json.loads((ROOT / "grafana/dashboards" / name).read_text())
    return [
        t["expr"].replace("$__rate_interval", "1m").replace("$replica", ".*")
        for panel in board["panels"]
        for t in panel["targets"]
    ]


def test_rendered_prometheus_config_and_rules_pass_promtool(tmp_path: Path) -> None:
    settings = load_settings({"BOT_REPLICAS": "4", "BOT_DOTENV": "/dev/null"})
    base = observability.write_config(settings, Paths(tmp_path))
    bot_targets = json.loads((base / "targets" / "bot.json").read_text())
    assert [g["labels"]["replica"] for g in bot_targets] == ["bot-1", "bot-2", "bot-3", "bot-4"]
    assert bot_targets[3]["targets"] == ["127.0.0.1:9104"]
    result = run(["promtool", "check", "config", str(base / "prometheus.yml")])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 2 rule files found" in result.stdout + result.stderr


def test_every_contract_alert_has_severity_annotations_and_a_runbook_section() -> None:
    rules = alert_rules()
    assert {r["alert"] for r in rules} == ALERTS
    runbook = (ROOT / "docs/runbooks.md").read_text()
    anchors = {h.strip().lower() for h in re.findall(r"^## (\w+)", runbook, re.M)}
    for rule in rules:
        labels, notes = rule["labels"], rule["annotations"]
        assert isinstance(labels, dict) and isinstance(notes, dict)
        assert labels["severity"] in ("page", "ticket"), rule["alert"]
        assert notes["summary"] and notes["description"], rule["alert"]
        anchor = str(rule["alert"]).lower()
        assert notes["runbook_url"] == f"docs/runbooks.md#{anchor}"
        assert anchor in anchors, f"docs/runbooks.md has no section for {rule['alert']}"


def test_promtool_unit_tests_cover_every_alert_firing_and_silent() -> None:
    tests = sorted((ROOT / "prometheus/tests").glob("*.yml"))
    result = run(["promtool", "test", "rules", *map(str, tests)])
    assert result.returncode == 0, result.stdout + result.stderr
    fired: set[str] = set()
    silent: set[str] = set()
    for path in tests:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (fired if check.get("exp_alerts") else silent).add(check["alertname"])
    assert fired == ALERTS
    assert silent == ALERTS


def test_rendered_alertmanager_config_passes_amtool(tmp_path: Path) -> None:
    settings = load_settings({"BOT_DOTENV": "/dev/null", "BOT_SCRAPE_INTERVAL": "1"})
    conf = tmp_path / "alertmanager.yml"
    conf.write_text(observability.render_alertmanager(settings, "http://127.0.0.1:9094/alerts"))
    result = run(["amtool", "check-config", str(conf)])
    assert result.returncode == 0, result.stdout + result.stderr
    rendered = yaml.safe_load(conf.read_text())
    assert rendered["route"]["group_wait"] == "2000ms"
    assert {r["name"] for r in rendered["receivers"]} == {"page", "ticket"}
    # RedisDown silences the symptoms it causes.
    redis_rule = next(
        r for r in rendered["inhibit_rules"] if r["source_matchers"] == ['alertname="RedisDown"']
    )
    assert "BotHighErrorRate" in redis_rule["target_matchers"][0]


def _matches(labels: dict[str, str], matcher: str) -> bool:
    """One Alertmanager matcher (`name="v"`, `name!="v"`, `name=~"re"`) against labels."""
    m = re.fullmatch(r'\s*(\w+)\s*(=~|!~|!=|=)\s*"(.*)"\s*', matcher)
    assert m, f"unsupported matcher {matcher!r}"
    name, op, value = m.groups()
    have = labels.get(name, "")
    if op in ("=~", "!~"):
        return bool(re.fullmatch(value, have)) == (op == "=~")
    return (have == value) == (op == "=")


def test_every_inhibit_rule_names_alerts_as_they_fire(tmp_path: Path) -> None:
    """Each source and each alert a target names exists with the labels the rule asks for:
    a rule that can never match (a wrong severity, a renamed alert) silences nothing."""
    settings = load_settings({"BOT_DOTENV": "/dev/null"})
    rendered = yaml.safe_load(observability.render_alertmanager(settings, "http://sink/alerts"))
    alerts = [
        {"alertname": str(r["alert"]), **r["labels"]}  # type: ignore[dict-item]
        for r in alert_rules()
    ]
    for rule in rendered["inhibit_rules"]:
        for side in ("source_matchers", "target_matchers"):
            matchers = rule[side]
            hits = [a for a in alerts if all(_matches(a, m) for m in matchers)]
            named = {a["alertname"] for a in alerts if _matches(a, matchers[0])}
            assert named, (side, rule)  # the first matcher names the alerts
            # every alert the rule names can match it, in at least one of its severities
            assert {a["alertname"] for a in hits} == named, (side, rule, named)


def test_committed_dashboards_match_their_generator() -> None:
    for name, board in dashboards.DASHBOARDS.items():
        assert (ROOT / "grafana/dashboards" / name).read_text() == dashboards.render(board), (
            f"run `python -m infra.dashboards`: {name} is stale"
        )
        variables = [v["name"] for v in board["templating"]["list"]]
        assert variables == ["replica"]
        assert board["annotations"]["list"][0]["expr"].startswith("ALERTS{")


def test_every_dashboard_query_parses(tmp_path: Path) -> None:
    exprs = dashboard_exprs("bot-overview.json") + dashboard_exprs("infrastructure.json")
    rules = {
        "groups": [
            {
                "name": "dashboards",
                "rules": [
                    {"record": f"dashboard:query{i}", "expr": e} for i, e in enumerate(exprs)
                ],
            }
        ]
    }
    path = tmp_path / "dashboards.yml"
    path.write_text(yaml.safe_dump(rules))
    result = run(["promtool", "check", "rules", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in result.stdout
