"""The SQLite mirror: one write path, separate read connection, versioned schema.

Every change the sync engine applies gets the next local sequence number; items carry the
sequence number of their latest change and deleted items leave a tombstone carrying theirs, so a
change feed is "items and tombstones with seq > N, in seq order". One upstream answer is written
in one transaction, so a crash or a cancel leaves the mirror at a page boundary.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import sqlite3
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import aiosqlite

T = TypeVar("T")


class StoreError(Exception):
    """A problem with the mirror database, worded for the operator."""


class StoreLocked(StoreError):
    """Another mirrord process is writing this mirror."""


def utc_now() -> str:
    """Timestamps are ISO-8601 UTC text: readable in sqlite3 and they sort as text."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# Each entry migrates the schema from version i to i+1. Never edit a released entry: append.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
    INSERT INTO meta (key, value) VALUES ('last_seq', 0);

    -- One row per mirrored collection: the images of a survey, or the surveys of a field.
    CREATE TABLE collections (
        id INTEGER PRIMARY KEY,
        kind TEXT NOT NULL CHECK (kind IN ('images', 'surveys')),
        parent_id TEXT NOT NULL,
        origin TEXT NOT NULL,
        item_count INTEGER NOT NULL DEFAULT 0,
        remaining_count INTEGER,
        failed_count INTEGER NOT NULL DEFAULT 0,
        last_attempt_at TEXT,
        last_success_at TEXT,
        last_outcome TEXT,
        last_error TEXT,
        last_reconcile_at TEXT,
        dropped_at TEXT,
        UNIQUE (kind, parent_id)
    );

    -- seq is the rowid: the latest change to an item gets the next number, so the change feed
    -- is a range scan and bulk inserts append at the end of the table.
    CREATE TABLE items (
        seq INTEGER PRIMARY KEY,
        collection_id INTEGER NOT NULL REFERENCES collections (id),
        sentera_id TEXT NOT NULL,
        content_hash TEXT NOT NULL,
        data TEXT NOT NULL,
        UNIQUE (collection_id, sentera_id)
    );
    -- No index on sentera_id alone: it would cost every write ~5 µs. A lookup by id probes
    -- the unique index once per collection: `collection_id IN (SELECT id FROM collections)`.

    CREATE TABLE tombstones (
        seq INTEGER PRIMARY KEY,
        collection_id INTEGER NOT NULL REFERENCES collections (id),
        sentera_id TEXT NOT NULL,
        content_hash TEXT NOT NULL,
        deleted_at TEXT NOT NULL,
        UNIQUE (collection_id, sentera_id)
    );

    -- Upstream's `failed` entries, kept until a complete run no longer reports them.
    CREATE TABLE failed_items (
        collection_id INTEGER NOT NULL REFERENCES collections (id),
        key TEXT NOT NULL,
        message TEXT NOT NULL,
        code TEXT,
        reason TEXT,
        details TEXT,
        first_seen_at TEXT NOT NULL,
        last_seen_at TEXT NOT NULL,
        last_run_id INTEGER NOT NULL,
        PRIMARY KEY (collection_id, key)
    );

    CREATE TABLE sync_runs (
        id INTEGER PRIMARY KEY,
        collection_id INTEGER NOT NULL REFERENCES collections (id),
        started_at TEXT NOT NULL,
        finished_at TEXT,
        full_walk INTEGER NOT NULL,
        outcome TEXT,
        pages INTEGER NOT NULL DEFAULT 0,
        upserted INTEGER NOT NULL DEFAULT 0,
        deleted INTEGER NOT NULL DEFAULT 0,
        failed INTEGER NOT NULL DEFAULT 0,
        error TEXT
    );
    CREATE INDEX sync_runs_by_collection ON sync_runs (collection_id, id);
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


class Upsert(NamedTuple):  # a tuple: one is made per item synced, so creation cost matters
    sentera_id: str
    content_hash: str
    data: str  # the item's JSON exactly as upstream sent its fields


@dataclass(frozen=True)
class Failure:
    key: str
    message: str
    code: str | None = None
    reason: str | None = None
    details: Any = None


@dataclass
class PageChanges:
    """What one upstream answer changes in one collection, already decided by the engine."""

    upserts: list[Upsert] = field(default_factory=list)
    new_ids: set[str] = field(default_factory=set)  # upserted ids the collection did not hold
    deletes: list[tuple[str, str]] = field(default_factory=list)  # (sentera_id, held hash)
    failures: list[Failure] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.upserts or self.deletes)


@dataclass(frozen=True)
class CollectionRef:
    id: int
    kind: str
    parent_id: str


@dataclass(frozen=True)
class CollectionStatus:
    kind: str
    parent_id: str
    origin: str
    item_count: int
    remaining_count: int | None
    failed_count: int
    last_attempt_at: str | None
    last_success_at: str | None
    last_outcome: str | None
    last_error: str | None
    last_reconcile_at: str | None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class RunRecord:
    outcome: str
    pages: int
    upserted: int
    deleted: int
    failed: int
    error: str | None
    full_walk: bool


class _Lock:
    """An advisory lock beside the database, so two writers never share one mirror."""

    def __init__(self, db_path: Path) -> None:
        self.path = db_path.with_name(db_path.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise StoreError(
                f"cannot open the mirror's lock file {self.path}: {e.strerror or e} "
                "(mirrord must be able to write the mirror's directory)"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StoreLocked(
                f"another mirrord process (pid {holder}) is writing {self.path.with_suffix('')}; "
                "stop it first, or ask the running daemon to sync"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


class Store:
    """The mirror database. Use `await Store.open(path)`; close with `await store.close()`."""

    def __init__(
        self,
        path: Path,
        writer: aiosqlite.Connection | None,
        reader: aiosqlite.Connection,
        lock: _Lock | None,
    ) -> None:
        self.path = path
        self._writer = writer
        self._reader = reader
        self._lock = lock
        self._write_lock = asyncio.Lock()
        self._last_seq = 0
        self._changed = asyncio.Event()  # set (and replaced) after each commit that changes seq

    # ---- opening and closing ------------------------------------------------------------

    @classmethod
    async def open(cls, path: str | Path, *, readonly: bool = False) -> Store:
        """Open (creating and migrating if needed) the mirror; `readonly` opens for reading only."""
        db_path = Path(path)
        if readonly and not db_path.exists():
            raise StoreError(f"no mirror at {db_path} yet: run `mirrord sync` first")
        lock: _Lock | None = None
        opened: list[aiosqlite.Connection] = []
        try:
            writer = None
            if not readonly:
                try:
                    db_path.parent.mkdir(parents=True, exist_ok=True)
                except OSError as e:
                    raise StoreError(
                        f"cannot create the mirror's directory {db_path.parent}: {e.strerror or e}"
                    ) from None
                lock = _Lock(db_path)
                lock.acquire()
                writer = await _connect(db_path)
                opened.append(writer)
                await _migrate(writer, db_path)
                await _check_writable(writer, db_path)
            reader = await _connect(db_path)
            opened.append(reader)
            await _check_version(reader, db_path)
            await reader.execute("PRAGMA query_only = ON")
            store = cls(db_path, writer, reader, lock)
            store._last_seq = await store._read_last_seq()
            return store
        except BaseException as e:
            # Every connection owns a worker thread: one left open keeps the process alive.
            for db in opened:
                with contextlib.suppress(Exception):
                    await db.close()
            if lock is not None:
                lock.release()
            if isinstance(e, sqlite3.Error):
                raise StoreError(f"cannot open the mirror {db_path}: {e}") from None
            raise

    async def close(self) -> None:
        async with self._write_lock:
            if self._writer is not None:
                await self._writer.close()
                self._writer = None
        await self._reader.close()
        if self._lock is not None:
            self._lock.release()

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---- the write path -----------------------------------------------------------------

    async def collection(self, kind: str, parent_id: str, origin: str) -> CollectionRef:
        """The collection row for (kind, parent), created or revived, with its origin updated."""

        async def work(db: aiosqlite.Connection) -> CollectionRef:
            await db.execute(
                "INSERT INTO collections (kind, parent_id, origin) VALUES (?, ?, ?) "
                "ON CONFLICT (kind, parent_id) DO UPDATE SET origin = excluded.origin, "
                "dropped_at = NULL",
                (kind, parent_id, origin),
            )
            rows = await db.execute_fetchall(
                "SELECT id FROM collections WHERE kind = ? AND parent_id = ?", (kind, parent_id)
            )
            return CollectionRef(int(next(iter(rows))[0]), kind, parent_id)

        return await self._transaction(work)

    async def held_hashes(self, coll: CollectionRef) -> dict[str, str]:
        """sentera_id -> content_hash of every item the collection holds: the sync cursor."""
        db = self._db()
        async with self._write_lock:
            rows = await self._fetch(
                db, "SELECT sentera_id, content_hash FROM items WHERE collection_id = ?", (coll.id,)
            )
        return {sid: chash for sid, chash in rows}

    async def begin_run(self, coll: CollectionRef, *, full_walk: bool) -> int:
        now = utc_now()

        async def work(db: aiosqlite.Connection) -> int:
            await db.execute(
                "UPDATE collections SET last_attempt_at = ? WHERE id = ?", (now, coll.id)
            )
            cur = await db.execute(
                "INSERT INTO sync_runs (collection_id, started_at, full_walk) VALUES (?, ?, ?)",
                (coll.id, now, int(full_walk)),
            )
            assert cur.lastrowid is not None
            return cur.lastrowid

        return await self._transaction(work)

    async def apply_page(
        self,
        coll: CollectionRef,
        run_id: int,
        changes: PageChanges,
        remaining_count: int,
        item_count: int,
    ) -> None:
        """Write one upstream answer's effect in ONE transaction."""
        now = utc_now()

        async def work(db: aiosqlite.Connection) -> None:
            seq = self._last_seq
            if changes.upserts:
                rows = []
                for up in changes.upserts:
                    seq += 1
                    rows.append((seq, coll.id, up.sentera_id, up.content_hash, up.data))
                await db.executemany(
                    "INSERT INTO items (seq, collection_id, sentera_id, content_hash, data) "
                    "VALUES (?, ?, ?, ?, ?) ON CONFLICT (collection_id, sentera_id) "
                    "DO UPDATE SET seq = excluded.seq, content_hash = excluded.content_hash, "
                    "data = excluded.data",
                    rows,
                )
            if changes.new_ids and await self._has_tombstones(db, coll):
                await db.executemany(
                    "DELETE FROM tombstones WHERE collection_id = ? AND sentera_id = ?",
                    [(coll.id, sid) for sid in changes.new_ids],
                )
            if changes.deletes:
                seq = await self._write_deletes(db, coll, changes.deletes, seq, now)
            if changes.failures:
                await self._write_failures(db, coll, run_id, changes.failures, now)
            await db.execute(
                "UPDATE collections SET remaining_count = ?, item_count = ? WHERE id = ?",
                (remaining_count, item_count, coll.id),
            )
            await db.execute(
                "UPDATE sync_runs SET pages = pages + 1, upserted = upserted + ?, "
                "deleted = deleted + ? WHERE id = ?",
                (len(changes.upserts), len(changes.deletes), run_id),
            )
            await db.execute("UPDATE meta SET value = ? WHERE key = 'last_seq'", (seq,))
            self._last_seq = seq

        await self._transaction(work)

    async def _has_tombstones(self, db: aiosqlite.Connection, coll: CollectionRef) -> bool:
        rows = await db.execute_fetchall(
            "SELECT 1 FROM tombstones WHERE collection_id = ? LIMIT 1", (coll.id,)
        )
        return bool(rows)

    async def _write_deletes(
        self,
        db: aiosqlite.Connection,
        coll: CollectionRef,
        deletes: Sequence[tuple[str, str]],
        seq: int,
        now: str,
    ) -> int:
        stones = []
        for sid, chash in deletes:
            seq += 1
            stones.append((seq, coll.id, sid, chash, now))
        await db.executemany(
            "DELETE FROM items WHERE collection_id = ? AND sentera_id = ?",
            [(coll.id, sid) for sid, _ in deletes],
        )
        await db.executemany(
            "INSERT INTO tombstones (seq, collection_id, sentera_id, content_hash, deleted_at) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (collection_id, sentera_id) DO UPDATE SET "
            "seq = excluded.seq, content_hash = excluded.content_hash, "
            "deleted_at = excluded.deleted_at",
            stones,
        )
        return seq

    async def _write_failures(
        self,
        db: aiosqlite.Connection,
        coll: CollectionRef,
        run_id: int,
        failures: Iterable[Failure],
        now: str,
    ) -> None:
        await db.executemany(
            "INSERT INTO failed_items (collection_id, key, message, code, reason, details, "
            "first_seen_at, last_seen_at, last_run_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (collection_id, key) DO UPDATE SET message = excluded.message, "
            "code = excluded.code, reason = excluded.reason, details = excluded.details, "
            "last_seen_at = excluded.last_seen_at, last_run_id = excluded.last_run_id",
            [
                (
                    coll.id,
                    f.key,
                    f.message,
                    f.code,
                    f.reason,
                    None if f.details is None else json.dumps(f.details),
                    now,
                    now,
                    run_id,
                )
                for f in failures
            ],
        )

    async def delete_items(
        self, coll: CollectionRef, run_id: int, gone: Sequence[tuple[str, str]]
    ) -> int:
        """Delete these (sentera_id, content_hash) items, leaving tombstones, in one transaction."""
        if not gone:
            return 0
        now = utc_now()

        async def work(db: aiosqlite.Connection) -> int:
            seq = await self._write_deletes(db, coll, gone, self._last_seq, now)
            await db.execute(
                "UPDATE collections SET item_count = item_count - ? WHERE id = ?",
                (len(gone), coll.id),
            )
            await db.execute(
                "UPDATE sync_runs SET deleted = deleted + ? WHERE id = ?", (len(gone), run_id)
            )
            await db.execute("UPDATE meta SET value = ? WHERE key = 'last_seq'", (seq,))
            self._last_seq = seq
            return len(gone)

        return await self._transaction(work)

    async def finish_run(self, coll: CollectionRef, run_id: int, run: RunRecord) -> None:
        """Close the run's record and the collection's status; a complete run also clears
        `failed` entries upstream no longer reports."""
        now = utc_now()
        complete = run.outcome in ("converged", "partial")

        async def work(db: aiosqlite.Connection) -> None:
            if complete:
                await db.execute(
                    "DELETE FROM failed_items WHERE collection_id = ? AND last_run_id != ?",
                    (coll.id, run_id),
                )
            await db.execute(
                "UPDATE sync_runs SET finished_at = ?, outcome = ?, failed = ?, error = ? "
                "WHERE id = ?",
                (now, run.outcome, run.failed, run.error, run_id),
            )
            success = run.outcome == "converged"
            await db.execute(
                "UPDATE collections SET last_outcome = ?, last_error = ?, "
                "failed_count = (SELECT count(*) FROM failed_items WHERE collection_id = ?), "
                "last_success_at = CASE WHEN ? THEN ? ELSE last_success_at END, "
                "last_reconcile_at = CASE WHEN ? THEN ? ELSE last_reconcile_at END "
                "WHERE id = ?",
                (
                    run.outcome,
                    run.error,
                    coll.id,
                    success,
                    now,
                    complete and run.full_walk,
                    now,
                    coll.id,
                ),
            )

        await self._transaction(work)

    async def drop_collection(self, coll: CollectionRef) -> int:
        """Delete every item of a collection (leaving tombstones) and hide it from status."""
        run_id = await self.begin_run(coll, full_walk=False)
        held = await self.held_hashes(coll)
        dropped = await self.delete_items(coll, run_id, list(held.items()))

        async def work(db: aiosqlite.Connection) -> None:
            await db.execute("DELETE FROM failed_items WHERE collection_id = ?", (coll.id,))
            await db.execute(
                "UPDATE sync_runs SET finished_at = ?, outcome = 'dropped' WHERE id = ?",
                (utc_now(), run_id),
            )
            await db.execute(
                "UPDATE collections SET dropped_at = ?, item_count = 0, failed_count = 0 "
                "WHERE id = ?",
                (utc_now(), coll.id),
            )

        await self._transaction(work)
        return dropped

    async def _transaction(self, work: Callable[[aiosqlite.Connection], Awaitable[T]]) -> T:
        """Run `work` in one IMMEDIATE transaction on the write connection.

        The transaction runs in its own task behind a shield: cancelling the caller (Ctrl-C,
        SIGTERM, a test) lets it commit or roll back whole instead of leaving it open.
        """
        db = self._db()

        async def run() -> T:
            async with self._write_lock:
                saved_seq = self._last_seq
                await db.execute("BEGIN IMMEDIATE")
                try:
                    result = await work(db)
                    await db.execute("COMMIT")
                    if self._last_seq != saved_seq:
                        self._announce_change()
                except BaseException:
                    self._last_seq = saved_seq
                    with contextlib.suppress(sqlite3.Error):
                        await db.execute("ROLLBACK")
                    raise
                return result

        task = asyncio.ensure_future(run())
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            with contextlib.suppress(BaseException):
                await task
            raise
        except sqlite3.Error as e:
            hint = ""
            name = getattr(e, "sqlite_errorname", "")
            if name == "SQLITE_BUSY":
                hint = " (another program holds a write lock on it)"
            elif _damaged(e):
                hint = DAMAGED
            elif name.startswith("SQLITE_IOERR"):
                hint = " (writing to the disk failed: is it full, or read-only?)"
            raise StoreError(f"cannot write the mirror {self.path}: {e}{hint}") from None

    def _announce_change(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def wait_for_change(self, after_seq: int, timeout: float) -> bool:
        """Wait until the mirror holds a change with seq > after_seq (a long-poll); True if it
        does, False when `timeout` passed first. Only sees this process's own writes."""
        changed = self._changed
        if await self._read_last_seq() > after_seq:
            return True
        try:
            await asyncio.wait_for(changed.wait(), timeout)
        except TimeoutError:
            return await self._read_last_seq() > after_seq
        return True

    def _db(self) -> aiosqlite.Connection:
        if self._writer is None:
            raise StoreError(f"the mirror {self.path} is open read-only")
        return self._writer

    async def _read_last_seq(self) -> int:
        rows = await self._fetch(self._reader, "SELECT value FROM meta WHERE key = 'last_seq'")
        return int(rows[0][0])

    async def _fetch(
        self, db: aiosqlite.Connection, sql: str, params: Sequence[Any] = ()
    ) -> list[Any]:
        """Rows of a query; a file that fails (corrupted, cut short, I/O errors) raises
        StoreError, worded for the operator, so the daemon and the API can say so."""
        try:
            return list(await db.execute_fetchall(sql, params))
        except sqlite3.OperationalError as e:
            if "syntax error" in str(e) or "no such column" in str(e):
                raise  # a bug in the query, not a problem with the file
            hint = DAMAGED if _damaged(e) else ""
            raise StoreError(f"cannot read the mirror {self.path}: {e}{hint}") from None
        except sqlite3.DatabaseError as e:
            hint = DAMAGED if _damaged(e) else ""
            raise StoreError(f"cannot read the mirror {self.path}: {e}{hint}") from None

    # ---- the read path (never waits on a sync: WAL + its own connection) -------------------

    _STATUS_COLUMNS = (
        "kind, parent_id, origin, item_count, remaining_count, failed_count, last_attempt_at, "
        "last_success_at, last_outcome, last_error, last_reconcile_at"
    )

    async def statuses(self) -> list[CollectionStatus]:
        rows = await self._fetch(
            self._reader,
            f"SELECT {self._STATUS_COLUMNS} FROM collections WHERE dropped_at IS NULL "
            "ORDER BY kind DESC, parent_id",
        )
        return [CollectionStatus(*row) for row in rows]

    async def status(self, coll: CollectionRef) -> CollectionStatus:
        rows = await self._fetch(
            self._reader, f"SELECT {self._STATUS_COLUMNS} FROM collections WHERE id = ?", (coll.id,)
        )
        return CollectionStatus(*next(iter(rows)))

    async def items(self, kind: str, parent_id: str) -> dict[str, tuple[str, dict[str, Any]]]:
        """sentera_id -> (content_hash, item) for one collection."""
        rows = await self._fetch(
            self._reader,
            "SELECT i.sentera_id, i.content_hash, i.data FROM items i "
            "JOIN collections c ON c.id = i.collection_id WHERE c.kind = ? AND c.parent_id = ?",
            (kind, parent_id),
        )
        return {sid: (chash, json.loads(data)) for sid, chash, data in rows}

    async def item_ids(self, kind: str, parent_id: str) -> list[str]:
        rows = await self._fetch(
            self._reader,
            "SELECT i.sentera_id FROM items i JOIN collections c ON c.id = i.collection_id "
            "WHERE c.kind = ? AND c.parent_id = ? ORDER BY i.sentera_id",
            (kind, parent_id),
        )
        return [row[0] for row in rows]

    async def find_collection(self, kind: str, parent_id: str) -> CollectionRef | None:
        rows = await self._fetch(
            self._reader,
            "SELECT id FROM collections WHERE kind = ? AND parent_id = ? AND dropped_at IS NULL",
            (kind, parent_id),
        )
        found = list(rows)
        return CollectionRef(int(found[0][0]), kind, parent_id) if found else None

    async def collections_from(self, origin: str) -> list[CollectionRef]:
        rows = await self._fetch(
            self._reader,
            "SELECT id, kind, parent_id FROM collections WHERE origin = ? AND dropped_at IS NULL",
            (origin,),
        )
        return [CollectionRef(int(i), k, p) for i, k, p in rows]

    async def failures(self, kind: str, parent_id: str) -> list[Failure]:
        rows = await self._fetch(
            self._reader,
            "SELECT f.key, f.message, f.code, f.reason, f.details FROM failed_items f "
            "JOIN collections c ON c.id = f.collection_id WHERE c.kind = ? AND c.parent_id = ? "
            "ORDER BY f.key",
            (kind, parent_id),
        )
        return [Failure(k, m, c, r, None if d is None else json.loads(d)) for k, m, c, r, d in rows]

    async def last_seq(self) -> int:
        return await self._read_last_seq()

    async def read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run a read-only query on the read connection (the HTTP views' queries). The
        connection is `query_only`, so a view can never write; always pass values as params."""
        rows = await self._fetch(self._reader, sql, params)
        return [tuple(row) for row in rows]


DAMAGED = (
    " (the file is damaged: stop mirrord, then restore a backup or delete the file to mirror "
    "again from upstream)"
)


def _damaged(e: sqlite3.Error) -> bool:
    """The file is not what SQLite wrote: corrupted, cut short, or not a database at all."""
    name = getattr(e, "sqlite_errorname", "")
    return (
        name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB", "SQLITE_IOERR_SHORT_READ"))
        or "malformed" in str(e)
        or "no such table" in str(e)
    )


async def _connect(path: Path) -> aiosqlite.Connection:
    # isolation_level=None: we issue BEGIN/COMMIT ourselves, so a transaction is exactly a page.
    db = await aiosqlite.connect(path, isolation_level=None)
    try:
        await db.execute("PRAGMA busy_timeout = 10000")
        await db.execute("PRAGMA foreign_keys = ON")
    except BaseException:
        await db.close()
        raise
    return db


async def _schema_version(db: aiosqlite.Connection) -> int:
    rows = await db.execute_fetchall("PRAGMA user_version")
    return int(next(iter(rows))[0])


async def _check_version(db: aiosqlite.Connection, path: Path) -> None:
    version = await _schema_version(db)
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"the mirror {path} has schema version {version}, newer than this mirrord "
            f"understands ({SCHEMA_VERSION}): upgrade mirrord"
        )
    if version < SCHEMA_VERSION:
        raise StoreError(f"the mirror {path} is not initialised yet: run `mirrord sync` first")


async def _migrate(db: aiosqlite.Connection, path: Path) -> None:
    # 16 KiB pages: items are ~1 KB of JSON, and bigger pages mean a quarter of the write
    # syscalls (only takes effect on a new database). WAL: readers never wait on the writer.
    # synchronous=FULL: a committed page survives a power cut (one fsync per answer is cheap
    # next to the answer's network round trip).
    await db.execute("PRAGMA page_size = 16384")
    await db.execute("PRAGMA journal_mode = WAL")
    await db.execute("PRAGMA synchronous = FULL")
    version = await _schema_version(db)
    if version > SCHEMA_VERSION:
        await _check_version(db, path)
    for target in range(version + 1, SCHEMA_VERSION + 1):
        script = MIGRATIONS[target - 1]
        await db.execute("BEGIN IMMEDIATE")
        try:
            for statement in _statements(script):
                await db.execute(statement)
            await db.execute(f"PRAGMA user_version = {target}")
            await db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                await db.execute("ROLLBACK")
            raise


async def _check_writable(db: aiosqlite.Connection, path: Path) -> None:
    """SQLite opens a file it may not write read-only and only fails at the first write: find
    out now (file mode, `chattr +i`, a read-only filesystem), not at every sync."""
    await db.execute("BEGIN IMMEDIATE")
    try:
        await db.execute("UPDATE meta SET value = value WHERE 0")
    except sqlite3.Error as e:
        if getattr(e, "sqlite_errorname", "") != "SQLITE_READONLY":
            raise
        raise StoreError(
            f"the mirror {path} is read-only (its file mode or attributes, or a read-only "
            "filesystem): mirrord must be able to write it"
        ) from None
    finally:
        with contextlib.suppress(sqlite3.Error):
            await db.execute("ROLLBACK")


def _statements(script: str) -> list[str]:
    """Split a migration into statements (executescript would commit on its own)."""
    statements, buffer = [], ""
    for line in script.splitlines(keepends=True):
        if line.strip().startswith("--"):
            continue
        buffer += line
        if sqlite3.complete_statement(buffer):
            statements.append(buffer.strip())
            buffer = ""
    return [s for s in statements if s]
