"""Image files the way users run mirrord: `mirrord sync` and `mirrord verify` as processes, the
daemon as a process serving the files over real HTTP, kill -9 in the middle of downloads."""

from __future__ import annotations

import hashlib
import json
import signal
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from mirrord.fake_upstream import FakeData, FakeUpstream
from tests.conftest import TOKEN, wait_for
from tests.test_cli import no_traceback, run_cli
from tests.test_daemon import DaemonProcess, free_port, launch, targets

pytestmark = pytest.mark.asyncio


@pytest.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream(FakeData(seed=21, file_sizes=(2_000, 200_000)), token=TOKEN) as up:
        yield up


def files_config(
    tmp_path: Path, fake: FakeUpstream, surveys: list[str], *, port: int = 8765, extra: str = ""
) -> Path:
    path = tmp_path / "mirrord.toml"
    path.write_text(
        f'[upstream]\nurl = "{fake.url}"\ntoken = "{TOKEN}"\ntimeout = "3s"\n'
        'max_attempts = 2\nretry_cap = "100ms"\n'
        f'[storage]\npath = "mirror.db"\nfiles_dir = "files"\n{extra}'
        '[sync]\ninterval = "1s"\njitter = "0"\nreconcile_every = "0"\n'
        f'[http]\nlisten = "127.0.0.1:{port}"\n'
        + "".join(f'[[surveys]]\nid = "{s}"\nfiles = "all"\n' for s in surveys)
    )
    return path


def files_on_disk(root: Path) -> dict[str, str]:
    """file name -> sha256 of every complete file under root."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file() and p.suffix != ".part"
    }


def upstream_files(fake: FakeUpstream, survey: str) -> dict[str, str]:
    return {sid: fake.data.file_sha256(sid) for sid in fake.data.images(survey)}


async def test_sync_downloads_and_verify_repairs(tmp_path: Path, fake: FakeUpstream) -> None:
    survey = fake.data.add_survey(25)
    config = files_config(tmp_path, fake, [survey])
    code, out, err = await run_cli("sync", "-c", str(config))
    assert code == 0, err
    assert "files: 25 downloaded" in out
    assert files_on_disk(tmp_path / "files") == upstream_files(fake, survey)
    code, out, err = await run_cli("status", "-c", str(config))
    assert code == 0 and "files: 25 of 25 on disk" in out
    code, out, err = await run_cli("verify", "-c", str(config))
    assert code == 0 and "25 files checked" in out and "all present" in out
    # A file deleted by hand and a stray one: found (exit 1), then fixed.
    victim = next(iter(fake.data.images(survey)))
    (victim_path,) = (tmp_path / "files").rglob(victim)
    victim_path.unlink()
    stray = victim_path.with_name("stray.jpg")
    stray.write_bytes(b"x" * 10)
    code, out, err = await run_cli("verify", "-c", str(config))
    assert code == 1 and f"missing or damaged: the file of image {victim}" in out
    assert "stray:" in out and "stray.jpg" in out and "--fix" in out
    code, out, err = await run_cli("verify", "--fix", "-c", str(config))
    assert code == 0 and not stray.exists()
    code, out, err = await run_cli("sync", "-c", str(config))
    assert code == 0 and "files: 1 downloaded" in out, out + err
    assert files_on_disk(tmp_path / "files") == upstream_files(fake, survey)
    no_traceback(out, err)


async def test_prune_removes_the_files_of_a_survey_no_longer_configured(
    tmp_path: Path, fake: FakeUpstream
) -> None:
    keep, drop = fake.data.add_survey(3), fake.data.add_survey(4)
    config = files_config(tmp_path, fake, [keep, drop])
    assert (await run_cli("sync", "-c", str(config)))[0] == 0
    assert len(files_on_disk(tmp_path / "files")) == 7
    files_config(tmp_path, fake, [keep])
    code, out, err = await run_cli("prune", "--yes", "-c", str(config))
    assert code == 0 and "4 image files" in out, out + err
    assert files_on_disk(tmp_path / "files") == upstream_files(fake, keep)


async def test_sync_renews_urls_that_expire_during_downloads(
    tmp_path: Path, fake: FakeUpstream
) -> None:
    survey = fake.data.add_survey(6)
    config = files_config(tmp_path, fake, [survey])
    # The first two downloads answer 403, as an expired URL does.
    fake.file_faults.push("status", times=2, code=403)
    code, out, err = await run_cli("sync", "-c", str(config))
    assert code == 0, out + err
    assert files_on_disk(tmp_path / "files") == upstream_files(fake, survey)


async def test_a_full_budget_is_reported_and_exits_1(tmp_path: Path, fake: FakeUpstream) -> None:
    survey = fake.data.add_survey(10)
    total = sum(i["size"] for i in fake.data.images(survey).values())
    config = files_config(tmp_path, fake, [survey], extra=f"max_disk = {total // 3}\n")
    code, out, err = await run_cli("sync", "-c", str(config))
    assert code == 1 and "disk budget reached" in err and "max_disk" in err
    on_disk = sum(p.stat().st_size for p in (tmp_path / "files").rglob("*") if p.is_file())
    assert 0 < on_disk <= total // 3
    no_traceback(out, err)


async def test_the_daemon_serves_files_over_http(
    tmp_path: Path, fake: FakeUpstream, daemons: list[DaemonProcess]
) -> None:
    survey = fake.data.add_survey(8)
    port = free_port()
    d = await launch(daemons, files_config(tmp_path, fake, [survey], port=port), port)
    status = await d.wait_status(lambda s: s["files"]["done"] == 8)
    assert status["files"]["bytes_on_disk"] == sum(
        i["size"] for i in fake.data.images(survey).values()
    )
    assert status["targets"][0]["files"]["pending"] == 0
    base = f"http://127.0.0.1:{port}"
    image = next(iter(fake.data.images(survey).values()))
    sid, body = image["sentera_id"], fake.data.file_bytes(image["sentera_id"])
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/v1/images/{sid}/file") as resp:
            assert resp.status == 200 and await resp.read() == body
            assert resp.headers["Content-Type"] == "image/jpeg"
            assert int(resp.headers["Content-Length"]) == len(body)
            etag = resp.headers["ETag"]
        async with http.get(f"{base}/v1/images/{sid}/file", headers={"If-None-Match": etag}) as r:
            assert r.status == 304
        async with http.get(f"{base}/v1/images/{sid}/file", headers={"Range": "bytes=10-99"}) as r:
            assert r.status == 206 and await r.read() == body[10:100]
        async with http.get(
            f"{base}/v1/images/{sid}/file", headers={"Range": f"bytes={len(body)}-"}
        ) as r:
            assert r.status == 416 and (await r.json())["error"]["code"] == "bad_range"
        async with http.get(f"{base}/v1/images/{sid}") as r:
            assert (await r.json())["local_file"] is True
        async with http.get(f"{base}/v1/images/nope/file") as r:
            assert r.status == 404 and (await r.json())["error"]["code"] == "unknown_image"
        # The local GraphQL endpoint points an upstream-style client at the local files, which
        # work offline and never expire.
        query = (
            "query ($s: ID!) { sync_images(survey_sentera_id: $s, content_hashes: []) "
            "{ upserted { sentera_id ... on Image { url } } } }"
        )
        async with http.post(
            f"{base}/graphql", json={"query": query, "variables": {"s": survey}}
        ) as r:
            upserted = (await r.json())["data"]["sync_images"]["upserted"]
        urls = {i["sentera_id"]: i["url"] for i in upserted}
        assert urls[sid] == f"{base}/v1/images/{sid}/file" and len(urls) == 8
        async with http.get(urls[sid]) as r:
            assert await r.read() == body
        async with http.get(f"{base}/metrics") as r:
            text = await r.text()
            assert f'mirrord_files{{state="done",survey="{survey}"}} 8.0' in text
        # An update: the file is refetched and served new; a delete: 404 and off the disk.
        fake.data.update_images(survey, ids=[sid])
        new_body = fake.data.file_bytes(sid)
        gone = next(other for other in fake.data.images(survey) if other != sid)
        fake.data.delete_images(survey, ids=[gone])

        async def served_new() -> bool:
            async with http.get(f"{base}/v1/images/{sid}/file") as r:
                return r.status == 200 and await r.read() == new_body

        await wait_for(served_new, timeout=15)
        async with http.get(f"{base}/v1/images/{gone}/file") as r:
            assert r.status == 404
    await wait_for(lambda: not list((tmp_path / "files").rglob(gone)), timeout=10)
    assert await d.stop() == 0
    assert files_on_disk(tmp_path / "files") == upstream_files(fake, survey)
    assert not any(TOKEN in line for line in d.raw)


async def test_kill_9_during_downloads_then_restart_converges(
    tmp_path: Path, fake: FakeUpstream, daemons: list[DaemonProcess]
) -> None:
    survey = fake.data.add_survey(30)
    fake.file_faults.rate = 400_000  # bytes/s: slow enough to be killed mid-file
    port = free_port()
    config = files_config(tmp_path, fake, [survey], port=port)
    for _ in range(3):
        sent_before = fake.file_bytes_sent
        d = await launch(daemons, config, port)
        await wait_for(lambda b=sent_before: fake.file_bytes_sent > b and _some_part(tmp_path), 20)
        await d.stop(signal.SIGKILL)
        with sqlite3.connect(tmp_path / "mirror.db") as db:
            assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    fake.file_faults.rate = None
    d = await launch(daemons, config, port)
    await d.wait_status(lambda s: s["files"]["done"] == 30, timeout=30)
    assert await d.stop() == 0
    assert files_on_disk(tmp_path / "files") == upstream_files(fake, survey)
    assert not list((tmp_path / "files").rglob("*.part"))
    # Resumed, not refetched: across the kills, each file's bytes were sent about once.
    sent = sum(r.bytes_sent for r in fake.file_requests)
    total = sum(i["size"] for i in fake.data.images(survey).values())
    assert sent < total * 1.5, (sent, total)


def _some_part(root: Path) -> bool:
    return any(p.stat().st_size > 0 for p in root.rglob("*.part"))


async def test_list_pages_say_which_files_are_local_at_every_page_size(
    tmp_path: Path, fake: FakeUpstream, daemons: list[DaemonProcess]
) -> None:
    """A page's items are the texts the store keeps, each closed with its local_file from the
    files table as the page is read (views/data.py); with a disk budget for about half the
    files, a page holds both kinds. Every page size must give each item exactly as a single
    read of it does."""
    survey = fake.data.add_survey(24)
    sizes = [i["size"] for i in fake.data.images(survey).values()]
    port = free_port()
    config = files_config(
        tmp_path, fake, [survey], port=port, extra=f"max_disk = {sum(sizes) // 2}\n"
    )
    d = await launch(daemons, config, port)
    status = await d.wait_status(lambda s: s["files"]["done"] > 0 and s["files"]["blocked"])
    assert 0 < status["files"]["done"] < 24
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as http:

        async def single_reads() -> dict[str, object]:
            items = {}
            for sid in fake.data.images(survey):
                async with http.get(f"{base}/v1/images/{sid}") as r:
                    items[sid] = json.loads(await r.read(), strict=False)
                async with http.get(f"{base}/v1/images/{sid}/file") as r:
                    local = items[sid].get("local_file")  # none on a text edited below
                    assert local is None or (r.status == 200) is local
            return items

        async def paged(limit: int) -> list[dict[str, object]]:
            images: list[dict[str, object]] = []
            cursor = ""
            while True:
                url = f"{base}/v1/surveys/{survey}/images?limit={limit}{cursor}"
                async with http.get(url) as r:
                    assert r.status == 200
                    raw, etag = await r.read(), r.headers["ETag"]
                async with http.get(url, headers={"If-None-Match": etag}) as r:
                    assert r.status == 304  # the same page, unchanged: the same ETag
                page = json.loads(raw, strict=False)  # strict: no raw control characters
                assert len(page["images"]) <= limit
                images += page["images"]
                if page["next_cursor"] is None:
                    return images
                assert len(page["images"]) == limit
                cursor = f"&cursor={page['next_cursor']}"

        expected = await single_reads()
        assert {i["local_file"] for i in expected.values()} == {True, False}
        for limit in (1, 5, 12, 23, 24, 25, 1000):
            images = await paged(limit)
            assert [i["sentera_id"] for i in images] == sorted(expected), limit
            assert images == [expected[sid] for sid in sorted(expected)], limit

        # Item texts that are not plain JSON objects' (as an older writer or a hand edit may
        # leave them) send their pages the row-by-row way, which serves each as a single read
        # does: one that does not end with its brace and an empty object. One holding a raw
        # 0x1e (JSON text never does) is a plain object's all the same. The mirror is edited
        # while no daemon runs, as the README asks: a running one keeps the texts it read.
        ids = sorted(expected)
        edits = {
            ids[3]: "data || ' '",
            ids[8]: "'{}'",
            ids[13]: "'{\"note\":\"a' || char(30) || 'b\",' || substr(data, 2)",
        }
        assert await d.stop() == 0
        with sqlite3.connect(tmp_path / "mirror.db", timeout=10) as db:
            for sid, edit in edits.items():
                db.execute(f"UPDATE items SET data = {edit} WHERE sentera_id = ?", (sid,))
        d = await launch(daemons, config, port)
        await d.wait_status(lambda s: targets(s)[survey]["last_outcome"] is not None)
        expected = await single_reads()
        assert "local_file" not in expected[ids[3]] and expected[ids[8]] == {}
        assert expected[ids[13]]["note"] == "a\x1eb" and "local_file" in expected[ids[13]]
        for limit in (1, 4, 10, 24):
            assert await paged(limit) == [expected[sid] for sid in ids], limit
    assert await d.stop() == 0
