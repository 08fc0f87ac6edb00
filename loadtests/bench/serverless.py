"""`make bench-serverless`: the Lambda handler's cold start and per-invocation cost, measured.

- cold import: `import bot.serverless` in fresh interpreters (BENCH_SL_IMPORTS of them: the
  best and the median), beside an interpreter that imports nothing, in this venv and, with
  BENCH_SL_PACKAGE=1 (the default), in the package `sam build` makes (`make build-BotFunction`:
  the runtime dependencies only, as the function gets them); and `-X importtime`'s heaviest
  modules;
- the first invocation (the container's clients and broker connection made) and the second,
  in a fresh process;
- per invocation, in one warm process (BENCH_SL_CALLS each, after a warm-up): `/healthz`, a
  command (`/echo`), a question the cache misses (the stub upstream answering at once, so the
  bot's own time), a question it hits, and a Telegram update queued to RabbitMQ; wall and
  CPU time, mean, p50, p99;
- what a million messages would cost on Lambda + an HTTP API at those durations
  (`docs/serverless.md` says which prices and why).

Needs Redis and RabbitMQ (`REDIS_URL`, `AMQP_URL`, as the stack); starts the stub upstream
itself. Its users, queues and keys are its own (a run tag) and are removed at the end.
Prints a table and saves `reports/bench-serverless-<time>.json`. Never fails on a timing.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import redis

from bot.cache import cache_id
from bot.channels.intake import dedupe_key
from bot.settings import load_settings
from bot.upstream import upstream_kind
from infra.common import ROOT, drop_queues, free_port

# AWS list prices (us-east-1, x86_64, on-demand; November 2026), per unit.
LAMBDA_GB_SECOND = 0.0000166667
LAMBDA_REQUEST = 0.20 / 1e6
HTTP_API_REQUEST = 1.00 / 1e6
# A Lambda function gets one full vCPU at 1769 MB, proportionally less below.
FULL_VCPU_MB = 1769
TG_SECRET = "bench-telegram-secret"


def _env(key: str, default: int) -> int:
    return int(os.environ.get(key, default))


# What the handler cannot do without: the HTTP client (upstream), Redis, the broker, the
# logger and the metrics. Their import, in the same run, is the baseline of the handler's.
LIBRARIES = "aiohttp, redis.asyncio, aio_pika, structlog, prometheus_client, orjson"


def cold_import(
    python: list[str], env: dict[str, str], runs: int, modules: str = "bot.serverless"
) -> dict[str, float]:
    """Seconds to import `modules` in a fresh interpreter, and a bare one's start."""
    code = "import time; t, c = time.perf_counter(), time.process_time(); "
    code += f"import {modules}; "
    code += "print(time.perf_counter() - t, time.process_time() - c)"
    inner, cpu, whole, bare = [], [], [], []
    for _ in range(runs):
        started = time.perf_counter()
        out = subprocess.run([*python, "-c", code], env=env, capture_output=True, text=True)
        whole.append(time.perf_counter() - started)
        out.check_returncode()
        wall, used = out.stdout.split()
        inner.append(float(wall))
        cpu.append(float(used))
        started = time.perf_counter()
        subprocess.run([*python, "-c", "pass"], env=env, check=True)
        bare.append(time.perf_counter() - started)
    return {
        "import_best_ms": min(inner) * 1000,
        "import_median_ms": statistics.median(inner) * 1000,
        "import_cpu_best_ms": min(cpu) * 1000,
        "process_best_ms": min(whole) * 1000,
        "bare_interpreter_best_ms": min(bare) * 1000,
    }


def heaviest_imports(
    python: list[str], env: dict[str, str], top: int = 8
) -> list[tuple[str, float]]:
    """`-X importtime`'s top-level packages by cumulative time (ms)."""
    err = subprocess.run(
        [*python, "-X", "importtime", "-c", "import bot.serverless"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stderr
    rows = []
    for line in err.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cumulative, name = (part.strip() for part in line.split("|"))
        if not name.startswith(" ") and "." not in name.strip():
            rows.append((name.strip(), int(cumulative) / 1000))
    return sorted(rows, key=lambda r: -r[1])[:top]


def lambda_package(target: Path) -> Path:
    """The function's package, as `sam build` makes it (the Makefile's target)."""
    subprocess.run(
        ["make", "-s", "build-BotFunction", f"ARTIFACTS_DIR={target}", f"PY={sys.executable}"],
        cwd=ROOT,
        check=True,
    )
    return target


INVOKE = """
import json, sys, time
events = json.loads(sys.stdin.read())
t0 = time.perf_counter()
from bot.serverless import handler
t1 = time.perf_counter()
first = handler(events[0], None)
t2 = time.perf_counter()
second = handler(events[1], None)
t3 = time.perf_counter()
assert first["statusCode"] == second["statusCode"] == 200, (first, second)
print(json.dumps({"import_ms": (t1 - t0) * 1000, "first_invocation_ms": (t2 - t1) * 1000,
                  "second_invocation_ms": (t3 - t2) * 1000}))
"""


def first_invocations(env: dict[str, str], tag: str) -> dict[str, float]:
    events = [_message(f"{tag}-cold", "/echo cold", f"{tag}-c{i}") for i in range(2)]
    out = subprocess.run(
        [sys.executable, "-c", INVOKE],
        input=json.dumps(events),
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    result: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return result


def event(method: str, path: str, body: bytes | None, headers: dict[str, str]) -> dict[str, Any]:
    """An HTTP API payload 2.0 event."""
    ev: dict[str, Any] = {
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": path,
        "rawQueryString": "",
        "headers": {k.lower(): v for k, v in headers.items()},
        "requestContext": {"http": {"method": method, "path": path, "sourceIp": "127.0.0.1"}},
        "isBase64Encoded": False,
    }
    if body is not None:
        ev["body"] = body.decode()
        ev["headers"]["content-length"] = str(len(body))
    return ev


def _message(user: str, text: str, mid: str) -> dict[str, Any]:
    body = orjson.dumps({"user_id": user, "text": text, "message_id": mid})
    return event("POST", "/v1/messages", body, {"content-type": "application/json"})


def _questions(tag: str, calls: int) -> list[str]:
    """Every question the bench asks (the cache keys it leaves are theirs)."""
    return [f"what is {tag} {i}?" for i in range(-20, calls)] + [f"what is {tag}?"]


def _telegram(update_id: int) -> dict[str, Any]:
    update = {
        "update_id": update_id,
        "message": {
            "message_id": update_id,
            "date": int(time.time()),
            "chat": {"id": 7000 + update_id % 50, "type": "private"},
            "from": {"id": 7000 + update_id % 50, "is_bot": False, "first_name": "B"},
            "text": "hello",
        },
    }
    headers = {"content-type": "application/json", "x-telegram-bot-api-secret-token": TG_SECRET}
    return event("POST", "/channels/telegram", orjson.dumps(update), headers)


def _update_id(tag: str, i: int) -> int:
    return int(tag.removeprefix("slb-"), 16) % 10**6 * 10**4 + i + 20


def invocations(tag: str, calls: int) -> dict[str, dict[str, float]]:
    """Wall and CPU time per invocation of each kind, in this (warm) process."""
    from bot.serverless import handler, shutdown

    kinds: dict[str, Callable[[int], dict[str, Any]]] = {
        "healthz": lambda i: event("GET", "/healthz", None, {}),
        "command_echo": lambda i: _message(f"{tag}-{i % 200}", "/echo hi", f"{tag}-e{i}"),
        "question_cache_miss": lambda i: _message(f"{tag}-q{i}", f"what is {tag} {i}?", "m"),
        "question_cache_hit": lambda i: _message(f"{tag}-h{i}", f"what is {tag}?", "m"),
        # Update ids of the run's own (its tag's digits): their dedupe keys are removed after.
        "telegram_update": lambda i: _telegram(_update_id(tag, i)),
    }
    results = {}
    for name, make in kinds.items():
        for i in range(min(20, calls)):  # warm-up (and the hit's cached answer)
            assert handler(make(-1 - i), None)["statusCode"] == 200
        walls, cpus = [], []
        for i in range(calls):
            ev = make(i)
            w, c = time.perf_counter(), time.process_time()
            res = handler(ev, None)
            walls.append(time.perf_counter() - w)
            cpus.append(time.process_time() - c)
            assert res["statusCode"] == 200, res
        walls.sort()
        results[name] = {
            "wall_mean_ms": statistics.fmean(walls) * 1000,
            "wall_p50_ms": walls[len(walls) // 2] * 1000,
            "wall_p99_ms": walls[int(len(walls) * 0.99) - 1] * 1000,
            "cpu_mean_ms": statistics.fmean(cpus) * 1000,
        }
    shutdown()
    return results


def cost_per_million(wall_ms: float, cpu_ms: float, memory_mb: int) -> dict[str, float]:
    """USD per million invocations: billed duration (1 ms steps) at `memory_mb`, with the CPU
    part slowed by the vCPU share below 1769 MB; plus Lambda's and the HTTP API's requests."""
    slowdown = max(1.0, FULL_VCPU_MB / memory_mb)
    billed_ms = -(-(wall_ms + cpu_ms * (slowdown - 1)) // 1)
    compute = billed_ms / 1000 * memory_mb / 1024 * LAMBDA_GB_SECOND * 1e6
    requests = (LAMBDA_REQUEST + HTTP_API_REQUEST) * 1e6
    return {"billed_ms": billed_ms, "compute_usd": compute, "total_usd": compute + requests}


def main() -> int:
    tag = f"slb-{uuid.uuid4().hex[:8]}"
    calls = _env("BENCH_SL_CALLS", 300)
    runs = _env("BENCH_SL_IMPORTS", 10)
    stub_port = free_port()
    stub = subprocess.Popen(
        [sys.executable, "-m", "infra.stub", "--port", str(stub_port), "--latency-ms", "0"],
        cwd=ROOT,
    )
    base = load_settings()
    env = {
        **os.environ,
        "REDIS_URL": base.redis_url,
        "AMQP_URL": base.amqp_url,
        "UPSTREAM_URL": f"http://127.0.0.1:{stub_port}",
        "BOT_QUEUE_PREFIX": tag,
        "BOT_OPEN_API": "1",
        "BOT_API_KEYS": "",
        "BOT_RATE_LIMIT": "1000/second",
        "BOT_RATE_BURST": "100000",
        "BOT_CACHE_TTL": "120",
        "TELEGRAM_BOT_TOKEN": "1:bench",
        "TELEGRAM_WEBHOOK_SECRET": TG_SECRET,
        "LOG_LEVEL": "warning",
    }
    report: dict[str, Any] = {"tag": tag, "calls": calls}
    try:
        time.sleep(1.0)  # the stub binds its port
        report["cold_import_venv"] = cold_import([sys.executable], env, runs)
        report["heaviest_imports_venv"] = heaviest_imports([sys.executable], env)
        if os.environ.get("BENCH_SL_PACKAGE", "1") == "1":
            with tempfile.TemporaryDirectory(prefix="bot-lambda-") as tmp:
                package = lambda_package(Path(tmp))
                # As Lambda runs it: the base interpreter (the venv's own, without the venv's
                # site-packages: -S), the package on the path, nothing else of this checkout.
                bare = [sys._base_executable, "-S"]  # type: ignore[attr-defined]
                penv = {**env, "PYTHONPATH": str(package)}
                report["cold_import_package"] = cold_import(bare, penv, runs)
                report["cold_import_package_libraries"] = cold_import(bare, penv, runs, LIBRARIES)
                report["heaviest_imports_package"] = heaviest_imports(bare, penv)
        report["first_invocations"] = first_invocations(env, tag)
        os.environ.update(env)
        report["invocations"] = invocations(tag, calls)
    finally:
        stub.terminate()
        stub.wait()
        settings = load_settings(env)
        drop_queues(settings)
        client = redis.Redis.from_url(settings.redis_url)
        for key in client.scan_iter(f"*{tag}*", count=1000):
            client.delete(key)
        for question in _questions(tag, calls):
            cid = cache_id(question, upstream_kind(settings))
            client.delete(*(f"cache:{{{cid}}}:{part}" for part in ("a", "lock", "err")))
        for i in range(-20, calls):
            client.delete(dedupe_key("telegram", str(_update_id(tag, i))))
        client.delete(f"bot:outbox:{tag}")
    for memory in (512, 1024):
        report[f"cost_{memory}mb"] = {
            name: cost_per_million(r["wall_mean_ms"], r["cpu_mean_ms"], memory)
            for name, r in report["invocations"].items()
        }
    _print(report)
    out = ROOT / "reports" / f"bench-serverless-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"saved {out.relative_to(ROOT)}")
    return 0


def _print(report: dict[str, Any]) -> None:
    for where in ("venv", "package"):
        cold = report.get(f"cold_import_{where}")
        if cold:
            print(
                f"cold import ({where}): best {cold['import_best_ms']:.0f} ms, median "
                f"{cold['import_median_ms']:.0f} ms (its CPU time: best "
                f"{cold['import_cpu_best_ms']:.0f} ms); a fresh process importing it "
                f"{cold['process_best_ms']:.0f} ms (a bare interpreter "
                f"{cold['bare_interpreter_best_ms']:.0f} ms)"
            )
            libraries = report.get(f"cold_import_{where}_libraries")
            if libraries:
                best = libraries["import_best_ms"]
                print(
                    f"  its libraries alone ({LIBRARIES}): best {best:.0f} ms; the handler "
                    f"{cold['import_best_ms'] / best:.2f}x that"
                )
            heavy = ", ".join(f"{n} {ms:.0f}" for n, ms in report[f"heaviest_imports_{where}"])
            print(f"  heaviest (ms, cumulative): {heavy}")
    first = report["first_invocations"]
    print(
        f"fresh process: import {first['import_ms']:.0f} ms, first invocation (clients, "
        f"broker) {first['first_invocation_ms']:.0f} ms, second "
        f"{first['second_invocation_ms']:.1f} ms"
    )
    head = f"{'per invocation':22} {'mean':>8} {'p50':>8} {'p99':>8} {'cpu':>8}"
    print(head + "  $/1M@512MB $/1M@1GB")
    for name, r in report["invocations"].items():
        c512, c1g = report["cost_512mb"][name], report["cost_1024mb"][name]
        print(
            f"{name:22} {r['wall_mean_ms']:7.2f}ms {r['wall_p50_ms']:7.2f}ms "
            f"{r['wall_p99_ms']:7.2f}ms {r['cpu_mean_ms']:7.2f}ms  "
            f"{c512['total_usd']:9.2f} {c1g['total_usd']:8.2f}"
        )


if __name__ == "__main__":
    raise SystemExit(main())
