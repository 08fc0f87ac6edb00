"""What the load run learns from the stack itself: process memory, inboxes, Prometheus, and
whether it still serves everyone after a hostile run."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter, defaultdict
from typing import Any
from urllib.parse import quote

import orjson
import psutil
import requests

from bot.settings import Settings
from loadtests import hostile
from loadtests.config import LoadConfig


def stack_processes(s: Settings) -> dict[int, str]:
    """The stack's processes (pid -> name), found by the ports they listen on, with children.

    Redis and RabbitMQ are not included: they are shared, and their memory is data.
    """
    ports = {s.public_port: "nginx", s.stub_port: "stub", s.worker_metrics_port: "worker"}
    ports[s.prometheus_port] = "prometheus"
    for i in range(1, s.replicas + 1):
        ports[s.replica_port(i)] = f"bot-{i}"
    found: dict[int, str] = {}
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.pid and conn.laddr.port in ports:
            found.setdefault(conn.pid, ports[conn.laddr.port])
    for pid, name in list(found.items()):
        try:
            proc = psutil.Process(pid)
            # A worker of a pre-forking server (NGINX) listens too: start from its master.
            while (parent := proc.parent()) is not None and parent.name() == proc.name():
                proc = parent
            found.pop(pid)
            found[proc.pid] = name
            for child in proc.children(recursive=True):
                found.setdefault(child.pid, f"{name}-child")
        except psutil.Error:
            continue
    return found


def listening_pids(port: int) -> list[int]:
    """Processes listening on `port` (Redis, an NGINX of our own...)."""
    return sorted(
        {
            c.pid
            for c in psutil.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.pid and c.laddr.port == port
        }
    )


class MemorySampler(threading.Thread):
    """Samples the RSS (MB) of every stack process every `interval` seconds."""

    def __init__(self, cfg: LoadConfig) -> None:
        super().__init__(daemon=True, name="memory-sampler")
        self.cfg = cfg
        self.samples: dict[str, list[list[float]]] = defaultdict(list)
        self._halt = threading.Event()

    def run(self) -> None:
        procs: dict[int, str] = {}
        last_scan = 0.0
        while not self._halt.is_set():
            now = time.time()
            if now - last_scan > 30 or not procs:
                procs = stack_processes(self.cfg.stack)
                last_scan = now
            for pid, name in procs.items():
                try:
                    rss = psutil.Process(pid).memory_info().rss / 2**20
                except psutil.Error:
                    continue
                self.samples[f"{name}[{pid}]"].append([round(now, 1), round(rss, 2)])
            self._halt.wait(self.cfg.mem_interval)

    def stop(self) -> dict[str, list[list[float]]]:
        self._halt.set()
        self.join(timeout=10)
        return dict(self.samples)


def _headers(cfg: LoadConfig) -> dict[str, str]:
    return {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}


def read_inbox(cfg: LoadConfig, user_id: str, max_pages: int = 50) -> list[str]:
    """Every reply id in a user's inbox, from the start, following `next`."""
    ids: list[str] = []
    after = ""
    for _ in range(max_pages):
        resp = requests.get(
            f"{cfg.target}/v1/users/{quote(user_id)}/replies",
            params={"after": after},
            headers=_headers(cfg),
            timeout=10,
        )
        if resp.status_code != 200:
            raise RuntimeError(f"GET replies of {user_id}: {resp.status_code} {resp.text[:200]}")
        data = resp.json()
        replies = data.get("replies") or []
        ids += [str(r.get("message_id")) for r in replies]
        nxt = str(data.get("next") or "")
        if not replies or nxt == after:
            break
        after = nxt
    return ids


def check_inboxes(cfg: LoadConfig, queued: dict[str, list[str]]) -> dict[str, Any]:
    """Wait until every 202'd message is in its user's inbox (or the timeout); count each."""
    deadline = time.monotonic() + cfg.delivery_timeout
    total = sum(len(v) for v in queued.values())
    result: dict[str, Any] = {"queued": total, "delivered": 0, "missing": [], "duplicated": []}
    pending = {u: set(ids) for u, ids in queued.items() if ids}
    counts: dict[str, Counter[str]] = {}
    while True:
        errors: list[str] = []
        for user in pending:
            try:
                counts[user] = Counter(read_inbox(cfg, user))
            except (requests.RequestException, RuntimeError, ValueError) as exc:
                errors.append(str(exc))
        missing = [
            m for u, ids in pending.items() for m in ids if counts.get(u, Counter()).get(m, 0) == 0
        ]
        if (not missing and not errors) or time.monotonic() > deadline:
            break
        time.sleep(2)
    duplicated = [
        m for u, ids in pending.items() for m in ids if counts.get(u, Counter()).get(m, 0) > 1
    ]
    # A reply nobody queued, or one counted twice, is as wrong as a missing one.
    strays = [m for u, c in counts.items() for m, n in c.items() if m not in pending[u] and n > 1]
    result.update(
        delivered=total - len(missing),
        missing=missing[:100],
        duplicated=(duplicated + strays)[:100],
        waited_s=round(cfg.delivery_timeout - max(0.0, deadline - time.monotonic()), 1),
        errors=errors[:5],
    )
    return result


def prometheus_view(cfg: LoadConfig, start: float, end: float) -> dict[str, Any] | None:
    """The stack's Prometheus on the run's window: 5xx, sheds, cache hit ratio; None if absent."""
    window = f"{max(1, round(end - start))}s"
    queries = {
        "requests": f"sum(increase(bot_http_requests_total[{window}]))",
        "http_5xx": f'sum(increase(bot_http_requests_total{{code=~"5.."}}[{window}]))',
        "shed": f'sum(increase(bot_messages_total{{outcome="shed"}}[{window}]))',
        "rate_limited": f'sum(increase(bot_messages_total{{outcome="rate_limited"}}[{window}]))',
        "queued": f'sum(increase(bot_messages_total{{outcome="queued"}}[{window}]))',
        "cache_hit_ratio": (
            f'sum(increase(bot_cache_lookups_total{{result="hit"}}[{window}])) / '
            f"sum(increase(bot_cache_lookups_total[{window}]))"
        ),
    }
    out: dict[str, Any] = {"url": cfg.prometheus, "window": window}
    params: dict[str, str | float]
    try:
        ready = requests.get(f"{cfg.prometheus}/-/ready", timeout=2)
        if ready.status_code != 200:
            return None
        for name, q in queries.items():
            params = {"query": q, "time": end}
            resp = requests.get(f"{cfg.prometheus}/api/v1/query", params=params, timeout=5)
            result = resp.json().get("data", {}).get("result", [])
            out[name] = round(float(result[0]["value"][1]), 3) if result else None
    except (requests.RequestException, ValueError, KeyError, IndexError):
        return None
    return out


def probe(cfg: LoadConfig, addresses: list[str]) -> dict[str, Any]:
    """After a run: health, readiness, a message and an inbox, from each client address.

    The hostile clients' own addresses included: once they behave, the stack (NGINX's
    per-address guard above all) serves them like anyone else.
    """
    target = cfg.target_address
    auth = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    ok, failures = 0, []
    for addr in ["127.0.0.1", *addresses]:
        user = f"probe-{uuid.uuid4().hex[:12]}"
        body = orjson.dumps({"user_id": user, "text": "/help", "message_id": f"m-{user}"})
        for method, path, headers, payload in (
            ("GET", "/healthz", {}, b""),
            ("GET", "/readyz", {}, b""),
            ("POST", "/v1/messages", {"Content-Type": "application/json", **auth}, body),
            ("GET", f"/v1/users/{user}/replies", auth, b""),
        ):
            answer = hostile.exchange(target, addr, hostile.request(method, path, headers, payload))
            if answer.status == 200:
                ok += 1
            else:
                failures.append(f"{addr} {method} {path}: {answer.status or answer.error}")
    return {"ok": ok, "failures": failures}
