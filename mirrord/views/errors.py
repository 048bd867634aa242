"""Every error the HTTP API answers is JSON: `{"error": {"code", "message"}}`, never a
traceback, never an HTML page."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web

from mirrord import logs
from mirrord.store import StoreError

log = logs.get_logger("mirrord.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "body_too_large",
    415: "unsupported_media_type",
    429: "too_many_requests",
}


class ApiError(web.HTTPException):
    """Raise from a view: becomes a JSON error answer with this status, code and message."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        self.status_code = status
        super().__init__(headers=headers)
        self.code = code
        self.message = message


def json_error(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.json_response(
        {"error": {"code": code, "message": message}}, status=status, headers=headers
    )


# The body is ours (JSON), so the exception's own body headers must not survive.
_BODY_HEADERS = {"content-type", "content-length", "content-encoding"}


def _kept_headers(e: web.HTTPException) -> dict[str, str]:
    """The exception's protocol headers (Allow on a 405, WWW-Authenticate on a 401, CORS)."""
    return {k: v for k, v in e.headers.items() if k.lower() not in _BODY_HEADERS}


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as e:
        return json_error(e.status_code, e.code, e.message, _kept_headers(e))
    except web.HTTPException as e:
        if e.status_code < 400:
            raise
        code = _CODES.get(e.status_code, "error")
        message = e.reason if e.status_code != 404 else f"no such endpoint: {request.path}"
        return json_error(e.status_code, code, message, _kept_headers(e))
    except StoreError as e:
        # The database itself failed (corrupted, disk error): not the client's fault, and
        # nothing a retry by the client fixes soon. Say so in one line.
        log.error("mirror database error", path=request.path, error=str(e))
        return json_error(503, "database_error", str(e))
    except Exception:
        # A bug: log it with its traceback for us, answer one line for the client.
        log.exception("internal error", path=request.path, method=request.method)
        return json_error(500, "internal", "internal error (logged)")
