"""NGINX's config from its one template (``nginx/nginx.conf.template``).

The native runner, the containers' renderer and the benchmark all render it here, so the
edge behaves the same wherever it runs.
"""

from __future__ import annotations

import math

from bot.settings import Settings
from infra.common import ROOT, Paths, render_template

WEB_ROOT = ROOT / "web"  # the web chat page's static files


def read_timeout(settings: Settings) -> int:
    """NGINX's `proxy_read_timeout`, seconds: a long poll's 30 s with a margin, or one
    upstream call's longest (an LLM's whole answer, not streamed) with one."""
    return max(45, math.ceil(settings.call_timeout) + 10)


def render_nginx(
    settings: Settings,
    paths: Paths,
    upstream_host: str = "127.0.0.1",
    resolver: str = "",
    web_root: str = str(WEB_ROOT),
) -> str:
    """NGINX's config from its one template.

    `upstream_host` may name each replica (``bot-{i}`` in compose). With a `resolver`, NGINX
    re-resolves those names while it runs, since a recreated container gets a new address.
    `web_root` is where NGINX finds the web chat page (``web/``).
    """
    resolve = " resolve" if resolver else ""
    lines = [
        f"        server {upstream_host.format(i=i)}:{settings.replica_port(i)}{resolve} "
        "max_fails=2 fail_timeout=3s;"
        for i in range(1, settings.replicas + 1)
    ]
    if resolver:  # `resolve` needs the group in shared memory (NGINX >= 1.27.3)
        lines[:0] = [
            "        zone bot_replicas 256k;",
            f"        resolver {resolver} valid=5s ipv6=off;",
        ]
    servers = "\n".join(lines)
    template = (ROOT / "nginx" / "nginx.conf.template").read_text()
    return render_template(
        template,
        {
            "worker_processes": 2,
            "run_dir": paths.run,
            "log_dir": paths.logs,
            "upstream_servers": servers,
            "public_host": "0.0.0.0",
            "public_port": settings.public_port,
            "status_port": settings.nginx_status_port,
            "addr_rate": settings.edge_rate,
            "addr_burst": settings.edge_burst,
            "addr_conn": settings.edge_conn,
            "read_timeout": read_timeout(settings),
            "web_root": web_root,
        },
    )
