"""Reliability of the real daemon process (issue #7, items 1 and 2).

1. Seeded fault schedules: the daemon runs against the fake upstream while the test drives a
   random schedule of faults, `failed` items, offline spells and data churn (between pages
   and between runs); once everything is cleared the mirror must equal upstream exactly.
   The test's choices replay from the seed (the daemon's timing, and so which request meets
   which fault, does not: a failing seed is a strong, not an exact, reproduction).
2. Crash consistency: kill -9 at random moments during syncs, restart on the same database;
   every committed change-feed sequence number keeps its meaning, and the mirror converges.
   And what a naive file copy of a database being written gives (see
   test_copying_the_database_file_while_the_daemon_writes).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import shutil
import signal
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from random import Random
from typing import Any

import pytest

from mirrord.fake_upstream import Behaviour, FakeData, FakeUpstream
from mirrord.store import Store, StoreError
from tests.conftest import TOKEN, wait_for
from tests.test_daemon import DaemonProcess, config_text, free_port, launch
from tests.test_sync import feed_is_sane

FAULT_KINDS = (
    "http_500",
    "http_502",
    "http_503",
    "http_429",
    "hang",
    "cutoff",
    "reset",
    "graphql_error",
    "html",
    "not_json",
)
CI_SEEDS = range(25)

SLOW_SEEDS = range(1000, 1300)
PARALLEL = 5  # seeds run side by side: each daemon spends most of its time waiting


def fast_config(
    fake: FakeUpstream, port: int, surveys: list[str], fields: list[str], interval: str
) -> str:
    """A daemon that retries quickly: short timeout, 2 attempts, backoff capped at 1 s."""
    text = config_text(
        fake, port, surveys, fields, interval=interval, extra_sync='backoff_cap = "1s"\n'
    )
    return text.replace(
        'timeout = "3s"\nmax_attempts = 1\n',
        'timeout = "1s"\nmax_attempts = 2\nretry_cap = "1s"\n',
    )


def _strip(item: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in item.items() if k != "__typename"}


async def open_when_ready(db: Path, timeout: float) -> Store:
    """The mirror, read-only, once the daemon has created and migrated it."""
    opened: list[Store] = []

    async def ready() -> bool:
        with contextlib.suppress(StoreError):
            opened.append(await Store.open(db, readonly=True))
        return bool(opened)

    await wait_for(ready, timeout=timeout, interval=0.05)
    return opened[0]


def _diff(kind: str, parent: str, held: dict[str, Any], upstream: dict[str, Any]) -> str | None:
    missing, stale = upstream.keys() - held.keys(), held.keys() - upstream.keys()
    if missing or stale:
        return f"{kind} of {parent}: missing {len(missing)}, stale {len(stale)}"
    for sid, item in upstream.items():
        chash, data = held[sid]
        if chash != item["content_hash"] or _strip(data) != _strip(item):
            return f"{kind} of {parent}: {sid} differs"
    return None


async def mirror_difference(
    store: Store, data: FakeData, surveys: list[str], fields: list[str], gone: set[str]
) -> str | None:
    """None if the mirror holds exactly upstream's data, else the first difference."""
    for field_id in fields:
        upstream = data.surveys(field_id)
        problem = _diff("surveys", field_id, await store.items("surveys", field_id), upstream)
        if problem:
            return problem
    listed = [s for f in fields for s in data.survey_ids(f)]
    for survey in dict.fromkeys([*surveys, *listed]):
        problem = _diff("images", survey, await store.items("images", survey), data.images(survey))
        if problem:
            return problem
    for survey in gone:  # deleted upstream: the field's sync drops its images
        if await store.items("images", survey):
            return f"images of deleted survey {survey} still held"
    return None


async def wait_converged(
    db: Path,
    data: FakeData,
    surveys: list[str],
    fields: list[str],
    gone: set[str],
    timeout: float,
) -> str | None:
    """Poll until the mirror equals upstream: None, or the last difference seen at the deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    store = await open_when_ready(db, timeout)
    try:
        while True:
            problem = await mirror_difference(store, data, surveys, fields, gone)
            if problem is None or loop.time() > deadline:
                return problem
            await asyncio.sleep(0.1)
    finally:
        await store.close()


# --------------------------------------------------------------------------------------------
# 1. Seeded fault schedules
# --------------------------------------------------------------------------------------------


@dataclass
class World:
    """One seed's upstream and what the schedule has done to it."""

    rng: Random
    data: FakeData
    fake: FakeUpstream
    survey: str  # configured directly
    field_id: str  # configured as a field: its surveys come and go
    gone: set[str] = field(default_factory=set)
    log: list[str] = field(default_factory=list)

    def field_surveys(self) -> list[str]:
        return [s for s in self.data.survey_ids(self.field_id) if s != self.survey]

    def all_surveys(self) -> list[str]:
        return [self.survey, *self.field_surveys()]

    def churn(self) -> None:
        """One random change upstream: images added, updated, deleted; field surveys too."""
        rng, data = self.rng, self.data
        what = rng.choices(
            ["add", "update", "delete", "add_survey", "update_survey", "delete_survey"],
            weights=[4, 4, 3, 1, 1, 1],
        )[0]
        survey = rng.choice(self.all_surveys())
        n = rng.randint(1, 40)
        if what == "add":
            data.add_images(survey, n)
        elif what == "update":
            data.update_images(survey, n)
        elif what == "delete":
            data.delete_images(survey, n)
        elif what == "add_survey" and len(self.field_surveys()) < 4:
            data.add_survey(rng.randint(0, 60), self.field_id)
        elif what == "update_survey" and self.field_surveys():
            data.update_survey(rng.choice(self.field_surveys()))
        elif what == "delete_survey" and self.field_surveys():
            victim = rng.choice(self.field_surveys())
            data.delete_survey(victim)
            self.gone.add(victim)
        self.log.append(f"{what} {n}")


def make_world(seed: int) -> tuple[World, Behaviour]:
    rng = Random(seed)
    data = FakeData(seed=seed)
    field_id = data.add_field(n_surveys=rng.randint(1, 2), images_per_survey=rng.randint(0, 150))
    other = data.add_field()
    survey = data.add_survey(rng.randint(50, 400), other)
    behaviour = Behaviour(
        old_hash_in_deleted=rng.choice(["never", "same_answer", "before", "after"]),
        order=rng.choice(["deleted_first", "upserted_first", "shuffled"]),
        shared_limit=rng.random() < 0.5,
        failed_in_remaining=rng.random() < 0.5,
        empty_failed=rng.choice(["empty_list", "null"]),
        image_page_limit=rng.choice([25, 60, 150, 1000]),
        survey_page_limit=rng.choice([1, 2, 2000]),
    )
    fake = FakeUpstream(data, token=TOKEN, behaviour=behaviour, seed=seed)
    return World(rng, data, fake, survey, field_id), behaviour


def schedule_step(w: World) -> None:
    """One seeded action of the schedule."""
    rng, faults = w.rng, w.fake.faults
    action = rng.choices(
        ["random", "push", "clear", "offline", "fail", "unfail", "churn", "between_pages"],
        weights=[3, 3, 1, 2, 2, 1, 4, 2],
    )[0]
    w.log.append(action)
    if action == "random":
        kinds = rng.sample(FAULT_KINDS, rng.randint(1, 4))
        faults.random(rng.uniform(0.1, 0.6), kinds, rng.randrange(2**32))
    elif action == "push":
        kind = rng.choice(FAULT_KINDS)
        params: dict[str, Any] = {}
        if kind == "hang":
            params["delay"] = 1.5  # past the daemon's 1 s timeout
        elif kind in ("http_429", "http_503"):
            params["retry_after"] = rng.choice([0, 0.2, 0.5])
        elif kind == "cutoff":
            params["fraction"] = round(rng.uniform(0.05, 0.95), 2)
        faults.push(kind, rng.randint(1, 3), **params)
    elif action == "clear":
        faults.clear()
    elif action == "offline":
        faults.offline = not faults.offline
    elif action == "fail":
        ids = [i for s in w.all_surveys() for i in w.data.image_hashes(s)]
        ids += w.field_surveys()
        w.data.set_failing(set(rng.sample(ids, min(len(ids), rng.randint(1, 6)))))
    elif action == "unfail":
        w.data.set_failing(set())
    elif action == "churn":
        w.churn()
    else:  # data changes between the pages of one sync
        budget = [rng.randint(1, 4)]
        p = rng.uniform(0.2, 0.8)

        def between_pages() -> None:
            if budget[0] > 0 and rng.random() < p:
                budget[0] -= 1
                w.churn()

        w.fake.on_answer = between_pages if rng.random() < 0.8 else None


async def run_seed(seed: int, tmp_path: Path, port: int, daemons: list[DaemonProcess]) -> None:
    """One seed: schedule, then clean link and no failures, then the mirror must be exact."""
    w, behaviour = make_world(seed)
    where = tmp_path / f"seed-{seed}"
    where.mkdir()
    async with w.fake:
        config = where / "mirrord.toml"
        interval = f"{w.rng.choice([200, 300, 500])}ms"
        config.write_text(fast_config(w.fake, port, [w.survey], [w.field_id], interval))
        d = await launch(daemons, config, port)
        loop = asyncio.get_running_loop()
        end = loop.time() + w.rng.uniform(1.5, 2.5)
        while loop.time() < end:
            schedule_step(w)
            await asyncio.sleep(w.rng.uniform(0.03, 0.25))
        w.fake.faults.clear()
        w.data.set_failing(set())
        w.fake.on_answer = None
        problem = await wait_converged(
            where / "mirror.db", w.data, [w.survey], [w.field_id], w.gone, timeout=25
        )
        context = f"seed {seed} ({behaviour}; schedule {w.log})"
        assert d.proc is not None
        assert d.proc.returncode is None, f"{context}: the daemon died: {d.raw[-5:]}"
        code = await d.stop()
    assert problem is None, f"{context}: not converged: {problem}"
    assert code == 0, f"{context}: exit {code}: {d.raw[-8:]}"
    assert not any("Traceback" in line for line in d.raw), f"{context}: {d.raw}"
    try:
        feed_is_sane(where / "mirror.db")
    except AssertionError as e:
        raise AssertionError(f"{context}: change feed: {e}") from None


async def run_seeds(seeds: range, tmp_path: Path, daemons: list[DaemonProcess]) -> None:
    failures: list[str] = []
    for start in range(0, len(seeds), PARALLEL):
        group = seeds[start : start + PARALLEL]
        ports = distinct_ports(len(group))
        results = await asyncio.gather(
            *(run_seed(s, tmp_path, p, daemons) for s, p in zip(group, ports, strict=True)),
            return_exceptions=True,
        )
        for seed, result in zip(group, results, strict=True):
            if isinstance(result, BaseException):
                failures.append(f"seed {seed}: {result!r}"[:3000])
    assert not failures, "\n".join(failures)


def distinct_ports(n: int) -> list[int]:
    """n free ports, distinct from each other (all held at once while picked)."""
    import socket

    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.mark.parametrize("group", range(0, len(CI_SEEDS), PARALLEL))
async def test_seeded_fault_schedules_converge_exactly(
    tmp_path: Path, daemons: list[DaemonProcess], group: int
) -> None:
    await run_seeds(CI_SEEDS[group : group + PARALLEL], tmp_path, daemons)


@pytest.mark.slow
@pytest.mark.parametrize("group", range(0, len(SLOW_SEEDS), PARALLEL))
async def test_seeded_fault_schedules_soak(
    tmp_path: Path, daemons: list[DaemonProcess], group: int
) -> None:
    await run_seeds(SLOW_SEEDS[group : group + PARALLEL], tmp_path, daemons)


# --------------------------------------------------------------------------------------------
# 2. Crash consistency
# --------------------------------------------------------------------------------------------

Change = tuple[str, str, bool]  # (sentera_id, content_hash, deleted)

CRASH_SEEDS = (11, 12)
KILLS_PER_SEED = 11  # 22 kills in CI


def feed_snapshot(db: Path) -> tuple[int, dict[int, Change]]:
    """(last_seq, seq -> change) of a mirror no process has open; integrity checked first."""
    con = sqlite3.connect(db)
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        last = int(con.execute("SELECT value FROM meta WHERE key = 'last_seq'").fetchone()[0])
        feed: dict[int, Change] = {
            seq: (sid, chash, False)
            for seq, sid, chash in con.execute("SELECT seq, sentera_id, content_hash FROM items")
        }
        for seq, sid, chash in con.execute("SELECT seq, sentera_id, content_hash FROM tombstones"):
            assert seq not in feed, f"seq {seq} is both an item and a tombstone"
            feed[seq] = (sid, chash, True)
        return last, feed
    finally:
        con.close()


def check_feed_history(
    seen: dict[int, Change], prev_last: int, last: int, feed: dict[int, Change]
) -> None:
    """A committed seq never goes back nor changes meaning: every seq at or below the previous
    last_seq that is still in the feed means what it meant then; `seen` grows with `feed`."""
    assert last >= prev_last, f"last_seq went back: {prev_last} -> {last}"
    for seq, change in feed.items():
        assert seq <= last, f"seq {seq} beyond last_seq {last}"
        if seq <= prev_last:
            assert seen.get(seq) == change, f"seq {seq} reused: {seen.get(seq)} -> {change}"
    seen.update(feed)


async def wait_answers(fake: FakeUpstream, n: int, timeout: float) -> None:
    """Until the fake has computed `n` more sync answers (or `timeout` passed)."""
    answered = asyncio.Event()
    count = [0]

    def on_answer() -> None:
        count[0] += 1
        if count[0] >= n:
            answered.set()

    fake.on_answer = on_answer
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(answered.wait(), timeout)
    finally:
        fake.on_answer = None


FILES_CRASH_SEED = 13  # with file downloads: 11 more kills


def files_difference(root: Path, data: FakeData, survey: str) -> str | None:
    """None when the complete files under root are exactly upstream's, by hash."""
    on_disk = {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file() and p.suffix != ".part"
    }
    wanted = {sid: data.file_sha256(sid) for sid in data.images(survey)}
    if on_disk == wanted:
        return None
    wrong = [k for k in on_disk.keys() & wanted.keys() if on_disk[k] != wanted[k]]
    return (
        f"files: {len(wanted.keys() - on_disk.keys())} missing, "
        f"{len(on_disk.keys() - wanted.keys())} extra, {len(wrong)} with other bytes"
    )


@pytest.mark.parametrize("seed", [*CRASH_SEEDS, FILES_CRASH_SEED])
async def test_kill_9_during_syncs_never_corrupts_nor_reuses_seqs(
    tmp_path: Path, daemons: list[DaemonProcess], seed: int
) -> None:
    rng = Random(seed)
    files = seed == FILES_CRASH_SEED
    data = FakeData(seed=seed, file_sizes=(1_000, 60_000) if files else None)
    survey = data.add_survey(n_images=300 if files else 1500)
    behaviour = Behaviour(image_page_limit=100, old_hash_in_deleted="after")
    async with FakeUpstream(data, token=TOKEN, behaviour=behaviour, seed=seed) as fake:
        port = free_port()
        config = tmp_path / "mirrord.toml"
        text = fast_config(fake, port, [survey], [], "300ms")
        if files:
            # Slow enough that kills land mid-file too, not only between files.
            fake.file_faults.rate = 2_000_000
            text = text.replace(f'id = "{survey}"\n', f'id = "{survey}"\nfiles = "all"\n')
        config.write_text(text)
        db = tmp_path / "mirror.db"
        seen: dict[int, Change] = {}
        last = 0
        for kill in range(KILLS_PER_SEED):
            d = await launch(daemons, config, port)
            # Kill after a few answers, a random moment later: mid-request, mid-page-write,
            # mid-commit, or between runs.
            await wait_answers(fake, rng.randint(1, 6), timeout=10)
            await asyncio.sleep(rng.uniform(0, 0.04))
            assert await d.stop(signal.SIGKILL) == -signal.SIGKILL
            context = f"seed {seed}, kill {kill}"
            try:
                new_last, feed = feed_snapshot(db)
                check_feed_history(seen, last, new_last, feed)
                feed_is_sane(db)
            except AssertionError as e:
                raise AssertionError(f"{context}: {e}") from None
            last = new_last
            # Upstream moves on between kills.
            scale = 0.2 if files else 1.0
            data.add_images(survey, int(rng.randint(100, 600) * scale))
            data.update_images(survey, int(rng.randint(0, 300) * scale))
            data.delete_images(survey, int(rng.randint(0, 150) * scale))
            ids = list(data.image_hashes(survey))
            data.set_failing(set(rng.sample(ids, rng.randint(0, 3))))
        data.set_failing(set())
        d = await launch(daemons, config, port)
        problem = await wait_converged(db, data, [survey], [], set(), timeout=30)
        assert problem is None, f"seed {seed}: not converged after the kills: {problem}"
        if files:
            fake.file_faults.rate = None
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60  # a slow disk's fsyncs, on a loaded machine
            while (problem := files_difference(tmp_path / "files", data, survey)) is not None:
                if loop.time() > deadline:
                    with sqlite3.connect(db) as con:
                        states = con.execute(
                            "SELECT state, count(*), max(attempts), max(reason), "
                            "min(url_seen_at) FROM files GROUP BY state"
                        ).fetchall()
                    log = d.raw[-8:]
                    live = (await d.status())["files"]
                    raise AssertionError(
                        f"seed {seed}: {problem}; rows {states}; status {live}; log {log}"
                    )
                await asyncio.sleep(0.1)
        assert await d.stop() == 0
        new_last, feed = feed_snapshot(db)
        check_feed_history(seen, last, new_last, feed)
        feed_is_sane(db)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(100, 120))
async def test_kill_9_soak(tmp_path: Path, daemons: list[DaemonProcess], seed: int) -> None:
    await test_kill_9_during_syncs_never_corrupts_nor_reuses_seqs(tmp_path, daemons, seed)


# --------------------------------------------------------------------------------------------
# Copying the database file while the daemon writes
# --------------------------------------------------------------------------------------------


def copy_verdict(db: Path) -> str:
    """'ok', or what is wrong with a copied mirror: it must open, pass integrity_check, and
    hold one transaction's state (item counts and last_seq agree with the rows)."""
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    except sqlite3.Error as e:
        return f"cannot open: {e}"
    try:
        if con.execute("SELECT count(*) FROM sqlite_schema").fetchone()[0] == 0:
            return "ok"  # an empty database: the main file before the first checkpoint
        check = con.execute("PRAGMA integrity_check").fetchall()
        if check != [("ok",)]:
            return f"integrity_check: {check[:3]}"
        counts = con.execute(
            "SELECT count(*) FROM collections c WHERE item_count != "
            "(SELECT count(*) FROM items i WHERE i.collection_id = c.id)"
        ).fetchone()[0]
        if counts:
            return "item_count disagrees with the items held"
        last = con.execute("SELECT value FROM meta WHERE key = 'last_seq'").fetchone()[0]
        top = con.execute(
            "SELECT max(s) FROM (SELECT max(seq) s FROM items UNION ALL "
            "SELECT max(seq) FROM tombstones)"
        ).fetchone()[0]
        if top is not None and top > last:
            return "a seq beyond last_seq"
        return "ok"
    except sqlite3.Error as e:
        return f"query failed: {e}"
    finally:
        con.close()


def backup_api_copy(src: Path, dst_dir: Path) -> Path:
    """The SQLite online backup API: a consistent snapshot whatever the writer does."""
    dst_dir.mkdir()
    dst = dst_dir / src.name
    source = sqlite3.connect(f"file:{src}?mode=ro", uri=True)
    target = sqlite3.connect(dst)
    try:
        source.backup(target)
    finally:
        target.close()
        source.close()
    return dst


async def test_copying_the_database_file_while_the_daemon_writes(
    tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    """What holds for a copy of a mirror being written (WAL mode, 120 commits, checkpoints):

    - a copy through SQLite's backup API is always consistent: asserted here;
    - a naive copy of the main file alone is NOT: it is the state as of the last checkpoint
      only if no checkpoint runs during the copy; one taken while a checkpoint writes pages
      back is torn ("database disk image is malformed" seen in 1 of ~80 copies);
    - a naive copy of the main file then the -wal is not safe either: a checkpoint plus a
      WAL restart between the two copies pairs an old main file with newer frames (none of
      ~80 such copies failed here, but nothing prevents it). Naive copies are therefore not
      asserted: a file-level backup needs the daemon stopped, or the backup API.
    """
    data = FakeData(seed=5)
    survey = data.add_survey(n_images=30_000)
    behaviour = Behaviour(image_page_limit=250)  # 120 commits, several WAL checkpoints
    async with FakeUpstream(data, token=TOKEN, behaviour=behaviour, seed=5) as fake:
        port = free_port()
        config = tmp_path / "mirrord.toml"
        config.write_text(fast_config(fake, port, [survey], [], "1h"))
        db = tmp_path / "mirror.db"
        d = await launch(daemons, config, port)
        await wait_for(lambda: len(fake.requests) >= 2, timeout=30)
        verdicts: list[str] = []
        loop = asyncio.get_running_loop()
        end = loop.time() + 8
        while loop.time() < end and not d.events("sync"):  # until the sync ends
            target = tmp_path / f"copy-{len(verdicts)}"
            copied = await asyncio.to_thread(backup_api_copy, db, target)
            verdicts.append(await asyncio.to_thread(copy_verdict, copied))
            shutil.rmtree(target)
        assert await d.stop() == 0
    assert len(verdicts) >= 5, "the sync ended before enough copies were taken"
    assert set(verdicts) == {"ok"}, verdicts
