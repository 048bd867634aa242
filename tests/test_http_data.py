"""The data endpoints of the local HTTP API, over real HTTP to a real daemon process."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mirrord.fake_upstream import FakeUpstream
from tests.test_daemon import DaemonProcess, config_text, free_port, launch, targets


async def get(d: DaemonProcess, path: str, **kwargs: Any) -> tuple[int, Any, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{d.port}{path}", **kwargs) as resp,
    ):
        body = await resp.json(content_type=None) if resp.status != 304 else None
        return resp.status, body, resp.headers.copy()  # case-insensitive


async def post(d: DaemonProcess, path: str) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"http://127.0.0.1:{d.port}{path}") as resp,
    ):
        return resp.status, await resp.json(content_type=None)


async def serving(
    tmp_path: Path,
    fake: FakeUpstream,
    daemons: list[DaemonProcess],
    surveys: list[str],
    interval: str = "1h",
) -> DaemonProcess:
    port = free_port()
    config = tmp_path / "mirrord.toml"
    config.write_text(config_text(fake, port, surveys, interval=interval))
    d = await launch(daemons, config, port)
    await d.wait_status(
        lambda s: (
            all(t.get("last_outcome") == "converged" for t in s["targets"])
            and len(s["targets"]) == len(surveys)
        )
    )
    return d


def strip(item: dict[str, Any]) -> dict[str, Any]:
    """The item as upstream sent it: without the mirror's own `local_file` flag."""
    assert item["local_file"] is False  # these surveys mirror metadata only
    return {k: v for k, v in item.items() if k not in ("__typename", "local_file")}


async def all_pages(
    d: DaemonProcess, survey: str, query: str = "", limit: int = 1000, between: Any = None
) -> list[dict[str, Any]]:
    images: list[dict[str, Any]] = []
    cursor = None
    while True:
        path = f"/v1/surveys/{survey}/images?limit={limit}{query}"
        status, body, _ = await get(d, path + (f"&cursor={cursor}" if cursor else ""))
        assert status == 200, body
        images += body["images"]
        cursor = body["next_cursor"]
        if cursor is None:
            return images
        if between:
            await between()


async def test_surveys_and_images_as_mirrored(
    tmp_path: Path, fake: FakeUpstream, daemons: list[DaemonProcess]
) -> None:
    a = fake.data.add_survey(n_images=2500)
    b = fake.data.add_survey(n_images=3)
    d = await serving(tmp_path, fake, daemons, [a, b])
    status, body, _ = await get(d, "/v1/surveys")
    assert status == 200
    assert {s["id"]: s["image_count"] for s in body["surveys"]} == {a: 2500, b: 3}
    status, body, _ = await get(d, f"/v1/surveys/{a}")
    assert status == 200 and body["id"] == a and body["last_outcome"] == "converged"
    images = await all_pages(d, a, limit=1000)
    assert len(images) == 2500 == len({i["sentera_id"] for i in images})
    upstream = fake.data.images(a)
    assert {i["sentera_id"]: strip(i) for i in images} == upstream  # every field, as sent
    status, body, _ = await get(d, f"/v1/surveys/{b}/images")
    assert len(body["images"]) == 3 and body["next_cursor"] is None
    assert await d.stop() == 0


async def test_surveys_added_and_dropped_while_serving_are_seen(
    tmp_path: Path, fake: FakeUpstream, daemons: list[DaemonProcess]
) -> None:
    """The API remembers which collection holds a survey's images: a survey added to the
    config is served once synced, though it was asked for before; one dropped (its field no
    longer lists it) is a 404 at once."""
    a = fake.data.add_survey(n_images=5)
    b = fake.data.add_survey(n_images=7)
    field = fake.data.add_field(n_surveys=2, images_per_survey=4)
    doomed, kept = fake.data.survey_ids(field)
    port = free_port()
    config = tmp_path / "mirrord.toml"
    config.write_text(config_text(fake, port, [a], [field], interval="1h"))
    d = await launch(daemons, config, port)
    await d.wait_status(lambda s: _converged(s, [a, doomed, kept]))
    b_image = next(iter(fake.data.images(b)))
    doomed_image = next(iter(fake.data.images(doomed)))
    # Asked for before it is mirrored (so a "no such survey" could be remembered).
    assert (await get(d, f"/v1/surveys/{b}/images"))[0] == 404
    assert (await get(d, f"/v1/images/{b_image}"))[0] == 404
    for sid in (a, doomed, kept):
        status, body, _ = await get(d, f"/v1/surveys/{sid}/images")
        assert status == 200 and len(body["images"]) == len(fake.data.images(sid))
    assert (await get(d, f"/v1/images/{doomed_image}"))[0] == 200

    config.write_text(config_text(fake, port, [a, b], [field], interval="1h"))
    await d.wait_status(lambda s: _converged(s, [b]))
    status, body, _ = await get(d, f"/v1/surveys/{b}/images")
    assert status == 200 and {i["sentera_id"] for i in body["images"]} == set(fake.data.images(b))
    status, body, _ = await get(d, f"/v1/images/{b_image}")
    assert status == 200 and body["sentera_id"] == b_image

    # Upstream deletes one of the field's surveys: the field's next sync drops it.
    fake.data.delete_survey(doomed)
    assert (await post(d, f"/v1/fields/{field}/sync"))[0] == 202
    await _wait(lambda: _answers(d, f"/v1/surveys/{doomed}/images", 404))
    assert (await get(d, f"/v1/surveys/{doomed}"))[0] == 404
    assert (await get(d, f"/v1/images/{doomed_image}"))[0] == 404
    assert (await get(d, f"/v1/surveys/{kept}/images"))[0] == 200
    assert await d.stop() == 0


def _converged(status: dict[str, Any], surveys: list[str]) -> bool:
    """Each survey's images are mirrored (a field's target converges once it has listed its
    surveys, before their images are synced)."""
    held = {
        c["parent_id"]: c["last_outcome"] for c in status["collections"] if c["kind"] == "images"
    }
    return all(held.get(sid) == "converged" for sid in surveys)


async def _answers(d: DaemonProcess, path: str, status: int) -> bool:
    return (await get(d, path))[0] == status


async def test_paging_is_stable_while_a_sync_changes_data(
    tmp_path: Path, fake: FakeUpstream, daemons: list[DaemonProcess]
) -> None:
    a = fake.data.add_survey(n_images=1200)
    d = await serving(tmp_path, fake, daemons, [a])
    before = set(fake.data.images(a))
    changed: set[str] = set()

    async def churn() -> None:
        changed.update(fake.data.delete_images(a, 20))
        fake.data.add_images(a, 20)
        assert (await post(d, f"/v1/surveys/{a}/sync"))[0] in (202, 409)
        await d.wait_status(
            lambda s: (
                targets(s)[a].get("image_count") == len(fake.data.images(a))
                and targets(s)[a]["state"] == "idle"
            )
        )

    images = await all_pages(d, a, limit=100, between=churn)
    seen = [i["sentera_id"] for i in images]
    assert len(seen) == len(set(seen)), "an image was served twice"
    assert before - changed <= set(seen), "an image present throughout was skipped"
    assert await d.stop() == 0


async def test_pages_from_kept_texts_follow_every_sync(
    tmp_path: Path, fake: FakeUpstream, daemons: list[DaemonProcess]
) -> None:
    """List pages are made of item texts the daemon keeps in memory (Store.item_prefixes).
    Syncs that change, delete and add images while they are kept must show at once, page by
    page, at every page size; the kept texts are counted in /metrics."""
    a = fake.data.add_survey(n_images=300)
    d = await serving(tmp_path, fake, daemons, [a])

    async def exact(limit: int) -> None:
        images = await all_pages(d, a, limit=limit)
        assert [i["sentera_id"] for i in images] == sorted(fake.data.images(a)), limit
        assert {i["sentera_id"]: strip(i) for i in images} == fake.data.images(a), limit

    await exact(100)
    first = (await get(d, f"/v1/surveys/{a}/images?limit=7"))[2]["ETag"]
    for round_ in range(3):
        changed = fake.data.update_images(a, 40)
        fake.data.delete_images(a, 10)
        fake.data.add_images(a, 15)
        assert (await post(d, f"/v1/surveys/{a}/sync"))[0] == 202
        await d.wait_status(
            lambda s: (
                targets(s)[a]["state"] == "idle"
                and targets(s)[a].get("image_count") == len(fake.data.images(a))
            )
        )
        for limit in (1000, 100, 37):
            await exact(limit)
        for sid in changed[:3]:
            status, body, _ = await get(d, f"/v1/images/{sid}")
            assert status == 200 and strip(body) == fake.data.images(a)[sid], round_
    assert (await get(d, f"/v1/surveys/{a}/images?limit=7"))[2]["ETag"] != first

    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{d.port}/metrics") as r,
    ):
        text = await r.text()
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert 300 * 500 < samples["mirrord_item_cache_bytes"] < 2_000_000
    assert samples["mirrord_item_cache_hits_total"] > samples["mirrord_item_cache_misses_total"]
    assert samples["mirrord_item_cache_misses_total"] >= 300
    assert await d.stop() == 0


async def test_bbox_since_seq_and_geojson(
    tmp_path: Path, fake: FakeUpstream, daemons: list[DaemonProcess]
) -> None:
    a = fake.data.add_survey(n_images=400)
    d = await serving(tmp_path, fake, daemons, [a])
    upstream = fake.data.images(a)
    lons = sorted(i["longitude"] for i in upstream.values())
    lats = sorted(i["latitude"] for i in upstream.values())
    box = (lons[100], lats[100], lons[300], lats[300])
    expected = {
        sid
        for sid, i in upstream.items()
        if box[0] <= i["longitude"] <= box[2] and box[1] <= i["latitude"] <= box[3]
    }
    assert 0 < len(expected) < 400
    got = await all_pages(d, a, query="&bbox=" + ",".join(map(str, box)), limit=50)
    assert {i["sentera_id"] for i in got} == expected

    mark = (await get(d, "/v1/changes?since=0&limit=10000"))[1]["last_seq"]
    updated = fake.data.update_images(a, 7)
    assert (await post(d, f"/v1/surveys/{a}/sync"))[0] == 202
    await d.wait_status(
        lambda s: (
            targets(s)[a]["state"] == "idle"
            and targets(s)[a].get("last_attempt_at") is not None
            and (s["targets"][0].get("seconds_since_success") or 99) < 5
        )
    )
    await _wait_feed_beyond(d, mark)
    got = await all_pages(d, a, query=f"&since_seq={mark}")
    assert {i["sentera_id"] for i in got} == set(updated)

    for kwargs, path in (
        ({"headers": {"Accept": "application/geo+json"}}, "/images"),
        ({}, "/images.geojson"),
    ):
        status, body, headers = await get(d, f"/v1/surveys/{a}{path}?limit=5", **kwargs)
        assert status == 200 and headers["Content-Type"].startswith("application/geo+json")
        assert body["type"] == "FeatureCollection" and len(body["features"]) == 5
        feature = body["features"][0]
        item = upstream[feature["id"]]
        assert feature["geometry"] == {
            "type": "Point",
            "coordinates": [item["longitude"], item["latitude"]],
        }
    assert await d.stop() == 0


async def _wait_feed_beyond(d: DaemonProcess, mark: int) -> None:
    deadline = time.monotonic() + 10
    while (await get(d, f"/v1/changes?since={mark}"))[1]["changes"] == []:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)


async def test_single_image_etags_and_304(
    tmp_path: Path, fake: FakeUpstream, daemons: list[DaemonProcess]
) -> None:
    a = fake.data.add_survey(n_images=5)
    d = await serving(tmp_path, fake, daemons, [a])
    sid, item = next(iter(fake.data.images(a).items()))
    status, body, headers = await get(d, f"/v1/images/{sid}")
    assert status == 200 and strip(body) == item
    etag = headers["ETag"]
    status, _, _ = await get(d, f"/v1/images/{sid}", headers={"If-None-Match": etag})
    assert status == 304
    status, _, list_headers = await get(d, f"/v1/surveys/{a}/images")
    status, _, _ = await get(
        d, f"/v1/surveys/{a}/images", headers={"If-None-Match": list_headers["ETag"]}
    )
    assert status == 304
    fake.data.update_images(a, ids=[sid])
    await post(d, f"/v1/surveys/{a}/sync")
    await _wait(lambda: _etag_changed(d, sid, etag))
    status, body, _ = await get(d, f"/v1/images/{sid}", headers={"If-None-Match": etag})
    assert status == 200 and body["content_hash"] == fake.data.images(a)[sid]["content_hash"]
    assert await d.stop() == 0


async def _etag_changed(d: DaemonProcess, sid: str, etag: str) -> bool:
    return (await get(d, f"/v1/images/{sid}"))[2]["ETag"] != etag


async def _wait(check: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_change_feed_long_poll_wakes_on_a_sync(
    tmp_path: Path, fake: FakeUpstream, daemons: list[DaemonProcess]
) -> None:
    a = fake.data.add_survey(n_images=50)
    d = await serving(tmp_path, fake, daemons, [a])
    status, feed, _ = await get(d, "/v1/changes?since=0&limit=10000")
    assert status == 200 and len(feed["changes"]) == 50
    assert [c["seq"] for c in feed["changes"]] == sorted(c["seq"] for c in feed["changes"])
    last = feed["last_seq"]
    poll = asyncio.ensure_future(get(d, f"/v1/changes?since={last}&wait=20"))
    await asyncio.sleep(0.3)
    assert not poll.done()  # it waits: nothing changed yet
    deleted = fake.data.delete_images(a, 1)[0]
    started = time.monotonic()
    assert (await post(d, f"/v1/surveys/{a}/sync"))[0] == 202
    status, feed, _ = await asyncio.wait_for(poll, 15)
    assert time.monotonic() - started < 5  # woken by the sync, not by the 20 s timeout
    assert status == 200
    change = feed["changes"][0]
    assert change == {
        "seq": last + 1,
        "kind": "image",
        "survey_id": a,
        "sentera_id": deleted,
        "content_hash": change["content_hash"],
        "deleted": True,
    }
    status, feed, _ = await get(d, f"/v1/changes?since={feed['last_seq']}&wait=0.2")
    assert feed["changes"] == []
    assert await d.stop() == 0


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/v1/surveys/nope", 404, "unknown_survey"),
        ("/v1/surveys/nope/images", 404, "unknown_survey"),
        ("/v1/images/nope", 404, "unknown_image"),
        ("/v1/surveys/{a}/images?limit=0", 400, "bad_limit"),
        ("/v1/surveys/{a}/images?limit=1001", 400, "bad_limit"),
        ("/v1/surveys/{a}/images?limit=-5", 400, "bad_limit"),
        ("/v1/surveys/{a}/images?limit=abc", 400, "bad_limit"),
        ("/v1/surveys/{a}/images?cursor=garbage!", 400, "bad_cursor"),
        ("/v1/surveys/{a}/images?cursor=WyJ2MiIsICJ4Il0", 400, "bad_cursor"),
        ("/v1/surveys/{a}/images?bbox=1,2,3", 400, "bad_bbox"),
        ("/v1/surveys/{a}/images?bbox=10,0,0,0", 400, "bad_bbox"),
        ("/v1/surveys/{a}/images?bbox=a,b,c,d", 400, "bad_bbox"),
        ("/v1/surveys/{a}/images?bbox=nan,0,1,1", 400, "bad_bbox"),
        ("/v1/surveys/{a}/images?since_seq=-1", 400, "bad_since_seq"),
        ("/v1/changes?since=x", 400, "bad_since"),
        ("/v1/changes?limit=0", 400, "bad_limit"),
        ("/v1/changes?wait=9999", 400, "bad_wait"),
        ("/v1/changes?wait=inf", 400, "bad_wait"),
        ("/v1/images/..%2F..%2Fetc%2Fpasswd", 404, "unknown_image"),
        ("/v1/nothing-here", 404, "not_found"),
    ],
)
async def test_bad_input_gets_a_json_4xx(
    tmp_path: Path,
    fake: FakeUpstream,
    daemons: list[DaemonProcess],
    path: str,
    status: int,
    code: str,
) -> None:
    if not daemons:
        a = fake.data.add_survey(n_images=3)
        await serving(tmp_path, fake, daemons, [a])
    d = daemons[0]
    a = next(t["id"] for t in (await d.status())["targets"])
    got, body, headers = await get(d, path.format(a=a))
    assert (got, body["error"]["code"]) == (status, code), body
    assert body["error"]["message"] and "Traceback" not in str(body)
    assert headers["Content-Type"].startswith("application/json")


async def test_sync_now_answers(
    tmp_path: Path, fake: FakeUpstream, daemons: list[DaemonProcess]
) -> None:
    a = fake.data.add_survey(n_images=3)
    d = await serving(tmp_path, fake, daemons, [a])
    assert (await post(d, f"/v1/surveys/{a}/sync"))[0] == 202
    status, body = await post(d, "/v1/surveys/not-configured/sync")
    assert status == 404 and body["error"]["code"] == "unknown_survey"
    async with (
        aiohttp.ClientSession() as http,
        http.delete(f"http://127.0.0.1:{d.port}/v1/surveys/{a}/sync") as resp,
    ):
        assert resp.status == 405
        assert (await resp.json())["error"]["code"] == "method_not_allowed"
    assert await d.stop() == 0
