"""Logging with structlog: JSON lines when stdout is not a terminal (journald keeps them), a
readable console rendering on a terminal. Every string that reaches a log line is scrubbed of
registered secrets first, so a token can only leak if it was never registered."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

_SECRETS: set[str] = set()
_MIN_SECRET = 6  # shorter strings would mangle messages while protecting nothing
REDACTED = "[redacted]"


def register_secret(value: str) -> None:
    """Never let `value` appear in a log line (tokens, client secrets, refresh tokens)."""
    if len(value) >= _MIN_SECRET:
        _SECRETS.add(value)


def scrub(text: str) -> str:
    for secret in _SECRETS:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


def _redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in event.items():
        if isinstance(value, str):
            event[key] = scrub(value)
        elif not isinstance(value, int | float | bool | type(None)):
            event[key] = scrub(str(value))
    return event


def configure(
    stream: TextIO | None = None, *, json_lines: bool | None = None, level: int = logging.INFO
) -> None:
    """Set up structlog and route stdlib logging (aiohttp, APScheduler) through it."""
    stream = stream or sys.stdout
    if json_lines is None:
        json_lines = not stream.isatty()
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        _redact,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json_lines
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=[structlog.stdlib.ExtraAdder(), *shared],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # APScheduler narrates every job start and end at INFO; our own run summary says more.
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def get_logger(name: str = "mirrord") -> Any:
    return structlog.get_logger(name)
