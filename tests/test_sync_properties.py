"""Model-based property test of the sync engine with Hypothesis.

Any interleaving of upstream mutations, undocumented server behaviours, tiny page sizes, faults,
failed items, edits between pages and syncs cut off part-way must end, once the link is clean,
with the mirror equal to upstream; and every run must terminate.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mirrord.fake_upstream import Behaviour, FakeData, FakeUpstream
from mirrord.store import PageChanges, Store, Upsert
from mirrord.sync import SyncEngine, SyncProgress, SyncRun
from mirrord.upstream import SYNC_IMAGES
from tests.conftest import TOKEN, assert_mirrors, make_client
from tests.test_sync import feed_is_sane

MAX_PAGES = 400

behaviours = st.builds(
    Behaviour,
    old_hash_in_deleted=st.sampled_from(["never", "same_answer", "before", "after"]),
    order=st.sampled_from(["deleted_first", "upserted_first", "shuffled"]),
    shared_limit=st.booleans(),
    unknown_hashes=st.sampled_from(["ignore", "deleted", "failed"]),
    failed_in_remaining=st.booleans(),
    image_page_limit=st.integers(1, 40),
)

steps = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(["add", "update", "delete"]), st.integers(0, 30)),
        st.tuples(st.just("fail"), st.integers(0, 3)),
        st.tuples(st.just("sync"), st.integers(0, 5)),  # cut off after n pages (0: never)
        st.tuples(st.just("churn"), st.integers(1, 3)),  # edits during the first n answers
        st.tuples(st.just("faults"), st.integers(0, 2**16)),
        st.tuples(st.just("ghost"), st.just(0)),  # a held hash upstream never issued
        st.tuples(st.just("behaviour"), st.integers(0, 2**16)),
    ),
    max_size=14,
)


class CutOff(Exception):
    pass


async def one_sync(
    fake: FakeUpstream, store: Store, survey: str, cut_after: int = 0, full: bool = False
) -> SyncRun | None:
    def progress(p: SyncProgress) -> None:
        if cut_after and p.pages >= cut_after:
            raise asyncio.CancelledError  # the laptop's lid closes mid-sync

    async with make_client(fake, attempts=8, timeout=5) as client:
        engine = SyncEngine(
            store, client, max_pages=MAX_PAGES, reconcile_every=0, progress=progress
        )
        try:
            run = await engine.sync_collection(SYNC_IMAGES, survey, full=full)
        except asyncio.CancelledError:
            return None
    assert run.pages <= MAX_PAGES
    assert run.outcome in ("converged", "partial", "stalled", "failed"), run
    return run


async def plant_ghost(store: Store, survey: str, n: int) -> None:
    coll = await store.collection("images", survey, "config")
    run_id = await store.begin_run(coll, full_walk=False)
    held = await store.held_hashes(coll)
    sid = f"ghost_IM_{n:04d}"
    changes = PageChanges(upserts=[Upsert(sid, f"NEVERISSUED{n:05d}", "{}")], new_ids={sid})
    await store.apply_page(coll, run_id, changes, 0, len(held) + 1)


async def scenario(
    behaviour: Behaviour, plan: list[tuple[str, int]], data_seed: int, db_path: Path
) -> None:
    data = FakeData(seed=data_seed)
    survey = data.add_survey(n_images=25)
    async with FakeUpstream(data, token=TOKEN, behaviour=behaviour, seed=data_seed) as fake:
        store = await Store.open(db_path)
        try:
            ghosts = await run_plan(fake, store, survey, plan)
            fake.faults.clear()
            fake.data.set_failing(set())
            fake.on_answer = None
            run = await one_sync(fake, store, survey)
            assert run is not None and run.outcome == "converged", run
            if ghosts and fake.behaviour.unknown_hashes == "ignore":
                # Upstream never mentions those hashes: only a full walk finds them stale.
                run = await one_sync(fake, store, survey, full=True)
                assert run is not None and run.outcome == "converged", run
            await assert_mirrors(store, fake, survey)
        finally:
            await store.close()
    feed_is_sane(db_path)


async def run_plan(
    fake: FakeUpstream, store: Store, survey: str, plan: list[tuple[str, int]]
) -> int:
    ghosts = 0
    for action, n in plan:
        if action == "add":
            fake.data.add_images(survey, n)
        elif action in ("update", "delete"):
            getattr(fake.data, f"{action}_images")(survey, n)
        elif action == "fail":
            fake.data.set_failing(set(fake.data.update_images(survey, n)))
        elif action == "sync":
            await one_sync(fake, store, survey, cut_after=n)
        elif action == "churn":
            fake.on_answer = churner(fake, survey, n)
        elif action == "faults":
            fake.faults.random(
                rate=0.3,
                seed=n,
                kinds=[
                    "http_500",
                    "http_503",
                    "cutoff",
                    "reset",
                    "graphql_error",
                    "html",
                    "not_json",
                ],
            )
        elif action == "ghost":
            ghosts += 1
            await plant_ghost(store, survey, ghosts)
        elif action == "behaviour":
            fake.behaviour = pick_behaviour(n, fake.behaviour)
    return ghosts


def churner(fake: FakeUpstream, survey: str, answers: int) -> Any:
    left = [answers]

    def churn() -> None:
        if left[0] > 0:
            left[0] -= 1
            fake.data.add_images(survey, 2)
            fake.data.update_images(survey, 3)
            fake.data.delete_images(survey, 1)

    return churn


def pick_behaviour(n: int, current: Behaviour) -> Behaviour:
    modes = ["never", "same_answer", "before", "after"]
    return Behaviour(
        old_hash_in_deleted=modes[n % 4],  # type: ignore[arg-type]
        order=["deleted_first", "upserted_first", "shuffled"][n // 4 % 3],  # type: ignore[arg-type]
        shared_limit=bool(n // 12 % 2),
        unknown_hashes=current.unknown_hashes,
        failed_in_remaining=bool(n // 24 % 2),
        image_page_limit=1 + n // 48 % 25,
    )


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(behaviour=behaviours, plan=steps, data_seed=st.integers(0, 1000))
def test_any_history_converges_to_upstream(
    behaviour: Behaviour, plan: list[tuple[str, int]], data_seed: int
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(scenario(behaviour, plan, data_seed, Path(tmp) / "mirror.db"))
