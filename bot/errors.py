"""Errors a caller can act on, each with the HTTP status it maps to.

Raised anywhere below the HTTP layer and rendered as ``{"error": {"code", "message"}}`` by
one middleware (`bot.api.middleware`). Nothing here imports aiohttp.
"""

from __future__ import annotations

# The largest request body the API reads (contract.md); NGINX refuses larger ones first.
MAX_BODY = 64 * 1024


class BotError(Exception):
    """Base: an error with a stable machine code, a human message and an HTTP status."""

    status = 500
    code = "internal"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def headers(self) -> dict[str, str]:
        """Extra response headers (Retry-After, WWW-Authenticate...)."""
        return {}


class BadRequest(BotError):
    status = 400
    code = "bad_request"


class Unauthorized(BotError):
    status = 401
    code = "unauthorized"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="bot"'}


class Forbidden(BotError):
    """Authenticated (or not needing to be) but not allowed: a key's user prefix, an address."""

    status = 403
    code = "forbidden"


class NotFound(BotError):
    status = 404
    code = "not_found"


class MethodNotAllowed(BotError):
    status = 405
    code = "method_not_allowed"

    def __init__(self, message: str, allowed: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.allowed = allowed

    def headers(self) -> dict[str, str]:
        return {"Allow": ", ".join(sorted(self.allowed))} if self.allowed else {}


class Conflict(BotError):
    """A well-formed request the resource's current state refuses (a user's 101st pref)."""

    status = 409
    code = "conflict"


class PayloadTooLarge(BotError):
    status = 413
    code = "payload_too_large"

    def __init__(self) -> None:
        super().__init__(f"request body is larger than {MAX_BODY // 1024} KiB")


class UnsupportedMediaType(BotError):
    status = 415
    code = "unsupported_media_type"


class _RetryLater(BotError):
    def __init__(self, message: str, retry_after: float = 1.0, *, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after = max(1, int(-(-retry_after // 1)))  # whole seconds, rounded up, >= 1

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class RateLimited(_RetryLater):
    status = 429
    code = "rate_limited"

    def __init__(
        self,
        message: str,
        retry_after: float = 1.0,
        *,
        extra: dict[str, str] | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message, retry_after, code=code)
        self.extra = extra or {}

    def headers(self) -> dict[str, str]:
        return {**self.extra, **super().headers()}


class Overloaded(_RetryLater):
    """This replica has too many requests in flight; try again (NGINX may try another)."""

    status = 503
    code = "overloaded"


class Unavailable(_RetryLater):
    """A dependency (Redis, RabbitMQ, upstream) is down and nothing else can hold the job."""

    status = 503
    code = "unavailable"


class Busy(Unavailable):
    """The same message is being answered by another request: its answer will be the one."""

    code = "busy"

    def __init__(self) -> None:
        super().__init__("the same message is still being processed", 1)


class StorageUnavailable(Unavailable):
    """Redis did not answer: what any `RedisError` that reaches a caller becomes (503)."""

    def __init__(self) -> None:
        super().__init__("storage is unavailable right now; try again", 5)


class Misconfigured(Unavailable):
    """The process's settings are invalid (a Lambda function's: it answers this until a
    deploy fixes them). Names the setting, never its value (it may be a secret)."""

    def __init__(self, setting: str) -> None:
        super().__init__(f"setting {setting} is invalid; see the log", 60, code="misconfigured")


class UpstreamUnavailable(Exception):
    """The upstream API failed (error, timeout, open circuit). Not an HTTP error by itself."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class UpstreamRejected(Exception):
    """The upstream refused the call for good (400/401/403/404/422...): retrying cannot help.

    Not retried, not counted against the circuit breaker; the user gets `apology` at once.
    `code` is the provider's own error code (``invalid_api_key``, ``model_not_found``).
    """

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"upstream answered {status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message

    @property
    def apology(self) -> str:
        """What the user is told: a sentence per class of refusal, no provider internals."""
        if self.status in (401, 403):
            return (
                "Sorry, the language model refused this bot's credentials, so I cannot "
                "answer right now. The operators have been told."
            )
        if self.status == 404:
            return (
                "Sorry, the language model this bot is set to use is not available. "
                "If you chose one with /prefs set model, try /prefs del model."
            )
        return (
            "Sorry, the language model could not take this message as it is. "
            "Try rephrasing or shortening it."
        )


class HttpError(BotError):
    """Any other 4xx the HTTP layer raises (kept as JSON like the rest)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message, code="http_error")
        self.status = status
