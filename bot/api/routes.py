"""The API's routes in one table: the aiohttp app and the serverless handler serve the same.

The web chat (``/chat/*``) is not in it: its event stream needs a server that holds the
connection, so it is the aiohttp app's alone (`bot.api.webchat.add_routes`).
"""

from __future__ import annotations

from typing import NamedTuple

from aiohttp.typedefs import Handler

from bot.api import channels, docs, health, messages, prefs, replies
from bot.api.keys import MESSAGES_ROUTE

PREFS = "/v1/users/{user_id}/prefs"


class Route(NamedTuple):
    method: str  # a GET answers HEAD too, as aiohttp's `add_get` does
    path: str  # aiohttp's template: `{name}` matches one path segment
    handler: Handler


ROUTES: tuple[Route, ...] = (
    Route("GET", "/healthz", health.healthz),
    Route("GET", "/readyz", health.readyz),
    Route("POST", MESSAGES_ROUTE, messages.post_message),
    Route("GET", replies.ROUTE, replies.get_replies),
    Route("GET", "/v1/openapi.json", docs.openapi),
    Route("GET", PREFS, prefs.get_prefs),
    Route("PUT", PREFS, prefs.put_prefs),
    Route("DELETE", PREFS, prefs.delete_prefs),
    Route("DELETE", PREFS + "/{key}", prefs.delete_pref),
    Route("POST", channels.TELEGRAM_ROUTE, channels.post_telegram),
    Route("POST", channels.SLACK_EVENTS_ROUTE, channels.post_slack_event),
    Route("POST", channels.SLACK_COMMANDS_ROUTE, channels.post_slack_command),
    Route("POST", channels.DISCORD_ROUTE, channels.post_discord),
)
