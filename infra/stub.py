"""The upstream stub: a fake external API with fault injection (contract: port 8099).

    python -m infra.stub [--port BOT_STUB_PORT] [--host 127.0.0.1] [--latency-ms 300]

`GET /answer?q=` (or `POST /answer` with `{"q", "context"}`, or the OpenAI-compatible
`POST /v1/chat/completions`) answers after `latency_ms`;
`POST /admin/faults` sets `error_rate`, `latency_ms` and `outage`; `POST /admin/llm` makes the
next chat completions misbehave as an LLM provider can (an error status with OpenAI's error
body and headers, a slow first token, a stream cut midway, `content: null`, no choices,
`finish_reason: length`); `GET /admin/stats` counts
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
LLM = web.AppKey("llm", dict)


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


@dataclass
class LlmFaults:
    """How the next chat completions misbehave (`POST /admin/llm`); `times` of them, then
    the rest answer normally (0: every one)."""

    status: int = 0  # an error answer with this status (OpenAI's error body)
    code: str = ""  # its error code (e.g. invalid_api_key, insufficient_quota)
    headers: dict[str, str] = field(default_factory=dict)  # e.g. Retry-After, x-ratelimit-*
    first_token_ms: int = 0  # wait before the first content piece (streaming)
    token_ms: int = 0  # wait between pieces
    cut_after: int = -1  # close the stream after this many content pieces (-1: never)
    content_null: bool = False  # message.content null (a refusal), with `refusal`
    refusal: str = ""
    empty_choices: bool = False
    finish_reason: str = "stop"
    times: int = 0


_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_denied",
    404: "not_found_error",
    409: "conflict",
    422: "invalid_request_error",
    429: "rate_limit_exceeded",
}


def _openai_error(
    status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None
) -> web.Response:
    """An error as OpenAI's API writes it: `{"error": {message, type, param, code}}`."""
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return _json(body, status, headers)


def _tokens(text: str) -> int:
    return len(text.split())


def _completion(
    n: int, model: str, choices: list[dict[str, Any]], obj: str, **extra: Any
) -> dict[str, Any]:
    """A completion (`chat.completion`) or one chunk of a stream (`chat.completion.chunk`)."""
    return {
        "id": f"chatcmpl-stub-{n}",
        "object": obj,
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        **extra,
    }


def _chunk(n: int, model: str, choices: list[dict[str, Any]], **extra: Any) -> bytes:
    body = _completion(n, model, choices, "chat.completion.chunk", **extra)
    return b"data: " + orjson.dumps(body) + b"\n\n"


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """OpenAI's `POST /v1/chat/completions`: answers the last user message, streamed when
    asked (`stream: true`, usage with `stream_options.include_usage`), with the stub's faults
    and the LLM faults of `POST /admin/llm`."""
    try:
        data = await request.json(loads=orjson.loads)
        messages = [(str(m["role"]), m.get("content")) for m in data["messages"]]
        model = data["model"]
        if not isinstance(model, str) or not model or not messages:
            raise ValueError
        if messages[-1][0] != "user" or not isinstance(messages[-1][1], str):
            raise ValueError
    except (ValueError, KeyError, TypeError, AttributeError):
        return _openai_error(400, "expected {model, messages: [..., {role: user, content}]}")
    failed = await _fault(request)
    if failed is not None:
        retry = (
            {"Retry-After": failed.headers["Retry-After"]}
            if "Retry-After" in failed.headers
            else {}
        )
        return _openai_error(failed.status, "stub fault", None, retry)
    stats: Stats = request.app[STATS]["now"]
    n = stats.calls
    q = str(messages[-1][1])
    stats.last = {
        "q": q,
        "context": [{"role": r, "content": c} for r, c in messages[:-1]],
        "model": model,
        "authorization": request.headers.get("Authorization", ""),
        "max_tokens": data.get("max_tokens"),
        "temperature": data.get("temperature"),
        "stream": bool(data.get("stream")),
    }
    llm = request.app[LLM]
    fault: LlmFaults = llm["now"]
    if fault.times:
        fault.times -= 1
        if fault.times == 0:
            llm["now"] = LlmFaults()
    headers = {
        "x-request-id": f"req_stub_{n}",
        "openai-processing-ms": "1",
        "x-ratelimit-limit-requests": "10000",
        "x-ratelimit-remaining-requests": "9999",
        "x-ratelimit-reset-requests": "6ms",
        **fault.headers,
    }
    if fault.status:
        stats.failures += 1
        return _openai_error(
            fault.status, f"stub error {fault.status}", fault.code or None, headers
        )
    text = f"[{n}] You asked: {q}"
    usage = {
        "prompt_tokens": sum(_tokens(str(c or "")) for _, c in messages),
        "completion_tokens": _tokens(text),
    }
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    content = None if fault.content_null else text
    if not data.get("stream"):
        await asyncio.sleep(fault.first_token_ms / 1000)
        message = {"role": "assistant", "content": content, "refusal": fault.refusal or None}
        choices = (
            []
            if fault.empty_choices
            else [
                {
                    "index": 0,
                    "message": message,
                    "finish_reason": fault.finish_reason,
                    "logprobs": None,
                }
            ]
        )
        body = _completion(n, model, choices, "chat.completion", usage=usage)
        return _json(body, headers=headers)
    resp = web.StreamResponse(
        headers={**headers, "Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await resp.prepare(request)
    if not fault.empty_choices:
        role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
        await resp.write(_chunk(n, model, [role]))
    await asyncio.sleep(fault.first_token_ms / 1000)
    pieces = (
        []
        if content is None or fault.empty_choices
        else [w if i == 0 else " " + w for i, w in enumerate(content.split(" "))]
    )
    if fault.content_null and fault.refusal:
        await resp.write(
            _chunk(
                n, model, [{"index": 0, "delta": {"refusal": fault.refusal}, "finish_reason": None}]
            )
        )
    for i, piece in enumerate(pieces):
        if i == fault.cut_after:
            # Cut midway: the connection closes with no final chunk and no [DONE].
            assert request.transport is not None
            request.transport.close()
            return resp
        if i and fault.token_ms:
            await asyncio.sleep(fault.token_ms / 1000)
        delta = {"index": 0, "delta": {"content": piece}, "finish_reason": None}
        await resp.write(_chunk(n, model, [delta]))
    if not fault.empty_choices:
        end = {"index": 0, "delta": {}, "finish_reason": fault.finish_reason}
        await resp.write(_chunk(n, model, [end]))
    if (data.get("stream_options") or {}).get("include_usage"):
        await resp.write(_chunk(n, model, [], usage=usage))
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def set_llm(request: web.Request) -> web.Response:
    """Set the LLM faults of the next chat completions (fields of `LlmFaults`)."""
    try:
        data = await request.json(loads=orjson.loads)
        fault = LlmFaults(**data)
    except (ValueError, TypeError):
        return _json({"error": "expected fields of LlmFaults"}, 400)
    request.app[LLM]["now"] = fault
    return _json(asdict(fault))


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
    request.app[LLM]["now"] = LlmFaults()
    return _json({"calls": 0, "failures": 0})


async def healthz(_: web.Request) -> web.Response:
    return _json({"status": "ok"})


def create_stub_app(latency_ms: int = 300) -> web.Application:
    app = web.Application()
    app[FAULTS] = {"now": Faults(latency_ms=latency_ms)}
    app[STATS] = {"now": Stats()}
    app[LLM] = {"now": LlmFaults()}
    app.router.add_route("GET", "/answer", answer)
    app.router.add_route("POST", "/answer", answer)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/admin/faults", set_faults)
    app.router.add_post("/admin/llm", set_llm)
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
