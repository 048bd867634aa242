"""What one HTTP client can hold of the daemon: time, connections, bytes.

aiohttp's own defaults suit a server behind a reverse proxy, not one facing clients directly:
an idle connection, or one whose request headers never finish (a slow-loris client sending a
byte now and then), is kept for an hour, and a request body is awaited for ever. These bounds
are set explicitly (tests/test_http_hostile.py checks each over real sockets):

- `KEEPALIVE_TIMEOUT`: a connection is closed once it has been idle this long, and also when
  its request headers are not complete this long after it opened (or after its previous
  answer): aiohttp runs one timer for both.
- `BODY_TIMEOUT`: a request body must arrive whole within this, or the answer is a JSON 408
  and the connection is closed.
- `LINGER`: a body the handler did not need is drained for at most this long after the
  answer, then the connection is closed.
- `SHUTDOWN_TIMEOUT`: on SIGTERM, requests in flight get this long before they are cancelled
  (long-polls are woken at once: they answer what they have).
- Header sizes: a request line or header field over `MAX_LINE` bytes gets a 400 (aiohttp's
  plain-text answer: the request never reached the API).
- `MAX_FILES`: the daemon raises its open-file limit up to this (systemd's soft default is
  1,024), so that a crowd of idle connections cannot leave it unable to accept the next one
  or to open its own connection upstream.

Requests that are not HTTP at all (bad request lines, oversized headers, broken chunking) are
refused by aiohttp before any middleware runs; `ProtocolErrorFilter` logs each as one warning
line instead of an error with a traceback.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from mirrord.views.errors import ApiError, Handler

KEEPALIVE_TIMEOUT = 15.0  # seconds
BODY_TIMEOUT = 30.0  # seconds for a whole request body (8 MiB at most: mirrord.app.MAX_BODY)
LINGER = 2.0  # seconds
SHUTDOWN_TIMEOUT = 3.0  # seconds
MAX_LINE = 8190  # bytes: request line, and each header field (name and value)
MAX_FILES = 65536

_PROTOCOL_LOGGER = "aiohttp.server"
_MESSAGE_CAP = 160  # characters of a refused request that reach the log


def runner_options(
    *,
    keepalive_timeout: float = KEEPALIVE_TIMEOUT,
    linger: float = LINGER,
    shutdown_timeout: float = SHUTDOWN_TIMEOUT,
) -> dict[str, Any]:
    """Keyword arguments for `web.AppRunner`: the bounds above."""
    return {
        "access_log": None,
        "keepalive_timeout": keepalive_timeout,
        "lingering_time": linger,
        "shutdown_timeout": shutdown_timeout,
        "max_line_size": MAX_LINE,
        "max_field_size": MAX_LINE,
    }


def body_timeout_middleware(timeout: float = BODY_TIMEOUT) -> Any:
    """Read a request's body before the handler does, within `timeout` seconds."""

    @web.middleware
    async def body_timeout(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.body_exists:
            try:
                async with asyncio.timeout(timeout):
                    await request.read()  # kept by aiohttp: the handler's read() gets it
            except TimeoutError:
                raise ApiError(
                    408,
                    "body_timeout",
                    f"the request body did not arrive within {timeout:g} seconds",
                ) from None
        return await handler(request)

    return body_timeout


class ProtocolErrorFilter(logging.Filter):
    """aiohttp logs every malformed request as an error with a traceback: one client could
    fill the journal with them. Make each one warning line; other records pass unchanged."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            reason = " ".join(str(exc.message).split())[:_MESSAGE_CAP]
            record.msg = "malformed HTTP request refused (400): %s"
            record.args = (reason,)
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def install_log_filter() -> None:
    logger = logging.getLogger(_PROTOCOL_LOGGER)
    if not any(isinstance(f, ProtocolErrorFilter) for f in logger.filters):
        logger.addFilter(ProtocolErrorFilter())


def raise_file_limit(target: int = MAX_FILES) -> int:
    """Raise the soft open-file limit towards `target` (never above the hard limit, never
    down); returns the limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    ceiling = target if hard == resource.RLIM_INFINITY else min(target, hard)
    if soft != resource.RLIM_INFINITY and soft < ceiling:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (ceiling, hard))
        except (ValueError, OSError):
            return soft
        return ceiling
    return soft
