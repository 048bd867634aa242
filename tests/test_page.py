"""The status page's HTML without a browser: what it shows, that nothing it shows can inject
markup or script, the CSP that lets only its own inline CSS and JS run, the token lock, and the
sync-now endpoints its buttons use."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from mirrord.app import make_app
from mirrord.config import Config, loads_config
from mirrord.context import TargetState
from mirrord.fake_upstream import FakeData, FakeUpstream
from mirrord.files import DownloadStatus
from mirrord.store import Store
from mirrord.sync import SyncRun
from mirrord.views.page import ago, span
from tests.conftest import Mirror
from tests.test_daemon import free_port

HOSTILE = "<script>alert(1)</script><img src=x onerror=alert(2)>\"' onmouseover=alert(3) &amp;"
HTTP_TOKEN = "page-token-93b1f0"


class Context:
    def __init__(self, config: Config, store: Store) -> None:
        self.config = config
        self.config_error: str | None = None
        self.started = 0.0
        self.online: bool | None = True
        self.states: dict[str, TargetState] = {}
        self._store = store
        self.downloads = DownloadStatus()
        self.answer = "started"
        self.calls: list[str] = []

    @property
    def store(self) -> Store:
        return self._store

    def next_run_at(self, job_id: str) -> datetime | None:
        return datetime.now(UTC) + timedelta(seconds=30)

    def sync_now(self, job_id: str) -> str:
        self.calls.append(job_id)
        return self.answer


def rename_survey(data: FakeData, field_id: str, survey_id: str, name: str) -> None:
    scope = data._field(field_id).surveys
    scope.put({**scope.current[survey_id], "content_hash": data._new_hash(), "name": name})


class World:
    def __init__(self, survey: str, field: str, field_surveys: list[str]) -> None:
        self.survey = survey
        self.field = field
        self.field_surveys = field_surveys


@pytest.fixture
async def world(fake: FakeUpstream, mirror: Mirror) -> World:
    survey = fake.data.add_survey(n_images=120)
    field = fake.data.add_field(n_surveys=2, images_per_survey=40)
    field_surveys = fake.data.survey_ids(field)
    rename_survey(fake.data, field, field_surveys[0], HOSTILE)  # upstream's text
    runs = await mirror.sync_all([survey], [field])
    assert all(r.ok for r in runs)
    return World(survey, field, field_surveys)


def config_for(tmp_path: Path, world: World, http: str = "") -> Config:
    text = (
        f'[upstream]\ntoken = "abc"\n{http}'
        f'[[surveys]]\nid = "{world.survey}"\nname = {json.dumps(HOSTILE)}\n'  # the user's text
        f'[[fields]]\nid = "{world.field}"\n'
    )
    return loads_config(text, tmp_path / "m.toml", env={})


Serve = Any


@pytest.fixture
async def serve(store: Store) -> AsyncIterator[Serve]:
    runners: list[web.AppRunner] = []

    async def start(ctx: Context) -> str:
        runner = web.AppRunner(make_app(ctx))
        await runner.setup()
        runners.append(runner)
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        return f"http://127.0.0.1:{port}"

    yield start
    for runner in runners:
        await runner.cleanup()


async def fetch(
    url: str, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], str]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http,
        http.request(method, url, headers=headers) as resp,
    ):
        return resp.status, dict(resp.headers), await resp.text()


class Parsed(HTMLParser):
    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.scripts: list[str] = []
        self.styles: list[str] = []
        self._in: str | None = None
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag in ("script", "style"):
            self._in = tag

    def handle_endtag(self, tag: str) -> None:
        self._in = None

    def handle_data(self, data: str) -> None:
        if self._in == "script":
            self.scripts.append(data)
        elif self._in == "style":
            self.styles.append(data)
        else:
            self.text.append(data)

    def all(self, tag: str, **match: str) -> list[dict[str, str | None]]:
        return [
            a for t, a in self.tags if t == tag and all(a.get(k) == v for k, v in match.items())
        ]


def sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


async def test_page_shows_rows_and_plot_and_escapes_every_text(
    tmp_path: Path, store: Store, world: World, serve: Serve
) -> None:
    ctx = Context(config_for(tmp_path, world), store)
    ctx.config_error = f"m.toml line 3: {HOSTILE}"
    ctx.states = {
        f"survey:{world.survey}": TargetState(
            state="error",
            last_runs=[SyncRun("images", world.survey, outcome="failed", error=HOSTILE)],
        )
    }
    base = await serve(ctx)
    status, headers, body = await fetch(base + "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    page = Parsed(body)

    # Nothing from upstream, the config or an error became markup: one script (ours), no
    # img, no event-handler attribute; the hostile text is there, as text.
    assert len(page.all("script")) == 1 and page.all("script")[0].get("src") is None
    assert page.all("img") == []
    assert not [a for _, attrs in page.tags for a in attrs if a.startswith("on")]
    assert HOSTILE not in body
    text = "".join(page.text)
    assert text.count(HOSTILE) >= 3  # survey name (config), survey name (upstream), error
    assert "m.toml line 3: " + HOSTILE in text

    # The CSP allows exactly the inline script and style the page carries, nothing else.
    csp = dict(p.strip().split(" ", 1) for p in headers["Content-Security-Policy"].split(";"))
    assert csp["default-src"] == "'none'"
    assert csp["script-src"] == sha256(page.scripts[0])
    assert csp["style-src"] == sha256(page.styles[0])
    assert csp["connect-src"] == "'self'" and csp["frame-ancestors"] == "'none'"
    assert headers["Cache-Control"] == "no-store"

    # One row per configured survey and field, the field's surveys under it.
    rows = {a["data-id"]: a for a in page.all("tr") if a.get("class") == "target"}
    assert set(rows) == {world.survey, world.field}
    assert rows[world.survey]["data-state"] == "error"
    assert rows[world.field]["data-state"] == "idle"
    subs = {a["data-id"] for a in page.all("tr") if a.get("class") == "sub"}
    assert subs == set(world.field_surveys)
    buttons = {a["data-sync"] for a in page.all("button") if "data-sync" in a}
    assert buttons == {f"/v1/surveys/{world.survey}/sync", f"/v1/fields/{world.field}/sync"}
    assert re.search(r"\b120\b", text) and "80 in 2 surveys" in text
    assert "Online" in text

    # The biggest survey is plotted by default: one point per image.
    (svg,) = page.all("svg")
    assert svg["data-points"] == "120"
    assert len(page.all("circle")) == 120
    assert int(body[body.index('<body data-seq="') + 16 :].split('"')[0]) > 0


async def test_plot_follows_the_query(
    tmp_path: Path, store: Store, world: World, serve: Serve
) -> None:
    base = await serve(Context(config_for(tmp_path, world), store))
    chosen = world.field_surveys[1]
    page = Parsed((await fetch(f"{base}/?survey={chosen}&color=sensor"))[2])
    assert page.all("svg")[0]["data-points"] == "40"
    assert page.all("a", **{"class": "chip", "aria-current": "true"})[0]["href"] == (
        f"?survey={chosen}&color=sensor"
    )
    assert "Sensor" in "".join(page.text)
    # An unknown survey or colour falls back to the defaults (no error, nothing echoed).
    status, _, body = await fetch(f"{base}/?survey=%3Cb%3Enope&color=%3Ci%3E")
    assert status == 200 and "nope" not in body
    assert Parsed(body).all("svg")[0]["data-points"] == "120"


async def test_with_a_token_the_page_shows_no_data_without_it(
    tmp_path: Path, store: Store, world: World, serve: Serve
) -> None:
    config = config_for(tmp_path, world, http=f'[http]\ntoken = "{HTTP_TOKEN}"\n')
    base = await serve(Context(config, store))
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        status, _, body = await fetch(base + "/", headers=headers)
        assert status == 200 and 'data-locked="1"' in body
        for secret in (world.survey, world.field, *world.field_surveys, "alert"):
            assert secret not in body
    status, _, body = await fetch(base + "/", headers={"Authorization": f"Bearer {HTTP_TOKEN}"})
    assert status == 200 and 'data-locked="0"' in body and world.survey in body
    # The rest of the API is as closed as before.
    assert (await fetch(base + "/v1/status"))[0] == 401
    assert (await fetch(base + f"/v1/fields/{world.field}/sync", "POST"))[0] == 401
    # And the page, like everything, only answers loopback Host names.
    status, _, body = await fetch(base + "/", headers={"Host": "evil.example"})
    assert status == 403 and "forbidden" in body


async def test_sync_now_for_fields_and_their_surveys(
    tmp_path: Path, store: Store, world: World, serve: Serve
) -> None:
    ctx = Context(config_for(tmp_path, world), store)
    base = await serve(ctx)
    status, _, body = await fetch(f"{base}/v1/fields/{world.field}/sync", "POST")
    assert status == 202
    assert json.loads(body) == {"status": "started", "job": f"field:{world.field}"}
    # A survey a field brings syncs in the field's job.
    status, _, _ = await fetch(f"{base}/v1/surveys/{world.field_surveys[0]}/sync", "POST")
    assert status == 202 and ctx.calls == [f"field:{world.field}"] * 2
    ctx.answer = "running"
    status, _, body = await fetch(f"{base}/v1/fields/{world.field}/sync", "POST")
    assert status == 409 and json.loads(body)["error"]["code"] == "sync_running"
    status, _, body = await fetch(f"{base}/v1/fields/{world.survey}/sync", "POST")
    assert status == 404 and json.loads(body)["error"]["code"] == "unknown_field"


def test_times_read_calmly() -> None:
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)

    def stamp(seconds: int) -> str:
        return (now - timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    assert ago(None, now) == "never"
    assert ago(stamp(2), now) == "just now"
    assert ago(stamp(42), now) == "42 seconds ago"
    assert ago(stamp(3 * 60 + 5), now) == "3 minutes ago"
    assert ago(stamp(2 * 3600), now) == "2 hours ago"
    assert ago(stamp(86400), now) == "1 day ago"
    assert ago("not a time", now) == "never"
    assert span(3 * 86400) == "3 days"
