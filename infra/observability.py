"""Prometheus, Alertmanager, the local alert sink and the exporters, for the native runner.

`observability_programs()` renders Prometheus's and Alertmanager's configs from their one
template each into the run directory, writes the file-based service-discovery files
(``targets/<job>.json``) for `BOT_REPLICAS` replicas, the worker and the exporters, copies the
rule files (a test may rewrite its copy and send SIGHUP), and returns the processes to
supervise. Off with ``BOT_OBSERVABILITY=false`` (the tests' default: most stacks need none of
it). `wait_targets_loaded` lets `make up` print its URLs only once Prometheus lists them.
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from bot.settings import Settings
from infra.common import ROOT, Paths, answers, port_free, render_template
from infra.programs import RABBITMQ_PROMETHEUS_PORT, Program, module_command

PROMETHEUS_DIR = ROOT / "prometheus"
ALERTMANAGER_DIR = ROOT / "alertmanager"


def rabbitmq_metrics_target(settings: Settings) -> str | None:
    """The broker's rabbitmq_prometheus endpoint, when there is one to scrape.

    A broker the runner starts itself has the plugin enabled (see `data_programs`); a
    reused one is scraped only when its plugin answers. The bot's own
    `bot_retry_queue_messages` and `bot_dependency_up` cover RabbitMQ in any case.
    """
    amqp = urlparse(settings.amqp_url)
    host = amqp.hostname or "127.0.0.1"
    if answers(host, amqp.port or 5672):  # a reused broker
        plugin = answers(host, RABBITMQ_PROMETHEUS_PORT)
    else:  # ours: its plugin takes the port unless another process holds it already
        plugin = port_free(RABBITMQ_PROMETHEUS_PORT)
    return f"{host}:{RABBITMQ_PROMETHEUS_PORT}" if plugin else None


def has_worker() -> bool:
    """Whether the retry worker exists in this build (`bot worker`), so it is a target."""
    from bot.cli import build_parser

    return any(
        "worker" in (getattr(action, "choices", None) or {})
        for action in build_parser()._actions  # argparse keeps subcommands only here
    )


def scrape_targets(settings: Settings, host: str = "127.0.0.1") -> dict[str, list[dict[str, Any]]]:
    """File-SD groups per job: what Prometheus scrapes for these settings."""

    def group(port: int, **labels: str) -> dict[str, Any]:
        return {"targets": [f"{host}:{port}"], "labels": labels}

    rabbitmq = rabbitmq_metrics_target(settings)
    return {
        "bot": [
            group(settings.replica_metrics_port(i), replica=f"bot-{i}")
            for i in range(1, settings.replicas + 1)
        ],
        "worker": [group(settings.worker_metrics_port, replica="worker")] if has_worker() else [],
        "nginx": [group(settings.nginx_exporter_port)],
        "nginx-log": [group(settings.mtail_port)],
        "redis": [group(settings.redis_exporter_port)],
        "rabbitmq": [{"targets": [rabbitmq], "labels": {}}] if rabbitmq else [],
        "prometheus": [group(settings.prometheus_port)],
        "alertmanager": [group(settings.alertmanager_port)],
    }


def _duration(seconds: float) -> str:
    return f"{round(seconds * 1000)}ms"


def render_prometheus(
    settings: Settings, targets_dir: Path, rules_dir: Path, alertmanager: str = ""
) -> str:
    """Prometheus's config; `alertmanager` is host:port (compose names its container)."""
    template = (PROMETHEUS_DIR / "prometheus.yml.template").read_text()
    return render_template(
        template,
        {
            "scrape_interval": _duration(settings.scrape_interval),
            "scrape_timeout": _duration(min(settings.scrape_interval, 10.0)),
            "rules_dir": rules_dir,
            "targets_dir": targets_dir,
            "alertmanager": alertmanager or f"127.0.0.1:{settings.alertmanager_port}",
        },
    )


def render_alertmanager(settings: Settings, sink_url: str) -> str:
    """Alertmanager's config; its grouping timings scale with the scrape interval.

    At the default 15 s scrape they are Alertmanager's usual 30 s / 5 m; a test scraping
    every second gets 2 s / 20 s and sees its alert within seconds.
    """
    template = (ALERTMANAGER_DIR / "alertmanager.yml.template").read_text()
    return render_template(
        template,
        {
            "alertsink_url": sink_url,
            "group_wait": _duration(2 * settings.scrape_interval),
            "group_interval": _duration(20 * settings.scrape_interval),
        },
    )


def write_config(settings: Settings, paths: Paths) -> Path:
    """Render everything Prometheus and Alertmanager read into ``<run>/prometheus``."""
    base = paths.run / "prometheus"
    targets, rules = targets_dir(paths), base / "rules"
    for d in (targets, rules, base / "data", paths.run / "alertmanager"):
        d.mkdir(parents=True, exist_ok=True)
    for job, groups in scrape_targets(settings).items():
        (targets / f"{job}.json").write_text(json.dumps(groups, indent=2) + "\n")
    source = Path(settings.prometheus_rules_dir or PROMETHEUS_DIR / "rules")
    for rule_file in source.glob("*.yml"):
        shutil.copyfile(rule_file, rules / rule_file.name)
    (base / "prometheus.yml").write_text(render_prometheus(settings, targets, rules))
    sink = f"http://127.0.0.1:{settings.alertsink_port}/alerts"
    (paths.run / "alertmanager" / "alertmanager.yml").write_text(
        render_alertmanager(settings, sink)
    )
    return base


def targets_dir(paths: Paths) -> Path:
    """Where `write_config` puts the file-SD target files Prometheus reads."""
    return paths.run / "prometheus" / "targets"


def targets_loaded(settings: Settings, paths: Paths) -> bool:
    """Whether Prometheus's /api/v1/targets lists every target of our file-SD files."""
    expected = {
        target
        for path in targets_dir(paths).glob("*.json")
        for group in json.loads(path.read_text())
        for target in group["targets"]
    }
    url = f"http://127.0.0.1:{settings.prometheus_port}/api/v1/targets?state=active"
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            active = json.loads(resp.read())["data"]["activeTargets"]
    except (urllib.error.URLError, OSError, ValueError, KeyError):
        return False
    return expected <= {t.get("labels", {}).get("instance") for t in active}


def wait_targets_loaded(settings: Settings, paths: Paths, timeout: float) -> bool:
    """Wait until Prometheus lists its targets (it reads file-SD a few seconds after start)."""
    deadline = time.monotonic() + timeout
    while not targets_loaded(settings, paths):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.25)
    return True


def _exe(name: str) -> str:
    return shutil.which(name) or f"/usr/bin/{name}"


def observability_programs(settings: Settings, paths: Paths, env: dict[str, str]) -> list[Program]:
    """The observability processes for these settings (none when it is switched off)."""
    if not settings.observability:
        return []
    base = write_config(settings, paths)
    (paths.logs / "nginx-access.log").touch()  # mtail follows only files present at its start
    am_dir = paths.run / "alertmanager"
    redis = urlparse(settings.redis_url)
    redis_addr = f"redis://{redis.hostname or '127.0.0.1'}:{redis.port or 6379}"
    nginx_port, redis_port, log_port = (
        settings.nginx_exporter_port,
        settings.redis_exporter_port,
        settings.mtail_port,
    )
    return [
        Program(
            "prometheus",
            f"{_exe('prometheus')} --config.file={base / 'prometheus.yml'} "
            f"--storage.tsdb.path={base / 'data'} --storage.tsdb.retention.time=15d "
            f"--web.listen-address=127.0.0.1:{settings.prometheus_port} --web.enable-lifecycle",
            settings.prometheus_port,
            priority=950,
            ready_url=f"http://127.0.0.1:{settings.prometheus_port}/-/ready",
            writable=(base / "data",),
        ),
        Program(
            "alertmanager",
            f"{_exe('prometheus-alertmanager')} --config.file={am_dir / 'alertmanager.yml'} "
            f"--storage.path={am_dir} --cluster.listen-address= "
            f"--web.listen-address=127.0.0.1:{settings.alertmanager_port}",
            settings.alertmanager_port,
            priority=940,
            ready_url=f"http://127.0.0.1:{settings.alertmanager_port}/-/ready",
            writable=(am_dir,),
        ),
        Program(
            "alertsink",
            module_command("infra.alertsink", "serve"),
            settings.alertsink_port,
            priority=930,
            ready_url=f"http://127.0.0.1:{settings.alertsink_port}/healthz",
        ),
        Program(
            "nginx-exporter",
            f"{_exe('prometheus-nginx-exporter')} "
            f"-nginx.scrape-uri=http://127.0.0.1:{settings.nginx_status_port}/stub_status "
            f"-web.listen-address=127.0.0.1:{nginx_port}",
            nginx_port,
            priority=950,
        ),
        Program(
            "redis-exporter",
            f"{_exe('prometheus-redis-exporter')} -redis.addr={redis_addr} "
            f"-web.listen-address=127.0.0.1:{redis_port}",
            redis_port,
            priority=950,
        ),
        Program(
            "nginx-log",
            f"{_exe('mtail')} -progs {PROMETHEUS_DIR / 'mtail'} "
            f"-logs {paths.logs / 'nginx-access.log'} -emit_prog_label=false "
            f"-address 127.0.0.1 -port {log_port} -logtostderr",
            log_port,
            priority=950,
        ),
    ]
