"""`mirrord run`: the long-running service.

One APScheduler job per configured survey and field, each at its own interval with jitter,
`max_instances=1` and coalescing (a laptop waking from sleep runs one catch-up sync, not a
burst). While upstream is unreachable a target backs off exponentially with full jitter up to
`sync.backoff_cap`. The config file is watched (its directory, filtered by name, so editors
that save by rename are seen) and reloaded on SIGHUP; an invalid edit is refused and the old
config keeps running. SIGTERM/SIGINT stop cleanly: a page being written commits or rolls back
whole (the store shields its transactions), the database is closed, exit 0.
"""

from __future__ import annotations

import asyncio
import gc
import random
import signal
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from aiohttp import web
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from mirrord import __version__, logs, systemd
from mirrord.auth import token_provider
from mirrord.config import Config, ConfigError, load_config
from mirrord.context import Target, TargetState, targets_of
from mirrord.files import Downloader, DownloadStatus
from mirrord.store import Store
from mirrord.sync import SyncProgress, SyncRun, engine_for
from mirrord.upstream import RetryPolicy, TokenProvider, UpstreamClient
from mirrord.views import metrics

log = logs.get_logger("mirrord.daemon")

BACKOFF_BASE = 5.0  # seconds: the first retry after a failed contact waits up to this
RELOAD_DEBOUNCE = 0.3  # editors write a file in bursts; reload once they are done


class StartupError(Exception):
    """The daemon cannot start; one line for the operator."""


class Daemon:
    def __init__(
        self,
        config_path: Path,
        config: Config,
        tokens: Callable[[Config], TokenProvider] | None = None,
    ) -> None:
        self.config_path = config_path
        self.config = config
        self.config_error: str | None = None
        self.started = time.time()
        self.online: bool | None = None  # unknown until the first contact
        self.states: dict[str, TargetState] = {}
        self._make_tokens = tokens or _tokens_for
        self._tokens = self._make_tokens(config)
        self._store: Store | None = None
        self._scheduler: AsyncIOScheduler | None = None
        self._limit = asyncio.Semaphore(config.sync.concurrency)
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._reload_timer: asyncio.TimerHandle | None = None
        self._runner: web.AppRunner | None = None
        self.downloads = DownloadStatus()
        self._download_task: asyncio.Task[None] | None = None
        self._download_again = False

    @property
    def store(self) -> Store:
        assert self._store is not None, "the daemon is not running"
        return self._store

    # ---- lifecycle ----------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        # First: a stop asked for during start-up (opening and migrating the mirror, binding
        # the port) then ends the daemon cleanly once started, instead of killing it midway.
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        self._store = await Store.open(self.config.storage.path)
        observer = None
        watchdog: asyncio.Task[None] | None = None
        try:
            await self._start_http()
            self._scheduler = AsyncIOScheduler(event_loop=loop, timezone=UTC)
            self._scheduler.start()
            for target in targets_of(self.config).values():
                self._add_job(target, at_once=True)
            loop.add_signal_handler(signal.SIGHUP, self.request_reload)
            observer = self._watch_config(loop)
            watchdog = self._start_watchdog()
            # What start-up built (the app, the GraphQL schema, the modules) lives as long as
            # the daemon: out of the collector's way, a full collection during a sync walks
            # only what syncs and requests make (it held the HTTP loop 36-83 ms before).
            gc.freeze()
            systemd.ready(self._status_line())
            log.info(
                "started",
                version=__version__,
                config=str(self.config_path),
                mirror=str(self.config.storage.path),
                targets=len(self.states),
                listen=f"{self.config.http.host}:{self.config.http.port}",
            )
            await self._stop.wait()
        finally:
            if watchdog is not None:
                watchdog.cancel()
            systemd.stopping()
            if observer is not None:
                observer.stop()
            await self._shutdown()
            if observer is not None:
                observer.join(timeout=5)
        log.info("stopped")
        return 0

    def stop(self) -> None:
        self._stop.set()

    async def _shutdown(self) -> None:
        self._stop.set()
        if self._scheduler is not None:
            self._scheduler.pause()
            # A run the scheduler handed to the loop a moment ago has not begun: let it begin,
            # see the stop and end. Cancelled before its first step, it is logged as a crash.
            await asyncio.sleep(0)
            self._scheduler.shutdown(wait=False)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=10)
        if self._runner is not None:
            await self._runner.cleanup()
        if self._store is not None:
            await self._store.close()

    async def _start_http(self) -> None:
        from mirrord.app import make_runner
        from mirrord.views.limits import raise_file_limit

        raise_file_limit()  # idle clients must not use up the descriptors (views/limits.py)
        self._runner = make_runner(self)
        await self._runner.setup()
        host, port = self.config.http.host, self.config.http.port
        try:
            await web.TCPSite(self._runner, host, port).start()
        except OSError as e:
            await self._runner.cleanup()
            self._runner = None
            raise StartupError(
                f"cannot listen on {host}:{port}: {e.strerror or e} "
                "(is another mirrord running? change [http] listen)"
            ) from None

    def _start_watchdog(self) -> asyncio.Task[None] | None:
        interval = systemd.watchdog_interval()
        if interval is None:
            return None
        return asyncio.ensure_future(systemd.watchdog_loop(interval))

    # ---- scheduling ----------------------------------------------------------------------

    def _add_job(self, target: Target, *, at_once: bool) -> None:
        assert self._scheduler is not None
        self.states.setdefault(target.job_id, TargetState())
        self._scheduler.add_job(
            self._job,
            self._trigger(target),
            args=[target.job_id],
            id=target.job_id,
            max_instances=1,
            coalesce=True,
            misfire_grace_time=None,  # a run missed while asleep still runs (once: coalesce)
            next_run_time=datetime.now(UTC) if at_once else None,
            replace_existing=True,
        )

    def _trigger(self, target: Target) -> IntervalTrigger:
        jitter = min(self.config.sync.jitter, target.interval / 2) or None
        return IntervalTrigger(seconds=target.interval, jitter=jitter, timezone=UTC)

    async def _job(self, job_id: str) -> None:
        if self._stop.is_set():
            return  # handed over as the daemon stops
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._sync_target(job_id)
        except asyncio.CancelledError:
            if self._stop.is_set():
                # Stopping: the engine recorded the run as cancelled at a page boundary. Ending
                # quietly here keeps the scheduler from logging a cancelled job as a crash.
                log.info("sync stopped: shutting down", target=job_id)
                return
            # Not ours: we only cancel jobs when stopping. A library timer that fired late must
            # not leave the target stuck in "syncing"; the next run starts from the database.
            task.uncancel()
            state = self.states.get(job_id)
            if state is not None:
                state.state, state.progress = "error", None
            log.warning(
                "sync interrupted by a stray cancellation; retrying next run", target=job_id
            )
        finally:
            self._tasks.discard(task)

    async def _sync_target(self, job_id: str) -> None:
        target = targets_of(self.config).get(job_id)
        state = self.states.get(job_id)
        if target is None or state is None:
            return  # removed by a reload while it waited
        async with self._limit:
            state.state, state.progress = "syncing", None
            systemd.status(self._status_line())
            try:
                runs = await self._run_engine(target, state)
            except BaseException:
                state.state, state.progress = "error", None  # never stuck in "syncing"
                raise
        self._after_runs(target, state, runs)
        systemd.status(self._status_line())
        if not any(r.retryable for r in runs):
            self._kick_downloads()

    # ---- image files --------------------------------------------------------------------

    def _kick_downloads(self) -> None:
        """Download what the last sync queued; one round at a time, another after it if a
        sync finished meanwhile."""
        if self._download_task is not None and not self._download_task.done():
            self._download_again = True
            return
        self._download_task = asyncio.ensure_future(self._download_rounds())
        self._tasks.add(self._download_task)
        self._download_task.add_done_callback(self._tasks.discard)

    async def _download_rounds(self) -> None:
        again = True
        while again and not self._stop.is_set():
            self._download_again = False
            downloader = Downloader.for_config(self.config, self.store, self.downloads)
            try:
                async with downloader:
                    result = await downloader.run_round()
            except Exception as e:  # a bug: say so loudly, and let the next sync try again
                log.error("file downloads failed", error=f"{type(e).__name__}: {e}")
                return
            if result.eventful:
                log.info(
                    "files",
                    downloaded=result.done,
                    bytes=result.bytes,
                    removed=result.removed,
                    expired=result.expired,
                    failed=result.failed,
                    blocked=result.blocked,
                )
            again = self._download_again

    async def _run_engine(self, target: Target, state: TargetState) -> list[SyncRun]:
        config = self.config
        up = config.upstream
        retry = RetryPolicy(max_attempts=up.max_attempts, cap=up.retry_cap)

        def progress(p: SyncProgress) -> None:
            state.progress = p

        async with UpstreamClient(
            up.url, self._tokens, timeout=up.timeout, retry=retry, on_request=self._count_request
        ) as client:
            engine = engine_for(config, self.store, client, progress)
            if target.kind == "survey":
                return await engine.sync_surveys([target.id])
            return await engine.sync_field(
                target.id,
                skip={s.id for s in config.surveys},
                other_fields=[f.id for f in config.fields if f.id != target.id],
                concurrency=1,  # this job already holds one of the concurrency slots
            )

    def _count_request(self, outcome: str) -> None:
        if self._runner is not None:
            metrics.record_upstream_request(self._runner.app, outcome)

    def _after_runs(self, target: Target, state: TargetState, runs: list[SyncRun]) -> None:
        state.progress, state.last_runs = None, runs
        for run in runs:
            log.info(
                "sync",
                target=target.job_id,
                kind=run.kind,
                id=run.parent_id,
                outcome=run.outcome,
                pages=run.pages,
                upserted=run.upserted,
                deleted=run.deleted,
                failed=run.failed,
                items=run.item_count,
                seconds=round(run.seconds, 3),
                full_walk=run.full_walk,
                error=run.error,
            )
        link_down = any(r.retryable for r in runs)
        if link_down:
            self._back_off(target, state, next(r.error for r in runs if r.retryable))
            return
        if state.offline_since is not None:
            state.last_offline_seconds = time.time() - state.offline_since
            log.info(
                "back online",
                target=target.job_id,
                offline_seconds=round(state.last_offline_seconds, 1),
            )
        state.failures, state.offline_since = 0, None
        state.state = "idle" if all(r.ok for r in runs) else "error"
        if any(r.outcome in ("converged", "partial") for r in runs):
            self.online = True

    def _back_off(self, target: Target, state: TargetState, error: str | None) -> None:
        """Full jitter: wait a random time up to min(cap, base * 2^failures)."""
        state.failures += 1
        state.state = "backoff"
        if state.offline_since is None:
            state.offline_since = time.time()
        self.online = False
        bound = min(self.config.sync.backoff_cap, BACKOFF_BASE * 2 ** (state.failures - 1))
        delay = random.uniform(0, bound)
        log.warning(
            "upstream unreachable, backing off",
            target=target.job_id,
            attempt=state.failures,
            retry_in=round(delay, 1),
            error=error,
        )
        if self._scheduler is not None and self._scheduler.get_job(target.job_id):
            self._scheduler.modify_job(
                target.job_id, next_run_time=datetime.now(UTC) + timedelta(seconds=delay)
            )

    def sync_now(self, job_id: str) -> str:
        """Start a sync of a target now (the HTTP API's "sync now")."""
        state = self.states.get(job_id)
        if self._scheduler is None or state is None or not self._scheduler.get_job(job_id):
            return "unknown"
        if state.state == "syncing":
            return "running"
        self._scheduler.modify_job(job_id, next_run_time=datetime.now(UTC))
        return "started"

    def next_run_at(self, job_id: str) -> datetime | None:
        if self._scheduler is None:
            return None
        job = self._scheduler.get_job(job_id)
        return None if job is None else job.next_run_time

    # ---- reloading ----------------------------------------------------------------------

    def request_reload(self) -> None:
        """Debounced: an editor's burst of writes, or SIGHUP, leads to one reload."""
        loop = asyncio.get_running_loop()
        if self._reload_timer is not None:
            self._reload_timer.cancel()
        self._reload_timer = loop.call_later(RELOAD_DEBOUNCE, self.reload)

    def reload(self) -> None:
        self._reload_timer = None
        systemd.reloading()
        try:
            new = load_config(self.config_path)
        except ConfigError as e:
            self.config_error = str(e)
            log.error("config not reloaded: keeping the running config", error=str(e))
            systemd.ready(self._status_line())
            return
        self.config_error = None
        self._apply(new)
        systemd.ready(self._status_line())

    def _apply(self, new: Config) -> None:
        old, self.config = self.config, new
        if old.storage.path != new.storage.path:
            log.warning("change needs a restart to take effect", key="storage.path")
        if (old.http.host, old.http.port) != (new.http.host, new.http.port):
            log.warning("change needs a restart to take effect", key="http.listen")
        if new.upstream != old.upstream or new.storage.state_dir != old.storage.state_dir:
            _register_secrets(new)
            self._tokens = self._make_tokens(new)
        if new.sync.concurrency != old.sync.concurrency:
            self._limit = asyncio.Semaphore(new.sync.concurrency)
        before, after = targets_of(old), targets_of(new)
        assert self._scheduler is not None
        for job_id in before.keys() - after.keys():
            self._scheduler.remove_job(job_id)
            self.states.pop(job_id, None)
            log.info(
                "target removed: no longer synced; its data stays until `mirrord prune`",
                target=job_id,
            )
        for job_id in after.keys() - before.keys():
            self._add_job(after[job_id], at_once=True)
            log.info("target added", target=job_id)
        jitter_changed = old.sync.jitter != new.sync.jitter
        for job_id in after.keys() & before.keys():
            if after[job_id].interval != before[job_id].interval or jitter_changed:
                self._scheduler.reschedule_job(job_id, trigger=self._trigger(after[job_id]))
                log.info("target rescheduled", target=job_id, interval=after[job_id].interval)
        log.info("config reloaded", targets=len(after))

    def _watch_config(self, loop: asyncio.AbstractEventLoop) -> Any:
        handler = _ConfigFileHandler(
            self.config_path, lambda: loop.call_soon_threadsafe(self.request_reload)
        )
        observer = Observer()
        observer.schedule(handler, str(self.config_path.parent), recursive=False)
        observer.daemon = True
        observer.start()
        return observer

    # ---- status -------------------------------------------------------------------------------

    def _status_line(self) -> str:
        syncing = sum(1 for s in self.states.values() if s.state == "syncing")
        backoff = sum(1 for s in self.states.values() if s.state == "backoff")
        parts = [f"{len(self.states)} targets", f"{syncing} syncing"]
        if backoff:
            parts.append(f"{backoff} waiting for the link")
        if self.config_error:
            parts.append("config error: running on the previous config")
        return ", ".join(parts)


class _ConfigFileHandler(FileSystemEventHandler):
    """Events for the config file only: written in place, created, or renamed into place."""

    def __init__(self, path: Path, changed: Callable[[], object]) -> None:
        self.name = path.name
        self.changed = changed

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type not in ("modified", "created", "moved", "deleted", "closed"):
            return
        paths = [event.src_path, getattr(event, "dest_path", "")]
        if any(Path(str(p)).name == self.name for p in paths if p):
            self.changed()


def _tokens_for(config: Config) -> TokenProvider:
    """A static token, or OAuth2 whose rotating refresh token lives in the state directory.
    Every token it obtains is registered with the log scrubber."""
    return token_provider(config.upstream, config.storage.state_dir, on_secret=logs.register_secret)


def _register_secrets(config: Config) -> None:
    up = config.upstream
    secrets = [up.token, config.http.token]
    if up.oauth is not None:
        secrets += [up.oauth.client_secret, up.oauth.refresh_token]
    for secret in secrets:
        if secret is not None:
            logs.register_secret(secret.reveal())


def run_daemon(config_path: Path) -> int:
    """Load the config, then run until SIGTERM/SIGINT. Errors at start-up raise ConfigError,
    StoreError or StartupError (one line each)."""
    config = load_config(config_path)
    _register_secrets(config)
    daemon = Daemon(config_path, config)
    # The sync's CPU work (reading answers, on a worker thread) and the SQLite threads share
    # the GIL with the event loop that serves the local API. A thread waiting for the GIL
    # takes it after this interval (default 5 ms): 1 ms keeps reads responsive during a sync.
    # Measured under the HTTP benchmark during a sync: page p99 79-92 ms against 88-114 ms.
    sys.setswitchinterval(0.001)
    return asyncio.run(daemon.run())
