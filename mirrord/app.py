"""The local HTTP API served by the daemon (loopback by default): wiring only.

Each concern is a module of its own under mirrord/views; they read the daemon through
`MirrorContext` (mirrord/context.py).
"""

from __future__ import annotations

from aiohttp import web

from mirrord.context import CONTEXT, MirrorContext
from mirrord.views import data, errors, files, graphql, metrics, openapi, security, status

MAX_BODY = 8 * 1024 * 1024  # the largest request body: a local GraphQL sync with ~300k hashes


def make_app(ctx: MirrorContext) -> web.Application:
    app = web.Application(
        middlewares=[
            errors.error_middleware,  # outermost: whatever happens inside answers JSON
            metrics.metrics_middleware,  # sees every request, refused ones too
            security.guard_middleware,  # Host header, CORS, bearer token
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
    return app
