"""Time to first and last byte of streamed answers under load, against a running stack.

    .venv/bin/python -m loadtests.stream [--url http://127.0.0.1:8080] [--users 20]
        [--seconds 30] [--token-ms 50]

For a stack whose upstream is the bundled stub spoken to as an LLM (`UPSTREAM_KIND=openai`,
`UPSTREAM_URL` the stub): the stub is told to stream each piece `--token-ms` apart (its
`POST /admin/llm`; `--token-ms -1` leaves a real upstream alone), then locust runs headless
(`loadtests/stream_locustfile.py`) with `--users` users asking new questions, each with
`Accept: text/event-stream`. Prints p50/p95/p99 of the first byte, the first `delta` event
and the last byte, and the share of the answer a user sees before it ends. Exits 1 when an
answer failed (not 200, or no `done` event); never on a timing.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import orjson
import requests

from loadtests.cache_latency import percentile

LOCUSTFILE = Path(__file__).with_name("stream_locustfile.py")
MOMENTS = ("first byte", "first delta", "last byte")


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Percentiles (ms) of each moment over the answers that came whole; failures counted."""
    ok = [r for r in rows if not r.get("error")]
    out: dict[str, Any] = {"answers": len(ok), "failed": len(rows) - len(ok)}
    for moment in MOMENTS:
        values = [r[moment] for r in ok if moment in r]
        if values:
            out[moment] = {f"p{q}": round(percentile(values, q / 100), 1) for q in (50, 95, 99)}
    return out


def run(url: str, users: int, seconds: int, token_ms: int, stub_url: str) -> dict[str, Any]:
    if token_ms >= 0:
        requests.post(stub_url + "/admin/llm", json={"token_ms": token_ms}, timeout=5)
    with tempfile.TemporaryDirectory(prefix="stream-load-") as tmp:
        results = Path(tmp) / "results.jsonl"
        cmd = [
            sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
            "--host", url, "--users", str(users), "--spawn-rate", str(max(users, 1)),
            "--run-time", f"{seconds}s", "--only-summary", "--stop-timeout", "30",
            "--loglevel", "WARNING", "--exit-code-on-error", "0",
        ]  # fmt: skip
        env = {**os.environ, "LOAD_STREAM_RESULTS": str(results)}
        subprocess.run(cmd, env=env, capture_output=True, timeout=seconds + 90, check=False)
        rows = [orjson.loads(line) for line in results.read_bytes().splitlines() if line]
    if token_ms >= 0:
        requests.post(stub_url + "/admin/llm", json={}, timeout=5)
    return summarise(rows)


def render(summary: dict[str, Any], users: int) -> str:
    lines = [f"{summary['answers']} streamed answers, {summary['failed']} failed, {users} users"]
    for moment in MOMENTS:
        if moment in summary:
            p = summary[moment]
            lines.append(
                f"  {moment:<11} p50 {p['p50']:>8.1f} ms  p95 {p['p95']:>8.1f} ms"
                f"  p99 {p['p99']:>8.1f} ms"
            )
    if "first delta" in summary and "last byte" in summary:
        ratio = summary["last byte"]["p50"] / max(summary["first delta"]["p50"], 0.001)
        lines.append(f"  the first words arrive {ratio:.1f}x sooner than the whole answer (p50)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="loadtests.stream", description=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--stub-url", default="http://127.0.0.1:8099")
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--seconds", type=int, default=30)
    parser.add_argument("--token-ms", type=int, default=50)
    args = parser.parse_args(argv)
    summary = run(args.url, args.users, args.seconds, args.token_ms, args.stub_url)
    print(render(summary, args.users))
    return 1 if summary["failed"] or not summary["answers"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
