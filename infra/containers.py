"""What the containers of `compose.yaml` need beyond the `bot` commands.

`render` fills the native runner's templates (NGINX, Prometheus, Alertmanager) with the
containers' host names instead of ``127.0.0.1`` and writes them into the volume that NGINX,
Prometheus and Alertmanager mount: one set of templates, one renderer, two host layouts.
`probe` is the images' health check (the slim Python image has no curl); `replicas N` prints
a compose file that adds replicas beyond compose.yaml's (docs/containers.md, "Scaling").

    python -m infra.containers render [--out DIR]
    python -m infra.containers probe URL
    python -m infra.containers replicas N > compose.replicas.yaml
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from bot.settings import Settings, SettingsError, load_settings, merged_environ
from infra import observability
from infra.common import ROOT, Paths
from infra.nginxconf import render_nginx
from infra.programs import RABBITMQ_PROMETHEUS_PORT

# Where the rendered files live in every container that reads them (a named volume).
CONFIG_DIR = Path("/srv/bot-config")
# NGINX's run directory in its container: pid, temp files and logs/ (a volume mtail reads).
NGINX_RUN = Path("/var/lib/bot-nginx")
WEB_ROOT = "/srv/bot-web"  # the nginx service mounts web/ here
# Where the Prometheus container mounts the repo's prometheus/rules folder.
RULES_DIR = Path("/etc/prometheus/rules")
# Docker's embedded DNS server, on every user-defined network.
DOCKER_DNS = "127.0.0.11"
# Exporters that share NGINX's network namespace (stub_status stays on its loopback).
IN_NGINX_NETNS = frozenset({"nginx-exporter"})


def service_host(program: str) -> str:
    """The host name a native program has in compose: its service's (or NGINX's) name."""
    return "nginx" if program in IN_NGINX_NETNS else program


def target_hosts(settings: Settings) -> dict[int, str]:
    """Metrics port -> the compose service that serves it (ports are the native ones)."""
    hosts = {settings.replica_metrics_port(i): f"bot-{i}" for i in range(1, settings.replicas + 1)}
    hosts |= {
        settings.worker_metrics_port: "worker",
        settings.nginx_exporter_port: service_host("nginx-exporter"),
        settings.mtail_port: "nginx-log",
        settings.redis_exporter_port: "redis-exporter",
        RABBITMQ_PROMETHEUS_PORT: "rabbitmq",
        settings.prometheus_port: "prometheus",
        settings.alertmanager_port: "alertmanager",
    }
    return hosts


def scrape_targets(settings: Settings) -> dict[str, list[dict[str, Any]]]:
    """The native runner's file-SD groups, each target moved to its container."""
    hosts = target_hosts(settings)
    jobs = observability.scrape_targets(settings)
    for groups in jobs.values():
        for group in groups:
            moved = []
            for target in group["targets"]:
                port = int(target.rsplit(":", 1)[1])
                if port not in hosts:
                    raise ValueError(f"no container serves the scrape target {target}")
                moved.append(f"{hosts[port]}:{port}")
            group["targets"] = moved
    return jobs


def render(settings: Settings, out: Path) -> list[Path]:
    """Write nginx.conf, prometheus.yml (+ its targets) and alertmanager.yml under `out`."""
    nginx = render_nginx(
        settings,
        Paths(NGINX_RUN),
        upstream_host="bot-{i}",
        resolver=DOCKER_DNS,
        web_root=WEB_ROOT,
    )
    targets = out / "prometheus" / "targets"
    files: dict[Path, str] = {
        out / "nginx" / "nginx.conf": nginx,
        out / "prometheus" / "prometheus.yml": observability.render_prometheus(
            settings, targets, RULES_DIR, alertmanager=f"alertmanager:{settings.alertmanager_port}"
        ),
        out / "alertmanager" / "alertmanager.yml": observability.render_alertmanager(
            settings, f"http://alertsink:{settings.alertsink_port}/alerts"
        ),
    }
    for job, groups in scrape_targets(settings).items():
        files[targets / f"{job}.json"] = json.dumps(groups, indent=2) + "\n"
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return sorted(files)


def replica_services(compose: dict[str, Any], replicas: int) -> dict[str, Any]:
    """Services ``bot-<k+1>..bot-<replicas>``: compose's `bot-1` with its replica's number.

    An override file rather than ``extends``, which Compose v1 refuses for services with
    ``depends_on``; NGINX waits for the new replicas too.
    """
    base = compose["services"]["bot-1"]
    have = sum(1 for name in compose["services"] if name.startswith("bot-"))
    first = Settings()
    services: dict[str, Any] = {}
    for i in range(have + 1, replicas + 1):
        service = copy.deepcopy(base)
        args = service["command"]
        args[args.index("--replica") + 1] = str(i)
        service["healthcheck"]["test"] = [
            t.replace(f":{first.replica_port(1)}/", f":{first.replica_port(i)}/")
            for t in service["healthcheck"]["test"]
        ]
        services[f"bot-{i}"] = service
    if services:
        services["nginx"] = {
            "depends_on": {name: {"condition": "service_healthy"} for name in services}
        }
    return {"services": services}


def probe(url: str, timeout: float = 3.0) -> bool:
    """Whether `url` answers 2xx/3xx: the containers' health check."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return bool(resp.status < 400)
    except (urllib.error.URLError, OSError):
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="containers", description=__doc__)
    sub = parser.add_subparsers(dest="action", required=True)
    render_cmd = sub.add_parser("render", help="render the config files for compose")
    render_cmd.add_argument("--out", type=Path, default=CONFIG_DIR)
    probe_cmd = sub.add_parser("probe", help="exit 0 when URL answers 2xx/3xx")
    probe_cmd.add_argument("url")
    replicas_cmd = sub.add_parser("replicas", help="print a compose file adding replicas")
    replicas_cmd.add_argument("count", type=int)
    args = parser.parse_args(argv)
    if args.action == "probe":
        return 0 if probe(args.url) else 1
    if args.action == "replicas":
        compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
        print(f"# BOT_REPLICAS={args.count}: use with compose.yaml (docs/containers.md)")
        print(yaml.safe_dump(replica_services(compose, args.count), sort_keys=False), end="")
        return 0
    try:
        settings = load_settings(merged_environ())
    except SettingsError as exc:
        print(f"containers: {exc}", file=sys.stderr)
        return 2
    for path in render(settings, args.out):
        print(f"rendered {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
