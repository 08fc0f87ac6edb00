"""The stub's chat platforms: every send recorded in order, faults scripted per conversation.

    POST /bot{token}/sendMessage                       Telegram {"chat_id", "text"}
    POST /bot{token}/setWebhook                        Telegram (recorded as "setWebhook")
    POST /slack/api/chat.postMessage                   Slack {"channel", "text"} (Bearer token)
    POST /slack/hooks/{hook}                           a Slack slash command's response_url
    PATCH /discord/api/webhooks/{app}/{token}/messages/@original
                                                       Discord: edit an interaction's answer
    PUT  /discord/api/applications/{app}/commands      Discord: register commands (recorded)

    POST /admin/{platform}/script   {"conversation", "responses": [{"status": 429,
                                     "retry_after": 2} | {"status": 500} | {"hang_ms": 30000} |
                                     {"status": 403, "description": ...}, ...]}
                                    (each call to that conversation takes the next one)
    GET  /admin/{platform}/sent     [{"conversation", "text", "at", "status", "auth"}, ...]
    POST /admin/{platform}/reset    forget that platform's record and scripts

The conversation is Telegram's chat id, Slack's channel (`hook:{hook}` for a response_url),
Discord's interaction token. A 2xx is recorded with status 200; a scripted failure with its
status (or "hang"), so a test sees both the attempts and what reached the conversation. Each
platform answers 429 its own way: Telegram's `parameters.retry_after`, Slack's `Retry-After`
header, Discord's `retry_after` field.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

PLATFORMS = ("telegram", "slack", "discord")


@dataclass
class Platform:
    sent: list[dict[str, Any]] = field(default_factory=list)
    scripts: dict[str, deque[dict[str, Any]]] = field(default_factory=lambda: defaultdict(deque))
    ids: int = 0


STATE = web.AppKey("platforms", dict)


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(body), status=status, headers=headers, content_type="application/json"
    )


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        data = await request.json(loads=orjson.loads)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


async def _record(
    request: web.Request, platform: str, conversation: str, text: str
) -> tuple[int, dict[str, Any]] | None:
    """Record the call; the scripted failure (status, step) it meets, or None for a 2xx."""
    state: Platform = request.app[STATE][platform]
    record = {
        "conversation": conversation,
        "text": text,
        "at": time.time(),
        "auth": request.headers.get("Authorization", ""),
    }
    script = state.scripts.get(conversation)
    step = script.popleft() if script else None
    if step is not None and "hang_ms" in step:
        state.sent.append({**record, "status": "hang"})
        await asyncio.sleep(int(step["hang_ms"]) / 1000)
        return 504, step
    if step is not None:
        status = int(step.get("status", 500))
        state.sent.append({**record, "status": status})
        return status, step
    state.ids += 1
    state.sent.append({**record, "status": 200})
    return None


async def telegram_send(request: web.Request) -> web.Response:
    data = await _body(request)
    if "chat_id" not in data or not isinstance(data.get("text"), str):
        return _json({"ok": False, "error_code": 400, "description": "Bad Request"}, 400)
    chat_id, text = str(data["chat_id"]), data["text"]
    failed = await _record(request, "telegram", chat_id, text)
    if failed is not None:
        status, step = failed
        body: dict[str, Any] = {
            "ok": False,
            "error_code": status,
            "description": step.get("description", f"scripted {status}"),
        }
        if status == 429:
            body["parameters"] = {"retry_after": step.get("retry_after", 1)}
        return _json(body, status)
    result = {"message_id": request.app[STATE]["telegram"].ids, "chat": {"id": chat_id}}
    return _json({"ok": True, "result": {**result, "text": text}})


async def telegram_set_webhook(request: web.Request) -> web.Response:
    """Recorded under the conversation "setWebhook", its body as the text."""
    data = await _body(request)
    if not isinstance(data.get("url"), str):
        return _json({"ok": False, "error_code": 400, "description": "Bad Request: url"}, 400)
    await _record(request, "telegram", "setWebhook", orjson.dumps(data).decode())
    return _json({"ok": True, "result": True, "description": "Webhook was set"})


async def _slack(request: web.Request, conversation: str, text: Any) -> web.Response:
    if not isinstance(text, str):
        return _json({"ok": False, "error": "no_text"})
    failed = await _record(request, "slack", conversation, text)
    if failed is None:
        return _json({"ok": True, "channel": conversation, "ts": str(time.time())})
    status, step = failed
    if status == 429:
        return _json(
            {"ok": False, "error": "ratelimited"},
            429,
            {"Retry-After": str(step.get("retry_after", 1))},
        )
    if status >= 500:
        return _json({"ok": False, "error": "internal_error"}, status)
    # Slack's Web API says most errors in a 200 with ok: false.
    return _json({"ok": False, "error": step.get("description", "channel_not_found")})


async def slack_post(request: web.Request) -> web.Response:
    data = await _body(request)
    return await _slack(request, str(data.get("channel", "")), data.get("text"))


async def slack_hook(request: web.Request) -> web.Response:
    data = await _body(request)
    return await _slack(request, "hook:" + request.match_info["hook"], data.get("text"))


async def discord_edit(request: web.Request) -> web.Response:
    data = await _body(request)
    text = data.get("content")
    if not isinstance(text, str):
        return _json({"message": "Cannot send an empty message", "code": 50006}, 400)
    failed = await _record(request, "discord", request.match_info["token"], text)
    if failed is None:
        return _json({"id": str(request.app[STATE]["discord"].ids), "content": text})
    status, step = failed
    if status == 429:
        body = {"message": "You are being rate limited.", "retry_after": step.get("retry_after", 1)}
        return _json({**body, "global": False}, 429)
    return _json({"message": step.get("description", f"scripted {status}"), "code": 0}, status)


async def discord_commands(request: web.Request) -> web.Response:
    try:
        data = await request.json(loads=orjson.loads)
    except ValueError:
        return _json({"message": "400: Bad Request"}, 400)
    text = orjson.dumps(data).decode()
    await _record(request, "discord", "commands:" + request.match_info["app"], text)
    return _json(data if isinstance(data, list) else [])


def _platform(request: web.Request) -> Platform:
    name = request.match_info["platform"]
    if name not in PLATFORMS:
        raise web.HTTPNotFound()
    state: Platform = request.app[STATE][name]
    return state


async def script(request: web.Request) -> web.Response:
    state = _platform(request)
    data = await _body(request)
    conversation = data.get("conversation", data.get("chat_id"))
    responses = data.get("responses")
    if conversation is None or not isinstance(responses, list):
        return _json({"error": "expected {conversation, responses: [...]}"}, 400)
    state.scripts[str(conversation)].extend(responses)
    return _json({"conversation": str(conversation), "scripted": len(responses)})


async def sent(request: web.Request) -> web.Response:
    return _json(_platform(request).sent)


async def reset(request: web.Request) -> web.Response:
    state = _platform(request)
    state.sent.clear()
    state.scripts.clear()
    return _json({})


def add_routes(app: web.Application) -> None:
    app[STATE] = {name: Platform() for name in PLATFORMS}
    app.router.add_post("/bot{token}/sendMessage", telegram_send)
    app.router.add_post("/bot{token}/setWebhook", telegram_set_webhook)
    app.router.add_post("/slack/api/chat.postMessage", slack_post)
    app.router.add_post("/slack/hooks/{hook}", slack_hook)
    app.router.add_patch("/discord/api/webhooks/{app}/{token}/messages/@original", discord_edit)
    app.router.add_put("/discord/api/applications/{app}/commands", discord_commands)
    app.router.add_post("/admin/{platform}/script", script)
    app.router.add_get("/admin/{platform}/sent", sent)
    app.router.add_post("/admin/{platform}/reset", reset)
