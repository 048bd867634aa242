"""Hostile config and state (issue #7 item 5): the real `mirrord run` and CLI processes against a
config file that turns to garbage, vanishes or cannot be read, and a mirror database that is
read-only, locked by another program, corrupted, from a future mirrord, or on a full disk.

Each case wants a clear one-line error (logged as JSON, shown in `/v1/status`, or on stderr
with exit 2), reads that keep working while the database can serve them, nothing mirrored lost,
recovery once the cause goes, and never a traceback.

Tests run as root in CI, where file modes do not stop reads or writes: "unreadable" then means
the config path turned into a directory, and "read-only" means `chattr +i` (the immutable
attribute binds root too); without chattr the read-only cases skip, saying why.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import shutil
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mirrord.fake_upstream import FakeUpstream
from mirrord.store import SCHEMA_VERSION, Store
from tests.conftest import TOKEN, assert_mirrors
from tests.test_cli import run_cli
from tests.test_daemon import DaemonProcess, config_text, free_port, launch, targets
from tests.test_reliability import backup_api_copy

IS_ROOT = os.geteuid() == 0
NOT_RELOADED = "config not reloaded: keeping the running config"


# ---- helpers ----------------------------------------------------------------------------------


def no_traceback(*texts: str) -> None:
    for text in texts:
        assert "Traceback" not in text, text


def daemon_clean(d: DaemonProcess) -> None:
    """No traceback anywhere in the output, and every line is one JSON log record."""
    no_traceback(*d.raw)
    assert len(d.lines) == len(d.raw), [r for r in d.raw if not r.startswith("{")]
    assert not any(TOKEN in line for line in d.raw)


def one_line(err: str, *needles: str) -> None:
    """A CLI error: exactly one line on stderr, naming what it must name."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


async def image_ids(port: int, survey: str) -> set[str]:
    """Every image of a survey, read over the daemon's HTTP API (paged)."""
    ids: set[str] = set()
    cursor: str | None = None
    async with aiohttp.ClientSession() as http:
        while True:
            params = {"limit": "1000", **({"cursor": cursor} if cursor else {})}
            url = f"http://127.0.0.1:{port}/v1/surveys/{survey}/images"
            async with http.get(url, params=params) as resp:
                assert resp.status == 200, await resp.text()
                body = await resp.json()
            ids |= {img["sentera_id"] for img in body["images"]}
            cursor = body["next_cursor"]
            if not cursor:
                return ids


def held_ids(db: Path, survey: str) -> set[str]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = con.execute(
            "SELECT i.sentera_id FROM items i JOIN collections c ON c.id = i.collection_id "
            "WHERE c.kind = 'images' AND c.parent_id = ?",
            (survey,),
        ).fetchall()
    finally:
        con.close()
    return {r[0] for r in rows}


def sync_events(d: DaemonProcess, survey: str) -> list[dict[str, Any]]:
    return [e for e in d.events("sync") if e.get("id") == survey]


async def converged(d: DaemonProcess, survey: str, count: int, timeout: float = 30) -> None:
    await d.wait_status(
        lambda s: (
            targets(s).get(survey, {}).get("image_count") == count
            and targets(s)[survey].get("last_outcome") == "converged"
        ),
        timeout=timeout,
    )


def _chattr(flag: str, *paths: Path) -> None:
    subprocess.run(["chattr", flag, *map(str, paths)], check=True, capture_output=True)


@contextlib.contextmanager
def read_only(*paths: Path) -> Iterator[None]:
    """Make files and directories read-only for this process, whoever it runs as."""
    if not IS_ROOT:
        modes = {p: p.stat().st_mode for p in paths}
        for p in paths:
            p.chmod(0o555 if p.is_dir() else 0o444)
        try:
            yield
        finally:
            for p, mode in modes.items():
                p.chmod(mode)
        return
    if shutil.which("chattr") is None:
        pytest.skip("running as root, where file modes do not bind, and chattr is not installed")
    try:
        _chattr("+i", *paths)
    except subprocess.CalledProcessError as e:
        pytest.skip(f"running as root and chattr +i is not supported here: {e.stderr.decode()}")
    try:
        yield
    finally:
        _chattr("-i", *paths)


class LimitedDaemon(DaemonProcess):
    """`mirrord run` with a file size limit (RLIMIT_FSIZE): a write past it fails with EFBIG,
    which is how a full disk looks to SQLite without needing a tiny filesystem. Python ignores
    SIGXFSZ, so the child gets the error instead of being killed."""

    def __init__(self, config: Path, port: int, max_file_bytes: int) -> None:
        super().__init__(config, port)
        self.max_file_bytes = max_file_bytes

    def preexec(self) -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.max_file_bytes, self.max_file_bytes))


async def start_synced(
    tmp_path: Path,
    fake: FakeUpstream,
    daemons: list[DaemonProcess],
    n_images: int,
    interval: str = "1s",
) -> tuple[DaemonProcess, Path, str, int]:
    survey = fake.data.add_survey(n_images=n_images)
    port = free_port()
    config = tmp_path / "mirrord.toml"
    config.write_text(config_text(fake, port, [survey], interval=interval))
    d = await launch(daemons, config, port)
    await converged(d, survey, n_images)
    return d, config, survey, port


# ---- the config file, while the daemon runs ----------------------------------------------


def _garbage(config: Path) -> Callable[[], None]:
    config.write_text('[upstream\nurl = "http://\x01\n[[surveys]] id =\n')
    return lambda: None


def _empty(config: Path) -> Callable[[], None]:
    config.write_text("")
    return lambda: None


def _deleted(config: Path) -> Callable[[], None]:
    config.unlink()
    return lambda: None


def _unreadable(config: Path) -> Callable[[], None]:
    config.chmod(0)
    try:
        config.read_bytes()
    except PermissionError:
        return lambda: config.chmod(0o644)  # a normal user: the mode is enough
    # Root reads whatever the mode says: make the path unreadable as a file another way.
    config.chmod(0o644)
    config.unlink()
    config.mkdir()
    return config.rmdir


@pytest.mark.parametrize(
    ("break_config", "problem"),
    [
        (_garbage, "mirrord.toml:"),
        (_empty, "upstream"),
        (_unreadable, "cannot read config file"),
        (_deleted, "cannot read config file"),
    ],
    ids=["garbage", "empty", "unreadable", "deleted"],
)
async def test_config_broken_while_running_keeps_the_old_config(
    tmp_path: Path,
    fake: FakeUpstream,
    daemons: list[DaemonProcess],
    break_config: Callable[[Path], Callable[[], None]],
    problem: str,
) -> None:
    d, config, a, port = await start_synced(tmp_path, fake, daemons, n_images=40)
    good = config.read_text()

    restore = break_config(config)
    status = await d.wait_status(lambda s: s["config_error"] is not None)
    assert problem in status["config_error"], status["config_error"]
    assert str(config) in status["config_error"]
    assert set(targets(status)) == {a}  # still the old config's targets
    refused = d.events(NOT_RELOADED)
    assert refused and problem in refused[-1]["error"] and refused[-1]["level"] == "error"

    # It keeps syncing on the old config (interval 1 s) and serving reads.
    added = set(fake.data.add_images(a, 7))
    await converged(d, a, 47)
    assert added <= await image_ids(port, a)
    assert await image_ids(port, a) == set(fake.data.images(a))

    # A good file again (with one more survey, to see it applied): recovered.
    restore()
    b = fake.data.add_survey(n_images=15)
    config.write_text(good.replace(f'id = "{a}"\n', f'id = "{a}"\n[[surveys]]\nid = "{b}"\n'))
    status = await d.wait_status(
        lambda s: s["config_error"] is None and targets(s).get(b, {}).get("image_count") == 15
    )
    assert targets(status)[a]["image_count"] == 47
    assert await d.stop() == 0
    daemon_clean(d)
    # One line per refusal, not one per watcher event of the same edit burst.
    assert len(d.events(NOT_RELOADED)) <= 3
    assert held_ids(tmp_path / "mirror.db", a) == set(fake.data.images(a))


# ---- the database ------------------------------------------------------------------------


async def test_read_only_database_is_refused_at_start_and_recovers(
    tmp_path: Path, fake: FakeUpstream
) -> None:
    from tests.test_cli import write_config

    a = fake.data.add_survey(n_images=30)
    config = write_config(tmp_path, fake, [a])
    assert (await run_cli("sync", "-c", str(config), "-q"))[0] == 0
    db = tmp_path / "mirror.db"
    before = held_ids(db, a)
    assert len(before) == 30
    fake.data.add_images(a, 5)

    # The file itself read-only.
    with read_only(db):
        for command in ("run", "sync"):
            code, out, err = await run_cli(command, "-c", str(config), timeout=20)
            assert code == 2, (command, out, err)
            one_line(err, str(db), "read-only")
            no_traceback(out, err)
        code, out, err = await run_cli("status", "-c", str(config), timeout=20)
        assert code == 0 and a in out, err  # reading it still works
    # Its directory read-only: no lock file, no WAL can be made.
    (tmp_path / "mirror.db.lock").unlink(missing_ok=True)
    with read_only(tmp_path):
        for command in ("run", "sync"):
            code, out, err = await run_cli(command, "-c", str(config), timeout=20)
            assert code == 2, (command, out, err)
            one_line(err, str(tmp_path))
            no_traceback(out, err)
    assert held_ids(db, a) == before  # nothing lost

    code, out, err = await run_cli("sync", "-c", str(config), "-q")
    assert code == 0, err
    assert held_ids(db, a) == set(fake.data.images(a))


async def test_database_locked_by_another_writer(
    tmp_path: Path, fake: FakeUpstream, daemons: list[DaemonProcess]
) -> None:
    d, _, a, port = await start_synced(tmp_path, fake, daemons, n_images=60)
    db = tmp_path / "mirror.db"
    other = sqlite3.connect(db, isolation_level=None, timeout=0)
    try:
        other.execute("BEGIN IMMEDIATE")  # another program's write transaction, held
        fake.data.add_images(a, 9)
        runs_before = len(sync_events(d, a))
        # The next sync waits out SQLite's busy timeout (10 s), then fails, saying why.
        status = await d.wait_status(
            lambda s: "locked" in (targets(s)[a].get("last_error") or ""), timeout=30
        )
        failed = [e for e in sync_events(d, a)[runs_before:] if e["outcome"] == "failed"]
        assert failed and str(db) in failed[0]["error"] and "locked" in failed[0]["error"]
        assert "another program" in failed[0]["error"]
        assert targets(status)[a]["state"] == "error"
        assert targets(status)[a]["last_outcome"] == "failed"
        # Reads never wait on the lock: the mirror as it was.
        held = await image_ids(port, a)
        assert len(held) == 60
        async with aiohttp.ClientSession() as http:
            for sid in sorted(held)[:5]:
                async with http.get(f"http://127.0.0.1:{port}/v1/images/{sid}") as resp:
                    assert resp.status == 200 and (await resp.json())["sentera_id"] == sid
        other.execute("ROLLBACK")
    finally:
        other.close()
    # The lock is gone: the next scheduled sync catches up.
    await converged(d, a, 69)
    status = await d.status()
    assert targets(status)[a]["state"] == "idle" and targets(status)[a]["last_error"] is None
    assert await image_ids(port, a) == set(fake.data.images(a))
    assert await d.stop() == 0
    daemon_clean(d)


def _truncate_half(db: Path) -> None:
    with db.open("r+b") as f:
        f.truncate(db.stat().st_size // 2)


def _overwrite_header(db: Path) -> None:
    with db.open("r+b") as f:
        f.write(b"this is no SQLite file at all!!!")


@pytest.mark.parametrize("corrupt", [_truncate_half, _overwrite_header], ids=["half", "header"])
async def test_corrupted_database_is_refused_in_one_line(
    tmp_path: Path, fake: FakeUpstream, corrupt: Callable[[Path], None]
) -> None:
    from tests.test_cli import write_config

    a = fake.data.add_survey(n_images=2500)
    config = write_config(tmp_path, fake, [a])
    assert (await run_cli("sync", "-c", str(config), "-q"))[0] == 0
    db = tmp_path / "mirror.db"
    assert not db.with_name("mirror.db-wal").exists()  # checkpointed on close
    corrupt(db)
    for command in ("run", "sync", "status"):
        code, out, err = await run_cli(command, "-c", str(config), timeout=20)
        assert code == 2, (command, out, err)
        one_line(err, str(db))
        no_traceback(out, err)


async def test_database_from_a_future_mirrord_is_refused(
    tmp_path: Path, fake: FakeUpstream
) -> None:
    from tests.test_cli import write_config

    a = fake.data.add_survey(n_images=10)
    config = write_config(tmp_path, fake, [a])
    assert (await run_cli("sync", "-c", str(config), "-q"))[0] == 0
    db = tmp_path / "mirror.db"
    con = sqlite3.connect(db)
    con.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    con.commit()
    con.close()
    for command in ("run", "sync", "status"):
        code, out, err = await run_cli(command, "-c", str(config), timeout=20)
        assert code == 2, (command, out, err)
        one_line(err, str(db), f"schema version {SCHEMA_VERSION + 1}", "upgrade mirrord")
        no_traceback(out, err)
    assert len(held_ids(db, a)) == 10  # untouched


async def test_full_disk_fails_the_sync_keeps_the_mirror_and_converges_after(
    tmp_path: Path, fake: FakeUpstream, daemons: list[DaemonProcess]
) -> None:
    d, config, a, port = await start_synced(tmp_path, fake, daemons, n_images=200, interval="1h")
    assert await d.stop() == 0
    db = tmp_path / "mirror.db"
    before = held_ids(db, a)
    fake.data.add_images(a, 3000)  # ~3 MB to write: far past the room left
    # Room for the small bookkeeping transactions, not for a 1,000-image page.
    full = LimitedDaemon(config, port, max_file_bytes=db.stat().st_size + 256 * 1024)
    daemons.append(full)
    await full.start()
    status = await full.wait_status(
        lambda s: targets(s)[a].get("last_outcome") == "failed", timeout=30
    )
    error = targets(status)[a]["last_error"]
    assert str(db) in error and "cannot write the mirror" in error and "full" in error, error
    assert targets(status)[a]["state"] == "error"
    failed = [e for e in sync_events(full, a) if e["outcome"] == "failed"]
    assert failed and failed[0]["error"] == error
    assert await image_ids(port, a) == before  # reads keep working, nothing lost
    assert await full.stop() == 0
    daemon_clean(full)
    assert held_ids(db, a) == before

    # Room again: it converges.
    d2 = await launch(daemons, config, port)
    await converged(d2, a, 3200)
    assert await image_ids(port, a) == set(fake.data.images(a))
    assert await d2.stop(signal.SIGTERM) == 0
    daemon_clean(d2)


async def test_database_corrupted_while_serving_answers_503_not_500(
    tmp_path: Path, fake: FakeUpstream, daemons: list[DaemonProcess]
) -> None:
    import sqlite3

    import aiohttp

    from tests.test_daemon import config_text, free_port, launch, targets

    a = fake.data.add_survey(n_images=2000)
    port = free_port()
    config = tmp_path / "mirrord.toml"
    config.write_text(config_text(fake, port, [a], interval="1h"))
    d = await launch(daemons, config, port)
    await d.wait_status(lambda s: targets(s).get(a, {}).get("image_count") == 2000)
    db = tmp_path / "mirror.db"
    con = sqlite3.connect(db)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the items now live in the main file
    con.close()
    size = db.stat().st_size
    with db.open("r+b") as f:  # a disk going bad under a running daemon
        f.seek(size // 4)
        f.write(b"\xff" * (size - size // 4))
    statuses = set()
    # Single images are read on the serving thread's own connection: the same 503s.
    single = [f"/v1/images/{sid}" for sid in sorted(fake.data.images(a))[::100]]
    paths = [f"/v1/surveys/{a}/images?limit=1000", "/v1/changes?since=0&limit=5000", *single]
    async with aiohttp.ClientSession() as http:
        for path in paths:
            async with http.get(f"http://127.0.0.1:{port}{path}") as resp:
                body = await resp.json()
                statuses.add((resp.status, path in single))
                if resp.status != 200:
                    assert resp.status == 503, body
                    assert body["error"]["code"] == "database_error"
                    assert "mirror.db" in body["error"]["message"]
        async with http.get(f"http://127.0.0.1:{port}/healthz") as resp:
            assert resp.status == 200  # the process still serves
    assert (503, False) in statuses, "the corruption went unnoticed by every read"
    assert (503, True) in statuses, "the corruption went unnoticed by every single-image read"
    assert not any("Traceback" in line for line in d.raw)
    await d.stop()


# ---- the database damaged while the daemon syncs into it ----------------------------------


def _damage(db: Path, how: str) -> None:
    size = db.stat().st_size
    with db.open("r+b") as f:
        if how == "truncate":
            f.truncate(size // 3)
        elif how == "empty":
            f.truncate(0)
        else:  # garbage over everything past the header page
            f.seek(16384)
            f.write(os.urandom(max(0, size - 16384)))
        f.flush()
        os.fsync(f.fileno())


@pytest.mark.parametrize("how", ["truncate", "empty", "garbage"])
async def test_database_damaged_during_a_sync_then_restored(
    tmp_path: Path, fake: FakeUpstream, daemons: list[DaemonProcess], how: str
) -> None:
    """The file is cut short, emptied or overwritten while the daemon syncs into it: every
    read answers 200 or a one-line 503 database_error, /v1/status keeps answering and says
    why, syncs fail with the reason, no traceback, the daemon stays up and stops cleanly.
    Restored from a backup and restarted, it converges to upstream exactly."""
    d, config, a, port = await start_synced(tmp_path, fake, daemons, 3000, interval="1s")
    db = tmp_path / "mirror.db"
    con = sqlite3.connect(db)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the items now live in the main file
    con.close()
    # A copy through SQLite's backup API, as the README tells operators to take one.
    backup = backup_api_copy(db, tmp_path / "backup")
    # A big change to sync (10 pages), then the damage while it is being written.
    fake.data.add_images(a, 10_000)
    fake.data.update_images(a, 200)
    fake.data.delete_images(a, 100)
    await d.wait_status(lambda s: (targets(s)[a].get("progress") or {}).get("pages", 0) >= 2)
    _damage(db, how)

    seen: dict[int, int] = {}
    paths = [
        f"/v1/surveys/{a}/images?limit=1000",
        f"/v1/surveys/{a}",
        "/v1/surveys",
        "/v1/changes?since=0&limit=5000",
        f"/v1/images/{next(iter(fake.data.images(a)))}",
        "/metrics",
    ]
    status: dict[str, Any] = {}
    async with aiohttp.ClientSession() as http:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            for path in paths:
                async with http.get(f"http://127.0.0.1:{port}{path}") as resp:
                    text = await resp.text()
                    no_traceback(text)
                    seen[resp.status] = seen.get(resp.status, 0) + 1
                    assert resp.status in (200, 503), (path, resp.status, text[:300])
                    if resp.status == 503:
                        error = (await resp.json())["error"]
                        assert error["code"] == "database_error", error
                        assert str(db) in error["message"] and "\n" not in error["message"]
            async with http.get(f"http://127.0.0.1:{port}/v1/status") as resp:
                assert resp.status == 200, await resp.text()
                status = await resp.json()
            if targets(status)[a].get("last_outcome") == "failed" or seen.get(503):
                break
            await asyncio.sleep(0.2)
    # The damage was noticed, by the sync or by the reads, and said in one line naming the
    # file. Which notices first depends on who reads a damaged page first: the writer keeps
    # a 16 MiB page cache, so a sync can finish from cache and the WAL before it reads one.
    target = targets(status)[a]
    assert target["last_outcome"] == "failed" or seen.get(503), (target, seen)
    if target["last_outcome"] == "failed":
        assert str(db) in (target["last_error"] or ""), target
        assert "damaged" in target["last_error"], target  # and what to do about it
        failed_runs = [e for e in sync_events(d, a) if e["outcome"] == "failed"]
        assert failed_runs and str(db) in failed_runs[-1]["error"]
    assert d.proc is not None and d.proc.returncode is None  # still up
    assert await d.stop() == 0
    daemon_clean(d)

    # Restored from the backup and restarted: exactly upstream again.
    for suffix in ("", "-wal", "-shm"):
        db.with_name(db.name + suffix).unlink(missing_ok=True)
    shutil.copy(backup, db)
    d2 = await launch(daemons, config, port)
    await converged(d2, a, len(fake.data.images(a)), timeout=60)
    assert await image_ids(port, a) == set(fake.data.images(a))
    assert await d2.stop() == 0
    daemon_clean(d2)
    con = sqlite3.connect(db)
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        con.close()
    store = await Store.open(db, readonly=True)
    try:
        await assert_mirrors(store, fake, a)
    finally:
        await store.close()
