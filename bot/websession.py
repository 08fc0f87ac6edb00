"""Web chat sessions: a random id in a cookie, signed so that no one can forge another's.

The cookie holds ``{session}.{signature}``: the session is 16 random bytes (URL-safe base64,
22 characters of the user_id alphabet, so the user is ``web:{session}``); the signature is
HMAC-SHA256 of it under `BOT_WEBCHAT_SECRET`. Nothing is stored server-side for a session: the
rate limit, context, prefs, idempotency and inbox of user ``web:{session}`` are the state.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets

COOKIE = "bot_chat"
MAX_AGE = 30 * 86400  # seconds the browser keeps the cookie (renewed on every visit)
_SESSION_RE = re.compile(r"[A-Za-z0-9_-]{22}")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class SessionSigner:
    """Makes, signs and verifies session cookies with one secret."""

    def __init__(self, secret: str) -> None:
        # A key of its own for this use, derived from the setting.
        self._key = hmac.new(secret.encode(), b"bot-webchat-session", hashlib.sha256).digest()

    @staticmethod
    def new_session() -> str:
        return _b64(secrets.token_bytes(16))

    def _signature(self, session: str) -> str:
        return _b64(hmac.new(self._key, session.encode(), hashlib.sha256).digest())

    def cookie(self, session: str) -> str:
        """The cookie value for `session`."""
        return f"{session}.{self._signature(session)}"

    def session(self, cookie: str | None) -> str | None:
        """The session a cookie value holds, or None when it is missing, malformed or forged."""
        if not cookie or not cookie.isascii():
            return None
        session, _, signature = cookie.partition(".")
        if not _SESSION_RE.fullmatch(session):
            return None
        if not hmac.compare_digest(signature.encode(), self._signature(session).encode()):
            return None
        return session


def user_id(session: str) -> str:
    """The bot user a web chat session talks as."""
    return f"web:{session}"
