"""The chat platforms' webhooks: verify, hand the update to the intake, acknowledge.

Thin: the platform adapter (`bot.channels.telegram`) turns the request into an update, the
intake (`bot.channels.intake`) claims and queues it; the answer comes later, through the
delivery path. A channel whose secrets are unset answers 404.
"""

from __future__ import annotations

from aiohttp import web

from bot import metrics
from bot.api.keys import CHANNELS, SETTINGS
from bot.api.messages import read_json
from bot.api.render import json_response
from bot.channels import telegram
from bot.errors import BadRequest, NotFound, Unauthorized

TELEGRAM_ROUTE = "/channels/telegram"


async def post_telegram(request: web.Request) -> web.Response:
    """`POST /channels/telegram`: one Bot API update; `200 {}` once it is queued (or known)."""
    settings = request.app[SETTINGS]
    intake = request.app[CHANNELS].intake
    if intake is None or not settings.telegram_enabled:
        raise NotFound("the telegram channel is not enabled")
    try:
        telegram.verify(settings, request.headers.get(telegram.SECRET_HEADER))
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
        metrics.CHANNEL_UPDATES.labels(telegram.CHANNEL, "ignored").inc()
        return json_response({})
    await intake.take(update, str(uid))
    return json_response({})


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_post(TELEGRAM_ROUTE, post_telegram)
