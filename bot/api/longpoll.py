"""Bounds on long polls (replies ``?wait=``), apart from the load shedder's in-flight count.

A long poll holds a connection and a Redis connection for up to 30 s but almost no CPU, so
it is not counted in ``BOT_MAX_INFLIGHT`` (which protects the CPU, and which long polls
would otherwise exhaust, shedding messages and health checks). It has bounds of its own, per
replica (``BOT_LONGPOLL_MAX``: beyond it ``503 overloaded``, another replica may have room)
and per user (``BOT_LONGPOLL_PER_USER``: beyond it ``429 too_many_long_polls``, the caller's
own doing).

The web chat's event streams (``GET /chat/events``) are bounded the same way, by a
`LongPolls` of their own (``BOT_SSE_MAX`` per replica, ``BOT_SSE_PER_SESSION`` per session).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from bot.errors import Overloaded, RateLimited
from bot.settings import Settings


class LongPolls:
    """Counts this replica's long polls, in total and per user, and refuses beyond the bounds.

    `what` names what is held (in the errors) and `code` is the 429's error code.
    """

    def __init__(
        self,
        max_total: int,
        per_user: int,
        what: str = "long polls",
        code: str = "too_many_long_polls",
    ) -> None:
        self.max_total = max_total
        self.per_user = per_user
        self.what = what
        self.code = code
        self.total = 0
        self._users: dict[str, int] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> LongPolls:
        return cls(settings.longpoll_max, settings.longpoll_per_user)

    @classmethod
    def event_streams(cls, settings: Settings) -> LongPolls:
        """The bounds of the web chat's event streams, apart from the long polls'."""
        return cls(settings.sse_max, settings.sse_per_session, "event streams", "too_many_streams")

    @contextmanager
    def slot(self, user_id: str) -> Iterator[None]:
        """Hold one long-poll slot for `user_id` while the block runs."""
        held = self._users.get(user_id, 0)
        if held >= self.per_user:
            raise RateLimited(
                f"at most {self.per_user} {self.what} at once per user", code=self.code
            )
        if self.total >= self.max_total:
            raise Overloaded(f"this replica holds all the {self.what} it can; try again", 1)
        self.total += 1
        self._users[user_id] = held + 1
        try:
            yield
        finally:
            self.total -= 1
            left = self._users[user_id] - 1
            if left:
                self._users[user_id] = left
            else:
                del self._users[user_id]
