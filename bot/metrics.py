"""Every Prometheus metric of the stack, defined once, named as in contract.md.

Labels never carry user ids or raw paths: `route` is the route's template
(``/v1/users/{user_id}/prefs``) or ``unmatched``.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

# `_created` series double the scrape for nothing the dashboards use.
disable_created_metrics()  # type: ignore[no-untyped-call]

try:
    VERSION = version("bot")
except PackageNotFoundError:  # running from a source tree without install
    VERSION = "0.0.0"

# Latency buckets around what matters here: ms-level hot path, 300 ms upstream, 2 s timeout.
_HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_UPSTREAM_BUCKETS = (0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10)

HTTP_REQUESTS = Counter("bot_http_requests", "HTTP requests answered", ["route", "method", "code"])
HTTP_DURATION = Histogram(
    "bot_http_request_duration_seconds",
    "Time to answer an HTTP request",
    ["route", "method"],
    buckets=_HTTP_BUCKETS,
)
MESSAGES = Counter("bot_messages", "Messages by outcome", ["outcome"])
RATELIMIT_BACKEND_ERRORS = Counter(
    "bot_ratelimit_backend_errors", "Rate-limit checks that fell back to the local limiter"
)
CACHE_LOOKUPS = Counter("bot_cache_lookups", "Upstream answer cache lookups", ["result"])
UPSTREAM_REQUESTS = Counter("bot_upstream_requests", "Calls to the upstream API", ["outcome"])
UPSTREAM_DURATION = Histogram(
    "bot_upstream_request_duration_seconds",
    "Duration of upstream API calls",
    buckets=_UPSTREAM_BUCKETS,
)
# Upstream answers with an error status, by status and the provider's error code (bounded: a
# code outside [a-z0-9_.-]{1,64} counts as "other").
UPSTREAM_ERRORS = Counter(
    "bot_upstream_errors", "Upstream error answers by status and provider code", ["status", "code"]
)
# LLM answers that are not the whole answer (bot.answers.Incomplete), never cached.
UPSTREAM_INCOMPLETE = Counter(
    "bot_upstream_incomplete", "Upstream answers that were not whole, by reason", ["reason"]
)
UPSTREAM_TOKENS = Counter(
    "bot_upstream_tokens", "Tokens the upstream reported using", ["kind", "model"]
)
UPSTREAM_COST = Counter(
    "bot_upstream_cost_usd", "Estimated upstream cost in USD (UPSTREAM_PRICES)", ["model"]
)
UPSTREAM_BUDGET = Gauge("bot_upstream_budget_usd", "UPSTREAM_DAILY_BUDGET: USD a day (0: none)")
CIRCUIT_STATE = Gauge("bot_circuit_state", "Upstream circuit: 0 closed, 1 open, 2 half-open")
INFLIGHT = Gauge("bot_inflight_requests", "Requests being handled by this process")
RETRY_JOBS_PUBLISHED = Counter("bot_retry_jobs_published", "Retry jobs confirmed by the broker")
RETRY_ATTEMPTS = Counter("bot_retry_attempts", "Retry attempts by outcome", ["outcome"])
RETRY_QUEUE_MESSAGES = Gauge("bot_retry_queue_messages", "Messages in retry queues", ["queue"])
# Why each job reached the dead-letter queue (one of DEAD_REASONS).
DEAD_LETTERS = Counter(
    "bot_retry_dead_letters", "Jobs moved to the dead-letter queue, by reason", ["reason"]
)
REPLIES_DELIVERED = Counter("bot_replies_delivered", "Deferred replies stored in inboxes")
DEPENDENCY_UP = Gauge(
    "bot_dependency_up", "Dependency reachability from this process", ["dependency"]
)
# How many commands each auto-pipelined batch sent to Redis at once (`bot.autopipe`).
REDIS_BATCH = Histogram(
    "bot_redis_batch_commands",
    "Redis commands sent together in one auto-pipelined batch",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)
# Chat channels (docs/channels.md).
CHANNEL_UPDATES = Counter(
    "bot_channel_updates", "Platform updates taken in, by outcome", ["channel", "outcome"]
)
OUTBOUND_SENDS = Counter(
    "bot_outbound_sends", "Platform send attempts, by outcome", ["channel", "outcome"]
)
OUTBOUND_DUPLICATES = Counter(
    "bot_outbound_duplicates",
    "Sends that may have repeated one (a crash between the platform's 2xx and the record)",
    ["channel"],
)
OUTBOUND_QUEUE = Gauge(
    "bot_outbound_queue_messages", "Messages waiting in a channel's outbound queues", ["channel"]
)
OUTBOUND_PAUSED = Gauge(
    "bot_outbound_paused_conversations",
    "Conversations paused by a platform 429 in this process",
    ["channel"],
)
BUILD_INFO = Gauge("bot_build_info", "Build information (always 1)", ["version"])

MESSAGE_OUTCOMES = ("replied", "queued", "rate_limited", "duplicate", "rejected", "shed")
# Each outcome's series, bound once: `labels()` is a locked dict lookup the hot path need not pay.
MESSAGE = {outcome: MESSAGES.labels(outcome=outcome) for outcome in MESSAGE_OUTCOMES}
# max_attempts: the upstream kept failing; redelivered: the worker kept dying or failing on it;
# unreadable: a work-queue body that is not a job; outbox_unreadable: the same in the outbox.
# rejected: the upstream refused the question for good (a 4xx such as 400/401/404).
DEAD_REASONS = ("max_attempts", "rejected", "redelivered", "unreadable", "outbox_unreadable")


class HttpSeries:
    """`bot_http_requests_total` and `bot_http_request_duration_seconds` by route, method and
    code, each series bound the first time it is seen (labels bounded as the metrics are)."""

    _MAX = 4096  # series kept bound; past that (methods made up by a client), labels() each time

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str, int], Counter] = {}
        self._times: dict[tuple[str, str], Histogram] = {}

    def observe(self, route: str, method: str, code: int, seconds: float) -> None:
        count = self._counts.get((route, method, code))
        if count is None:
            count = HTTP_REQUESTS.labels(route, method, str(code))
            if len(self._counts) < self._MAX:
                self._counts[(route, method, code)] = count
        count.inc()
        took = self._times.get((route, method))
        if took is None:
            took = HTTP_DURATION.labels(route, method)
            if len(self._times) < self._MAX:
                self._times[(route, method)] = took
        took.observe(seconds)


HTTP = HttpSeries()
# queued, duplicate (already taken), ignored (no text), busy (another replica is queueing it),
# unauthorized, unavailable (Redis or RabbitMQ away: 503), processed (answered by the core).
CHANNELS = ("telegram", "slack", "discord")
CHANNEL_OUTCOMES = (
    "queued",
    "duplicate",
    "ignored",
    "busy",
    "unauthorized",
    "unavailable",
    "processed",
)
# sent (2xx), skipped (sent before), rate_limited (429), error (5xx, timeout: retried),
# dead_lettered (permanent, or out of attempts).
SEND_OUTCOMES = ("sent", "skipped", "rate_limited", "error", "dead_lettered")


def init_channels(channels: tuple[str, ...]) -> None:
    """The channel series at zero."""
    for channel in channels:
        for outcome in CHANNEL_OUTCOMES:
            CHANNEL_UPDATES.labels(channel, outcome)
        for outcome in SEND_OUTCOMES:
            OUTBOUND_SENDS.labels(channel, outcome)
        OUTBOUND_DUPLICATES.labels(channel)
        OUTBOUND_QUEUE.labels(channel)
        OUTBOUND_PAUSED.labels(channel)


def init() -> None:
    """Create every labelled series at zero so dashboards and alerts see them from the start."""
    BUILD_INFO.labels(version=VERSION).set(1)
    for result in ("hit", "miss", "stale"):
        CACHE_LOOKUPS.labels(result=result)
    for outcome in ("ok", "error", "timeout", "short_circuited"):
        UPSTREAM_REQUESTS.labels(outcome=outcome)
    for reason in ("content_null", "empty_choices", "length", "truncated"):
        UPSTREAM_INCOMPLETE.labels(reason=reason)
    for outcome in ("success", "retry", "dead"):
        RETRY_ATTEMPTS.labels(outcome=outcome)
    for reason in DEAD_REASONS:
        DEAD_LETTERS.labels(reason=reason)
    CIRCUIT_STATE.set(0)
    # Every channel's series, enabled or not: the alert and the dashboard read zeros, not gaps.
    init_channels(CHANNELS)


def render() -> tuple[bytes, str]:
    """The exposition body and its content type."""
    return generate_latest(), CONTENT_TYPE_LATEST
