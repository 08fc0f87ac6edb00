"""The stub's Telegram Bot API: `sendMessage` recorded in order, faults scripted per chat.

    POST /bot{token}/sendMessage           {"chat_id", "text"} -> {"ok": true, "result": {...}}
    POST /admin/telegram/script            {"chat_id", "responses": [{"status": 429,
                                            "retry_after": 2} | {"status": 500} |
                                            {"hang_ms": 30000} | {"status": 403}, ...]}
                                           (each call to that chat takes the next one)
    GET  /admin/telegram/sent              [{"chat_id", "text", "at", "status"}, ...] every call
    POST /admin/telegram/reset             forget the record and the scripts

A call answered 2xx is recorded with status 200; a scripted failure with its status (or
"hang"), so a test sees both the attempts and what reached the chat.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web


@dataclass
class TelegramState:
    sent: list[dict[str, Any]] = field(default_factory=list)
    scripts: dict[str, deque[dict[str, Any]]] = field(default_factory=lambda: defaultdict(deque))
    message_ids: int = 0


TELEGRAM = web.AppKey("telegram", TelegramState)


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


async def send_message(request: web.Request) -> web.Response:
    state = request.app[TELEGRAM]
    try:
        data = await request.json(loads=orjson.loads)
        chat_id, text = str(data["chat_id"]), str(data["text"])
    except (ValueError, KeyError, TypeError):
        return _json({"ok": False, "error_code": 400, "description": "Bad Request"}, 400)
    record = {"chat_id": chat_id, "text": text, "at": time.time()}
    script = state.scripts.get(chat_id)
    step = script.popleft() if script else None
    if step is not None and "hang_ms" in step:
        state.sent.append({**record, "status": "hang"})
        await asyncio.sleep(int(step["hang_ms"]) / 1000)
        return _json({"ok": False, "error_code": 504, "description": "hung"}, 504)
    if step is not None:
        status = int(step.get("status", 500))
        state.sent.append({**record, "status": status})
        body: dict[str, Any] = {
            "ok": False,
            "error_code": status,
            "description": step.get("description", f"scripted {status}"),
        }
        if status == 429:
            body["parameters"] = {"retry_after": step.get("retry_after", 1)}
        return _json(body, status)
    state.message_ids += 1
    state.sent.append({**record, "status": 200})
    message = {"message_id": state.message_ids, "chat": {"id": chat_id}, "text": text}
    return _json({"ok": True, "result": message})


async def script(request: web.Request) -> web.Response:
    try:
        data = await request.json(loads=orjson.loads)
        chat_id, responses = str(data["chat_id"]), list(data["responses"])
    except (ValueError, KeyError, TypeError):
        return _json({"error": "expected {chat_id, responses: [...]}"}, 400)
    request.app[TELEGRAM].scripts[chat_id].extend(responses)
    return _json({"chat_id": chat_id, "scripted": len(responses)})


async def sent(request: web.Request) -> web.Response:
    return _json(request.app[TELEGRAM].sent)


async def reset(request: web.Request) -> web.Response:
    state = request.app[TELEGRAM]
    state.sent.clear()
    state.scripts.clear()
    return _json({})


def add_routes(app: web.Application) -> None:
    app[TELEGRAM] = TelegramState()
    app.router.add_post("/bot{token}/sendMessage", send_message)
    app.router.add_post("/admin/telegram/script", script)
    app.router.add_get("/admin/telegram/sent", sent)
    app.router.add_post("/admin/telegram/reset", reset)
