"""Who may talk to the API: Host header check, bearer token, CORS.

One middleware, `guard_middleware`, inside `errors.error_middleware` (mirrord/app.py), checks
in this order:

- the Host header: a field laptop runs a browser, and any web page it opens can make the
  browser send requests to 127.0.0.1 under the page's own domain name (DNS rebinding). Those
  requests carry the page's Host, so only loopback names and the configured `[http] hosts`
  are served. It also fails closed if a request arrives on a non-loopback address while no
  token is set (a reload can drop the token while the socket stays bound: listen needs a
  restart).
- CORS: answers preflights and adds Access-Control-Allow-Origin for the
  configured `[http] allowed_origins` only. It comes before the token: browsers send
  preflights without the Authorization header.
- the token: with `[http] token`, every request but `/healthz` and `/` needs
  `Authorization: Bearer <token>` (`/` shows data only to a request that carries it).

The config is read per request through `request.app[CONTEXT].config` so that reloads apply.
"""

from __future__ import annotations

import functools
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
    return header is not None and _host_allowed(header, http.hosts)


@functools.lru_cache(maxsize=256)  # bounded: the header is the client's to choose
def _host_allowed(header: str, hosts: tuple[str, ...]) -> bool:
    name = host_name(header) if header else None
    if name is None:
        return False
    return is_loopback_host(name) or name in hosts


def _arrived_on_loopback(request: web.Request) -> bool:
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    if not isinstance(sockname, tuple) or not sockname:
        return False  # unknown: fail closed
    return _loopback_address(str(sockname[0]))


@functools.lru_cache(maxsize=64)  # the addresses this server listens on
def _loopback_address(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.partition("%")[0]).is_loopback
    except ValueError:
        return False


def _check_host(request: web.Request, http: HttpConfig) -> None:
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


def _cors_headers(origin: str) -> dict[str, str]:
    return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}


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


def _check_token(request: web.Request, http: HttpConfig) -> None:
    token = http.token
    if token is None or request.path in OPEN_PATHS:
        return
    if not bearer_ok(request.headers.get("Authorization"), token.reveal()):
        raise ApiError(
            401,
            "unauthorized",
            "missing or wrong bearer token (send Authorization: Bearer <[http] token>)",
            headers={"WWW-Authenticate": 'Bearer realm="mirrord"'},
        )


@web.middleware
async def guard_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The Host check, then CORS, then the token: one middleware, as each layer costs every
    request a coroutine of its own."""
    http = _http(request)
    _check_host(request, http)
    origins = http.allowed_origins
    origin = request.headers.get("Origin") if origins else None
    if origin is None or origin.lower() not in origins:
        _check_token(request, http)
        return await handler(request)
    # Echo the origin as the browser sent it: it compares byte for byte.
    headers = _cors_headers(origin)
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        # Before the token: browsers send preflights without the Authorization header.
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
        _check_token(request, http)
        response = await handler(request)
    except web.HTTPException as e:
        # Errors too: a page must be able to read why it was refused (401, 404, ...).
        e.headers.update(headers)
        raise
    response.headers.update(headers)
    return response
