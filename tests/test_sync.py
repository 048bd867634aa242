"""The delta-sync engine against the fake upstream, over real sockets, into a real SQLite file."""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from mirrord.fake_upstream import Behaviour, FakeUpstream
from mirrord.store import PageChanges, Store, Upsert
from tests.conftest import Mirror, assert_mirrors, wait_for


def feed_is_sane(db_path: Path) -> None:
    """Sequence numbers are unique across items and tombstones, and none exceeds last_seq."""
    con = sqlite3.connect(db_path)
    try:
        seqs = [
            r[0] for r in con.execute("SELECT seq FROM items UNION ALL SELECT seq FROM tombstones")
        ]
        last = con.execute("SELECT value FROM meta WHERE key='last_seq'").fetchone()[0]
        assert len(seqs) == len(set(seqs))
        assert all(0 < s <= last for s in seqs)
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        both = con.execute(
            "SELECT count(*) FROM items i JOIN tombstones t USING (collection_id, sentera_id)"
        ).fetchone()[0]
        assert both == 0, "an item is both live and tombstoned"
    finally:
        con.close()


@pytest.mark.parametrize("size", [0, 1, 999, 1000, 1001])
async def test_converges_for_survey_sizes(
    mirror: Mirror, fake: FakeUpstream, store: Store, size: int
) -> None:
    survey = fake.data.add_survey(n_images=size)
    run = await mirror.sync_survey(survey)
    assert run.outcome == "converged", run.error
    assert run.item_count == size
    assert run.pages == max(1, -(-size // 1000))
    await assert_mirrors(store, fake, survey)
    feed_is_sane(store.path)


async def test_large_survey_and_noop_resync_in_one_round_trip(
    mirror: Mirror, fake: FakeUpstream, store: Store
) -> None:
    survey = fake.data.add_survey(n_images=25_000)
    run = await mirror.sync_survey(survey)
    assert (run.outcome, run.pages, run.item_count) == ("converged", 25, 25_000)
    await assert_mirrors(store, fake, survey)
    before = len(fake.requests)
    again = await mirror.sync_survey(survey)
    assert again.outcome == "converged"
    assert len(fake.requests) - before == 1
    assert (again.upserted, again.deleted) == (0, 0)
    assert fake.requests[-1].n_hashes == 25_000


async def test_adds_updates_deletes_and_tombstones(
    mirror: Mirror, fake: FakeUpstream, store: Store
) -> None:
    survey = fake.data.add_survey(n_images=1500)
    await mirror.sync_survey(survey)
    seq_before = await store.last_seq()
    held_before = set(fake.data.images(survey))
    added = fake.data.add_images(survey, 700)
    updated = fake.data.update_images(survey, 600)
    deleted = fake.data.delete_images(survey, 400)
    run = await mirror.sync_survey(survey)
    assert run.outcome == "converged", run.error
    await assert_mirrors(store, fake, survey)
    assert run.deleted == len(set(deleted) & held_before)
    con = sqlite3.connect(store.path)
    stones = {r[0]: r[1] for r in con.execute("SELECT sentera_id, seq FROM tombstones")}
    changed = {
        r[0]: r[1]
        for r in con.execute("SELECT sentera_id, seq FROM items WHERE seq > ?", (seq_before,))
    }
    con.close()
    assert set(stones) == set(deleted) & held_before
    assert all(s > seq_before for s in stones.values())
    assert set(changed) == (set(added) | set(updated)) - set(deleted)
    feed_is_sane(store.path)


BEHAVIOURS = [
    Behaviour(old_hash_in_deleted=old, order=order, shared_limit=shared)
    for old, order, shared in itertools.product(
        ["never", "same_answer", "before", "after"],
        ["deleted_first", "upserted_first", "shuffled"],
        [True, False],
    )
]


@pytest.mark.parametrize(
    "behaviour",
    BEHAVIOURS,
    ids=lambda b: f"{b.old_hash_in_deleted}-{b.order}-{'shared' if b.shared_limit else 'own'}",
)
async def test_converges_under_every_undocumented_behaviour(
    mirror: Mirror, fake: FakeUpstream, store: Store, behaviour: Behaviour
) -> None:
    fake.behaviour = behaviour
    survey = fake.data.add_survey(n_images=2200)
    assert (await mirror.sync_survey(survey)).outcome == "converged"
    fake.data.update_images(survey, 1300)
    fake.data.delete_images(survey, 300)
    fake.data.add_images(survey, 500)
    run = await mirror.sync_survey(survey)
    assert run.outcome == "converged", run.error
    await assert_mirrors(store, fake, survey)
    # A late stale report (mode "after") must not undo anything on the next run either.
    assert (await mirror.sync_survey(survey)).outcome == "converged"
    await assert_mirrors(store, fake, survey)
    feed_is_sane(store.path)


@pytest.mark.parametrize("old", ["never", "same_answer", "before", "after"])
async def test_data_changing_between_pages(
    mirror: Mirror, fake: FakeUpstream, store: Store, old: str
) -> None:
    fake.behaviour = Behaviour(old_hash_in_deleted=old)  # type: ignore[arg-type]
    survey = fake.data.add_survey(n_images=3000)
    answers = 0

    def churn() -> None:
        nonlocal answers
        answers += 1
        if answers <= 3:  # other users edit the survey while we page through it
            fake.data.add_images(survey, 50)
            fake.data.update_images(survey, 80)
            fake.data.delete_images(survey, 30)

    fake.on_answer = churn
    run = await mirror.sync_survey(survey)
    fake.on_answer = None
    assert run.outcome == "converged", run.error
    await assert_mirrors(store, fake, survey)
    feed_is_sane(store.path)


async def _plant_bogus_row(store: Store, survey: str) -> str:
    """An item the mirror holds under a hash upstream never issued (a foreign or damaged row)."""
    coll = await store.collection("images", survey, "config")
    run_id = await store.begin_run(coll, full_walk=False)
    held = await store.held_hashes(coll)
    changes = PageChanges(
        upserts=[Upsert("ghost_IM_0001", "NEVERISSUED0000=", '{"x":1}')], new_ids={"ghost_IM_0001"}
    )
    await store.apply_page(coll, run_id, changes, 0, len(held) + 1)
    return "ghost_IM_0001"


@pytest.mark.parametrize("mode", ["ignore", "deleted", "failed"])
async def test_unknown_hashes_every_way(
    mirror: Mirror, fake: FakeUpstream, store: Store, mode: str
) -> None:
    fake.behaviour = Behaviour(unknown_hashes=mode)  # type: ignore[arg-type]
    survey = fake.data.add_survey(n_images=1200)
    await mirror.sync_survey(survey)
    ghost = await _plant_bogus_row(store, survey)
    run = await mirror.sync_survey(survey)
    assert run.outcome in ("converged", "partial")
    if mode == "ignore":
        # Upstream says nothing about the hash: only a full walk can find it stale.
        assert ghost in await store.items("images", survey)
        walk = await mirror.sync_survey(survey, full=True)
        assert walk.outcome == "converged" and walk.full_walk
    else:
        # Reported deleted, or failed (which triggers a full walk by itself).
        assert run.outcome == "converged", run.error
    await assert_mirrors(store, fake, survey)
    assert ghost not in await store.items("images", survey)
    feed_is_sane(store.path)


async def test_reconcile_every_runs_a_full_walk(fake: FakeUpstream, store: Store) -> None:
    fake.behaviour = Behaviour(unknown_hashes="ignore")
    survey = fake.data.add_survey(n_images=300)
    eager = Mirror(fake, store, reconcile_every=0.001)
    first = await eager.sync_survey(survey)
    assert first.full_walk  # an empty collection is listed whole
    await _plant_bogus_row(store, survey)
    await asyncio.sleep(0.01)
    run = await eager.sync_survey(survey)
    assert run.full_walk and run.outcome == "converged"
    await assert_mirrors(store, fake, survey)


@pytest.mark.parametrize("in_remaining", [True, False])
async def test_failed_items_terminate_are_recorded_and_clear(
    mirror: Mirror, fake: FakeUpstream, store: Store, in_remaining: bool
) -> None:
    fake.behaviour = Behaviour(failed_in_remaining=in_remaining)
    survey = fake.data.add_survey(n_images=2500)
    failing = set(list(fake.data.images(survey))[:3])
    fake.data.set_failing(failing)
    run = await mirror.sync_survey(survey)
    assert run.outcome == "partial"
    assert run.failed == 3
    assert "failed upstream" in (run.error or "")
    held = await store.items("images", survey)
    assert set(held) == set(fake.data.images(survey)) - failing
    recorded = await store.failures("images", survey)
    assert {f.key for f in recorded} == failing
    assert all(f.message for f in recorded)
    status = {s.parent_id: s for s in await store.statuses()}[survey]
    assert status.failed_count == 3 and status.last_outcome == "partial"
    # A survey that keeps failing items still ends every run, in few round trips.
    before = len(fake.requests)
    assert (await mirror.sync_survey(survey)).outcome == "partial"
    assert len(fake.requests) - before <= 2
    fake.data.set_failing(set())
    run = await mirror.sync_survey(survey)
    assert run.outcome == "converged"
    await assert_mirrors(store, fake, survey)
    assert await store.failures("images", survey) == []


async def test_fields_bring_their_surveys_and_drop_deleted_ones(
    mirror: Mirror, fake: FakeUpstream, store: Store
) -> None:
    field = fake.data.add_field(n_surveys=3, images_per_survey=250)
    runs = await mirror.sync_all([], [field])
    assert [r.outcome for r in runs] == ["converged"] * 4
    surveys = list(fake.data.surveys(field))
    for sid in surveys:
        await assert_mirrors(store, fake, sid)
    fake.data.delete_survey(surveys[0])
    runs = await mirror.sync_all([], [field])
    assert all(r.ok for r in runs)
    assert await store.items("images", surveys[0]) == {}
    assert surveys[0] not in {s.parent_id for s in await store.statuses()}
    feed_is_sane(store.path)


async def test_cancel_between_pages_then_resume(
    mirror: Mirror, fake: FakeUpstream, store: Store
) -> None:
    survey = fake.data.add_survey(n_images=5000)
    task = asyncio.ensure_future(mirror.sync_survey(survey))
    await wait_for(lambda: len(fake.requests) >= 2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    partial = await store.items("images", survey)
    assert 0 < len(partial) < 5000 and len(partial) % 1000 == 0  # a page boundary
    status = {s.parent_id: s for s in await store.statuses()}[survey]
    assert status.last_outcome == "cancelled"
    run = await mirror.sync_survey(survey)
    assert run.outcome == "converged"
    await assert_mirrors(store, fake, survey)
    feed_is_sane(store.path)


class PausingStore(Store):
    """A real store whose page transaction waits, mid-transaction, until the test says go."""

    inside: asyncio.Event
    release: asyncio.Event
    fail_inside = False

    async def apply_page(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        original = self._transaction

        async def paused(work):  # type: ignore[no-untyped-def]
            async def wrapped(db):  # type: ignore[no-untyped-def]
                result = await work(db)
                self.inside.set()
                await self.release.wait()
                if self.fail_inside:
                    raise sqlite3.OperationalError("disk I/O error (simulated)")
                return result

            return await original(wrapped)

        self._transaction = paused  # type: ignore[method-assign]
        try:
            await super().apply_page(*args, **kwargs)
        finally:
            self._transaction = original  # type: ignore[method-assign]


@pytest.mark.parametrize("fail_inside", [False, True])
async def test_cancel_inside_a_transaction(
    fake: FakeUpstream, tmp_path: Path, fail_inside: bool
) -> None:
    survey = fake.data.add_survey(n_images=3500)
    store = await PausingStore.open(tmp_path / "mirror.db")
    assert isinstance(store, PausingStore)
    store.inside, store.release = asyncio.Event(), asyncio.Event()
    store.fail_inside = fail_inside
    try:
        mirror = Mirror(fake, store, reconcile_every=0)
        task = asyncio.ensure_future(mirror.sync_survey(survey))
        await wait_for(store.inside.is_set)
        task.cancel()  # arrives while the page's transaction is open
        await asyncio.sleep(0)
        store.release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        held = await store.items("images", survey)
        # Committed whole, or (when the write failed) rolled back whole: a page boundary.
        assert len(held) == (0 if fail_inside else 1000)
        feed_is_sane(store.path)
        store.fail_inside = False
        store.inside, store.release = asyncio.Event(), asyncio.Event()
        store.release.set()
        run = await mirror.sync_survey(survey)
        assert run.outcome == "converged"
        await assert_mirrors(store, fake, survey)
        feed_is_sane(store.path)
    finally:
        await store.close()


async def test_updated_then_deleted_then_readded(
    mirror: Mirror, fake: FakeUpstream, store: Store
) -> None:
    survey = fake.data.add_survey(n_images=10)
    await mirror.sync_survey(survey)
    victim = fake.data.delete_images(survey, 1)[0]
    await mirror.sync_survey(survey)
    assert victim not in await store.items("images", survey)
    fake.data.add_images(survey, 1)
    fake.data.update_images(survey, 5)
    run = await mirror.sync_survey(survey)
    assert run.outcome == "converged"
    await assert_mirrors(store, fake, survey)
    feed_is_sane(store.path)


async def test_page_cap_stops_a_run(fake: FakeUpstream, store: Store) -> None:
    survey = fake.data.add_survey(n_images=3000)
    capped = Mirror(fake, store, reconcile_every=0, max_pages=2)
    run = await capped.sync_survey(survey)
    assert run.outcome == "stalled" and run.pages == 2
    assert "max_pages" in (run.error or "")
    run = await capped.sync_survey(survey)
    assert run.outcome == "converged"
    await assert_mirrors(store, fake, survey)


async def test_a_backlog_of_late_stale_reports_is_not_mistaken_for_a_stall(
    mirror: Mirror, fake: FakeUpstream, store: Store
) -> None:
    # Found by the property test: with tiny pages, a server that reports old hashes *after*
    # the new versions answers several pages in a row that change nothing here, while its
    # remaining_count counts down through the backlog. That is progress, not a stall.
    survey = fake.data.add_survey(n_images=40)
    await mirror.sync_survey(survey)
    fake.behaviour = Behaviour(
        old_hash_in_deleted="after", order="upserted_first", image_page_limit=2
    )
    fake.data.update_images(survey, 7)
    run = await mirror.sync_survey(survey)
    assert run.outcome == "converged", run.error
    await assert_mirrors(store, fake, survey)


async def assert_field_mirrors(store: Store, fake: FakeUpstream, field: str) -> None:
    held = await store.items("surveys", field)
    upstream = fake.data.surveys(field)
    assert {k: v[0] for k, v in held.items()} == {k: v["content_hash"] for k, v in upstream.items()}
    for sid, item in upstream.items():
        assert {k: v for k, v in held[sid][1].items() if k != "__typename"} == item
        await assert_mirrors(store, fake, sid)


@pytest.mark.parametrize(
    "behaviour",
    [
        Behaviour(old_hash_in_deleted=old, order=order, survey_page_limit=2, image_page_limit=50)
        for old, order in itertools.product(
            ["never", "same_answer", "before", "after"], ["deleted_first", "shuffled"]
        )
    ],
    ids=lambda b: f"{b.old_hash_in_deleted}-{b.order}",
)
async def test_sync_surveys_is_the_same_engine_under_every_behaviour(
    mirror: Mirror, fake: FakeUpstream, store: Store, behaviour: Behaviour
) -> None:
    fake.behaviour = behaviour
    field = fake.data.add_field(n_surveys=5, images_per_survey=60)
    assert all(r.ok for r in await mirror.sync_all([], [field]))
    surveys = list(fake.data.surveys(field))
    fake.data.update_survey(surveys[1])
    fake.data.update_survey(surveys[2])
    fake.data.delete_survey(surveys[3])
    fake.data.add_survey(n_images=70, field_id=field)
    fake.data.update_images(surveys[0], 20)
    runs = await mirror.sync_all([], [field])
    assert all(r.ok for r in runs), [r.error for r in runs if not r.ok]
    await assert_field_mirrors(store, fake, field)
    assert await store.items("images", surveys[3]) == {}
    feed_is_sane(store.path)
