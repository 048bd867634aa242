"""The delta-sync engine: one loop for every upstream sync query.

The protocol is stateless: the set of content hashes the client holds is the cursor. A run
sends that set, applies the answer (one transaction), and repeats until upstream says nothing
differs. The engine must be right however upstream fills the gaps of its documentation
(PROTOCOL.md): an updated item's old hash may come back in `deleted` before, with or after its new
version, or never; unknown hashes may be ignored, deleted or failed; failed items may hold
`remaining_count` above zero forever; data may change between pages. So:

- upserts replace by `sentera_id`, and an upsert in an answer beats a delete of the same id in
  that answer;
- a delete removes an item only if the item still has the deleted hash (a late report of an old
  hash never removes the new version); a delete naming an id we do not hold but a hash we do is
  applied to the item holding that hash (the server may not know whose a hash was);
- a run ends when upstream reports nothing remaining, when an answer brings no items, or when
  two answers in a row neither change anything nor lower `remaining_count` (no progress), and
  always within `max_pages`.

A full walk ("reconcile") re-lists the collection from an empty hash set and finally deletes what
upstream no longer listed: it catches items a server silently stopped reporting (a server that
ignores unknown hashes never says so). It runs every `reconcile_every`, on `--full`, and when
upstream marks a hash we hold as failed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from mirrord.auth import token_provider
from mirrord.config import Config
from mirrord.store import (
    CollectionRef,
    Failure,
    PageChanges,
    RunRecord,
    Store,
    StoreError,
    Upsert,
)
from mirrord.upstream import (
    SYNC_IMAGES,
    SYNC_SURVEYS,
    HashList,
    RetryPolicy,
    SyncAnswer,
    SyncQuery,
    UpstreamClient,
    UpstreamError,
)

# Answers in a row without progress before a run is declared stalled. An answer makes progress
# when it changes what we hold or send, or when upstream's remaining_count falls: a server that
# owes a backlog of stale reports (they change nothing here) still counts down through it.
NO_PROGRESS_LIMIT = 2

# Signed file URLs live about 60 minutes: one older than this is not worth a try, so the next
# sync leaves that image's hash out and upstream re-sends the image with a fresh URL.
URL_MAX_AGE = 45 * 60.0


@dataclass
class SyncProgress:
    """Reported after every applied page, for progress bars and status."""

    kind: str
    parent_id: str
    pages: int
    applied: int  # upserts + deletes applied so far in this run
    remaining: int  # upstream's remaining_count after this page
    item_count: int


@dataclass
class SyncRun:
    """The outcome of one run over one collection."""

    kind: str
    parent_id: str
    outcome: str = "running"  # converged | partial | stalled | failed | cancelled
    pages: int = 0
    upserted: int = 0
    deleted: int = 0
    failed: int = 0
    remaining: int | None = None
    item_count: int = 0
    full_walk: bool = False
    error: str | None = None
    retryable: bool = False  # the failure was the link or the server: worth trying again soon
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.outcome == "converged"


@dataclass
class _RunState:
    """What one run knows. `sent` is the hash set we send: the held items in a delta run,
    the items re-listed so far in a full walk."""

    held: dict[str, str]
    sent: dict[str, str]
    run: SyncRun
    failures: dict[str, Failure] = field(default_factory=dict)
    quiet_answers: int = 0
    last_answer_changed: bool = False
    last_remaining: int | None = None
    # `sent`, encoded: extended while pages only add, dropped (re-encoded) when one rewrites.
    encoded: HashList | None = None
    files: bool = False  # the collection's image files are mirrored: note every upsert's file
    # Held items left out of `sent` so upstream re-sends them (with fresh file URLs).
    refresh: set[str] = field(default_factory=set)

    def hash_list(self) -> HashList:
        if self.encoded is None:
            self.encoded = HashList(self.sent.values())
        return self.encoded


ProgressCallback = Callable[[SyncProgress], None]


class SyncEngine:
    def __init__(
        self,
        store: Store,
        client: UpstreamClient,
        *,
        max_pages: int = 5000,
        reconcile_every: float = 7 * 86400.0,
        progress: ProgressCallback | None = None,
        files_surveys: Collection[str] = (),
        files_fields: Collection[str] = (),
    ) -> None:
        self.store = store
        self.client = client
        self.max_pages = max_pages
        self.reconcile_every = reconcile_every
        self.progress = progress
        # Surveys, and fields whose surveys, have their image files mirrored too.
        self.files_surveys = frozenset(files_surveys)
        self.files_fields = frozenset(files_fields)

    def wants_files(self, kind: str, parent_id: str, origin: str) -> bool:
        if kind != "images":
            return False
        return parent_id in self.files_surveys or (
            origin.startswith("field:") and origin.removeprefix("field:") in self.files_fields
        )

    # ---- one collection -----------------------------------------------------------------

    async def sync_collection(
        self, query: SyncQuery, parent_id: str, *, origin: str = "config", full: bool = False
    ) -> SyncRun:
        """Bring one collection to upstream's state; never raises for upstream or database
        trouble (the run is `failed`, with the reason)."""
        started = time.monotonic()
        try:
            files = self.wants_files(query.kind, parent_id, origin)
            coll = await self.store.collection(query.kind, parent_id, origin, files=files)
            full = full or await self._reconcile_due(coll)
            state = await self._run(query, coll, full_walk=full)
        except StoreError as e:
            # The run could not even be recorded (a locked, read-only or full database).
            return SyncRun(
                query.kind,
                parent_id,
                outcome="failed",
                error=str(e),
                seconds=time.monotonic() - started,
            )
        run = state.run
        if run.outcome == "partial" and not run.full_walk and _failed_on_held_hash(state):
            # Upstream called a hash we hold "failed": it may not know that hash at all. Only a
            # full walk can tell whether the item still exists.
            try:
                walk = (await self._run(query, coll, full_walk=True)).run
            except StoreError as e:
                run.outcome, run.error = "failed", str(e)
                return run
            walk.pages += run.pages
            walk.upserted += run.upserted
            walk.deleted += run.deleted
            return walk
        return run

    async def _reconcile_due(self, coll: CollectionRef) -> bool:
        if self.reconcile_every <= 0:
            return False
        status = await self.store.status(coll)
        if status.last_reconcile_at is None:
            return status.item_count > 0
        return time.time() - _parse_time(status.last_reconcile_at) >= self.reconcile_every

    async def _run(self, query: SyncQuery, coll: CollectionRef, *, full_walk: bool) -> _RunState:
        started = time.monotonic()
        held = await self.store.held_hashes(coll)
        # Syncing an empty collection re-lists all of it: that is a full walk already.
        full_walk = full_walk or not held
        refresh = set()
        if not full_walk:
            refresh = await self.store.stale_file_ids(coll, time.time() - URL_MAX_AGE)
        state = _RunState(
            held=held,
            sent={} if full_walk else {s: h for s, h in held.items() if s not in refresh},
            run=SyncRun(query.kind, coll.parent_id, full_walk=full_walk, item_count=len(held)),
            files=coll.files,
            refresh=refresh,
        )
        run_id = await self.store.begin_run(coll, full_walk=full_walk)
        try:
            await self._loop(query, coll, run_id, state)
            if state.run.outcome in ("converged", "partial"):
                await self._sweep_unlisted(coll, run_id, state)
        except UpstreamError as e:
            state.run.outcome, state.run.error, state.run.retryable = "failed", str(e), e.retryable
        except StoreError as e:
            state.run.outcome, state.run.error = "failed", str(e)
        except asyncio.CancelledError:
            state.run.outcome, state.run.error = "cancelled", "the sync was stopped"
            await asyncio.shield(self._finish(coll, run_id, state, started))
            raise
        await self._finish(coll, run_id, state, started)
        return state

    async def _sweep_unlisted(self, coll: CollectionRef, run_id: int, state: _RunState) -> None:
        """After a complete run, what upstream was asked for and did not list is gone upstream:
        every held item in a full walk, the left-out items of a delta run. Except items
        upstream could not serve (`failed`): those exist, so the last good copy stays."""
        held, failed = state.held, state.failures.keys()
        # Set differences walk the held set in C: a full walk's is the whole collection.
        unlisted = (held.keys() if state.run.full_walk else state.refresh) - state.sent.keys()
        gone = [
            (sid, held[sid])
            for sid in unlisted
            if sid in held and sid not in failed and held[sid] not in failed
        ]
        swept = await self.store.delete_items(coll, run_id, gone)
        for sid, _ in gone:
            del state.held[sid]
        state.run.deleted += swept
        state.run.item_count -= swept

    async def _finish(
        self, coll: CollectionRef, run_id: int, state: _RunState, started: float
    ) -> None:
        run = state.run
        run.failed = len(state.failures)
        run.seconds = time.monotonic() - started
        record = RunRecord(
            run.outcome, run.pages, run.upserted, run.deleted, run.failed, run.error, run.full_walk
        )
        try:
            await self.store.finish_run(coll, run_id, record)
        except StoreError as e:
            if run.error is None:
                run.outcome, run.error = "failed", str(e)

    async def _loop(
        self, query: SyncQuery, coll: CollectionRef, run_id: int, state: _RunState
    ) -> None:
        run = state.run
        while True:
            if run.pages >= self.max_pages:
                run.outcome = "stalled"
                run.error = f"stopped after {run.pages} pages (sync.max_pages); will go on next run"
                return
            answer = await self.client.sync_page(
                query, coll.parent_id, state.hash_list(), files=state.files
            )
            changes = plan_page(state, answer)
            await self.store.apply_page(
                coll, run_id, changes, answer.remaining_count, len(state.held)
            )
            run.pages += 1
            run.upserted += len(changes.upserts)
            run.deleted += len(changes.deletes)
            run.remaining = answer.remaining_count
            run.item_count = len(state.held)
            self._report(run)
            if self._finished(state, answer):
                return

    def _finished(self, state: _RunState, answer: SyncAnswer) -> bool:
        run = state.run
        failed = f"{len(answer.failed)} item(s) failed upstream" if answer.failed else ""
        if answer.remaining_count == 0:
            run.outcome = "partial" if answer.failed else "converged"
            run.error = failed or None
            return True
        if not answer.upserted and not answer.deleted:
            run.outcome = "partial" if answer.failed else "stalled"
            run.error = failed or (
                f"upstream reports {answer.remaining_count} remaining but sent nothing"
            )
            return True
        counted_down = (
            state.last_remaining is not None and answer.remaining_count < state.last_remaining
        )
        state.last_remaining = answer.remaining_count
        if not (state.last_answer_changed or counted_down):
            state.quiet_answers += 1
            if state.quiet_answers >= NO_PROGRESS_LIMIT:
                run.outcome = "partial" if answer.failed else "stalled"
                run.error = failed or (
                    f"no progress: upstream keeps sending what is already held "
                    f"({answer.remaining_count} remaining)"
                )
                return True
        else:
            state.quiet_answers = 0
        return False

    def _report(self, run: SyncRun) -> None:
        if self.progress is not None:
            self.progress(
                SyncProgress(
                    run.kind,
                    run.parent_id,
                    run.pages,
                    run.upserted + run.deleted,
                    run.remaining or 0,
                    run.item_count,
                )
            )

    # ---- what to sync ---------------------------------------------------------------------

    async def sync_all(
        self,
        surveys: Sequence[str],
        fields: Sequence[str],
        *,
        full: bool = False,
        concurrency: int = 2,
    ) -> list[SyncRun]:
        """Sync the given fields (each with its surveys), then the given surveys."""
        runs: list[SyncRun] = []
        done = set(surveys)
        for field_id in fields:
            others = [f for f in fields if f != field_id]
            field_runs = await self.sync_field(
                field_id, skip=done, other_fields=others, full=full, concurrency=concurrency
            )
            done |= {r.parent_id for r in field_runs if r.kind == "images"}
            runs += field_runs
        return runs + await self.sync_surveys(surveys, full=full, concurrency=concurrency)

    async def sync_field(
        self,
        field_id: str,
        *,
        skip: Collection[str] = (),
        other_fields: Collection[str] = (),
        full: bool = False,
        concurrency: int = 2,
    ) -> list[SyncRun]:
        """Sync a field's survey list, then its surveys (except those in `skip`, synced
        elsewhere). A survey the field no longer lists is dropped from the mirror unless it is
        in `skip` or listed by one of `other_fields`."""
        run = await self.sync_collection(SYNC_SURVEYS, field_id, full=full)
        try:
            listed = await self.store.item_ids("surveys", field_id)
        except StoreError as e:  # the database failed: nothing more to do this run
            if run.error is None:
                run.outcome, run.error = "failed", str(e)
            return [run]
        if run.outcome in ("converged", "partial"):
            try:
                keep = set(listed) | set(skip)
                for other in other_fields:
                    keep.update(await self.store.item_ids("surveys", other))
                await self._drop_unlisted(field_id, keep)
            except StoreError as e:
                run.outcome, run.error = "failed", str(e)
        todo = [sid for sid in listed if sid not in skip]
        origin = f"field:{field_id}"
        return [
            run,
            *await self.sync_surveys(todo, origin=origin, full=full, concurrency=concurrency),
        ]

    async def sync_surveys(
        self,
        surveys: Sequence[str],
        *,
        origin: str = "config",
        full: bool = False,
        concurrency: int = 2,
    ) -> list[SyncRun]:
        limit = asyncio.Semaphore(max(1, concurrency))

        async def one(sid: str) -> SyncRun:
            async with limit:
                return await self.sync_collection(SYNC_IMAGES, sid, origin=origin, full=full)

        return list(await asyncio.gather(*(one(sid) for sid in surveys)))

    async def _drop_unlisted(self, field_id: str, keep: set[str]) -> None:
        for coll in await self.store.collections_from(f"field:{field_id}"):
            if coll.kind == "images" and coll.parent_id not in keep:
                await self.store.drop_collection(coll)


def plan_page(state: _RunState, answer: SyncAnswer) -> PageChanges:
    """Decide what an answer changes, updating the run's view (`held`, `sent`) to match."""
    changes = PageChanges()
    added: list[str] = []  # hashes new to `sent`
    rewritten = False  # a hash in `sent` replaced or dropped: its encoding must be redone
    sent, held = state.sent, state.held
    upserted_ids: Collection[str]
    fresh = _all_new(sent, held, answer.upserted)
    if fresh is not None:
        # The bulk of a first sync: every item new, each once. Applied dict to dict.
        sent.update(fresh)
        held.update(fresh)
        added = list(fresh.values())
        changes.upserts = list(answer.upserted)
        changes.new_ids = set(fresh)
        upserted_ids = fresh.keys()
    else:
        upserted_ids = set()
        upserts = changes.upserts
        for up in answer.upserted:  # one pass per synced item
            sid, chash = up.sentera_id, up.content_hash
            upserted_ids.add(sid)
            was = sent.get(sid)
            if was != chash:
                sent[sid] = chash
                if was is None:
                    added.append(chash)
                else:
                    rewritten = True
            old = held.get(sid)
            if old == chash:
                continue
            if old is None:
                changes.new_ids.add(sid)
            held[sid] = chash
            upserts.append(up)
        if len(upserts) > len(upserted_ids):
            changes.upserts = _last_per_id(upserts)
    owners: dict[str, str] | None = None  # hash -> id, built only if a delete needs it
    for sid, chash in answer.deleted:
        if state.sent.get(sid) != chash and sid not in state.sent and owners is None:
            owners = {h: s for s, h in state.sent.items()}
        rewritten |= _apply_delete(state, changes, upserted_ids, owners, sid, chash)
    for failure in answer.failed:
        state.failures[failure.key] = failure
    changes.failures = list(answer.failed)
    if state.files:
        changes.files = answer.files
    if rewritten:
        state.encoded = None
    elif added and state.encoded is not None:
        state.encoded.extend(added)
    state.last_answer_changed = bool(added) or rewritten or changes.changed
    return changes


def _all_new(
    sent: dict[str, str], held: dict[str, str], upserted: Sequence[Upsert]
) -> dict[str, str] | None:
    """id -> hash of the upserted items if each id is listed once and neither held nor sent,
    else None. (`keys().isdisjoint(d)` walks `d`: the page, not the collection.)"""
    page = {up.sentera_id: up.content_hash for up in upserted}
    if len(page) == len(upserted) and held.keys().isdisjoint(page) and sent.keys().isdisjoint(page):
        return page
    return None


def _apply_delete(
    state: _RunState,
    changes: PageChanges,
    upserted_ids: Collection[str],
    owners: dict[str, str] | None,
    sid: str,
    chash: str,
) -> bool:
    """Apply one `deleted` entry; returns whether the sent set changed."""
    owner: str | None = sid if state.sent.get(sid) == chash else None
    if owner is None and sid not in state.sent and owners is not None:
        owner = owners.get(chash)
    if owner is None or owner in upserted_ids or state.sent.get(owner) != chash:
        return False
    del state.sent[owner]
    if state.held.get(owner) == chash:
        del state.held[owner]
        changes.deletes.append((owner, chash))
    return True


def _failed_on_held_hash(state: _RunState) -> bool:
    held_hashes = set(state.held.values())
    return any(key in held_hashes for key in state.failures)


def _last_per_id(upserts: Iterable[Upsert]) -> list[Upsert]:
    """An answer listing one id twice: the later entry is what we hold."""
    by_id = {up.sentera_id: up for up in upserts}
    return list(by_id.values())


def _parse_time(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


def engine_for(
    config: Config,
    store: Store,
    client: UpstreamClient,
    progress: ProgressCallback | None = None,
) -> SyncEngine:
    """The engine as the config sets it up (the daemon and `mirrord sync` alike)."""
    return SyncEngine(
        store,
        client,
        max_pages=config.sync.max_pages,
        reconcile_every=config.sync.reconcile_every,
        progress=progress,
        files_surveys=[s.id for s in config.surveys if s.files == "all"],
        files_fields=[f.id for f in config.fields if f.files == "all"],
    )


async def sync_from_config(
    config: Config,
    *,
    surveys: Sequence[str] | None = None,
    fields: Sequence[str] | None = None,
    full: bool = False,
    progress: ProgressCallback | None = None,
    store: Store | None = None,
) -> list[SyncRun]:
    """One sync of what the config names (or the given subset), as `mirrord sync` runs it.
    Opens (and closes) the mirror unless given an open `store`."""
    if store is None:
        async with await Store.open(config.storage.path) as opened:
            return await sync_from_config(
                config, surveys=surveys, fields=fields, full=full, progress=progress, store=opened
            )
    up = config.upstream
    retry = RetryPolicy(max_attempts=up.max_attempts, cap=up.retry_cap)
    tokens = token_provider(up, config.storage.state_dir)
    async with UpstreamClient(up.url, tokens, timeout=up.timeout, retry=retry) as client:
        return await engine_for(config, store, client, progress).sync_all(
            [s.id for s in config.surveys] if surveys is None else surveys,
            [f.id for f in config.fields] if fields is None else fields,
            full=full,
            concurrency=config.sync.concurrency,
        )
