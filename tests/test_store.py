"""The SQLite store on its own: schema versions, the lock, WAL reads, bad files."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from mirrord.store import (
    SCHEMA_VERSION,
    PageChanges,
    Store,
    StoreError,
    StoreLocked,
    Upsert,
)


async def test_new_database_is_migrated_and_in_wal_mode(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "sub" / "mirror.db")
    await store.close()
    con = sqlite3.connect(tmp_path / "sub" / "mirror.db")
    assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"items", "tombstones", "collections", "failed_items", "sync_runs", "meta"} <= tables
    con.close()
    # Opening again is a no-op migration that keeps the data.
    store = await Store.open(tmp_path / "sub" / "mirror.db")
    assert await store.last_seq() == 0
    await store.close()


async def test_a_newer_schema_is_refused_clearly(tmp_path: Path) -> None:
    db = tmp_path / "mirror.db"
    await (await Store.open(db)).close()  # create it
    con = sqlite3.connect(db)
    con.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    con.close()
    for readonly in (False, True):
        with pytest.raises(StoreError, match=r"newer than this mirrord.*upgrade mirrord"):
            await Store.open(db, readonly=readonly)


async def test_second_writer_is_refused_and_lock_is_released(tmp_path: Path) -> None:
    db = tmp_path / "mirror.db"
    first = await Store.open(db)
    with pytest.raises(StoreLocked, match="another mirrord process"):
        await Store.open(db)
    reader = await Store.open(db, readonly=True)  # readers need no lock
    await reader.close()
    await first.close()
    second = await Store.open(db)
    await second.close()


async def test_missing_and_garbage_files(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=r"no mirror at .* run `mirrord sync`"):
        await Store.open(tmp_path / "none.db", readonly=True)
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database, it is a shopping list\n" * 200)
    with pytest.raises(StoreError, match=r"cannot open the mirror .*junk\.db"):
        await Store.open(junk)
    # The failed open left the lock free.
    junk.unlink()
    store = await Store.open(junk)
    await store.close()


async def test_reads_do_not_wait_on_an_open_write_transaction(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "mirror.db")
    try:
        coll = await store.collection("images", "s1", "config")
        run_id = await store.begin_run(coll, full_walk=False)
        await store.apply_page(
            coll,
            run_id,
            PageChanges(upserts=[Upsert("a", "h1", '{"sentera_id":"a"}')], new_ids={"a"}),
            0,
            1,
        )
        inside, release = asyncio.Event(), asyncio.Event()

        async def long_write(db):  # type: ignore[no-untyped-def]
            await db.execute("UPDATE collections SET last_error = 'x'")
            inside.set()
            await release.wait()

        writer = asyncio.ensure_future(store._transaction(long_write))
        await inside.wait()
        # The write transaction is open and holds the write lock: reads still answer at once,
        # point reads on the event loop's thread too.
        items = await asyncio.wait_for(store.items("images", "s1"), timeout=2)
        statuses = await asyncio.wait_for(store.statuses(), timeout=2)
        assert set(items) == {"a"} and statuses[0].last_error is None
        point = await asyncio.wait_for(store.read_point(_LAST_ERROR), timeout=2)
        assert point == [(None,)]
        release.set()
        await writer
        assert (await store.statuses())[0].last_error == "x"
        assert await store.read_point(_LAST_ERROR) == [("x",)]  # no snapshot kept open
    finally:
        await store.close()


_LAST_ERROR = "SELECT last_error FROM collections"


async def test_survey_collection_ids_follow_collection_changes(tmp_path: Path) -> None:
    """The views' survey id -> collection id lookups are remembered by the store that owns
    the writer, and forgotten whenever a collection is made, revived or dropped."""
    db = tmp_path / "mirror.db"
    store = await Store.open(db)
    other = await Store.open(db, readonly=True)  # another process's view: remembers nothing
    try:
        assert await store.survey_collection_id("s1") is None
        assert await store.image_collection_ids() == []
        s1 = await store.collection("images", "s1", "config")
        await store.collection("surveys", "f1", "config")  # a field: not an images collection
        assert await store.survey_collection_id("s1") == s1.id
        assert await other.survey_collection_id("s1") == s1.id
        assert await store.image_collection_ids() == [s1.id]
        s2 = await store.collection("images", "s2", "field:f1")
        assert await store.image_collection_ids() == [s1.id, s2.id]
        await store.drop_collection(s1)
        assert await store.survey_collection_id("s1") is None
        assert await other.survey_collection_id("s1") is None
        assert await store.survey_collection_id("s2") == s2.id
        revived = await store.collection("images", "s1", "config")
        assert revived.id == s1.id and await store.survey_collection_id("s1") == s1.id
        # The other view reads the database every time: a writer elsewhere is seen at once.
        con = sqlite3.connect(db)
        with con:
            con.execute("UPDATE collections SET dropped_at = 'x' WHERE parent_id = 's2'")
        con.close()
        assert await other.survey_collection_id("s2") is None
    finally:
        await other.close()
        await store.close()


async def test_sequence_numbers_survive_reopen(tmp_path: Path) -> None:
    db = tmp_path / "mirror.db"
    store = await Store.open(db)
    coll = await store.collection("images", "s1", "config")
    run_id = await store.begin_run(coll, full_walk=False)
    ups = [Upsert(f"i{n}", f"h{n}", "{}") for n in range(5)]
    await store.apply_page(
        coll, run_id, PageChanges(upserts=ups, new_ids={u.sentera_id for u in ups}), 0, 5
    )
    await store.delete_items(coll, run_id, [("i0", "h0")])
    assert await store.last_seq() == 6
    await store.close()
    store = await Store.open(db)
    run_id = await store.begin_run(coll, full_walk=False)
    await store.apply_page(
        coll, run_id, PageChanges(upserts=[Upsert("i0", "h9", "{}")], new_ids={"i0"}), 0, 5
    )
    assert await store.last_seq() == 7
    con = sqlite3.connect(db)
    assert con.execute("SELECT count(*) FROM tombstones").fetchone()[0] == 0  # re-added
    assert con.execute("SELECT seq FROM items WHERE sentera_id='i0'").fetchone()[0] == 7
    con.close()
    await store.close()


async def _seqs(store: Store, ids: list[str]) -> list[str]:
    rows = await store.read(
        f"SELECT sentera_id, seq FROM items WHERE sentera_id IN ({','.join('?' * len(ids))})", ids
    )
    by_id = {sid: str(seq) for sid, seq in rows}
    return [by_id[sid] for sid in ids]


async def _upsert(store: Store, texts: dict[str, str]) -> None:
    coll = await store.collection("images", "s1", "config")
    run_id = await store.begin_run(coll, full_walk=False)
    ups = [Upsert(sid, f"h-{text}", text) for sid, text in texts.items()]
    await store.apply_page(coll, run_id, PageChanges(upserts=ups, new_ids=set(texts)), 0, 1)


def _item(sid: str, note: str = "") -> str:
    return f'{{"sentera_id":"{sid}","note":"{note}{"x" * 200}"}}'


async def test_item_prefixes_are_kept_and_never_stale(tmp_path: Path) -> None:
    """The texts list pages are made of: each item's text without its closing brace, in the
    order asked, read once and then kept; an item changed by a sync gets a new seq, so the
    old text is never served for it."""
    store = await Store.open(tmp_path / "mirror.db")
    try:
        ids = [f"i{n:03}" for n in range(40)]
        await _upsert(store, {sid: _item(sid) for sid in ids})
        seqs = await _seqs(store, ids)
        asked = seqs[::-1]  # any order
        texts = await store.item_prefixes(asked)
        assert texts == [_item(sid)[:-1].encode() for sid in ids[::-1]]
        assert (store.item_cache.hits, store.item_cache.misses) == (0, 40)
        assert await store.item_prefixes(asked) == texts
        assert (store.item_cache.hits, store.item_cache.misses) == (40, 40)
        assert 40 * 200 < store.item_cache.kept_bytes < 40 * 400

        await _upsert(store, {ids[5]: _item(ids[5], "changed")})
        new_seqs = await _seqs(store, ids)
        assert new_seqs[5] != seqs[5] and new_seqs[:5] == seqs[:5]
        assert (await store.item_prefixes(new_seqs))[5] == _item(ids[5], "changed")[:-1].encode()
        # The replaced seq is no longer held: the caller reads its page again.
        assert await store.item_prefixes([seqs[4], "999999"]) is None
    finally:
        await store.close()


async def test_item_prefixes_refuse_texts_that_are_not_plain_objects(tmp_path: Path) -> None:
    """A hand edit may leave a text without its closing brace, or an empty object: its page
    is read row by row instead (views/data.py), the plain texts beside it are kept."""
    store = await Store.open(tmp_path / "mirror.db")
    try:
        await _upsert(store, {"a": _item("a"), "b": "{}", "c": _item("c") + " ", "d": _item("d")})
        a, b, c, d = await _seqs(store, ["a", "b", "c", "d"])
        assert await store.item_prefixes([a, b]) is None
        assert await store.item_prefixes([c, d]) is None
        misses = store.item_cache.misses
        assert await store.item_prefixes([d, a]) == [
            _item("d")[:-1].encode(),
            _item("a")[:-1].encode(),
        ]
        assert store.item_cache.misses == misses  # both kept from the reads before
    finally:
        await store.close()


async def test_item_prefixes_stay_within_their_budget(tmp_path: Path) -> None:
    budget = 20_000
    store = await Store.open(tmp_path / "mirror.db", item_cache_bytes=budget)
    try:
        ids = [f"i{n:04}" for n in range(600)]
        await _upsert(store, {sid: _item(sid) for sid in ids})
        seqs = await _seqs(store, ids)
        for start in range(0, 600, 30):  # pages of 30, about 10 KB each
            page = seqs[start : start + 30]
            texts = await store.item_prefixes(page)
            assert texts == [_item(sid)[:-1].encode() for sid in ids[start : start + 30]]
            assert 0 < store.item_cache.kept_bytes <= budget
        # The oldest went first: the last page is still kept, the first one is read again.
        misses = store.item_cache.misses
        assert await store.item_prefixes(seqs[-30:]) is not None
        assert store.item_cache.misses == misses
        assert await store.item_prefixes(seqs[:30]) is not None
        assert store.item_cache.misses == misses + 30
        # A page larger than the whole budget cannot be kept: the caller reads it row by row.
        assert await store.item_prefixes(seqs[:300]) is None
    finally:
        await store.close()
