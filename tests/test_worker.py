"""The sync worker (mirrord/worker.py): a loop on its own thread, and the store across loops."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from mirrord.store import PageChanges, Store, Upsert
from mirrord.worker import SyncWorker


@pytest.fixture
async def worker() -> SyncWorker:
    w = SyncWorker()
    w.start()
    yield w  # type: ignore[misc]
    await w.stop()


async def _write_one(store: Store, sid: str) -> int:
    coll = await store.collection("images", "s1", "config")
    run_id = await store.begin_run(coll, full_walk=False)
    await store.apply_page(
        coll, run_id, PageChanges(upserts=[Upsert(sid, "h1", "{}")], new_ids={sid}), 0, 1
    )
    return threading.get_ident()


async def test_runs_on_its_own_thread_and_returns_or_raises(worker: SyncWorker) -> None:
    async def where() -> int:
        return threading.get_ident()

    async def fails() -> None:
        raise ValueError("from the worker")

    assert await worker.run(where()) != threading.get_ident()
    with pytest.raises(ValueError, match="from the worker"):
        await worker.run(fails())


async def test_a_commit_on_the_worker_wakes_a_long_poll_here(
    tmp_path: Path, worker: SyncWorker
) -> None:
    store = await Store.open(tmp_path / "mirror.db")
    try:
        before = await store.last_seq()
        poll = asyncio.ensure_future(store.wait_for_change(before, timeout=10))
        await asyncio.sleep(0.05)  # the long-poll is waiting
        assert not poll.done()
        writer_thread = await worker.run(_write_one(store, "a"))
        assert writer_thread != threading.get_ident()
        assert await asyncio.wait_for(poll, timeout=2) is True
        assert await store.last_seq() > before
    finally:
        await worker.run(store.close())


async def test_cancelling_the_caller_waits_for_the_transaction(
    tmp_path: Path, worker: SyncWorker
) -> None:
    store = await Store.open(tmp_path / "mirror.db")
    inside, finished = threading.Event(), threading.Event()

    async def slow_write() -> None:
        async def work(db):  # type: ignore[no-untyped-def]
            await db.execute("UPDATE meta SET value = value + 1000 WHERE key = 'last_seq'")
            inside.set()
            await asyncio.sleep(0.3)  # cancelled meanwhile: the transaction still commits
            finished.set()

        await store._transaction(work)

    caller = asyncio.ensure_future(worker.run(slow_write()))
    await asyncio.to_thread(inside.wait, 5)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    # The caller only got its CancelledError once the work on the worker had ended.
    assert finished.is_set()
    assert await store.last_seq() == 1000
    await worker.run(store.close())


async def test_stop_cancels_what_still_runs() -> None:
    w = SyncWorker()
    w.start()
    started = threading.Event()
    cancelled = threading.Event()

    async def forever() -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    w.loop.call_soon_threadsafe(lambda: w.loop.create_task(forever()))
    await asyncio.to_thread(started.wait, 5)
    await w.stop()
    assert cancelled.is_set()
    assert w.loop.is_closed()
