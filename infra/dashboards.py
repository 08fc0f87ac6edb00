"""The Grafana dashboards, generated from code so every panel is a title and its queries.

    python -m infra.dashboards      # rewrites grafana/dashboards/*.json

The JSON files are committed (Grafana's provisioning reads them); a test checks they match
this code, that every query parses, and that *Bot overview*'s queries return data.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bot.metrics import CHANNELS

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "grafana" / "dashboards"
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}
R = "$__rate_interval"
SEL = 'replica=~"$replica"'

# (title, unit, [(legend, expr), ...]); each row of the list is one panel, 2 a row.
Panel = tuple[str, str, list[tuple[str, str]]]

BOT_OVERVIEW: list[Panel] = [
    (
        "Messages by outcome",
        "reqps",
        [("{{outcome}}", f"sum by (outcome) (rate(bot_messages_total{{{SEL}}}[{R}]))")],
    ),
    (
        "SLO: error-budget burn rate (99.9 % of messages without 5xx)",
        "none",
        [
            ("burn rate 1h", "slo:bot_messages_error_budget:burn_rate1h"),
            ("5xx ratio 5m x 1000", "slo:bot_messages_errors:ratio_rate5m * 1000"),
        ],
    ),
    (
        "Requests per route (rate)",
        "reqps",
        [
            (
                "{{method}} {{route}} {{code}}",
                f"sum by (route, method, code) (rate(bot_http_requests_total{{{SEL}}}[{R}]))",
            )
        ],
    ),
    (
        "Errors per route (5xx share)",
        "percentunit",
        [
            (
                "{{route}}",
                f'(sum by (route) (rate(bot_http_requests_total{{{SEL},code=~"5.."}}[{R}])) '
                f"or sum by (route) (rate(bot_http_requests_total{{{SEL}}}[{R}])) * 0) "
                f"/ sum by (route) (rate(bot_http_requests_total{{{SEL}}}[{R}]))",
            )
        ],
    ),
    (
        "Latency per route: p50 / p95 / p99",
        "s",
        [
            (
                f"p{q} {{{{route}}}}",
                f"histogram_quantile(0.{q}, sum by (route, le) "
                f"(rate(bot_http_request_duration_seconds_bucket{{{SEL}}}[{R}])))",
            )
            for q in ("50", "95", "99")
        ],
    ),
    (
        "Rate-limited share of messages",
        "percentunit",
        [
            (
                "rate limited",
                f'sum(rate(bot_messages_total{{{SEL},outcome="rate_limited"}}[{R}])) '
                f"/ sum(rate(bot_messages_total{{{SEL}}}[{R}]))",
            )
        ],
    ),
    (
        "Cache hit ratio",
        "percentunit",
        [
            (
                "hits",
                f'sum(rate(bot_cache_lookups_total{{{SEL},result="hit"}}[{R}])) '
                f"/ sum(rate(bot_cache_lookups_total{{{SEL}}}[{R}]))",
            )
        ],
    ),
    (
        "Upstream calls by outcome",
        "reqps",
        [
            (
                "{{outcome}}",
                f"sum by (outcome) (rate(bot_upstream_requests_total{{{SEL}}}[{R}]))",
            )
        ],
    ),
    (
        "Upstream latency p50 / p95",
        "s",
        [
            (
                f"p{q}",
                f"histogram_quantile(0.{q}, sum by (le) "
                f"(rate(bot_upstream_request_duration_seconds_bucket{{{SEL}}}[{R}])))",
            )
            for q in ("50", "95")
        ],
    ),
    (
        "LLM tokens/s by model",
        "short",
        [
            (
                "{{model}} {{kind}}",
                f"sum by (model, kind) (rate(bot_upstream_tokens_total{{{SEL}}}[{R}]))",
            )
        ],
    ),
    (
        "LLM cost (USD, 24 h) by model",
        "currencyUSD",
        [
            ("{{model}}", f"sum by (model) (increase(bot_upstream_cost_usd_total{{{SEL}}}[1d]))"),
            ("daily budget", "max(bot_upstream_budget_usd) > 0"),
        ],
    ),
    (
        "LLM errors by status and code",
        "reqps",
        [
            (
                "{{status}} {{code}}",
                f"sum by (status, code) (rate(bot_upstream_errors_total{{{SEL}}}[{R}]))",
            ),
            (
                "incomplete: {{reason}}",
                f"sum by (reason) (rate(bot_upstream_incomplete_total{{{SEL}}}[{R}]))",
            ),
        ],
    ),
    (
        "Circuit state (0 closed, 1 open, 2 half-open)",
        "none",
        [("{{replica}}", f"max by (replica) (bot_circuit_state{{{SEL}}})")],
    ),
    (
        "Retry backlog",
        "short",
        [
            ("{{queue}}", 'max by (queue) (bot_retry_queue_messages{queue!~".*(dead|dlq).*"})'),
            ("published/s", f"sum(rate(bot_retry_jobs_published_total{{{SEL}}}[{R}]))"),
            (
                "attempts {{outcome}}/s",
                f"sum by (outcome) (rate(bot_retry_attempts_total{{{SEL}}}[{R}]))",
            ),
        ],
    ),
    (
        "Dead letters",
        "short",
        [
            ("{{queue}}", 'max by (queue) (bot_retry_queue_messages{queue=~".*(dead|dlq).*"})'),
            ("dead-lettered (1h)", 'sum(increase(bot_retry_attempts_total{outcome="dead"}[1h]))'),
        ],
    ),
    (
        "Replies delivered (deferred)",
        "reqps",
        [("delivered", f"sum(rate(bot_replies_delivered_total{{{SEL}}}[{R}]))")],
    ),
    (
        "In-flight requests",
        "short",
        [("{{replica}}", f"sum by (replica) (bot_inflight_requests{{{SEL}}})")],
    ),
]

INFRASTRUCTURE: list[Panel] = [
    (
        "Replicas up",
        "none",
        [("{{replica}}", f'up{{job=~"bot|worker",{SEL}}}')],
    ),
    ("Scrape targets up per job", "none", [("{{job}}", "sum by (job) (up)")]),
    (
        "NGINX requests and connections",
        "short",
        [
            ("requests/s", f"sum(rate(nginx_http_requests_total[{R}]))"),
            ("active connections", "sum(nginx_connections_active)"),
        ],
    ),
    (
        "NGINX responses per upstream and status",
        "reqps",
        [
            (
                "{{upstream}} {{status}}",
                f"sum by (upstream, status) (rate(nginx_http_responses_total[{R}]))",
            )
        ],
    ),
    (
        "NGINX 5xx per upstream",
        "reqps",
        [
            (
                "{{upstream}}",
                f'sum by (upstream) (rate(nginx_http_responses_total{{status=~"5.."}}[{R}]))',
            )
        ],
    ),
    (
        "Redis memory",
        "bytes",
        [("used", "sum(redis_memory_used_bytes)"), ("max", "sum(redis_memory_max_bytes)")],
    ),
    (
        "Redis ops and clients",
        "short",
        [
            ("commands/s", f"sum(rate(redis_commands_processed_total[{R}]))"),
            ("clients", "sum(redis_connected_clients)"),
        ],
    ),
    (
        "RabbitMQ queues (bot view and broker)",
        "short",
        [
            ("{{queue}}", "max by (queue) (bot_retry_queue_messages)"),
            ("broker ready", "sum(rabbitmq_queue_messages_ready)"),
            ("broker unacked", "sum(rabbitmq_queue_messages_unacked)"),
        ],
    ),
    (
        "Dependencies seen by each process (1 up)",
        "none",
        [
            (
                "{{replica}} {{dependency}}",
                f"max by (replica, dependency) (bot_dependency_up{{{SEL}}})",
            )
        ],
    ),
    (
        "CPU per process",
        "percentunit",
        [("{{job}} {{replica}}", f"sum by (job, replica) (rate(process_cpu_seconds_total[{R}]))")],
    ),
    (
        "Memory per process (RSS)",
        "bytes",
        [("{{job}} {{replica}}", "sum by (job, replica) (process_resident_memory_bytes)")],
    ),
]


def _channel_row(channel: str) -> list[Panel]:
    """A row per chat channel: what came in and went out, and what waits."""
    c = f'channel="{channel}"'
    return [
        (
            f"{channel}: updates in and sends out",
            "reqps",
            [
                (
                    "in {{outcome}}",
                    f"sum by (outcome) (rate(bot_channel_updates_total{{{c}}}[{R}]))",
                ),
                (
                    "out {{outcome}}",
                    f"sum by (outcome) (rate(bot_outbound_sends_total{{{c}}}[{R}]))",
                ),
            ],
        ),
        (
            f"{channel}: outbound backlog and paused conversations",
            "short",
            [
                ("queued", f"max(bot_outbound_queue_messages{{{c}}})"),
                ("paused (429)", f"sum(bot_outbound_paused_conversations{{{c}}})"),
            ],
        ),
    ]


BOT_OVERVIEW += [panel for channel in CHANNELS for panel in _channel_row(channel)]


def _panel(index: int, panel: Panel) -> dict[str, Any]:
    title, unit, queries = panel
    return {
        "id": index + 1,
        "type": "timeseries",
        "title": title,
        "datasource": DATASOURCE,
        "gridPos": {"h": 8, "w": 12, "x": 12 * (index % 2), "y": 8 * (index // 2)},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
        "targets": [
            {"refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend}
            for i, (legend, expr) in enumerate(queries)
        ],
    }


def dashboard(uid: str, title: str, panels: list[Panel]) -> dict[str, Any]:
    """A Grafana dashboard with a `replica` variable and firing alerts as annotations."""
    return {
        "uid": uid,
        "title": title,
        "tags": ["bot"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "replica",
                    "label": "replica",
                    "type": "query",
                    "datasource": DATASOURCE,
                    "query": {
                        "query": 'label_values(up{job=~"bot|worker"}, replica)',
                        "refId": "replica",
                    },
                    "definition": 'label_values(up{job=~"bot|worker"}, replica)',
                    "refresh": 2,
                    "multi": True,
                    "includeAll": True,
                    "allValue": ".*",
                    "current": {"text": "All", "value": "$__all"},
                    "sort": 1,
                }
            ]
        },
        "annotations": {
            "list": [
                {
                    "name": "Alerts",
                    "datasource": DATASOURCE,
                    "enable": True,
                    "iconColor": "red",
                    "expr": 'ALERTS{alertstate="firing"}',
                    "step": "30s",
                    "titleFormat": "{{alertname}}",
                    "textFormat": "{{severity}} {{replica}}{{queue}}{{upstream}}",
                    "useValueForTime": False,
                }
            ]
        },
        "panels": [_panel(i, p) for i, p in enumerate(panels)],
    }


DASHBOARDS = {
    "bot-overview.json": dashboard("bot-overview", "Bot overview", BOT_OVERVIEW),
    "infrastructure.json": dashboard("bot-infrastructure", "Infrastructure", INFRASTRUCTURE),
}


def render(board: dict[str, Any]) -> str:
    return json.dumps(board, indent=2, ensure_ascii=False) + "\n"


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, board in DASHBOARDS.items():
        (OUT / name).write_text(render(board))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
