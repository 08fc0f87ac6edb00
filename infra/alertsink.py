"""The local alert sink: Alertmanager's webhook receiver when no outside service is set up.

`POST /alerts` takes Alertmanager's webhook payload, logs one `alert_received` event per
alert and keeps the last `KEEP` of them in memory; `GET /alerts` returns them, newest last
(what `python -m infra.alertsink show` prints). It pages no one: it lets an operator (and the
tests) see that an alert went all the way from a rule through Alertmanager.

    python -m infra.alertsink serve [--port BOT_ALERTMANAGER_PORT + 1] [--host 127.0.0.1]
    python -m infra.alertsink show [--last 50] [--json]
"""

from __future__ import annotations

import argparse
import collections
import json
import urllib.error
import urllib.request
from typing import Any

import orjson
from aiohttp import web

from bot import logging as bot_logging
from bot.logging import get_logger
from infra.common import settings_or_exit

KEEP = 200
ALERTS: web.AppKey[collections.deque[dict[str, Any]]] = web.AppKey("alerts")
log = get_logger(__name__)


def _summary(alert: dict[str, Any], receiver: str) -> dict[str, Any]:
    labels: dict[str, str] = alert.get("labels", {})
    annotations: dict[str, str] = alert.get("annotations", {})
    return {
        "status": alert.get("status", "?"),
        "alertname": labels.get("alertname", "?"),
        "severity": labels.get("severity", "?"),
        "labels": labels,
        "summary": annotations.get("summary", ""),
        "runbook_url": annotations.get("runbook_url", ""),
        "starts_at": alert.get("startsAt", ""),
        "ends_at": alert.get("endsAt", ""),
        "receiver": receiver,
    }


async def receive(request: web.Request) -> web.Response:
    try:
        payload = orjson.loads(await request.read())
        alerts = payload["alerts"]
        receiver = str(payload.get("receiver", ""))
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return web.json_response(
            {"error": {"code": "bad_request", "message": "expected Alertmanager's webhook JSON"}},
            status=400,
        )
    for alert in alerts:
        item = _summary(alert, receiver)
        request.app[ALERTS].append(item)
        log.warning(
            "alert_received",
            alertname=item["alertname"],
            status=item["status"],
            severity=item["severity"],
            summary=item["summary"],
            receiver=receiver,
        )
    return web.json_response({"received": len(alerts)})


async def list_alerts(request: web.Request) -> web.Response:
    kept = request.app[ALERTS]
    return web.Response(body=orjson.dumps({"alerts": [*kept]}), content_type="application/json")


async def healthz(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def create_sink_app() -> web.Application:
    app = web.Application()
    app[ALERTS] = collections.deque(maxlen=KEEP)
    app.router.add_post("/alerts", receive)
    app.router.add_get("/alerts", list_alerts)
    app.router.add_get("/healthz", healthz)
    return app


def run(port: int, host: str = "127.0.0.1") -> None:
    """Serve the sink until interrupted."""
    web.run_app(create_sink_app(), host=host, port=port, access_log=None, print=None)


def format_alerts(alerts: list[dict[str, Any]]) -> str:
    """One line per alert, newest last: when, status, severity, name, labels, summary."""
    if not alerts:
        return "no alerts received"
    lines = []
    for a in alerts:
        extra = ",".join(
            f"{k}={v}"
            for k, v in sorted(a.get("labels", {}).items())
            if k not in ("alertname", "severity")
        )
        lines.append(
            f"{a['starts_at'][:19]:<19} {a['status']:<8} {a['severity']:<7} "
            f"{a['alertname']:<22} {extra}  {a['summary']}"
        )
    return "\n".join(lines)


def _serve(args: argparse.Namespace) -> int:
    settings = settings_or_exit("infra.alertsink")
    bot_logging.configure(settings.log_format, settings.log_level, service="alertsink")
    run(args.port or settings.alertsink_port, host=args.host)
    return 0


def _show(args: argparse.Namespace) -> int:
    """Print the alerts the running sink received (Alertmanager's webhook receiver)."""
    url = f"http://127.0.0.1:{settings_or_exit('infra.alertsink').alertsink_port}/alerts"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            alerts = json.loads(resp.read())["alerts"][-args.last :]
    except (urllib.error.URLError, OSError) as exc:
        print(f"alertsink: the alert sink at {url} does not answer ({exc}); is the stack up?")
        return 1
    print(json.dumps(alerts, indent=2) if args.json else format_alerts(alerts))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="infra.alertsink", description="the local alert sink")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the sink (Alertmanager's webhook receiver)")
    serve.add_argument("--port", type=int, help="override BOT_ALERTMANAGER_PORT + 1")
    serve.add_argument("--host", default="127.0.0.1")
    serve.set_defaults(func=_serve)
    show = sub.add_parser("show", help="print the last alerts Alertmanager sent the sink")
    show.add_argument("--last", type=int, default=50, help="how many (default 50)")
    show.add_argument("--json", action="store_true", help="raw JSON")
    show.set_defaults(func=_show)
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
