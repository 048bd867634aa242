"""The change feed across restores, recreations and crashes: a sequence number never means two
things, and a client at a position the mirror no longer holds is told to start again (410
`feed_reset`) instead of silently missing what differs.

Real parts: the mirror is a real SQLite file, the upstream the fake over real sockets, the
daemon a real `mirrord run` process read over HTTP.
"""

from __future__ import annotations

import shutil
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mirrord.fake_upstream import FakeUpstream
from mirrord.store import SEQ_RESERVE, Store
from tests.conftest import Mirror, wait_for
from tests.test_daemon import DaemonProcess, config_text, free_port, launch
from tests.test_hostile_state import converged, daemon_clean
from tests.test_reliability import backup_api_copy


def _delete(db: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        db.with_name(db.name + suffix).unlink(missing_ok=True)


def _restore(db: Path, backup: Path) -> None:
    _delete(db)
    shutil.copy(backup, db)


async def _synced(fake: FakeUpstream, db: Path, survey: str) -> int:
    """Sync the survey into the mirror at `db`, close it cleanly; its last seq."""
    async with await Store.open(db) as store:
        await Mirror(fake, store, reconcile_every=0).sync_survey(survey)
        return await store.last_seq()


def _change(fake: FakeUpstream, survey: str) -> None:
    fake.data.add_images(survey, 5)
    fake.data.update_images(survey, 3)
    fake.data.delete_images(survey, 2)


async def test_a_restored_mirror_goes_on_past_every_seq_it_gave_out(
    tmp_path: Path, fake: FakeUpstream
) -> None:
    a = fake.data.add_survey(n_images=30)
    db = tmp_path / "mirror.db"
    at_backup = await _synced(fake, db, a)
    assert (tmp_path / "mirror.db.seq").read_text() == f"{at_backup}\n"  # exact: a clean close
    backup = backup_api_copy(db, tmp_path / "backup")
    _change(fake, a)
    seen = await _synced(fake, db, a)  # what a client of the feed may have seen
    assert seen > at_backup

    _restore(db, backup)
    async with await Store.open(db) as store:
        # The positions after the backup are gone: the feed goes on past the highest seq
        # ever given out, and a client at one of the lost positions is told to start again.
        # The mirror's own position is never a lost one (a client that takes it from the
        # restored mirror follows on from there).
        assert await store.last_seq() == seen + 1
        assert store.lost_position(seen + 1) is None
        assert store.lost_position(at_backup) is None
        assert store.lost_position(at_backup - 1) is None
        for lost in (at_backup + 1, seen):
            message = store.lost_position(lost)
            assert message is not None and f"since={lost}" in message
            assert "since=0" in message and "\n" not in message
        assert store.lost_position(seen + 2) is not None  # past the end
        run = await Mirror(fake, store, reconcile_every=0).sync_survey(a)
        assert run.outcome == "converged" and run.upserted + run.deleted >= 8
        now = await store.last_seq()
        assert now > seen
        # Every change synced since the restore is numbered past what clients had seen.
        rows = await store.read(
            "SELECT seq FROM items WHERE seq > ? UNION ALL "
            "SELECT seq FROM tombstones WHERE seq > ?",
            (at_backup, at_backup),
        )
        assert rows and min(r[0] for r in rows) > seen
        assert store.lost_position(seen) is not None  # the gap stays a gap
        assert store.lost_position(now) is None

    # A clean restart finds no gap and skips nothing.
    async with await Store.open(db) as store:
        assert await store.last_seq() == now
        assert store.lost_position(now) is None
        gaps = await store.read("SELECT after_seq, through_seq FROM feed_gaps")
        assert gaps == [(at_backup, seen)]


async def test_a_recreated_mirror_numbers_past_the_old_one(
    tmp_path: Path, fake: FakeUpstream
) -> None:
    a = fake.data.add_survey(n_images=20)
    db = tmp_path / "mirror.db"
    old = await _synced(fake, db, a)
    _delete(db)
    new = await _synced(fake, db, a)
    assert new == old + 1 + 20  # the same images again, numbered past the old mirror's
    async with await Store.open(db) as store:
        assert store.lost_position(old) is not None
        assert store.lost_position(new) is None


async def test_an_unreadable_mark_is_replaced_and_nothing_is_refused(
    tmp_path: Path, fake: FakeUpstream
) -> None:
    a = fake.data.add_survey(n_images=10)
    db = tmp_path / "mirror.db"
    last = await _synced(fake, db, a)
    mark = tmp_path / "mirror.db.seq"
    for garbage in (b"", b"not a number\n", b"\xff\xfe", b"-5\n"):
        mark.write_bytes(garbage)
        async with await Store.open(db) as store:
            assert await store.last_seq() == last
            assert store.lost_position(last) is None
        assert mark.read_text() == f"{last}\n"


def _feed_error(body: dict[str, Any], name: str, position: int) -> None:
    error = body["error"]
    assert error["code"] == "feed_reset"
    assert f"{name}={position}" in error["message"] and f"{name}=0" in error["message"]


async def test_feed_clients_are_told_to_start_again_after_a_restore_and_a_crash(
    tmp_path: Path, fake: FakeUpstream, daemons: list[DaemonProcess]
) -> None:
    """Over HTTP, with the real daemon: restored from a backup, it answers 410 feed_reset to a
    client past the backup (on the feed and on since_seq), serves one at the backup's position,
    and numbers new changes past everything it gave out; after a kill -9 it skips the seqs
    it had reserved, and a client's last position stays good."""
    a = fake.data.add_survey(n_images=40)
    port = free_port()
    config = tmp_path / "mirrord.toml"
    config.write_text(config_text(fake, port, [a], interval="1h"))
    db = tmp_path / "mirror.db"
    base = f"http://127.0.0.1:{port}"

    async def get(http: aiohttp.ClientSession, path: str) -> tuple[int, Any]:
        async with http.get(base + path) as resp:
            return resp.status, await resp.json()

    async def sync_now(d: DaemonProcess, http: aiohttp.ClientSession, count: int) -> None:
        async def started() -> bool:  # 409 while the start-up sync still runs
            async with http.post(f"{base}/v1/surveys/{a}/sync") as resp:
                assert resp.status in (202, 409), await resp.text()
                return resp.status == 202

        await wait_for(started, timeout=15, interval=0.1)
        await converged(d, a, count)

    d = await launch(daemons, config, port)
    await converged(d, a, 40)
    async with aiohttp.ClientSession() as http:
        at_backup = (await get(http, "/v1/changes?since=0&limit=5000"))[1]["last_seq"]
        backup = backup_api_copy(db, tmp_path / "backup")
        _change(fake, a)
        await sync_now(d, http, 43)
        seen = (await get(http, f"/v1/changes?since={at_backup}"))[1]["last_seq"]
        assert seen > at_backup
    assert await d.stop() == 0

    _restore(db, backup)
    d = await launch(daemons, config, port)
    await d.wait_status(lambda s: True)  # serving
    async with aiohttp.ClientSession() as http:
        status, body = await get(http, f"/v1/changes?since={seen}&wait=5")
        assert status == 410, body
        _feed_error(body, "since", seen)
        status, body = await get(http, f"/v1/surveys/{a}/images?since_seq={seen}")
        assert status == 410, body
        _feed_error(body, "since_seq", seen)
        # A request wrong in another way is told that first (found by the fuzz soak).
        for wrong in (f"/v1/changes?since={seen}&limit=", f"/v1/changes?since={seen}&wait=x"):
            assert (await get(http, wrong))[0] == 400, wrong
        for wrong in ("bbox=1,2", "limit=0", "cursor=nope"):
            path = f"/v1/surveys/{a}/images?since_seq={seen}&{wrong}"
            assert (await get(http, path))[0] == 400, wrong
        status, body = await get(http, f"/v1/changes?since={at_backup}")
        assert status == 200, body
        # Whatever position the restored mirror reports is one it goes on from.
        assert (await get(http, f"/v1/changes?since={body['last_seq']}"))[0] == 200
        await converged(d, a, 43)  # the start-up sync brings the restored mirror up to date
        status, body = await get(http, f"/v1/changes?since={at_backup}")
        assert body["changes"] and min(c["seq"] for c in body["changes"]) > seen
        assert (await get(http, f"/v1/changes?since={seen}"))[0] == 410  # still lost
        last = body["last_seq"]
        status, body = await get(http, f"/v1/changes?since={last + 1}")
        assert status == 410 and "past this mirror's last change" in body["error"]["message"]

        # kill -9: the seqs reserved ahead are skipped, never reused; `last` stays good.
        reserved = int((tmp_path / "mirror.db.seq").read_text())
        assert reserved >= last + 1 and reserved - last <= SEQ_RESERVE
        assert await d.stop(signal.SIGKILL) == -signal.SIGKILL
        d = await launch(daemons, config, port)
        await d.wait_status(lambda s: True)
        assert (await get(http, f"/v1/changes?since={last}"))[0] == 200
        assert (await get(http, f"/v1/changes?since={last + 1}"))[0] == 410
        _change(fake, a)
        await sync_now(d, http, 46)
        status, body = await get(http, f"/v1/changes?since={last}")
        assert status == 200 and min(c["seq"] for c in body["changes"]) > reserved
    assert await d.stop() == 0
    daemon_clean(d)


async def test_a_mirror_from_before_the_mark_is_upgraded_in_place(
    tmp_path: Path, fake: FakeUpstream
) -> None:
    """A mirror written by the previous release (the schema before feed_gaps, no mark file):
    read-only tools say to upgrade it; the writer migrates it, keeps its numbering and starts
    the mark."""
    import sqlite3

    from mirrord.store import SCHEMA_VERSION, StoreError

    a = fake.data.add_survey(n_images=10)
    db = tmp_path / "mirror.db"
    last = await _synced(fake, db, a)
    with sqlite3.connect(db) as con:
        con.execute("DROP TABLE feed_gaps")
        con.execute(f"PRAGMA user_version = {SCHEMA_VERSION - 1}")
    (tmp_path / "mirror.db.seq").unlink()
    with pytest.raises(StoreError) as refused:
        await (await Store.open(db, readonly=True)).close()
    old = SCHEMA_VERSION - 1
    message = str(refused.value)
    assert f"schema version {old}, older than this mirrord's ({SCHEMA_VERSION})" in message
    assert "restart the daemon" in message
    async with await Store.open(db) as store:
        assert await store.last_seq() == last
        assert store.lost_position(last) is None
    assert (tmp_path / "mirror.db.seq").read_text() == f"{last}\n"
    store = await Store.open(db, readonly=True)
    await store.close()
