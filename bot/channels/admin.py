"""`bot channels ...`: what an operator does with the chat channels.

    bot channels status                 enabled channels, queue depths, paused conversations
    bot channels telegram set-webhook --url URL [--drop-pending]
    bot channels discord register-commands

`set-webhook` is idempotent: it sends the same `setWebhook` (URL, `secret_token` from
`TELEGRAM_WEBHOOK_SECRET`, the update types the bot reads, `max_connections`) however often it
runs. Paused conversations are those a platform's 429 holds right now, as every delivering
process notes them in Redis (`chan:paused:<prefix>:<channel>`), each with its seconds left.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import aio_pika
import aiohttp
import orjson
from redis.exceptions import RedisError

from bot import runtime
from bot.channels import topology
from bot.channels.delivery import paused_key
from bot.channels.discord import COMMANDS
from bot.metrics import CHANNELS
from bot.settings import Settings

ALLOWED_UPDATES = ["message"]
MAX_CONNECTIONS = 40
TIMEOUT = aiohttp.ClientTimeout(total=15)


async def _depths(settings: Settings) -> dict[str, int | None]:
    """Messages in each channel queue (None when it was never declared)."""
    names = topology.names(settings.queue_prefix, CHANNELS)
    depths: dict[str, int | None] = {}
    connection = await aio_pika.connect(settings.amqp_url, timeout=5)
    async with connection:
        for name in names:
            channel = await connection.channel()  # a failed passive declare closes it
            try:
                queue = await channel.declare_queue(name, passive=True)
                depths[name] = queue.declaration_result.message_count or 0
            except aio_pika.exceptions.ChannelClosed:
                depths[name] = None
    return depths


async def _paused(settings: Settings) -> dict[str, list[tuple[str, float]]]:
    """Per enabled channel, its conversations paused by a 429 and the seconds each has left."""
    paused: dict[str, list[tuple[str, float]]] = {}
    async with runtime.redis_client(settings.redis_url, socket_timeout=5.0) as redis:
        now = time.time()
        for channel in settings.channels:
            key = paused_key(settings.queue_prefix, channel)
            held = await redis.zrangebyscore(key, now, "+inf", withscores=True)
            paused[channel] = [(str(c), end - now) for c, end in held]
    return paused


def status(settings: Settings) -> int:
    enabled = settings.channels
    print("enabled: " + (", ".join(enabled) if enabled else "none (set a channel's secrets)"))
    code = 0
    try:
        depths = asyncio.run(_depths(settings))
    except (OSError, aio_pika.exceptions.AMQPError, TimeoutError) as exc:
        print(f"rabbitmq: unreachable ({type(exc).__name__})")
        code = 1
    else:
        for name, n in depths.items():
            print(f"{name:<48} {'-' if n is None else n}")
    try:
        paused = asyncio.run(_paused(settings))
    except (OSError, RedisError) as exc:
        print(f"redis: unreachable ({type(exc).__name__}); paused conversations unknown")
        return 1
    for channel, held in paused.items():
        print(f"paused {channel}: {len(held)}")
        for conversation, left in held:
            print(f"  {channel}:{conversation} for {left:.1f} s more")
    return code


async def _call(method: str, url: str, body: Any, headers: dict[str, str]) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession(timeout=TIMEOUT) as http,
        http.request(method, url, data=orjson.dumps(body), headers=headers) as resp,
    ):
        raw = await resp.read()
        try:
            return resp.status, orjson.loads(raw)
        except orjson.JSONDecodeError:
            return resp.status, raw.decode("utf-8", "replace")[:200]


def set_webhook(settings: Settings, url: str, drop_pending: bool) -> int:
    if not settings.telegram_enabled:
        print("bot channels: set TELEGRAM_BOT_TOKEN and TELEGRAM_WEBHOOK_SECRET first")
        return 2
    if not url.startswith("https://"):
        print("bot channels: Telegram calls only https:// webhooks")
        return 2
    body = {
        "url": url,
        "secret_token": settings.telegram_webhook_secret,
        "allowed_updates": ALLOWED_UPDATES,
        "max_connections": MAX_CONNECTIONS,
        "drop_pending_updates": drop_pending,
    }
    api = f"{settings.telegram_api_url.rstrip('/')}/bot{settings.telegram_bot_token}/setWebhook"
    headers = {"Content-Type": "application/json"}
    code, answer = asyncio.run(_call("POST", api, body, headers))
    ok = code == 200 and isinstance(answer, dict) and answer.get("ok")
    # The answer, never the request: the token is in its URL.
    print(("webhook set: " + url) if ok else f"setWebhook failed: {code} {answer}")
    return 0 if ok else 1


def register_commands(settings: Settings) -> int:
    if not (settings.discord_application_id and settings.discord_bot_token):
        print("bot channels: set DISCORD_APPLICATION_ID and DISCORD_BOT_TOKEN first")
        return 2
    api = (
        f"{settings.discord_api_url.rstrip('/')}/applications/"
        f"{settings.discord_application_id}/commands"
    )
    headers = {
        "Authorization": f"Bot {settings.discord_bot_token}",
        "Content-Type": "application/json",
    }
    # PUT replaces the application's global commands with this list: idempotent.
    code, answer = asyncio.run(_call("PUT", api, COMMANDS, headers))
    ok = 200 <= code < 300
    names = ", ".join("/" + str(c["name"]) for c in COMMANDS)
    print(f"commands registered: {names}" if ok else f"register failed: {code} {answer}")
    return 0 if ok else 1


def run(settings: Settings, args: argparse.Namespace) -> int:
    """Run one `bot channels` action; returns the exit code."""
    if args.action == "status":
        return status(settings)
    if args.action == "telegram":
        return set_webhook(settings, args.url, args.drop_pending)
    return register_commands(settings)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], func: object) -> None:
    """Register `bot channels ...` on the CLI; `func(args)` runs it."""
    channels = sub.add_parser("channels", help="chat channels: status, webhooks, commands")
    actions = channels.add_subparsers(dest="action", required=True)
    actions.add_parser("status", help="enabled channels, queue depths, paused conversations")
    tg = actions.add_parser("telegram", help="Telegram's webhook")
    tg_actions = tg.add_subparsers(dest="telegram_action", required=True)
    hook = tg_actions.add_parser("set-webhook", help="point Telegram at this stack (idempotent)")
    hook.add_argument("--url", required=True, help="https://…/channels/telegram")
    hook.add_argument("--drop-pending", action="store_true", help="drop updates not yet sent")
    dc = actions.add_parser("discord", help="Discord's application commands")
    dc_actions = dc.add_subparsers(dest="discord_action", required=True)
    dc_actions.add_parser("register-commands", help="register /ask (idempotent)")
    channels.set_defaults(func=func)
