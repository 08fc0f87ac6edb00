"""`bot serve | worker | dlq ...`: the console script.

The stack's tooling has entry points of its own (`python -m infra.stub`, `python -m
infra.alertsink`), so the package imports nothing from `infra`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from bot import logging as bot_logging
from bot.settings import Settings, SettingsError, load_settings


def _settings() -> Settings:
    try:
        return load_settings()
    except SettingsError as exc:
        print(f"bot: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _serve(args: argparse.Namespace) -> int:
    settings = _settings()
    bot_logging.configure(
        settings.log_format, settings.log_level, settings.secrets, service=f"bot-{args.replica}"
    )
    from bot.serve import serve

    port = args.port or settings.replica_port(args.replica)
    metrics_port = args.metrics_port or settings.replica_metrics_port(args.replica)
    serve(settings, port, metrics_port, host=args.host)
    return 0


def _worker(args: argparse.Namespace) -> int:
    settings = _settings()
    bot_logging.configure(
        settings.log_format, settings.log_level, settings.secrets, service="worker"
    )
    from bot.serve_worker import serve_worker

    serve_worker(settings, args.metrics_port or settings.worker_metrics_port, host=args.host)
    return 0


def _dlq(args: argparse.Namespace) -> int:
    from bot.retries import dlq

    return dlq.run(_settings(), args)


def _channels(args: argparse.Namespace) -> int:
    from bot.channels import admin

    return admin.run(_settings(), args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bot", description="The resilient bot stack.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run one bot replica")
    serve.add_argument("--replica", type=int, default=1, help="replica number (1-based)")
    serve.add_argument("--port", type=int, help="override BOT_PORT_BASE + replica - 1")
    serve.add_argument("--metrics-port", type=int, help="override the metrics port")
    serve.add_argument("--host", default="127.0.0.1")
    serve.set_defaults(func=_serve)

    worker = sub.add_parser("worker", help="run the retry worker (answers queued jobs)")
    worker.add_argument("--metrics-port", type=int, help="override BOT_WORKER_METRICS_PORT")
    worker.add_argument("--host", default="127.0.0.1")
    worker.set_defaults(func=_worker)

    from bot.retries.dlq import add_parser as add_dlq_parser

    add_dlq_parser(sub, _dlq)
    from bot.channels.admin import add_parser as add_channels_parser

    add_channels_parser(sub, _channels)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
