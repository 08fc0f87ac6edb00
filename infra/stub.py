"""The upstream stub: a fake external API with fault injection (contract: port 8099).

    python -m infra.stub [--port BOT_STUB_PORT] [--host 127.0.0.1] [--latency-ms 300]

`GET /answer?q=` (or `POST /answer` with `{"q", "context"}`, or the OpenAI-compatible
`POST /v1/chat/completions`) answers after `latency_ms`;
`POST /admin/faults` sets `error_rate`, `latency_ms` and `outage`; `GET /admin/stats` counts
calls and failures; `POST /admin/reset` clears both. Answers carry the call's sequence
number so tests can tell one upstream call from another, and `POST /answer`'s a digest of
the context it was given (so a test sees whose conversation an answer was computed with).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson
import uvloop
from aiohttp import web

from infra import stub_platforms
from infra.common import settings_or_exit

FAULTS = web.AppKey("faults", dict)
STATS = web.AppKey("stats", dict)


@dataclass
class Faults:
    error_rate: float = 0.0
    latency_ms: int = 300
    outage: bool = False


@dataclass
class Stats:
    calls: int = 0
    failures: int = 0
    last: dict[str, Any] = field(default_factory=dict)


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(body), status=status, headers=headers, content_type="application/json"
    )


async def _fault(request: web.Request) -> web.Response | None:
    """Count the call, wait the latency, then maybe fail as configured."""
    faults: Faults = request.app[FAULTS]["now"]
    stats: Stats = request.app[STATS]["now"]
    stats.calls += 1
    if faults.outage:
        stats.failures += 1
        return _json({"error": "outage"}, 503, {"Retry-After": "1"})
    await asyncio.sleep(faults.latency_ms / 1000)
    if faults.error_rate and random.random() < faults.error_rate:
        stats.failures += 1
        return _json({"error": "injected failure"}, 500)
    return None


async def answer(request: web.Request) -> web.Response:
    if request.method == "POST":
        try:
            data = await request.json(loads=orjson.loads)
            q, context = str(data["q"]), list(data.get("context") or [])
        except (ValueError, KeyError, TypeError):
            return _json({"error": "expected {q, context}"}, 400)
    else:
        q, context = request.query.get("q", ""), []
    failed = await _fault(request)
    if failed is not None:
        return failed
    stats: Stats = request.app[STATS]["now"]
    stats.last = {"q": q, "context": context}
    text = f"[{stats.calls}] You asked: {q}"
    if context:
        text += f" (context {hashlib.sha256(orjson.dumps(context)).hexdigest()[:12]})"
    return _json({"answer": text, "context_messages": len(context)})


async def chat_completions(request: web.Request) -> web.Response:
    """An OpenAI-compatible chat completion: answers the last user message, same faults."""
    try:
        data = await request.json(loads=orjson.loads)
        messages = [(str(m["role"]), str(m["content"])) for m in data["messages"]]
        model = str(data.get("model", ""))
        if not messages or messages[-1][0] != "user":
            raise ValueError
    except (ValueError, KeyError, TypeError):
        return _json({"error": {"message": "expected {model, messages: [...user]}"}}, 400)
    failed = await _fault(request)
    if failed is not None:
        return failed
    stats: Stats = request.app[STATS]["now"]
    q = messages[-1][1]
    stats.last = {
        "q": q,
        "context": [{"role": r, "content": c} for r, c in messages[:-1]],
        "model": model,
        "authorization": request.headers.get("Authorization", ""),
    }
    n = stats.calls
    return _json(
        {
            "id": f"chatcmpl-stub-{n}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": f"[{n}] You asked: {q}"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        }
    )


async def set_faults(request: web.Request) -> web.Response:
    try:
        data = await request.json(loads=orjson.loads)
        current: Faults = request.app[FAULTS]["now"]
        new = Faults(
            error_rate=float(data.get("error_rate", current.error_rate)),
            latency_ms=int(data.get("latency_ms", current.latency_ms)),
            outage=bool(data.get("outage", current.outage)),
        )
        if not 0.0 <= new.error_rate <= 1.0 or new.latency_ms < 0:
            raise ValueError
    except (ValueError, TypeError, AttributeError):
        return _json({"error": "expected {error_rate: 0..1, latency_ms: int >= 0, outage}"}, 400)
    request.app[FAULTS]["now"] = new
    return _json(asdict(new))


async def stats(request: web.Request) -> web.Response:
    s: Stats = request.app[STATS]["now"]
    return _json({"calls": s.calls, "failures": s.failures, "last": s.last})


async def reset(request: web.Request) -> web.Response:
    request.app[STATS]["now"] = Stats()
    return _json({"calls": 0, "failures": 0})


async def healthz(_: web.Request) -> web.Response:
    return _json({"status": "ok"})


def create_stub_app(latency_ms: int = 300) -> web.Application:
    app = web.Application()
    app[FAULTS] = {"now": Faults(latency_ms=latency_ms)}
    app[STATS] = {"now": Stats()}
    app.router.add_route("GET", "/answer", answer)
    app.router.add_route("POST", "/answer", answer)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/admin/faults", set_faults)
    app.router.add_get("/admin/stats", stats)
    app.router.add_post("/admin/reset", reset)
    app.router.add_get("/healthz", healthz)
    stub_platforms.add_routes(app)  # Telegram, Slack and Discord, for the channels
    return app


def run(port: int, host: str = "127.0.0.1", latency_ms: int = 300) -> None:
    """Serve the stub until interrupted."""
    uvloop.install()
    web.run_app(create_stub_app(latency_ms), host=host, port=port, access_log=None, print=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="infra.stub", description="the upstream stub")
    parser.add_argument("--port", type=int, help="override BOT_STUB_PORT")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--latency-ms", type=int, default=300)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    port = args.port or settings_or_exit("infra.stub").stub_port
    run(port, host=args.host, latency_ms=args.latency_ms)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
