"""Who may talk to the API: Host header check, bearer token, CORS.

Three middlewares, in this order inside `errors.error_middleware` (mirrord/app.py):

- `host_middleware`: a field laptop runs a browser, and any web page it opens can make the
  browser send requests to 127.0.0.1 under the page's own domain name (DNS rebinding). Those
  requests carry the page's Host, so only loopback names and the configured `[http] hosts`
  are served. It also fails closed if a request arrives on a non-loopback address while no
  token is set (a reload can drop the token while the socket stays bound: listen needs a
  restart).
- `cors_middleware`: answers preflights and adds Access-Control-Allow-Origin for the
  configured `[http] allowed_origins` only. It sits before auth: browsers send preflights
  without the Authorization header.
- `auth_middleware`: with `[http] token`, every request but `/healthz` and `/` needs
  `Authorization: Bearer <token>` (`/` shows data only to a request that carries it).

The config is read per request through `request.app[CONTEXT].config` so that reloads apply.
"""

from __future__ import annotations

import hmac
import ipaddress

from aiohttp import web

from mirrord.config import HttpConfig, is_loopback_host
from mirrord.context import CONTEXT
from mirrord.views.errors import ApiError, Handler

# Liveness probes carry no credentials; a browser loading the status page cannot send any
# (views/page.py renders it without data unless the request carries the token).
OPEN_PATHS = frozenset({"/healthz", "/"})
CORS_METHODS = "GET, POST, OPTIONS"
CORS_HEADERS = "Authorization, Content-Type, Accept"
CORS_MAX_AGE = "600"  # seconds a browser may cache a preflight answer


def _http(request: web.Request) -> HttpConfig:
    return request.app[CONTEXT].config.http


def host_name(header: str) -> str | None:
    """The name in a Host header, lower-case, without port or IPv6 brackets; None if malformed."""
    value = header.strip().lower()
    if value.startswith("["):  # "[::1]:8765"
        name, bracket, rest = value[1:].partition("]")
        port = rest.removeprefix(":")
        if not bracket or (rest and (rest == port or not port.isdigit())):
            return None
        return name or None
    name, _, port = value.partition(":")
    if port and not port.isdigit():  # also refuses a bare IPv6 address: Host needs brackets
        return None
    return name or None


def host_allowed(header: str | None, http: HttpConfig) -> bool:
    name = host_name(header) if header else None
    if name is None:
        return False
    return is_loopback_host(name) or name in http.hosts


def _arrived_on_loopback(request: web.Request) -> bool:
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    if not isinstance(sockname, tuple) or not sockname:
        return False  # unknown: fail closed
    try:
        return ipaddress.ip_address(str(sockname[0]).partition("%")[0]).is_loopback
    except ValueError:
        return False


@web.middleware
async def host_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    http = _http(request)
    if not host_allowed(request.headers.get("Host"), http):
        raise ApiError(
            403,
            "forbidden",
            "Host header not accepted (use localhost or 127.0.0.1, or add the name to "
            "[http] hosts)",
        )
    if http.token is None and not _arrived_on_loopback(request):
        raise ApiError(
            403, "forbidden", "not served beyond loopback without [http] token (restart needed)"
        )
    return await handler(request)


def _cors_headers(origin: str) -> dict[str, str]:
    return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}


@web.middleware
async def cors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    origins = _http(request).allowed_origins
    origin = request.headers.get("Origin")
    if not origins or origin is None or origin.lower() not in origins:
        return await handler(request)
    # Echo the origin as the browser sent it: it compares byte for byte.
    headers = _cors_headers(origin)
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        return web.Response(
            status=204,
            headers=headers
            | {
                "Access-Control-Allow-Methods": CORS_METHODS,
                "Access-Control-Allow-Headers": CORS_HEADERS,
                "Access-Control-Max-Age": CORS_MAX_AGE,
            },
        )
    try:
        response = await handler(request)
    except web.HTTPException as e:
        # Errors too: a page must be able to read why it was refused (401, 404, ...).
        e.headers.update(headers)
        raise
    response.headers.update(headers)
    return response


def bearer_ok(authorization: str | None, token: str) -> bool:
    if not authorization:
        return False
    scheme, _, credentials = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    # Constant time: the comparison must not tell an attacker how much of a guess was right.
    return hmac.compare_digest(
        credentials.strip().encode("utf-8", "surrogateescape"), token.encode("utf-8")
    )


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    token = _http(request).token
    if token is None or request.path in OPEN_PATHS:
        return await handler(request)
    if not bearer_ok(request.headers.get("Authorization"), token.reveal()):
        raise ApiError(
            401,
            "unauthorized",
            "missing or wrong bearer token (send Authorization: Bearer <[http] token>)",
            headers={"WWW-Authenticate": 'Bearer realm="mirrord"'},
        )
    return await handler(request)


MIDDLEWARES = (host_middleware, cors_middleware, auth_middleware)
