"""structlog configuration: JSON lines by default, secrets scrubbed from every event."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any

import orjson
import structlog

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


def _redactor(secrets: Iterable[str]) -> structlog.types.Processor:
    """A processor that replaces any secret value found in an event's strings with `***`."""
    hidden = tuple(s for s in secrets if s)

    def redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        if not hidden:
            return event
        for key, value in event.items():
            if isinstance(value, str):
                for secret in hidden:
                    if secret in value:
                        value = value.replace(secret, "***")
                event[key] = value
        return event

    return redact


def _dumps(obj: Any, default: Any = None) -> str:
    return orjson.dumps(obj, default=default or str).decode()


def configure(
    fmt: str = "json", level: str = "info", secrets: Iterable[str] = (), service: str = "bot"
) -> None:
    """Configure structlog (and stdlib logging, for libraries) once per process."""
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        _redactor(secrets),
    ]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer(serializer=_dumps)
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.WriteLoggerFactory(sys.stdout),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(service=service)
    # Library loggers (aiohttp, aio-pika) at warning and above, one line each on stderr.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s %(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.ERROR)


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A logger bound with the module name."""
    logger: structlog.stdlib.BoundLogger = structlog.get_logger(logger_name=name)
    return logger
