"""The channels' background side, built from the settings: the processor of queued updates
and the delivery of outbound messages (run by `bot worker`, and by tests in-process)."""

from __future__ import annotations

import asyncio

import aiohttp
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from redis.asyncio import Redis

from bot import metrics
from bot.channels import topology
from bot.channels.delivery import Delivery, Pacing
from bot.channels.discord import CHANNEL as DISCORD
from bot.channels.discord import DiscordSender
from bot.channels.outbound import Outgoing
from bot.channels.processor import Processor
from bot.channels.sending import Sender
from bot.channels.slack import CHANNEL as SLACK
from bot.channels.slack import SlackSender
from bot.channels.telegram import CHANNEL as TELEGRAM
from bot.channels.telegram import TelegramSender
from bot.channels.wire import SHARDS
from bot.core.service import BotService
from bot.logging import get_logger
from bot.retries.broker import Broker, BrokerUnavailable
from bot.retries.jobs import RetryPolicy
from bot.settings import Settings

log = get_logger(__name__)

# Messages a channel consumer holds at once: a conversation paused by a 429 keeps its
# messages here, and the other conversations of the shard still flow past them.
PREFETCH = 512
# Seconds between any two sends of Slack's or Discord's (a ceiling of 50/s for the bot, below
# their global limits; their per-conversation limits are what bind).
_SPREAD = 0.02


def senders(settings: Settings, http: aiohttp.ClientSession) -> dict[str, tuple[Sender, Pacing]]:
    """A sender and its pacing for every enabled channel."""
    out: dict[str, tuple[Sender, Pacing]] = {}
    if settings.telegram_enabled:
        sender = TelegramSender(http, settings.telegram_api_url, settings.telegram_bot_token)
        pacing = Pacing(
            settings.telegram_chat_rate.interval,
            settings.telegram_rate.interval,
            settings.telegram_group_rate.interval,
            settings.telegram_bot_token,
        )
        out[TELEGRAM] = (sender, pacing)
    if settings.slack_enabled:
        slack_sender = SlackSender(http, settings.slack_api_url, settings.slack_bot_token)
        slack_pacing = Pacing(
            settings.slack_channel_rate.interval, _SPREAD, identity=settings.slack_bot_token
        )
        out[SLACK] = (slack_sender, slack_pacing)
    if settings.discord_enabled:
        app_id = settings.discord_application_id
        discord_sender = DiscordSender(http, settings.discord_api_url, app_id)
        # An interaction's answer is an edit of its own response: no per-channel pace.
        out[DISCORD] = (discord_sender, Pacing(0.0, _SPREAD, identity=app_id))
    return out


def channel_broker(settings: Settings, name: str) -> Broker:
    """A connection of the channels' own, with their prefetch and their queues declared."""
    return Broker.from_settings(
        settings,
        name,
        prefetch=PREFETCH,
        declare_more=topology.declarer(settings.queue_prefix, settings.channels),
    )


class ChannelWorker:
    """Processor and delivery over one broker connection; `run` until stopped."""

    def __init__(
        self, settings: Settings, redis: Redis, http: aiohttp.ClientSession, service: BotService
    ) -> None:
        self.settings = settings
        self.broker = channel_broker(settings, "bot-channels")
        self.outgoing = Outgoing(
            self.broker, redis, settings.queue_prefix, settings.idempotency_ttl
        )
        self.processor = Processor(
            self.broker,
            redis,
            service,
            self.outgoing,
            settings.queue_prefix,
            drain_timeout=settings.drain_timeout,
        )
        self.delivery = Delivery(
            self.broker,
            redis,
            senders(settings, http),
            settings.queue_prefix,
            RetryPolicy.from_settings(settings),
            drain_timeout=settings.drain_timeout,
        )

    async def run(self, stop: asyncio.Event) -> None:
        await self.broker.start()
        watch = asyncio.create_task(self._watch())
        try:
            await asyncio.gather(self.processor.run(stop), self.delivery.run(stop))
        finally:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)
            await self.broker.close()

    async def depths(self) -> dict[str, int]:
        """Messages waiting in each channel's outbound queues."""
        raw = await self.broker.channel.get_underlay_channel()
        depths: dict[str, int] = {}
        for channel in self.settings.channels:
            depths[channel] = 0
            for n in range(SHARDS):
                name = topology.outbound(self.settings.queue_prefix, channel, n)
                res = await raw.queue_declare(name, passive=True, timeout=2.0)
                depths[channel] += res.message_count or 0
        return depths

    async def _watch(self, interval: float = 5.0) -> None:
        """Refresh the outbound gauges until cancelled."""
        while True:
            for channel in self.settings.channels:
                metrics.OUTBOUND_PAUSED.labels(channel).set(self.delivery.paused(channel))
            try:
                if self.broker.up:
                    for channel, n in (await self.depths()).items():
                        metrics.OUTBOUND_QUEUE.labels(channel).set(n)
            except (BrokerUnavailable, TimeoutError, *CONNECTION_EXCEPTIONS) as exc:
                log.warning("outbound_depths_failed", error=repr(exc))
            await asyncio.sleep(interval)
