"""The local HTTP API served by the daemon (loopback by default): wiring only.

Each concern is a module of its own under mirrord/views; they read the daemon through
`MirrorContext` (mirrord/context.py).
"""

from __future__ import annotations

from aiohttp import web

from mirrord.context import CONTEXT, MirrorContext
from mirrord.views import (
    data,
    errors,
    files,
    graphql,
    limits,
    metrics,
    openapi,
    page,
    security,
    status,
)

MAX_BODY = 8 * 1024 * 1024  # the largest request body: a local GraphQL sync with ~300k hashes


def make_app(ctx: MirrorContext, body_timeout: float = limits.BODY_TIMEOUT) -> web.Application:
    app = web.Application(
        middlewares=[
            errors.error_middleware,  # outermost: whatever happens inside answers JSON
            metrics.metrics_middleware,  # sees every request, refused ones too
            security.guard_middleware,  # Host header, CORS, bearer token
            limits.body_timeout_middleware(body_timeout),  # after the token: refused ones send none
        ],
        client_max_size=MAX_BODY,
    )
    app[CONTEXT] = ctx
    metrics.setup(app)
    status.add_routes(app.router)
    data.add_routes(app.router)
    files.add_routes(app.router)
    graphql.add_routes(app.router)
    openapi.add_routes(app.router)
    page.add_routes(app.router)
    app.on_shutdown.append(_end_long_polls)
    return app


async def _end_long_polls(app: web.Application) -> None:
    # aiohttp waits for running handlers when it stops; a change-feed long-poll (an open status
    # page always has one) would hold the daemon's stop for up to its `wait`.
    app[CONTEXT].store.wake_waiters()


def make_runner(
    ctx: MirrorContext,
    *,
    keepalive_timeout: float = limits.KEEPALIVE_TIMEOUT,
    body_timeout: float = limits.BODY_TIMEOUT,
    linger: float = limits.LINGER,
    shutdown_timeout: float = limits.SHUTDOWN_TIMEOUT,
) -> web.AppRunner:
    """The app in a runner with explicit bounds on slow and idle clients (views/limits.py;
    tests pass shorter ones)."""
    limits.install_log_filter()
    options = limits.runner_options(
        keepalive_timeout=keepalive_timeout, linger=linger, shutdown_timeout=shutdown_timeout
    )
    return web.AppRunner(make_app(ctx, body_timeout), **options)
