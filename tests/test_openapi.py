"""/v1/openapi.json: a valid OpenAPI 3.1 document that matches the app's routes both ways."""

from __future__ import annotations

import re
from pathlib import Path

import aiohttp
from openapi_spec_validator import validate

from mirrord.app import make_app
from mirrord.config import loads_config
from mirrord.context import MirrorContext
from mirrord.fake_upstream import FakeUpstream
from mirrord.store import Store
from mirrord.views.openapi import document
from tests.test_daemon import DaemonProcess, config_text, free_port, launch
from tests.test_http_security import _Context, healthy

# Documented but deliberately not routed: none. (A route being written goes here until it
# is wired; the both-ways check then tolerates it.)
PENDING: set[tuple[str, str]] = set()


def test_document_is_valid_openapi_3_1() -> None:
    doc = document()
    assert doc["openapi"].startswith("3.1")
    validate(doc)  # raises on any violation


def _normalise(path: str) -> str:
    # aiohttp writes {id:regex} for constrained parameters; OpenAPI writes {id}.
    return re.sub(r"\{([^}:]+):[^}]*\}", r"{\1}", path)


def routed(ctx: MirrorContext) -> set[tuple[str, str]]:
    app = make_app(ctx)
    found = set()
    for route in app.router.routes():
        resource = route.resource
        if route.method in ("HEAD", "*") or resource is None:
            continue  # HEAD rides along with every GET
        found.add((route.method, _normalise(resource.canonical)))
    return found


def documented() -> set[tuple[str, str]]:
    return {
        (method.upper(), path)
        for path, item in document()["paths"].items()
        for method in item
        if method in ("get", "post", "put", "patch", "delete", "options")
    }


async def test_every_route_documented_and_every_documented_path_routed(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "mirror.db")
    try:
        config = loads_config('[upstream]\ntoken = "abc"\n', tmp_path / "m.toml", env={})
        routes = routed(_Context(config, store))
    finally:
        await store.close()
    docs = documented()
    assert routes - docs == set(), "routes missing from mirrord/views/openapi.py"
    unrouted = docs - routes - PENDING
    assert unrouted == set(), "documented but not routed (and not pending)"
    # Once a pending route is routed, it must leave PENDING: the check gets stricter by itself.
    assert PENDING & routes == set(), f"routed now, remove from PENDING: {PENDING & routes}"
    assert docs >= PENDING, "a pending route must be documented"


def test_every_operation_documents_the_error_format() -> None:
    doc = document()
    for path, item in doc["paths"].items():
        for method, op in item.items():
            errors = {k: v for k, v in op["responses"].items() if int(k) >= 400}
            assert {"403", "405", "500"} <= set(errors), (method, path)
            for answer in errors.values():
                schema = answer["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/Error"}, (method, path)
    assert doc["paths"]["/healthz"]["get"]["security"] == []


async def test_served_by_the_daemon(
    tmp_path: Path, fake: FakeUpstream, daemons: list[DaemonProcess]
) -> None:
    port = free_port()
    config = tmp_path / "mirrord.toml"
    config.write_text(config_text(fake, port, []))
    d = await launch(daemons, config, port)
    await healthy(d)
    timeout = aiohttp.ClientTimeout(total=10)
    async with (
        aiohttp.ClientSession(timeout=timeout) as http,
        http.get(f"http://127.0.0.1:{port}/v1/openapi.json") as resp,
    ):
        assert resp.status == 200
        doc = await resp.json()
    validate(doc)
    assert doc == document()
    assert await d.stop() == 0
