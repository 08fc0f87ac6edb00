"""Typed application keys shared by the app factory and the handlers."""

from __future__ import annotations

from aiohttp import ClientSession, web
from redis.asyncio import Redis

from bot.api.longpoll import LongPolls
from bot.core.service import BotService
from bot.ratelimit import SharedLimiter
from bot.settings import Settings
from bot.store import Store

SETTINGS = web.AppKey("settings", Settings)
REDIS = web.AppKey("redis", Redis)
HTTP = web.AppKey("http", ClientSession)
STORE = web.AppKey("store", Store)
SERVICE = web.AppKey("service", BotService)
STATE = web.AppKey("state", dict)  # {"draining": bool, "inflight": int}
READINESS = web.AppKey("readiness", list)  # async callables (name) -> bool, one per dependency
UPSTREAM_PROBE = web.AppKey("upstream_probe", object)  # async () -> bool
KEY_LIMITER = web.AppKey("key_limiter", SharedLimiter)  # per-API-key GCRA (when keys are set)
LONGPOLLS = web.AppKey("longpolls", LongPolls)
