"""The bot: one message in, one answer out, exactly once per message id.

Duplicates (a client's retries, NGINX's resend, a flood) cost almost nothing: inside a
replica, every request for one message shares a single flight (the first one's), so however
many duplicates arrive, the replica makes one admission and, while another replica holds the
message, one wait: it polls Redis with a backoff, and takes the claim over at once when its
holder's heartbeat is gone. At most `max_waiting` duplicates wait per replica; beyond that a
duplicate gets `503 busy` with `Retry-After` at once. Duplicates of a message still in
progress are not counted against the rate limit (NGINX's resend of an admitted message must
not be), but they cannot multiply the work either.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any, Protocol

from redis.exceptions import RedisError

from bot import metrics
from bot.answers import Ask, Sink, bounded
from bot.cache import CachedAnswerer
from bot.core import commands
from bot.core.types import Admission, Context, Job, Outcome, Record
from bot.core.validation import Message, check_pref_key, check_pref_value
from bot.errors import (
    BadRequest,
    Busy,
    RateLimited,
    Unavailable,
    UpstreamRejected,
    UpstreamUnavailable,
)
from bot.inbox import Inbox
from bot.logging import get_logger
from bot.ratelimit import LocalLimiter, Policy
from bot.settings import Settings
from bot.store import CONTEXT_TEXT_MAX, StorageFull, Store
from bot.upstream import Answerer

log = get_logger(__name__)

MAX_WAITING_DUPLICATES = 64  # per replica: a quarter of the default BOT_MAX_INFLIGHT
_POLL = (0.02, 0.25)  # seconds between looks at a claim another replica holds: first, most


class Deferrer(Protocol):
    """Takes a job whose upstream call failed and answers it later (the retry queue)."""

    async def defer(self, job: Job, retry_after: float | None) -> None: ...


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class BotService:
    """Admission, commands, questions and replay, over the Redis store and an answerer."""

    def __init__(
        self,
        store: Store,
        answerer: Answerer,
        policy: Policy,
        local_limiter: LocalLimiter,
        *,
        deferrer: Deferrer | None = None,
        inbox: Inbox | None = None,
        wait_timeout: float = 10.0,
        limit: bool = True,
        max_waiting: int = MAX_WAITING_DUPLICATES,
        models: tuple[str, ...] = (),
        default_model: str = "",
    ) -> None:
        self.store = store
        self.answerer = answerer
        self.policy = policy
        self.local = local_limiter
        self.deferrer = deferrer
        self.inbox = inbox  # where deferred replies land; replays of a 202 look there
        self.wait_timeout = wait_timeout
        self.limit = limit
        self.max_waiting = max_waiting
        # The models a user may choose with the pref `model` (UPSTREAM_MODELS), besides
        # the configured one; none: the pref means nothing.
        self.models = models
        self.default_model = default_model
        self._flights: dict[tuple[str, str], asyncio.Future[Outcome]] = {}
        self._waiting = 0
        if isinstance(answerer, CachedAnswerer):
            # Its single-flight locks name this process too, so a waiter on another replica
            # takes over the lock of a question whose asker died, as it does the claim.
            answerer.heartbeat = store.heartbeat

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        store: Store,
        answerer: Answerer,
        *,
        deferrer: Deferrer | None,
        inbox: Inbox | None,
    ) -> BotService:
        """A replica's service: its store's policy, shared among the replicas when Redis is
        away, and a duplicate waits as long as the claim it waits on can hold."""
        return cls(
            store,
            answerer,
            store.policy,
            LocalLimiter(store.policy.scaled(settings.replicas)),
            deferrer=deferrer,
            inbox=inbox,
            wait_timeout=store.lease_ms / 1000 + 1,
            limit=settings.rate_limit_enabled,
            models=settings.upstream_models if settings.upstream_kind == "openai" else (),
            default_model=settings.upstream_model,
        )

    async def handle(self, msg: Message, sink: Sink | None = None) -> Outcome:
        """Answer `msg`, or replay the answer it already had.

        `sink` gets the pieces of an upstream answer as they stream in, when this request
        is the one that asks the upstream (a duplicate, a replay or a cached answer has no
        pieces: only the outcome)."""
        cmd = commands.parse(msg.text)
        # An answer that needs nothing but the text (/help, /echo) is stored with the
        # admission itself: one Redis round trip for the whole message.
        known = self._known_answer(msg, cmd)
        key = (msg.user_id, msg.message_id)
        flight = self._flights.get(key)
        if flight is not None:
            return await self._join(flight)
        flight = asyncio.ensure_future(self._handle(msg, cmd, known, sink))
        self._flights[key] = flight
        flight.add_done_callback(lambda done: self._landed(key, done))
        # Shielded: the first asker going away must not cancel the others' answer.
        return await asyncio.shield(flight)

    async def _join(self, flight: asyncio.Future[Outcome]) -> Outcome:
        """A duplicate of a message this replica is handling: its answer, at no cost."""
        if self._waiting >= self.max_waiting:
            raise Busy()
        self._waiting += 1
        try:
            outcome = await asyncio.shield(flight)
        finally:
            self._waiting -= 1
        metrics.MESSAGE["duplicate"].inc()
        return Outcome(outcome.kind, outcome.body, replayed=True)

    def _landed(self, key: tuple[str, str], flight: asyncio.Future[Outcome]) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]
        if not flight.cancelled():
            flight.exception()  # retrieved: every asker may have gone

    async def _handle(
        self, msg: Message, cmd: commands.Command, known: Outcome | None, sink: Sink | None
    ) -> Outcome:
        deadline = time.monotonic() + self.wait_timeout
        delay, take_over = _POLL[0], ""
        while True:
            adm = await self._admit(msg, cmd, known, take_over)
            if adm.kind != "pending":
                break
            # Another request (NGINX's resend of this one, a duplicate on another replica)
            # holds the claim: wait for its record, polling with a backoff; if its holder's
            # heartbeat is gone (it died mid-answer), take the claim over at once.
            if time.monotonic() >= deadline:
                raise Busy()
            take_over = adm.token if await self.store.heartbeat.gone(adm.token) else ""
            if not take_over:
                await asyncio.sleep(min(delay, max(deadline - time.monotonic(), 0.0)))
                delay = min(delay * 1.5, _POLL[1])
        if take_over and adm.kind in ("ok", "stored"):
            log.info("claim_taken_over", message_id=msg.message_id)
        if adm.kind == "done":
            assert adm.record is not None
            replay = await self._replay(msg, adm.record)
            replay.rate = adm.rate
            return replay
        if adm.kind == "limited":
            metrics.MESSAGE["rate_limited"].inc()
            assert adm.rate is not None
            raise RateLimited(
                "too many messages; slow down",
                adm.rate.retry_after_s,
                extra=self.policy.headers(adm.rate),
            )

        if known is not None:  # stored with the admission (or Redis is down: not stored)
            metrics.MESSAGE["replied"].inc()
            known.rate = adm.rate
            return known

        try:
            outcome = await self._run(msg, cmd, adm.context, sink)
        except BaseException:
            if adm.token:
                await self._release(msg, adm.token)
            raise
        outcome.rate = adm.rate
        if adm.token:
            winner = await self._finish(msg, outcome, adm.token)
            if winner is not None:  # answered twice after a takeover: the first one counts
                return await self._replay(msg, winner)
        return outcome

    def _known_answer(self, msg: Message, cmd: commands.Command) -> Outcome | None:
        """The answer of a command that needs no state, or None."""
        if cmd.name == "help":
            return self._replied(msg, commands.HELP, cached=False)
        if cmd.name == "echo":
            if not cmd.args[0]:
                raise BadRequest("usage: /echo <text>", code="invalid_command")
            return self._replied(msg, cmd.args[0], cached=False)
        return None

    async def _admit(
        self, msg: Message, cmd: commands.Command, known: Outcome | None, take_over: str = ""
    ) -> Admission:
        answered = None
        if known is not None:
            answered = (self._record(known), self._context_entry(msg, known))
        try:
            return await self.store.admit(
                msg.user_id,
                msg.message_id,
                want_context=cmd.name == "ask",
                limit=self.limit,
                answered=answered,
                take_over=take_over,
            )
        except RedisError as exc:
            # Fail open to the per-replica limiter: Redis trouble must not become a 5xx.
            metrics.RATELIMIT_BACKEND_ERRORS.inc()
            log.warning("ratelimit_backend_error", error=type(exc).__name__)
            if not self.limit:
                return Admission("ok")
            state = self.local.check(msg.user_id)
            if state.retry_after_s > 0:
                return Admission("limited", rate=state)
            return Admission("ok", rate=state)

    async def _replay(self, msg: Message, record: Record) -> Outcome:
        metrics.MESSAGE["duplicate"].inc()
        if record.kind == "queued" and self.inbox is not None:
            # Once the deferred reply exists, the replay returns it instead of "queued".
            try:
                seen = await self.inbox.delivered(msg.user_id, msg.message_id)
            except RedisError:
                seen = None
            if seen is not None and seen.kind == "answer":
                replied = self._replied(msg, seen.reply, cached=False)
                return Outcome("replied", replied.body, replayed=True)
        return Outcome(record.kind, record.body, replayed=True)

    async def _release(self, msg: Message, token: str) -> None:
        try:
            await self.store.release(msg.user_id, msg.message_id, token)
        except RedisError:
            log.warning("claim_release_failed", message_id=msg.message_id)

    @staticmethod
    def _record(outcome: Outcome) -> Record:
        """What a replay of this message returns."""
        return Record(outcome.kind, outcome.body)

    @staticmethod
    def _context_entry(msg: Message, outcome: Outcome) -> dict[str, Any]:
        """The exchange as kept in the context, each side cut to a bounded size."""
        q = bounded(msg.text, CONTEXT_TEXT_MAX)
        return {"q": q, "a": bounded(outcome.body["reply"], CONTEXT_TEXT_MAX), "at": _now()}

    async def _finish(self, msg: Message, outcome: Outcome, token: str) -> Record | None:
        """Store the record; the record stored first by someone else, if there was one."""
        entry = self._context_entry(msg, outcome) if outcome.kind == "replied" else None
        try:
            return await self.store.finish(
                msg.user_id, msg.message_id, self._record(outcome), entry
            )
        except (RedisError, StorageFull) as exc:
            # The answer still goes out; with no record, a resend may be answered again.
            log.warning("record_store_failed", message_id=msg.message_id, error=type(exc).__name__)
            await self._release(msg, token)
            return None

    async def _run(
        self, msg: Message, cmd: commands.Command, context: Context, sink: Sink | None
    ) -> Outcome:
        if cmd.name == "ask":
            return await self._ask(msg, cmd.args[0], context, sink)
        reply = await self._command(msg.user_id, cmd)
        metrics.MESSAGE["replied"].inc()
        return self._replied(msg, reply, cached=False)

    def _replied(self, msg: Message, reply: str, *, cached: bool) -> Outcome:
        body = {
            "message_id": msg.message_id,
            "status": "replied",
            "reply": reply,
            "cached": cached,
        }
        return Outcome("replied", body)

    async def _model(self, user_id: str) -> str:
        """The model the user chose, when the allow-list has it; "" for the configured one."""
        if not self.models:
            return ""
        try:
            chosen = await self.store.pref(user_id, "model")
        except RedisError:
            return ""
        return chosen if chosen in self.models and chosen != self.default_model else ""

    def check_prefs(self, prefs: dict[str, str]) -> None:
        """Refuse a pref `model` outside the allow-list (when there is one)."""
        model = prefs.get("model")
        allowed = (self.default_model, *self.models)
        if self.models and model is not None and model not in allowed:
            raise BadRequest(
                f"model must be one of: {', '.join(allowed)}", code="invalid_pref_value"
            )

    async def _ask(
        self, msg: Message, question: str, context: Context, sink: Sink | None
    ) -> Outcome:
        model = await self._model(msg.user_id)
        try:
            answer = await self.answerer.answer(question, context, Ask(model, sink))
        except UpstreamRejected as exc:
            # Asking again cannot help: the user hears so now, and nothing is queued.
            log.info("upstream_call_rejected", status=exc.status, message_id=msg.message_id)
            metrics.MESSAGES.labels(outcome="replied").inc()
            return self._replied(msg, exc.apology, cached=False)
        except UpstreamUnavailable as exc:
            log.info("upstream_call_failed", reason=exc.reason, message_id=msg.message_id)
            if self.deferrer is None:
                raise Unavailable(
                    "the upstream API is unavailable; try again", exc.retry_after or 5
                ) from None
            job = Job(msg.message_id, msg.user_id, question, context, model=model)
            await self.deferrer.defer(job, exc.retry_after)
            metrics.MESSAGE["queued"].inc()
            return Outcome("queued", {"message_id": msg.message_id, "status": "queued"})
        metrics.MESSAGE["replied"].inc()
        outcome = self._replied(msg, answer.text, cached=answer.cached)
        outcome.cache = answer.cache
        return outcome

    async def _command(self, user_id: str, cmd: commands.Command) -> str:
        """The reply to a /prefs command (a `RedisError` is the caller's to render)."""
        match cmd.name:
            case "prefs":
                prefs = await self.store.prefs(user_id)
                if not prefs:
                    return "You have no preferences set."
                return "\n".join(f"{k} = {v}" for k, v in sorted(prefs.items()))
            case "prefs_get":
                key = check_pref_key(cmd.args[0])
                value = await self.store.pref(user_id, key)
                return f"{key} is not set." if value is None else f"{key} = {value}"
            case "prefs_set":
                key, value = cmd.args
                check_pref_key(key)
                if not value:
                    raise BadRequest("usage: /prefs set <key> <value>", code="invalid_command")
                self.check_prefs({key: value})
                await self.store.set_prefs(user_id, {key: check_pref_value(value)})
                return f"{key} = {value}"
            case "prefs_del":
                key = check_pref_key(cmd.args[0])
                removed = await self.store.del_prefs(user_id, key)
                return f"{key} removed." if removed else f"{key} was not set."
        raise BadRequest(
            "usage: /prefs, /prefs get <key>, /prefs set <key> <value>, /prefs del <key>",
            code="invalid_command",
        )
