"""The HTTP API's front door over real sockets: Host check, bearer token, CORS, JSON errors,
/metrics; against the REAL daemon process where the daemon's wiring matters."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from mirrord.app import MAX_BODY, make_app
from mirrord.config import Config, loads_config
from mirrord.context import TargetState
from mirrord.fake_upstream import FakeUpstream
from mirrord.files import DownloadStatus
from mirrord.store import Store
from mirrord.views.security import bearer_ok, host_name
from tests.conftest import wait_for
from tests.test_daemon import DaemonProcess, config_text, free_port, launch

HTTP_TOKEN = "http-token-7c2e41aa9f"
ORIGIN = "http://localhost:3000"


def no_traceback(body: str) -> None:
    assert "Traceback" not in body and 'File "' not in body, body


async def call(
    port: int, path: str, method: str = "GET", headers: dict[str, str] | None = None, **kw: Any
) -> tuple[int, dict[str, str], str]:
    timeout = aiohttp.ClientTimeout(total=10)
    async with (
        aiohttp.ClientSession(timeout=timeout) as http,
        http.request(method, f"http://127.0.0.1:{port}{path}", headers=headers, **kw) as resp,
    ):
        body = await resp.text()
        no_traceback(body)
        return resp.status, dict(resp.headers), body


async def json_error(port: int, path: str, status: int, code: str, **kw: Any) -> dict[str, str]:
    got, headers, body = await call(port, path, **kw)
    assert got == status, body
    assert headers["Content-Type"].startswith("application/json")
    assert json.loads(body)["error"]["code"] == code
    return headers


def with_http(text: str, port: int, extra: str, listen: str | None = None) -> str:
    old = f'listen = "127.0.0.1:{port}"\n'
    new = f'listen = "{listen or f"127.0.0.1:{port}"}"\n{extra}'
    assert old in text
    return text.replace(old, new)


async def healthy(d: DaemonProcess) -> None:
    async def up() -> bool:
        try:
            return (await call(d.port, "/healthz"))[0] == 200
        except aiohttp.ClientError:
            return False

    await wait_for(up, timeout=15, interval=0.05)


# --------------------------------------------------------------------------- pure helpers


@pytest.mark.parametrize(
    ("header", "name"),
    [
        ("localhost", "localhost"),
        ("LocalHost:8765", "localhost"),
        ("127.0.0.1:1", "127.0.0.1"),
        ("[::1]:8765", "::1"),
        ("[::1]", "::1"),
        ("::1", None),  # IPv6 in Host needs brackets
        ("[::1]x", None),
        ("a:b", None),
        ("", None),
    ],
)
def test_host_name(header: str, name: str | None) -> None:
    assert host_name(header) == name


def test_bearer_ok() -> None:
    assert bearer_ok(f"Bearer {HTTP_TOKEN}", HTTP_TOKEN)
    assert bearer_ok(f"bearer  {HTTP_TOKEN} ", HTTP_TOKEN)
    for bad in (None, "", HTTP_TOKEN, f"Basic {HTTP_TOKEN}", f"Bearer {HTTP_TOKEN}x", "Bearer é"):
        assert not bearer_ok(bad, HTTP_TOKEN)


# --------------------------------------------------------------------------- the real daemon


async def test_host_header_check(
    tmp_path: Path, fake: FakeUpstream, daemons: list[DaemonProcess]
) -> None:
    port = free_port()
    config = tmp_path / "mirrord.toml"
    config.write_text(with_http(config_text(fake, port, []), port, 'hosts = ["mirror.local"]\n'))
    d = await launch(daemons, config, port)
    await healthy(d)
    for host in ("127.0.0.1", f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}",
                 "127.3.2.1", f"mirror.local:{port}", "MIRROR.LOCAL"):  # fmt: skip
        status, _, body = await call(port, "/v1/status", headers={"Host": host})
        assert status == 200, (host, body)
    for host in ("evil.example", f"evil.example:{port}", "localhost.evil.example", "0.0.0.0",
                 "192.168.1.20", "mirror.local.evil.example", "::1"):  # fmt: skip
        for path in ("/v1/status", "/healthz", "/metrics", "/nope"):
            await json_error(port, path, 403, "forbidden", headers={"Host": host})
    assert await d.stop() == 0


async def test_non_loopback_listen_needs_a_token(
    tmp_path: Path, fake: FakeUpstream, daemons: list[DaemonProcess]
) -> None:
    port = free_port()
    config = tmp_path / "mirrord.toml"
    config.write_text(with_http(config_text(fake, port, []), port, "", listen=f"0.0.0.0:{port}"))
    check = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mirrord", "check-config", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(check.communicate(), 30)
    assert check.returncode == 2, (out, err)
    message = (out + err).decode()
    assert "http.listen" in message and "[http] has no token" in message
    assert len(message.strip().splitlines()) == 1

    # With a token (from a file), it serves, and wants the token on everything but /healthz.
    (tmp_path / "http-token").write_text(HTTP_TOKEN + "\n")
    config.write_text(
        with_http(
            config_text(fake, port, []),
            port,
            f'token_file = "http-token"\nallowed_origins = ["{ORIGIN}"]\n',
            listen=f"0.0.0.0:{port}",
        )
    )
    d = await launch(daemons, config, port)
    await healthy(d)  # open, no token
    good = {"Authorization": f"Bearer {HTTP_TOKEN}"}
    for path in ("/v1/status", "/metrics", "/v1/openapi.json", "/nope"):
        headers = await json_error(port, path, 401, "unauthorized")
        assert headers["WWW-Authenticate"].startswith("Bearer")
        await json_error(port, path, 401, "unauthorized", headers={"Authorization": "Bearer x"})
    assert (await call(port, "/v1/status", headers=good))[0] == 200
    assert (await call(port, "/metrics", headers=good))[0] == 200
    await json_error(port, "/nope", 404, "not_found", headers=good)
    # A listed origin may read the 401 (to show "sign in") and preflight without the token.
    headers = await json_error(port, "/v1/status", 401, "unauthorized", headers={"Origin": ORIGIN})
    assert headers["Access-Control-Allow-Origin"] == ORIGIN
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "GET",
                 "Access-Control-Request-Headers": "authorization"}  # fmt: skip
    status, headers, _ = await call(port, "/v1/status", "OPTIONS", headers=preflight)
    assert status == 204 and "Authorization" in headers["Access-Control-Allow-Headers"]
    assert not any(HTTP_TOKEN in line for line in d.raw)
    assert await d.stop() == 0


async def test_cors_only_for_listed_origins(
    tmp_path: Path, fake: FakeUpstream, daemons: list[DaemonProcess]
) -> None:
    port = free_port()
    config = tmp_path / "mirrord.toml"
    config.write_text(
        with_http(config_text(fake, port, []), port, f'allowed_origins = ["{ORIGIN}"]\n')
    )
    d = await launch(daemons, config, port)
    await healthy(d)
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "GET"}
    status, headers, _ = await call(port, "/v1/status", "OPTIONS", headers=preflight)
    assert status == 204 and headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "GET" in headers["Access-Control-Allow-Methods"]
    status, headers, _ = await call(port, "/v1/status", headers={"Origin": ORIGIN})
    assert status == 200 and headers["Access-Control-Allow-Origin"] == ORIGIN
    for other in ("http://evil.example", "http://localhost:3001", "null"):
        headers = await json_error(
            port, "/v1/status", 405, "method_not_allowed", method="OPTIONS",
            headers={"Origin": other, "Access-Control-Request-Method": "GET"},
        )  # fmt: skip
        assert not any(k.lower().startswith("access-control-") for k in headers)
        status, headers, _ = await call(port, "/v1/status", headers={"Origin": other})
        assert status == 200 and "Access-Control-Allow-Origin" not in headers

    # Reloaded without the origin: CORS is off at once, no restart.
    config.write_text(config_text(fake, port, []))

    async def cors_off() -> bool:
        status, headers, _ = await call(port, "/v1/status", headers={"Origin": ORIGIN})
        return status == 200 and "Access-Control-Allow-Origin" not in headers

    await wait_for(cors_off, timeout=10, interval=0.1)
    assert await d.stop() == 0


async def test_json_errors_and_metrics_after_a_sync(
    tmp_path: Path, fake: FakeUpstream, daemons: list[DaemonProcess]
) -> None:
    a = fake.data.add_survey(n_images=30)
    port = free_port()
    config = tmp_path / "mirrord.toml"
    config.write_text(config_text(fake, port, [a], interval="1h"))
    d = await launch(daemons, config, port)
    await d.wait_status(lambda s: s["targets"] and s["targets"][0].get("last_outcome"))
    headers = await json_error(port, "/healthz", 405, "method_not_allowed", method="POST")
    assert "GET" in headers["Allow"]
    await json_error(port, "/v1/status", 405, "method_not_allowed", method="DELETE")
    await json_error(port, "/no/such/thing", 404, "not_found")
    await json_error(port, "/v1/../etc/passwd", 404, "not_found")
    # The largest body is POST /graphql's (a local sync with ~300k hashes); beyond it, 413.
    big = {"data": b"x" * (MAX_BODY + 1), "headers": {"Content-Type": "application/json"}}
    await json_error(port, "/graphql", 413, "body_too_large", method="POST", **big)

    status, headers, text = await call(port, "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    converged = ("mirrord_sync_runs_total", (("kind", "images"), ("outcome", "converged")))
    assert samples[converged] >= 1
    assert samples[("mirrord_survey_images", (("survey", a),))] == 30
    assert samples[("mirrord_upstream_requests_total", (("outcome", "ok"),))] >= 1
    success = samples[
        ("mirrord_target_last_success_timestamp_seconds", (("target", f"survey:{a}"),))
    ]
    assert time.time() - 60 < success <= time.time()
    assert samples[("mirrord_upstream_online", ())] == 1
    requests = [k for k in samples if k[0] == "mirrord_http_requests_total"]
    routes = {dict(k[1])["route"]: dict(k[1]) for k in requests}
    assert routes["/v1/status"]["method"] == "GET"
    assert "(unmatched)" in routes  # the 404s, not one series per unknown path
    assert not any("/no/such" in route for route in routes)
    assert await d.stop() == 0


# --------------------------------------------------------------------------- in-process


class _Context:
    """A MirrorContext over a real store, for what needs no sync: body limits."""

    def __init__(self, config: Config, store: Store) -> None:
        self.config = config
        self.config_error: str | None = None
        self.started = time.time()
        self.online: bool | None = None
        self.states: dict[str, TargetState] = {}
        self._store = store
        self.downloads = DownloadStatus()

    @property
    def store(self) -> Store:
        return self._store

    def next_run_at(self, job_id: str) -> None:
        return None

    def sync_now(self, job_id: str) -> str:
        return "unknown"


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[int]:
    """make_app over real sockets, plus a test route that reads its body."""
    store = await Store.open(tmp_path / "mirror.db")
    config = loads_config('[upstream]\ntoken = "abc"\n', tmp_path / "m.toml", env={})
    app = make_app(_Context(config, store))

    async def echo(request: web.Request) -> web.Response:
        return web.json_response({"size": len(await request.read())})

    # POST /graphql (another module) reads big bodies; until it lands, a stand-in route.
    app.router.add_post("/test-echo", echo)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
        yield port
    finally:
        await runner.cleanup()
        await store.close()


async def test_oversized_body_is_a_json_413(served: int) -> None:
    status, _, body = await call(served, "/test-echo", "POST", data=b"x" * 1000)
    assert status == 200 and '"size": 1000' in body
    await json_error(served, "/test-echo", 413, "body_too_large", method="POST",
                     data=b"x" * (MAX_BODY + 1))  # fmt: skip
