"""GCRA rate limiting: the policy, its IETF headers, and the in-process fallback limiter.

The shared limiter runs inside Redis as part of the admission script (`admit.lua`, called by
`bot.store.Store.admit`) so that limit, idempotency and context cost one round trip. When
Redis does not answer, each replica limits on its own with `LocalLimiter` at
``rate / BOT_REPLICAS`` (fail open, but not unlimited) and goes back to Redis by itself.

`SharedLimiter` is the same GCRA for a bucket that is not a user (one per API key, so an
integration rotating user_ids meets a limit too): one script (`gcra.lua`), one round trip.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from importlib.resources import files

from redis.asyncio import Redis
from redis.exceptions import RedisError

from bot import metrics
from bot.core.types import RateState
from bot.settings import Rate, Settings

__all__ = ["LocalLimiter", "Policy", "RateState", "SharedLimiter"]


@dataclass(frozen=True, slots=True)
class Policy:
    """A GCRA policy: emission interval T and burst tolerance tau = T * burst.

    At an instant a user may send ``burst + 1`` messages (the burst on top of the one the
    sustained rate allows); after that, one every T seconds.
    """

    rate: Rate
    burst: int
    name: str = "user"  # the policy's name in the RateLimit headers

    @classmethod
    def from_settings(cls, settings: Settings) -> Policy:
        """The per-user policy (`BOT_RATE_LIMIT`, `BOT_RATE_BURST`)."""
        return cls(settings.rate_limit, settings.rate_burst)

    @property
    def interval_us(self) -> int:
        return round(self.rate.interval * 1_000_000)

    @property
    def capacity(self) -> int:
        return self.burst + 1

    @property
    def window(self) -> int:
        """Seconds for an exhausted quota to refill completely."""
        return max(1, math.ceil(self.rate.interval * self.capacity))

    def scaled(self, share: int) -> Policy:
        """This policy divided among `share` replicas (for the local fallback)."""
        if share <= 1:
            return self
        rate = Rate(max(1, self.rate.count // share), self.rate.period)
        return Policy(rate, max(0, self.capacity // share - 1), self.name)

    def headers(self, state: RateState) -> dict[str, str]:
        """IETF draft-ietf-httpapi-ratelimit-headers (structured fields form) for `state`."""
        return {
            "RateLimit-Policy": f'"{self.name}";q={self.capacity};w={self.window}',
            "RateLimit": f'"{self.name}";r={max(0, state.remaining)};t={math.ceil(state.reset_s)}',
        }


class LocalLimiter:
    """In-process GCRA for when Redis is down; bounded memory (LRU of users)."""

    def __init__(self, policy: Policy, max_users: int = 100_000) -> None:
        self.policy = policy
        self._tat: OrderedDict[str, float] = OrderedDict()
        self._max_users = max_users

    def check(self, user_id: str, now: float | None = None) -> RateState:
        """Take one token for `user_id`; `retry_after_s > 0` means limited."""
        now = time.monotonic() if now is None else now
        t = self.policy.rate.interval
        tau = t * self.policy.burst
        tat = max(self._tat.get(user_id, now), now)
        new_tat = tat + t
        allow_at = new_tat - tau - t
        if now < allow_at:
            return RateState(0, tat - now, allow_at - now)
        self._tat[user_id] = new_tat
        self._tat.move_to_end(user_id)
        if len(self._tat) > self._max_users:
            self._tat.popitem(last=False)
        remaining = math.floor((tau + t - (new_tat - now)) / t)
        return RateState(remaining, new_tat - now)


class SharedLimiter:
    """GCRA in Redis for named buckets (API keys); the local limiter while Redis is away."""

    def __init__(self, redis: Redis, policy: Policy, replicas: int, namespace: str) -> None:
        self.policy = policy
        self.local = LocalLimiter(policy.scaled(replicas), max_users=10_000)
        self._namespace = namespace
        self._script = redis.register_script(files("bot").joinpath("gcra.lua").read_text())

    @classmethod
    def for_api_keys(cls, settings: Settings, redis: Redis) -> SharedLimiter | None:
        """The per-API-key limiter (`BOT_KEY_RATE_*`); None when no keys or no limit is set."""
        if not settings.api_keys or settings.key_rate_limit is None:
            return None
        policy = Policy(settings.key_rate_limit, settings.key_rate_burst, "key")
        return cls(redis, policy, settings.replicas, "apikey")

    async def check(self, name: str) -> RateState:
        """Take one token from bucket `name`; `retry_after_s > 0` means limited."""
        try:
            allowed, first, reset_us = await self._script(
                keys=[f"bot:{{{self._namespace}:{name}}}:gcra"],
                args=[self.policy.interval_us, self.policy.burst],
            )
        except RedisError:
            metrics.RATELIMIT_BACKEND_ERRORS.inc()
            return self.local.check(name)
        if allowed:
            return RateState(int(first), reset_us / 1e6)
        return RateState(0, reset_us / 1e6, first / 1e6)
