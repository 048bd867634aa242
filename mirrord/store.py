"""The SQLite mirror: one write path, separate read connections, versioned schema.

Reads never wait on a write (WAL): `read` runs a query on the reader thread's connection,
`read_point` a bounded one (a unique-index lookup) at once on the caller's thread, on a
connection of its own.

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
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple, TypeVar, cast

import aiosqlite
import msgspec

from mirrord.durable import write_private_atomic

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
    """
    -- 1 while the collection's config says files = "all".
    ALTER TABLE collections ADD COLUMN files INTEGER NOT NULL DEFAULT 0;

    -- The image files: one row per held image of a collection with files on, written in the
    -- same transaction as the item, so the download queue survives a crash or a power cut.
    -- A row whose item is deleted (or whose collection stops wanting files) turns 'gone' in
    -- that transaction; the downloader then removes the file and the row.
    CREATE TABLE files (
        collection_id INTEGER NOT NULL REFERENCES collections (id),
        sentera_id TEXT NOT NULL,
        content_hash TEXT NOT NULL,  -- the version of the item the file belongs to
        size INTEGER,  -- bytes, as upstream's metadata says (NULL: not given)
        url TEXT,  -- the newest signed download URL: it expires (about 60 minutes)
        url_seen_at REAL NOT NULL DEFAULT 0,  -- unix time that URL arrived
        state TEXT NOT NULL CHECK (state IN ('pending', 'done', 'failed', 'expired', 'gone')),
        bytes INTEGER NOT NULL DEFAULT 0,  -- size of the complete file on disk, if any
        content_type TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,  -- failed tries at this version
        reason TEXT,  -- why the last try failed
        updated_at TEXT NOT NULL,
        PRIMARY KEY (collection_id, sentera_id)
    );
    CREATE INDEX files_by_state ON files (state);
    """,
    """
    -- Change-feed positions this database never held, or no longer holds: found at open
    -- (see Store._claim_seqs). A client at one of them must start the feed again.
    CREATE TABLE feed_gaps (
        after_seq INTEGER NOT NULL,  -- the database's last seq when the gap was found
        through_seq INTEGER NOT NULL,  -- the highest seq it may have given out before
        found_at TEXT NOT NULL
    );
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)

# The write connection's page cache. A page of upserts inserts 1,000 random sentera_ids into
# the (collection_id, sentera_id) index, touching most of a large collection's index pages:
# with SQLite's default 2 MiB those are read back from the file at every page once the index
# outgrows it (a 100,000-image survey's is ~8 MiB), which cost ~2.5 µs per image synced. The
# cache only grows as pages are used.
WRITER_CACHE_KIB = 16 * 1024
READER_CACHE_KIB = 32 * 1024
# Item texts the list pages keep in memory (Store.item_prefixes), in bytes, with each entry's
# own overhead counted: a 20,000-image survey's texts take about 21 MiB.
ITEM_CACHE_BYTES = 32 * 1024 * 1024
# An entry's bytes besides its text (the key, the bytes object, the slot): ~155 measured.
_ENTRY_OVERHEAD = 160
_SEQ_BATCHES = (16, 128, 1024, 32_766)  # item_prefixes' statement sizes: few cached statements
_FILES_PER_STATEMENT = 500  # 5 parameters each: far below SQLite's 32,766
_UNKNOWN = object()  # not in a cache
_MAX_REMEMBERED = 4096  # survey ids whose collection id a store remembers


@dataclass
class ItemCacheStats:
    """What Store.item_prefixes keeps in memory, and how often it was enough."""

    kept_bytes: int = 0  # texts and their entries' overhead, at most the store's budget
    hits: int = 0  # item texts a list page found kept
    misses: int = 0  # item texts it had to read from the database


class Upsert(msgspec.Struct, gc=False):
    """An item to store. One is made per item synced, so it is a msgspec Struct: the upstream
    client decodes each upserted item straight into one (mirrord.upstream), and gc=False (it
    holds strings only) keeps 100,000 of them out of the cyclic garbage collector's walks."""

    sentera_id: str
    content_hash: str
    data: str  # the item's JSON text, exactly as upstream sent it


class FileWant(NamedTuple):
    """An upserted image whose file is wanted: the version, and where to fetch it."""

    sentera_id: str
    content_hash: str
    size: int | None
    url: str | None


@dataclass(frozen=True)
class FileJob:
    """A file to download: one pending row of the `files` table."""

    collection_id: int
    sentera_id: str
    content_hash: str
    size: int | None
    url: str | None
    url_seen_at: float
    attempts: int

    @property
    def key(self) -> tuple[int, str]:
        return self.collection_id, self.sentera_id


@dataclass(frozen=True)
class FileTally:
    """File counts and bytes of one collection (or of all of them)."""

    pending: int = 0
    done: int = 0
    failed: int = 0
    expired: int = 0
    bytes_done: int = 0
    bytes_wanted: int = 0  # what every wanted file adds up to, by upstream's sizes

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


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
    files: list[FileWant] = field(default_factory=list)  # only in collections with files on

    @property
    def changed(self) -> bool:
        return bool(self.upserts or self.deletes)


@dataclass(frozen=True)
class CollectionRef:
    id: int
    kind: str
    parent_id: str
    files: bool = False  # its image files are mirrored too


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


# Sequence numbers the mark file (_SeqMark) reserves at a time: it is rewritten once per this
# many changes, and a crash makes the next seq jump by at most this much.
SEQ_RESERVE = 1_000_000


class _SeqMark:
    """A file beside the database, `<db>.seq`: how far the database may have given out
    sequence numbers. It lives outside the database so that it outlives it: a database
    restored from an older copy (or recreated) comes back with a lower last seq than clients
    of its change feed may have seen, and the mark is how the store finds out (_claim_seqs).
    Written ahead (SEQ_RESERVE at a time) before a commit passes it, and exactly at a clean
    close, so a clean restart finds no gap."""

    def __init__(self, db_path: Path) -> None:
        self.path = db_path.with_name(db_path.name + ".seq")

    def read(self) -> int | None:
        """The mark; None if there is none, or it is unreadable (then nothing can be told)."""
        try:
            text = self.path.read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError):
            return None
        return int(text) if text.strip().isdigit() else None

    def write(self, seq: int) -> None:
        """Replace the mark, durably (a crash leaves the old mark or the new one)."""
        try:
            write_private_atomic(self.path, f"{seq}\n".encode())
        except OSError as e:
            raise StoreError(
                f"cannot write {self.path}, which records the mirror's change-feed position: "
                f"{e.strerror or e} (mirrord must be able to write the mirror's directory)"
            ) from None


class Store:
    """The mirror database. Use `await Store.open(path)`; close with `await store.close()`."""

    def __init__(
        self,
        path: Path,
        writer: aiosqlite.Connection | None,
        reader: aiosqlite.Connection,
        lock: _Lock | None,
        point: sqlite3.Connection | None = None,
        item_cache_bytes: int = ITEM_CACHE_BYTES,
    ) -> None:
        self.path = path
        self._writer = writer
        self._reader = reader
        self._point = point  # bounded reads on the caller's thread: see read_point
        # seq (as text) -> item text without its closing brace: see item_prefixes
        self._prefixes: OrderedDict[str, bytes] = OrderedDict()
        self._item_cache_bytes = item_cache_bytes
        self.item_cache = ItemCacheStats()
        self._lock = lock
        # survey id -> the id of its images collection (None: not held), while this process
        # owns the only writer (see survey_collection_id).
        self._survey_collections: dict[str, int | None] = {}
        self._image_collections: list[int] | None = None
        self._collections_version = 0  # bumped by every write that may change collections
        self._write_lock = asyncio.Lock()
        self._last_seq = 0
        self._mark = _SeqMark(path) if writer is not None else None
        self._reserved = 0  # the mark file's value: no seq past it may be committed
        self._feed_gaps: list[tuple[int, int]] = []  # (after, through]: see lost_position
        self._changed = asyncio.Event()  # set (and replaced) after each commit that changes seq
        self._waking = False  # the server is stopping: long-polls answer at once

    # ---- opening and closing ------------------------------------------------------------

    @classmethod
    async def open(
        cls, path: str | Path, *, readonly: bool = False, item_cache_bytes: int = ITEM_CACHE_BYTES
    ) -> Store:
        """Open (creating and migrating if needed) the mirror; `readonly` opens for reading only.
        `item_cache_bytes` bounds the item texts kept in memory (see item_prefixes)."""
        db_path = Path(path)
        if readonly and not db_path.exists():
            raise StoreError(f"no mirror at {db_path} yet: run `mirrord sync` first")
        lock: _Lock | None = None
        opened: list[aiosqlite.Connection] = []
        point: sqlite3.Connection | None = None
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
                await writer.execute(f"PRAGMA cache_size = -{WRITER_CACHE_KIB}")
            reader = await _connect(db_path)
            opened.append(reader)
            await _check_version(reader, db_path)
            await reader.execute("PRAGMA query_only = ON")
            await reader.execute(f"PRAGMA cache_size = -{READER_CACHE_KIB}")
            point = _connect_point(db_path)
            store = cls(db_path, writer, reader, lock, point, item_cache_bytes)
            store._last_seq = await store._read_last_seq()
            if writer is not None:
                await store._claim_seqs()
            return store
        except BaseException as e:
            # Every connection owns a worker thread: one left open keeps the process alive.
            for db in opened:
                with contextlib.suppress(Exception):
                    await db.close()
            if point is not None:
                point.close()
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
                if self._mark is not None and self._reserved:
                    # Exactly where the feed is: the next open then finds no gap. Should this
                    # fail, the reservation stands, and the next open skips past it.
                    with contextlib.suppress(StoreError):
                        await asyncio.to_thread(self._mark.write, self._last_seq)
        await self._reader.close()
        if self._point is not None:
            self._point.close()
            self._point = None
        if self._lock is not None:
            self._lock.release()

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---- the write path -----------------------------------------------------------------

    async def collection(
        self, kind: str, parent_id: str, origin: str, *, files: bool = False
    ) -> CollectionRef:
        """The collection row for (kind, parent), created or revived, with its origin and
        files setting updated. Turning files on queues every held image; turning them off
        marks every file gone (the downloader removes them)."""
        now = utc_now()

        async def work(db: aiosqlite.Connection) -> CollectionRef:
            rows = await db.execute_fetchall(
                "SELECT id, files FROM collections WHERE kind = ? AND parent_id = ?",
                (kind, parent_id),
            )
            before = next(iter(rows), None)
            await db.execute(
                "INSERT INTO collections (kind, parent_id, origin, files) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (kind, parent_id) DO UPDATE SET origin = excluded.origin, "
                "files = excluded.files, dropped_at = NULL",
                (kind, parent_id, origin, int(files)),
            )
            rows = await db.execute_fetchall(
                "SELECT id FROM collections WHERE kind = ? AND parent_id = ?", (kind, parent_id)
            )
            ref = CollectionRef(int(next(iter(rows))[0]), kind, parent_id, files)
            if before is not None and bool(before[1]) != files:
                await (_queue_all_files(db, ref, now) if files else _drop_all_files(db, ref, now))
            return ref

        try:
            return await self._transaction(work)
        finally:
            self._collections_changed()

    async def held_hashes(self, coll: CollectionRef) -> dict[str, str]:
        """sentera_id -> content_hash of every item the collection holds: the sync cursor."""
        db = self._db()
        async with self._write_lock:
            # The rows by ascending seq (the IN list is a sorted b-tree), not in index order: a
            # large collection's rows are then read page by page, not one random page per row
            # (0.2 s instead of 0.6-0.8 s for 100,000 images).
            rows = await self._fetch(
                db,
                "SELECT sentera_id, content_hash FROM items "
                "WHERE seq IN (SELECT seq FROM items WHERE collection_id = ?)",
                (coll.id,),
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
            if changes.files:
                await _want_files(db, coll, changes.files, now)
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
        if coll.files:
            await db.executemany(
                "UPDATE files SET state = 'gone', updated_at = ? "
                "WHERE collection_id = ? AND sentera_id = ?",
                [(now, coll.id, sid) for sid, _ in deletes],
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
            await _drop_all_files(db, coll, utc_now())
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

        try:
            await self._transaction(work)
        finally:
            self._collections_changed()
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
                    if self._last_seq > self._reserved and self._mark is not None:
                        await self._reserve(self._last_seq)
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

    # ---- image files (the downloader's bookkeeping; same write path) -----------------------

    async def stale_file_ids(self, coll: CollectionRef, url_older_than: float) -> set[str]:
        """Images whose file still needs fetching but whose URL is expired, failed or too old
        to trust: the engine leaves their hashes out of the next sync so upstream re-sends
        them, with fresh URLs."""
        if not coll.files:
            return set()
        rows = await self._fetch(
            self._reader,
            "SELECT sentera_id FROM files WHERE collection_id = ? AND (state IN "
            "('expired', 'failed') OR (state = 'pending' AND url_seen_at < ?))",
            (coll.id, url_older_than),
        )
        return {row[0] for row in rows}

    async def file_jobs(self, limit: int, not_before: float) -> list[FileJob]:
        """Pending files whose URL arrived after `not_before`, freshest URL first (the older
        ones are the likelier to expire before their turn)."""
        rows = await self._fetch(
            self._reader,
            "SELECT f.collection_id, f.sentera_id, f.content_hash, f.size, f.url, "
            "f.url_seen_at, f.attempts FROM files f JOIN collections c ON c.id = f.collection_id "
            "WHERE f.state = 'pending' AND c.files = 1 AND f.url IS NOT NULL "
            "AND f.url_seen_at >= ? ORDER BY f.url_seen_at DESC LIMIT ?",
            (not_before, limit),
        )
        return [FileJob(*row) for row in rows]

    async def files_to_remove(self) -> list[tuple[int, str, str]]:
        """(collection_id, sentera_id, state) of rows whose file on disk must go: rows 'gone',
        and rows holding an out-of-date version's file (bytes > 0 but not done)."""
        rows = await self._fetch(
            self._reader,
            "SELECT collection_id, sentera_id, state FROM files "
            "WHERE state = 'gone' OR (state != 'done' AND bytes > 0)",
        )
        return [(int(c), s, st) for c, s, st in rows]

    async def file_removed(self, collection_id: int, sentera_id: str) -> None:
        """The file is off the disk: forget a gone row, zero the bytes of any other."""

        async def work(db: aiosqlite.Connection) -> None:
            await db.execute(
                "DELETE FROM files WHERE collection_id = ? AND sentera_id = ? AND state = 'gone'",
                (collection_id, sentera_id),
            )
            await db.execute(
                "UPDATE files SET bytes = 0 WHERE collection_id = ? AND sentera_id = ? "
                "AND state != 'done'",
                (collection_id, sentera_id),
            )

        await self._transaction(work)

    async def files_done(self, done: Sequence[tuple[FileJob, int, str | None]]) -> list[bool]:
        """The files of these jobs' versions are in place (job, size, content_type), recorded
        in one transaction. Per job, False when the row moved on meanwhile (a newer version
        or a delete): the row then keeps `bytes` so the file gets removed."""
        now = utc_now()
        jobs = list(done)

        async def work(db: aiosqlite.Connection) -> list[bool]:
            current: set[tuple[int, str]] = set()
            for start in range(0, len(jobs), _FILES_PER_STATEMENT):
                part = jobs[start : start + _FILES_PER_STATEMENT]
                values = ", ".join(["(?, ?, ?, ?, ?)"] * len(part))
                params: list[object] = [now]
                for job, size, content_type in part:
                    params += [*job.key, job.content_hash, size, content_type]
                # One statement for the lot: a round trip to the database thread per file
                # would cost more than the update itself.
                rows = await db.execute_fetchall(
                    "UPDATE files SET bytes = v.column4, content_type = v.column5, "
                    "updated_at = ?, reason = NULL, state = CASE WHEN "
                    "files.content_hash = v.column3 AND files.state = 'pending' THEN 'done' "
                    f"ELSE files.state END FROM (VALUES {values}) AS v "
                    "WHERE files.collection_id = v.column1 AND files.sentera_id = v.column2 "
                    "RETURNING collection_id, sentera_id, state",
                    params,
                )
                current.update((int(c), s) for c, s, state in rows if state == "done")
            return [job.key in current for job, _, _ in jobs]

        return await self._transaction(work)

    async def file_failed(self, job: FileJob, state: str, reason: str) -> None:
        """A try at `job` failed: `state` is 'pending' (try again), 'expired' or 'failed'."""

        async def work(db: aiosqlite.Connection) -> None:
            await db.execute(
                "UPDATE files SET state = ?, reason = ?, attempts = attempts + 1, updated_at = ? "
                "WHERE collection_id = ? AND sentera_id = ? AND content_hash = ? "
                "AND state = 'pending'",
                (state, reason, utc_now(), job.collection_id, job.sentera_id, job.content_hash),
            )

        await self._transaction(work)

    async def file_rows(self) -> list[tuple[int, str, str, int, int | None]]:
        """(collection_id, sentera_id, state, bytes, size) of every file row: for `verify`."""
        rows = await self._fetch(
            self._reader, "SELECT collection_id, sentera_id, state, bytes, size FROM files"
        )
        return [(int(c), s, st, int(b), z) for c, s, st, b, z in rows]

    async def requeue_file(self, collection_id: int, sentera_id: str, reason: str) -> None:
        """A done file is missing or wrong on disk: fetch it again (with a fresh URL)."""

        async def work(db: aiosqlite.Connection) -> None:
            await db.execute(
                "UPDATE files SET state = 'expired', bytes = 0, reason = ?, updated_at = ? "
                "WHERE collection_id = ? AND sentera_id = ? AND state = 'done'",
                (reason, utc_now(), collection_id, sentera_id),
            )

        await self._transaction(work)

    async def file_tallies(self) -> dict[str, FileTally]:
        """survey id -> the file counts of its images, for surveys with files on."""
        rows = await self._fetch(
            self._reader,
            "SELECT c.parent_id, "
            "sum(f.state = 'pending'), sum(f.state = 'done'), sum(f.state = 'failed'), "
            "sum(f.state = 'expired'), sum(CASE WHEN f.state = 'done' THEN f.bytes ELSE 0 END), "
            "sum(coalesce(f.size, 0)) FROM files f JOIN collections c ON c.id = f.collection_id "
            "WHERE f.state != 'gone' AND c.files = 1 AND c.dropped_at IS NULL "
            "GROUP BY c.parent_id",
        )
        return {str(row[0]): FileTally(*(int(v or 0) for v in row[1:])) for row in rows}

    async def bytes_on_disk(self) -> int:
        """Bytes of every complete file the mirror keeps on disk (out-of-date ones too)."""
        rows = await self._fetch(self._reader, "SELECT coalesce(sum(bytes), 0) FROM files")
        return int(next(iter(rows))[0])

    def _announce_change(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def wait_for_change(self, after_seq: int, timeout: float) -> bool:
        """Wait until the mirror holds a change with seq > after_seq (a long-poll); True if it
        does, False when `timeout` passed first. Only sees this process's own writes."""
        changed = self._changed
        if await self._read_last_seq() > after_seq or self._waking:
            return True
        try:
            await asyncio.wait_for(changed.wait(), timeout)
        except TimeoutError:
            return await self._read_last_seq() > after_seq
        return True

    def wake_waiters(self) -> None:
        """The server is stopping: every long-poll waiting in wait_for_change, now or later,
        returns at once (and answers what there is) instead of holding the stop up."""
        self._waking = True
        self._announce_change()

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
        except sqlite3.DatabaseError as e:
            raise self._read_error(e) from None

    def _read_error(self, e: sqlite3.DatabaseError) -> Exception:
        """What a failed read raises: StoreError for a file that fails (corrupted, cut short,
        I/O errors), the error itself for a bug in the query."""
        if isinstance(e, sqlite3.OperationalError) and (
            "syntax error" in str(e) or "no such column" in str(e)
        ):
            return e  # a bug in the query, not a problem with the file
        hint = DAMAGED if _damaged(e) else ""
        return StoreError(f"cannot read the mirror {self.path}: {e}{hint}")

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
            "SELECT id, files FROM collections "
            "WHERE kind = ? AND parent_id = ? AND dropped_at IS NULL",
            (kind, parent_id),
        )
        found = next(iter(rows), None)
        if found is None:
            return None
        return CollectionRef(int(found[0]), kind, parent_id, bool(found[1]))

    async def collections_from(self, origin: str) -> list[CollectionRef]:
        rows = await self._fetch(
            self._reader,
            "SELECT id, kind, parent_id, files FROM collections "
            "WHERE origin = ? AND dropped_at IS NULL",
            (origin,),
        )
        return [CollectionRef(int(i), k, p, bool(f)) for i, k, p, f in rows]

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

    def lost_position(self, since: int, name: str = "since") -> str | None:
        """Why a client at change-feed position `since` (the parameter `name`) cannot go on
        from it (None if it can): the position is past everything this mirror holds, or in a
        gap _claim_seqs found. Either way the mirror's history is no longer the one the client
        followed, so it must start again; a changes feed that just went on would skip what
        differs."""
        if since > self._last_seq:
            return (
                f"{name}={since} is past this mirror's last change ({self._last_seq}): it was "
                f"restored from an older copy or started afresh; start again from {name}=0"
            )
        for after, through in self._feed_gaps:
            if after < since <= through:
                return (
                    f"{name}={since} is a position this mirror no longer holds (it was "
                    f"restored from an older copy or started afresh after change {after}); "
                    f"start again from {name}=0"
                )
        return None

    async def _claim_seqs(self) -> None:
        """At open, with the writer: compare the database's last seq with the mark file's.
        A mark past it means seqs up to the mark may have been given out by a state of the
        mirror this database no longer holds (restored from a backup, recreated, or only a
        crash between reserving and using them): those positions become a gap, and the
        database's seqs go on past the mark, so that no seq ever means two things."""
        assert self._mark is not None
        mark = self._mark.read()
        if mark is not None:
            self._reserved = mark
        if mark is not None and mark > self._last_seq:
            gap = (self._last_seq, mark, utc_now())

            async def work(db: aiosqlite.Connection) -> None:
                await db.execute(
                    "INSERT INTO feed_gaps (after_seq, through_seq, found_at) VALUES (?, ?, ?)",
                    gap,
                )
                # Past the gap: the mark itself may be a position of the lost history (its
                # last change), and the feed's own last_seq must never be a lost position.
                await db.execute("UPDATE meta SET value = ? WHERE key = 'last_seq'", (mark + 1,))
                self._last_seq = mark + 1

            await self._transaction(work)
        if self._last_seq > self._reserved:  # no mark, or one behind the database
            await self._reserve(self._last_seq)
        rows = await self._fetch(self._reader, "SELECT after_seq, through_seq FROM feed_gaps")
        self._feed_gaps = [(int(a), int(t)) for a, t in rows]

    async def _reserve(self, seq: int) -> None:
        """Move the mark file ahead of `seq`, before a commit gives `seq` out."""
        assert self._mark is not None
        await asyncio.to_thread(self._mark.write, seq + SEQ_RESERVE)
        self._reserved = seq + SEQ_RESERVE

    async def read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run a read-only query on the read connection (the HTTP views' queries). The
        connection is `query_only`, so a view can never write; always pass values as params."""
        rows = await self._fetch(self._reader, sql, params)
        # fetchall's own list of tuples (no row factory): no copy on the hot path
        return cast(list[tuple[Any, ...]], rows)

    async def read_point(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Like `read`, for a bounded query only (a lookup on a unique index, a few rows): run
        at once on the calling thread, the event loop's, on a connection of its own. Handing
        such a query to the reader thread and waking the loop for its answer costs the loop
        more than the query does. WAL: a read never waits on the writer; should the file be
        busy even so (a connection recovering the WAL), the query takes `read`'s way, whose
        thread may wait, instead of holding the loop up."""
        point = self._point
        if point is not None:
            try:
                return point.execute(sql, params).fetchall()
            except sqlite3.DatabaseError as e:
                if not getattr(e, "sqlite_errorname", "").startswith("SQLITE_BUSY"):
                    raise self._read_error(e) from None
        return await self.read(sql, params)

    async def item_prefixes(self, seqs: list[str]) -> list[bytes] | None:
        """The texts of the items with these seqs (decimal text, as the change feed numbers
        them), in that order, each up to its closing brace: a list page adds `local_file` to
        each. None if one is not a plain JSON object's text (a hand edit: the page then reads
        its rows another way) or no longer held (a sync replaced it after the caller read its
        seq; reading the page again gets the new one).

        Kept in memory, up to the store's item cache bytes, the oldest out first. An item's
        every change gives it a new seq and a seq is never given out twice, so a kept text never
        goes stale; and unlike SQLite's page cache, which a commit anywhere in the file empties,
        a running sync leaves it alone. Misses are read in one row on the reader thread."""
        kept, stats = self._prefixes, self.item_cache
        try:
            texts = list(map(kept.__getitem__, seqs))
            stats.hits += len(texts)
            return texts
        except KeyError:
            pass
        missing = list(dict.fromkeys(s for s in seqs if s not in kept))
        stats.hits += len(seqs) - len(missing)
        stats.misses += len(missing)
        if not await self._keep_prefixes(missing):
            return None
        try:
            return list(map(kept.__getitem__, seqs))
        except KeyError:  # read, then pushed out again by the rest of a batch over the budget
            return None

    async def _keep_prefixes(self, seqs: list[str]) -> bool:
        """Read these items' texts into the kept ones; False if one is not held or not a plain
        JSON object's text."""
        size = next(n for n in _SEQ_BATCHES if n >= len(seqs))
        # Padded to a few statement sizes (repeats change nothing in an IN list), so SQLite's
        # statement cache holds them all.
        params = [int(s) for s in seqs] + [int(seqs[-1])] * (size - len(seqs))
        [(seq_text, length_text, texts)] = await self.read(
            "SELECT group_concat(seq), group_concat(length(b)), CAST(group_concat(b, '') AS BLOB) "
            f"FROM (SELECT seq, CAST(data AS BLOB) AS b FROM items WHERE seq IN ({_marks(size)}))",
            params,
        )
        if seq_text is None:
            return False
        found, lengths = seq_text.split(","), [int(n) for n in length_text.split(",")]
        if len(found) != len(seqs) or sum(lengths) != len(texts):
            return False
        kept, stats, end, plain = self._prefixes, self.item_cache, 0, True
        for seq, length in zip(found, lengths, strict=True):
            start, end = end, end + length
            # A JSON object's text: closed by its brace, and not the empty object (local_file
            # would need no comma before it).
            if length < 3 or texts[end - 1] != 0x7D:
                plain = False
            elif seq not in kept:
                kept[seq] = texts[start : end - 1]
                stats.kept_bytes += length + _ENTRY_OVERHEAD
        while stats.kept_bytes > self._item_cache_bytes and kept:
            _, text = kept.popitem(last=False)
            stats.kept_bytes -= len(text) + 1 + _ENTRY_OVERHEAD
        return plain

    async def survey_collection_id(self, survey_id: str) -> int | None:
        """The id of the collection holding a survey's images; None if the mirror holds none.

        Remembered while this process owns the mirror's only writer: every write that makes,
        revives or drops a collection (`collection`, `drop_collection`) forgets the lot. A
        read-only store (another process writes) asks the database every time."""
        cached = self._survey_collections.get(survey_id, _UNKNOWN)
        if cached is not _UNKNOWN:
            return cast("int | None", cached)
        version = self._collections_version
        rows = await self.read_point(
            "SELECT id FROM collections WHERE kind = 'images' AND parent_id = ? "
            "AND dropped_at IS NULL",
            (survey_id,),
        )
        found = int(rows[0][0]) if rows else None
        # Not if a collection changed while the read ran (it may have read the old state).
        if self._writer is not None and version == self._collections_version:
            if len(self._survey_collections) >= _MAX_REMEMBERED:
                self._survey_collections.clear()  # ids are the clients' to choose: bounded
            self._survey_collections[survey_id] = found
        return found

    async def image_collection_ids(self) -> list[int]:
        """The ids of every images collection (dropped ones too: they hold no items), in
        order; remembered like survey_collection_id's."""
        cached = self._image_collections
        if cached is not None:
            return cached
        version = self._collections_version
        rows = await self.read_point("SELECT id FROM collections WHERE kind = 'images' ORDER BY id")
        found = [int(row[0]) for row in rows]
        if self._writer is not None and version == self._collections_version:
            self._image_collections = found
        return found

    def _collections_changed(self) -> None:
        self._collections_version += 1
        self._survey_collections.clear()
        self._image_collections = None


# ---- file rows, inside the transactions of the write path --------------------------------

# A re-sent image of the same version only refreshes the URL (and retries a failed or expired
# file); a new version starts over. In SET, "files." names the row as it was before.
_WANT_FILE = (
    "INSERT INTO files (collection_id, sentera_id, content_hash, size, url, url_seen_at, "
    "state, updated_at) VALUES (?, ?, ?, ?, ?, ?, 'pending', ?) "
    "ON CONFLICT (collection_id, sentera_id) DO UPDATE SET "
    "url = excluded.url, url_seen_at = excluded.url_seen_at, updated_at = excluded.updated_at, "
    "size = excluded.size, content_hash = excluded.content_hash, "
    "state = CASE WHEN files.content_hash != excluded.content_hash THEN 'pending' "
    "WHEN files.state = 'done' THEN 'done' "
    "WHEN files.state = 'gone' AND files.bytes > 0 THEN 'done' "
    "ELSE 'pending' END, "
    "attempts = CASE WHEN files.content_hash = excluded.content_hash THEN files.attempts "
    "ELSE 0 END, "
    "reason = CASE WHEN files.content_hash = excluded.content_hash THEN files.reason ELSE NULL END"
)


async def _want_files(
    db: aiosqlite.Connection, coll: CollectionRef, wants: Sequence[FileWant], now: str
) -> None:
    seen = time.time()
    await db.executemany(
        _WANT_FILE,
        [(coll.id, w.sentera_id, w.content_hash, w.size, w.url, seen, now) for w in wants],
    )


async def _queue_all_files(db: aiosqlite.Connection, coll: CollectionRef, now: str) -> None:
    """Files were turned on: want every held image's file. Their URLs may be days old, so
    url_seen_at 0 makes the next sync fetch fresh ones."""
    await db.execute(
        "INSERT INTO files (collection_id, sentera_id, content_hash, size, url, url_seen_at, "
        "state, updated_at) SELECT collection_id, sentera_id, content_hash, "
        "json_extract(data, '$.size'), json_extract(data, '$.url'), 0, 'pending', ? "
        "FROM items WHERE collection_id = ? AND true "
        "ON CONFLICT (collection_id, sentera_id) DO UPDATE SET "
        "state = CASE WHEN files.content_hash = excluded.content_hash AND files.bytes > 0 "
        "THEN 'done' ELSE 'pending' END, content_hash = excluded.content_hash, "
        "size = excluded.size, url = excluded.url, url_seen_at = 0, "
        "updated_at = excluded.updated_at",
        (now, coll.id),
    )


async def _drop_all_files(db: aiosqlite.Connection, coll: CollectionRef, now: str) -> None:
    await db.execute(
        "UPDATE files SET state = 'gone', updated_at = ? WHERE collection_id = ?", (now, coll.id)
    )


DAMAGED = (
    " (the file is damaged: stop mirrord, then restore a backup or delete the file to mirror "
    "again from upstream)"
)


def _marks(n: int) -> str:
    """n SQL parameter marks for an IN list."""
    return ",".join("?" * n)


def _damaged(e: sqlite3.Error) -> bool:
    """The file is not what SQLite wrote: corrupted, cut short, or not a database at all."""
    name = getattr(e, "sqlite_errorname", "")
    return (
        name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB", "SQLITE_IOERR_SHORT_READ"))
        or "malformed" in str(e)
        or "no such table" in str(e)
    )


def _connect_point(path: Path) -> sqlite3.Connection:
    """The connection of `Store.read_point`: read-only, and it never waits for a lock (a busy
    file makes read_point take the reader thread's way, which does)."""
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        db.execute("PRAGMA busy_timeout = 0")
        db.execute(f"PRAGMA cache_size = -{READER_CACHE_KIB}")
        db.execute("PRAGMA query_only = ON")
    except BaseException:
        db.close()
        raise
    return db


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
    if version == 0:
        raise StoreError(f"the mirror {path} is not initialised yet: run `mirrord sync` first")
    if version < SCHEMA_VERSION:
        raise StoreError(
            f"the mirror {path} has schema version {version}, older than this mirrord's "
            f"({SCHEMA_VERSION}): restart the daemon, or run `mirrord sync`, to upgrade it"
        )


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
