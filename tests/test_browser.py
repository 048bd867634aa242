"""The status page in a real browser: headless Chromium (Debian's `chromium` package) driven by
Playwright, against a running `mirrord demo` and against a daemon with an API token.

Skipped, saying why, where Playwright or Chromium is missing or Chromium cannot start (.ci/run
installs both). Takes the screenshot the README shows; with MIRRORD_SCREENSHOT=1 in the
environment it replaces docs/status-page.png, so a plain test run leaves the checkout as it was.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mirrord.fake_upstream import FakeUpstream
from tests.test_daemon import DaemonProcess, config_text, free_port, launch
from tests.test_demo import DemoProcess, demos  # noqa: F401  (a fixture)
from tests.test_demo import launch as launch_demo
from tests.test_http_security import HTTP_TOKEN, healthy, with_http

async_api = pytest.importorskip(
    "playwright.async_api",
    reason="Playwright is not installed: pip install -e '.[test]'",
)
# Waits go through locators and `expect`, never page.wait_for_function: that one polls by
# evaluating script in the page, which the page's Content-Security-Policy (no 'unsafe-eval')
# refuses (EvalError) whenever the first check is not already true: a test that failed only
# when the page was slower than the test.
expect = async_api.expect

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
README_SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "status-page.png"
STEP = 15_000  # ms: the longest a page should take to show a change (event-driven waits)


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip(f"Chromium is not installed at {CHROMIUM} (apt-get install chromium)")
    async with async_api.async_playwright() as pw:
        try:
            chromium = await pw.chromium.launch(
                executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=60_000
            )
        except async_api.Error as e:
            pytest.skip(f"Chromium at {CHROMIUM} cannot be launched: {str(e).splitlines()[0]}")
        try:
            yield chromium
        finally:
            await chromium.close()


class Watch:
    """A page whose script errors and CSP violations fail the test."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.problems: list[str] = []
        page.on("pageerror", lambda e: self.problems.append(f"script error: {e}"))
        page.on("console", self._console)
        page.on("dialog", lambda d: self.problems.append(f"a dialog opened: {d.message}"))

    def _console(self, message: Any) -> None:
        if message.type == "error":
            self.problems.append(f"console: {message.text}")


async def post(url: str, body: dict[str, Any]) -> Any:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http,
        http.post(url, json=body) as resp,
    ):
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def test_status_page_of_a_running_demo(
    tmp_path: Path,
    browser: Any,
    demos: list[DemoProcess],  # noqa: F811
) -> None:
    # No field life and no scheduled syncs after the first: only what the test does happens.
    d = await launch_demo(
        demos,
        tmp_path / "demo",
        *("--images", "1500", "--port", str(free_port()), "--ticks", "0", "--interval", "1h"),
    )
    status = await d.wait_status(
        lambda s: s["online"] is True and all(t["state"] == "idle" for t in s["targets"])
    )
    big = next(t for t in status["targets"] if t["kind"] == "survey")["id"]
    fields = [t["id"] for t in status["targets"] if t["kind"] == "field"]
    field_surveys = [c["parent_id"] for c in status["collections"] if c["origin"] != "config"]
    assert fields and len(field_surveys) == 2

    page = await browser.new_page(viewport={"width": 1280, "height": 900})
    watch = Watch(page)
    await page.goto(d.base + "/")

    # Every survey and field has its row; the biggest survey is plotted, one point per image.
    for t in status["targets"]:
        row = page.locator(f'tr.target[data-id="{t["id"]}"]')
        await row.wait_for(timeout=STEP)
        assert await row.get_attribute("data-state") == "idle"
        assert "Up to date" in await row.inner_text()
    for survey in field_surveys:
        await page.locator(f'tr.sub[data-id="{survey}"]').wait_for(timeout=STEP)
    big_row = page.locator(f'tr.target[data-id="{big}"]')
    assert "1,500" in await big_row.inner_text()
    assert await page.locator("svg.plot circle").count() == 1500
    assert await page.locator("#live-head").inner_text() != ""
    assert "Online" in await page.locator("#live-head").inner_text()
    await expect(page.locator("#feed")).to_have_text(re.compile("^live"), timeout=STEP)

    # Upstream changes while the mirror waits (interval 1 h); "Sync now" fetches them. The
    # fake answers slowly once, so the sync is long enough for the page to show it running.
    fake = d.fake_base()
    await post(f"{fake}/_fake/mutate", {"op": "add_images", "survey_id": big, "n": 40})
    await post(f"{fake}/_fake/mutate", {"op": "update_images", "survey_id": big, "n": 120})
    await post(f"{fake}/_fake/faults", {"push": [{"kind": "slow", "delay": 2}]})
    before = await big_row.get_attribute("data-last-attempt")
    await big_row.locator("button.sync").click()
    await page.wait_for_selector(f'tr.target[data-id="{big}"][data-state="syncing"]', timeout=STEP)
    await page.wait_for_selector(f'tr.target[data-id="{big}"][data-state="idle"]', timeout=STEP)
    assert await big_row.get_attribute("data-last-attempt") != before
    await expect(big_row.locator("td.num").first).to_contain_text("1,540", timeout=STEP)
    await expect(page.locator("svg.plot circle")).to_have_count(1540, timeout=STEP)
    # Changed images (120 updated, 40 added; an added one may be updated too) are drawn in
    # the newest colour, the others in the oldest.
    assert 120 <= await page.locator("svg.plot g.a5 circle").count() <= 160
    assert await page.locator("svg.plot g.a0 circle").count() >= 1500 - 120

    # Another survey can be chosen for the plot; colour by sensor has a legend.
    other = field_surveys[0]
    await page.locator(f'tr.sub[data-id="{other}"] a').click()
    await page.wait_for_url(f"**survey={other}**")
    await page.locator("svg.plot circle").first.wait_for(timeout=STEP)
    await page.locator(".plot-head a", has_text="sensor").click()
    await page.locator(".legend li").first.wait_for(timeout=STEP)

    # The screenshot in the README: the big survey, calm, after the sync.
    await page.goto(d.base + "/")
    await page.locator("svg.plot circle").first.wait_for(timeout=STEP)
    await expect(page.locator("#feed")).to_have_text(re.compile("^live"), timeout=STEP)
    shot = README_SCREENSHOT if os.environ.get("MIRRORD_SCREENSHOT") else tmp_path / "page.png"
    await page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    assert watch.problems == []
    await page.close()

    d.signal_group(signal.SIGINT)
    assert await d.wait_exit() == 0


async def test_page_asks_for_the_api_token(
    tmp_path: Path, fake: FakeUpstream, browser: Any, daemons: list[DaemonProcess]
) -> None:
    survey = fake.data.add_survey(n_images=30)
    port = free_port()
    config = tmp_path / "mirrord.toml"
    text = config_text(fake, port, [survey], interval="1h")
    config.write_text(with_http(text, port, f'token = "{HTTP_TOKEN}"\n'))
    d = await launch(daemons, config, port)
    await healthy(d)
    page = await browser.new_page()
    watch = Watch(page)
    await page.goto(f"http://127.0.0.1:{port}/")
    form = page.locator("#token-form")
    await form.wait_for(state="visible", timeout=STEP)
    assert await page.locator("tr.target").count() == 0
    assert survey not in await page.content()

    await page.fill("#token-input", "not-the-token")
    await page.click("#token-form button")
    await expect(page.locator("#note")).to_contain_text("not accepted", timeout=STEP)
    assert await page.locator("tr.target").count() == 0

    await page.fill("#token-input", HTTP_TOKEN)
    await page.click("#token-form button")
    await page.locator(f'tr.target[data-id="{survey}"]').wait_for(timeout=STEP)
    await form.wait_for(state="hidden", timeout=STEP)
    # Sync now carries the token too.
    await page.locator(f'tr.target[data-id="{survey}"] button.sync').click()
    await expect(page.locator("#note")).to_contain_text("Sync started", timeout=STEP)
    # A reload keeps the token for this tab (sessionStorage), not in the page or the URL.
    await page.reload()
    await page.locator(f'tr.target[data-id="{survey}"]').wait_for(timeout=STEP)
    assert HTTP_TOKEN not in page.url
    assert watch.problems == []
    await page.close()
    assert await asyncio.wait_for(d.stop(), 20) == 0


async def test_page_follows_the_feed_again_after_the_mirror_is_restored(
    tmp_path: Path, fake: FakeUpstream, browser: Any, daemons: list[DaemonProcess]
) -> None:
    """The page follows the change feed at the last seq it saw. The daemon is stopped, its
    mirror restored from an older copy and started again: that seq is one the mirror no longer
    holds, and its one 410 (feed_reset) sends the page back to the mirror's own position, live
    again, instead of retrying the lost one until something changes."""
    from tests.test_feed_restore import _restore
    from tests.test_hostile_state import converged
    from tests.test_reliability import backup_api_copy

    survey = fake.data.add_survey(n_images=30)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    config = tmp_path / "mirrord.toml"
    config.write_text(config_text(fake, port, [survey], interval="1h"))
    db = tmp_path / "mirror.db"
    d = await launch(daemons, config, port)
    await converged(d, survey, 30)
    backup = backup_api_copy(db, tmp_path / "backup")
    added = fake.data.add_images(survey, 10)
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{base}/v1/surveys/{survey}/sync") as resp:
            assert resp.status == 202
        await converged(d, survey, 40)
        async with http.get(f"{base}/v1/changes?since=0&limit=5000") as resp:
            seen = (await resp.json())["last_seq"]

    page = await browser.new_page()
    watch = Watch(page)
    await page.goto(base + "/")
    feed = page.locator("#feed")
    await expect(feed).to_have_text(f"live: following the change feed (seq {seen})", timeout=STEP)

    assert await asyncio.wait_for(d.stop(), 20) == 0
    _restore(db, backup)
    # Upstream back as the copy holds it: nothing to sync, so nothing moves the page on but
    # the 410 (each change, or the page's own refresh, would bring it a valid seq anyway).
    fake.data.delete_images(survey, ids=added)
    d = await launch(daemons, config, port)
    await healthy(d)
    # The restored mirror goes on past every seq it gave out: seen + 1.
    await expect(feed).to_have_text(
        f"live: following the change feed (seq {seen + 1})", timeout=STEP
    )
    refused = [p for p in watch.problems if "status of 410" in p]
    assert len(refused) == 1, watch.problems
    # The browser reports the refused position and the stopped daemon as failed loads.
    others = [p for p in watch.problems if p not in refused]
    assert [p for p in others if "ERR_CONNECTION_REFUSED" not in p] == [], others
    await page.close()
    assert await asyncio.wait_for(d.stop(), 20) == 0
