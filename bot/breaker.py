"""A circuit breaker around the upstream client, one per process.

Closed: calls go through and their outcomes fill a rolling window. It opens when, within
`window` seconds, at least `min_calls` calls were made and `failure_ratio` of them failed,
or when `consecutive` calls failed in a row, or at once when the upstream answered 429/503
with a `Retry-After` (it told us when to come back). Open: calls fail at once
(`short_circuited`) for `open_seconds` instead of each waiting for the timeout. Then
half-open: one probe at a time goes through; a success closes the circuit, a failure opens
it again. Only that probe's verdict counts: every call carries the breaker's epoch (bumped on
each change of state) from the moment it was let through, and an outcome from an earlier
epoch (a call that started before the circuit opened and ends late) changes nothing, so a
slow success cannot close an open circuit. Only failures count: timeouts (connect, first
token, total) and errors worth retrying; a slow answer within its timeouts is a success, and a
permanent refusal (`UpstreamRejected`: 400/401/404...) trips nothing. Per process on
purpose: each replica judges the upstream from its own calls, with no shared state that could
itself fail.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from bot import metrics
from bot.answers import ASK, Answer, Answerer, Ask
from bot.errors import UpstreamRejected, UpstreamUnavailable
from bot.logging import get_logger
from bot.settings import Settings

log = get_logger(__name__)

State = Literal["closed", "open", "half_open"]
CLOSED: State = "closed"
OPEN: State = "open"
HALF_OPEN: State = "half_open"
_GAUGE: dict[State, int] = {CLOSED: 0, OPEN: 1, HALF_OPEN: 2}
_MAX_RETRY_AFTER = 3600.0


@dataclass(frozen=True, slots=True)
class Ticket:
    """What a call let through carries to its verdict: the epoch it started in, and whether
    it is the half-open probe."""

    epoch: int
    probe: bool = False


class CircuitBreaker:
    """The breaker's state machine (no I/O; the clock is injectable for tests)."""

    def __init__(
        self,
        *,
        window: float,
        min_calls: int,
        failure_ratio: float,
        consecutive: int,
        open_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window = window
        self.min_calls = min_calls
        self.failure_ratio = failure_ratio
        self.consecutive = consecutive
        self.open_seconds = open_seconds
        self.clock = clock
        self._state = CLOSED
        self._calls: deque[tuple[float, bool]] = deque()  # (when, ok) inside the window
        self._failures = 0  # failures among `_calls`
        self._streak = 0  # consecutive failures
        self._open_until = 0.0
        self._probing = False
        self._epoch = 0  # bumped on every change of state
        metrics.CIRCUIT_STATE.set(0)

    @classmethod
    def from_settings(cls, settings: Settings) -> CircuitBreaker:
        return cls(
            window=settings.breaker_window,
            min_calls=settings.breaker_min_calls,
            failure_ratio=settings.breaker_failure_ratio,
            consecutive=settings.breaker_consecutive,
            open_seconds=settings.breaker_open_seconds,
        )

    @property
    def state(self) -> State:
        """closed | open | half_open (an open circuit turns half-open once its time is up)."""
        if self._state == OPEN and self.clock() >= self._open_until:
            self._set(HALF_OPEN)
        return self._state

    def acquire(self) -> Ticket:
        """Let a call through (its ticket) or raise `UpstreamUnavailable` (short-circuited)."""
        state = self.state
        if state == CLOSED:
            return Ticket(self._epoch)
        if state == HALF_OPEN and not self._probing:
            self._probing = True
            return Ticket(self._epoch, probe=True)
        wait = max(self._open_until - self.clock(), 0.0) if state == OPEN else 1.0
        raise UpstreamUnavailable("upstream circuit is open", max(wait, 1.0))

    def release(self, ticket: Ticket | None = None) -> None:
        """A call let through ended with no verdict (cancelled): free the probe slot."""
        if self._current(ticket).probe:
            self._probing = False

    def success(self, ticket: Ticket | None = None) -> None:
        """A call succeeded; only the current half-open probe closes an open circuit."""
        ticket = self._current(ticket)
        if ticket.epoch != self._epoch:
            return  # started before the last change of state: says nothing about now
        if self.state != CLOSED:
            if ticket.probe:
                self._probing = False
                self._streak = 0
                self._reset_window()
                self._set(CLOSED)
            return
        self._streak = 0
        self._record(ok=True)

    def failure(self, ticket: Ticket | None = None, retry_after: float | None = None) -> None:
        """A call failed; the current probe's failure opens the circuit again."""
        ticket = self._current(ticket)
        if ticket.epoch != self._epoch:
            return  # a late verdict from before the circuit opened (or closed) again
        if self.state != CLOSED:
            if ticket.probe:
                self._probing = False
                self._streak += 1
                self._trip("probe_failed", retry_after)
            return
        self._streak += 1
        self._record(ok=False)
        calls = len(self._calls)
        if retry_after is not None:
            self._trip("retry_after", retry_after)
        elif self._streak >= self.consecutive:
            self._trip("consecutive_failures", None)
        elif calls >= self.min_calls and self._failures >= self.failure_ratio * calls:
            self._trip("failure_ratio", None)

    def _current(self, ticket: Ticket | None) -> Ticket:
        """The ticket of a call that started now (callers that do not track tickets)."""
        return ticket if ticket is not None else Ticket(self._epoch, self._probing)

    def _record(self, *, ok: bool) -> None:
        now = self.clock()
        self._calls.append((now, ok))
        if not ok:
            self._failures += 1
        horizon = now - self.window
        while self._calls and self._calls[0][0] < horizon:
            _, was_ok = self._calls.popleft()
            if not was_ok:
                self._failures -= 1

    def _reset_window(self) -> None:
        self._calls.clear()
        self._failures = 0

    def _trip(self, reason: str, retry_after: float | None) -> None:
        seconds = self.open_seconds
        if retry_after is not None:
            # The upstream said when to come back (429/503 Retry-After): that is the open time.
            seconds = min(max(retry_after, 0.1), _MAX_RETRY_AFTER)
        self._open_until = self.clock() + seconds
        log.warning(
            "circuit_opened",
            reason=reason,
            calls=len(self._calls),
            failures=self._failures,
            streak=self._streak,
            open_seconds=seconds,
        )
        self._reset_window()
        self._set(OPEN)

    def _set(self, state: State) -> None:
        if state != self._state:
            if state != OPEN:
                log.info("circuit_" + state, previous=self._state)
            self._state = state
            self._epoch += 1
            self._probing = False
        metrics.CIRCUIT_STATE.set(_GAUGE[state])


class BreakerAnswerer:
    """An `Answerer` that asks `inner` only while the breaker lets it."""

    def __init__(self, inner: Answerer, breaker: CircuitBreaker) -> None:
        self.inner = inner
        self.breaker = breaker
        self._short = metrics.UPSTREAM_REQUESTS.labels(outcome="short_circuited")

    async def answer(self, question: str, context: list[dict[str, Any]], ask: Ask = ASK) -> Answer:
        try:
            ticket = self.breaker.acquire()
        except UpstreamUnavailable:
            self._short.inc()
            raise
        try:
            answer = await self.inner.answer(question, context, ask)
        except UpstreamUnavailable as exc:
            self.breaker.failure(ticket, exc.retry_after)
            raise
        except UpstreamRejected:
            # The upstream is there and answering: it refused this call (a bad key, an
            # unknown model, a bad request), which says nothing about its health.
            self.breaker.success(ticket)
            raise
        except BaseException:
            self.breaker.release(ticket)
            raise
        if answer.upstream_failed:  # a stream that broke midway: the user has its part
            self.breaker.failure(ticket)
        else:
            self.breaker.success(ticket)
        return answer
