"""What the app factory gives the handlers and middlewares: typed state under typed keys.

`ReplicaState` exists from `create_app` on (the probes and the load shedder use it before and
after the clients live); `Replica` holds the components, built complete once the clients
exist (`bot.app.replica_ctx`). Nothing here is a bare `dict`, `list` or `object`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import ClientSession
from redis.asyncio import Redis

from bot.api import web
from bot.api.longpoll import LongPolls
from bot.channels.discord import Verifier
from bot.channels.intake import Intake
from bot.channels.slack import SignatureVerifier
from bot.core.service import BotService
from bot.inbox import Inbox
from bot.ratelimit import SharedLimiter
from bot.settings import Settings
from bot.store import Store
from bot.websession import SessionSigner

Check = Callable[[], Awaitable[bool]]  # a dependency's check: does it answer?
MESSAGES_ROUTE = "/v1/messages"
EVENTS_ROUTE = "/chat/events"  # the web chat's event streams: bounded apart, never shed


@dataclass(slots=True)
class ReplicaState:
    """This process's flags, shared by the probes, the load shedder and the long polls."""

    draining: bool = False
    inflight: int = 0  # requests being handled, long polls and probes aside
    readiness: list[tuple[str, Check]] = field(default_factory=list)  # reported by /readyz


@dataclass(frozen=True, slots=True)
class Replica:
    """The replica's components, each built complete from the settings and the clients."""

    store: Store
    service: BotService
    inbox: Inbox
    longpolls: LongPolls
    streams: LongPolls  # the web chat's event streams
    key_limiter: SharedLimiter | None  # per-API-key GCRA, when keys and the limit are set
    upstream_probe: Check  # not in /readyz: an upstream outage is survivable


@dataclass(frozen=True, slots=True)
class Channels:
    """The chat channels' intake (None when no channel is enabled) and request verifiers."""

    intake: Intake | None
    slack: SignatureVerifier
    discord: Verifier

    @classmethod
    def from_settings(cls, settings: Settings, intake: Intake | None) -> Channels:
        # A disabled channel's verifier refuses everything (its routes answer 404 first).
        slack = SignatureVerifier(settings.slack_signing_secret)
        return cls(intake, slack, Verifier(settings.discord_public_key or None))


SETTINGS = web.AppKey("settings", Settings)
STATE = web.AppKey("state", ReplicaState)
REDIS = web.AppKey("redis", Redis)
HTTP = web.AppKey("http", ClientSession)
REPLICA = web.AppKey("replica", Replica)
SIGNER = web.AppKey("webchat_signer", SessionSigner)  # set only when BOT_WEBCHAT_SECRET is
CHANNELS = web.AppKey("channels", Channels)
