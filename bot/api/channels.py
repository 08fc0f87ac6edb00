"""The chat platforms' webhooks: verify, hand the update to the intake, acknowledge.

Thin: a platform adapter (`bot.channels.telegram`, `.slack`, `.discord`) verifies the request
and turns it into an update, the intake (`bot.channels.intake`) claims and queues it; the
answer comes later, through the delivery path. A channel whose secrets are unset answers 404.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl

from bot import metrics
from bot.api import web
from bot.api.keys import CHANNELS, SETTINGS
from bot.api.messages import parse_json, read_body, read_json
from bot.api.render import json_response
from bot.channels import discord, slack, telegram
from bot.channels.intake import Intake
from bot.errors import BadRequest, NotFound, Unauthorized

TELEGRAM_ROUTE = "/channels/telegram"
SLACK_EVENTS_ROUTE = "/channels/slack/events"
SLACK_COMMANDS_ROUTE = "/channels/slack/commands"
DISCORD_ROUTE = "/channels/discord/interactions"
SLACK_ACK = {"response_type": "ephemeral", "text": "Working on it…"}


def _intake(request: web.Request, channel: str) -> Intake:
    intake = request.app[CHANNELS].intake
    if intake is None or channel not in request.app[SETTINGS].channels:
        raise NotFound(f"the {channel} channel is not enabled")
    return intake


def _ignored(channel: str) -> None:
    metrics.CHANNEL_UPDATES.labels(channel, "ignored").inc()


async def _verified(request: web.Request, channel: str, verify: Any) -> bytes:
    """The raw body, once `verify(headers, body)` accepted it (counted when it did not)."""
    body = await read_body(request)
    try:
        verify(request.headers, body)
    except Unauthorized:
        metrics.CHANNEL_UPDATES.labels(channel, "unauthorized").inc()
        raise
    return body


async def post_telegram(request: web.Request) -> web.Response:
    """`POST /channels/telegram`: one Bot API update; `200 {}` once it is queued (or known)."""
    intake = _intake(request, telegram.CHANNEL)
    try:
        telegram.verify(request.app[SETTINGS], request.headers.get(telegram.SECRET_HEADER))
    except Unauthorized:
        metrics.CHANNEL_UPDATES.labels(telegram.CHANNEL, "unauthorized").inc()
        raise
    data = await read_json(request)
    uid = telegram.update_id(data)
    if uid is None:
        raise BadRequest(
            "body is not a Telegram update (no integer update_id)", code="invalid_body"
        )
    update = telegram.parse_update(data)
    if update is None:
        _ignored(telegram.CHANNEL)
        return json_response({})
    await intake.take(update, str(uid))
    return json_response({})


async def post_slack_event(request: web.Request) -> web.Response:
    """`POST /channels/slack/events`: url_verification (signed), or one event; 200 once it
    is queued, known, or ignored (bots, subtypes, other event types)."""
    intake = _intake(request, slack.CHANNEL)
    body = await _verified(request, slack.CHANNEL, request.app[CHANNELS].slack.verify)
    data = parse_json(body)
    if not isinstance(data, dict):
        raise BadRequest("body is not a Slack event", code="invalid_body")
    if data.get("type") == "url_verification":
        challenge = data.get("challenge")
        if not isinstance(challenge, str):
            raise BadRequest("url_verification without a challenge", code="invalid_body")
        return json_response({"challenge": challenge})
    if data.get("type") != "event_callback":
        _ignored(slack.CHANNEL)
        return json_response({})
    parsed = slack.parse_event(data)
    if parsed is None:
        raise BadRequest("event_callback without an event_id or event", code="invalid_body")
    event_id, update = parsed
    if update is None:
        _ignored(slack.CHANNEL)
        return json_response({})
    await intake.take(update, event_id)
    return json_response({})


async def post_slack_command(request: web.Request) -> web.Response:
    """`POST /channels/slack/commands`: a slash command (form body); the answer goes to its
    `response_url`."""
    intake = _intake(request, slack.CHANNEL)
    body = await _verified(request, slack.CHANNEL, request.app[CHANNELS].slack.verify)
    try:
        form = dict(parse_qsl(body.decode(), keep_blank_values=True, strict_parsing=False))
    except UnicodeDecodeError:
        raise BadRequest("body is not a form", code="invalid_body") from None
    settings = request.app[SETTINGS]
    parsed = slack.parse_command(form, slack.allowed_hosts(settings.slack_api_url))
    if parsed is None:
        raise BadRequest("not a Slack slash command", code="invalid_body")
    await intake.take(parsed[1], parsed[0])
    return json_response(SLACK_ACK)


async def post_discord(request: web.Request) -> web.Response:
    """`POST /channels/discord/interactions`: PING → PONG; a command → deferred (type 5),
    answered later by editing the original response."""
    intake = _intake(request, discord.CHANNEL)
    body = await _verified(request, discord.CHANNEL, request.app[CHANNELS].discord.verify)
    parsed = discord.parse_interaction(parse_json(body))
    if parsed is None:
        raise BadRequest("body is not a Discord interaction", code="invalid_body")
    kind, update = parsed
    if kind == discord.PING:
        return json_response(discord.PONG)
    if update is None:
        _ignored(discord.CHANNEL)
        raise BadRequest("only application commands are answered", code="unsupported_interaction")
    await intake.take(update, update.message_id.removeprefix("discord:"))
    return json_response(discord.DEFERRED)
