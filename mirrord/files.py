"""Image files: download the files of new or changed images and keep them beside the mirror.

The queue is the `files` table (mirrord.store): the sync engine writes a row per upserted image
of a collection with files on, in the same transaction as the item, so a crash or a power cut
resumes the queue. A download streams into `<name>.<version>.part` in the file's directory,
resumes with HTTP Range where the server allows, and is renamed into place (after fsync) only
when complete and as long as upstream's `size` says. Each download runs in a thread of its
own, from the request to the last byte written (mirrord.fetch, mirrord.transfer); the event
loop hands out the files, keeps the disk budget, and publishes. Complete parts are published
in batches, off the download slots: fsynced (in parallel threads), renamed, their directory
fsynced once, then marked done in one transaction. Per file, those fsyncs and a SQLite commit
take longer than downloading 1 MB; batched and off the download path, they cost little
throughput. A crash before publishing leaves complete parts, which the next round publishes
without downloading them again. Deleted images' rows turn 'gone' with the delete; the
downloader removes their files before every round.

Signed URLs expire (about 60 minutes): a 403 marks the file 'expired', and the next metadata
sync leaves its hash out so upstream re-sends the image with a fresh URL (mirrord.sync).

`max_disk` is never exceeded: a file that would pass it (counting complete files, partial
ones and what running downloads still need) is not started, and the round stops with a
`blocked` status; the mirror keeps serving what it has.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import os
import random
import re
import shutil
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from urllib.parse import urlsplit

from mirrord import __version__, fetch, logs, transfer
from mirrord.config import Config
from mirrord.store import FileJob, Store, StoreError
from mirrord.sync import ProgressCallback, SyncRun, sync_from_config

log = logs.get_logger("mirrord.files")

MAX_ATTEMPTS = 5  # transient failures of one version before it is marked failed
TRIES_PER_ROUND = 3  # a cut-off download resumes at once, a few times, before it waits
MIN_FREE = 256 * 1024 * 1024  # bytes always left free on the filesystem, whatever max_disk says
JOB_BATCH = 64
PUBLISH_DELAY = 0.1  # seconds a complete file waits for others to be published with it
FSYNC_THREADS = 4
FREE_RECHECK = 0.5  # seconds the free space on the files' disk is taken as known
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,150}")


# ---- where files live -------------------------------------------------------------------


def file_path(files_dir: Path, collection_id: int, sentera_id: str) -> Path:
    """The file of an image: one directory per mirrored survey, named by sentera_id. An id
    that is not a plain file name (upstream controls it) is named by its hash instead."""
    name = sentera_id if _SAFE_NAME.fullmatch(sentera_id) and ".." not in sentera_id else None
    if name is None or name.endswith(".part"):
        name = "id-" + hashlib.sha256(sentera_id.encode()).hexdigest()[:32]
    return files_dir / str(collection_id) / name


def part_path(final: Path, content_hash: str) -> Path:
    """The partial download of one version: a new version never resumes an old one's bytes."""
    version = hashlib.sha256(content_hash.encode()).hexdigest()[:12]
    return final.with_name(f"{final.name}.{version}.part")


def part_files(files_dir: Path) -> Iterator[Path]:
    with contextlib.suppress(FileNotFoundError):
        for directory in files_dir.iterdir():
            if directory.is_dir():
                yield from directory.glob("*.part")


def _size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


# ---- outcomes -----------------------------------------------------------------------------


class FileProblem(Exception):
    """One try at one file failed. `state`: 'pending' (worth trying again), 'expired' (needs a
    fresh URL) or 'failed' (this version will not download)."""

    def __init__(self, state: str, reason: str) -> None:
        super().__init__(reason)
        self.state = state
        self.reason = reason


class OverBudget(Exception):
    """Starting (or finishing) a file would pass max_disk or fill the filesystem."""


@dataclass
class DownloadStatus:
    """What the downloader is doing, for /v1/status and /metrics."""

    running: bool = False
    in_flight: dict[str, tuple[int, int | None]] = field(default_factory=dict)  # id: (got, size)
    fetched_files: int = 0  # files completed since the daemon started
    fetched_bytes: int = 0  # bytes received since the daemon started
    failures: int = 0  # failed tries since the daemon started
    round_started_at: float | None = None
    round_bytes: int = 0
    blocked: str | None = None  # why downloads stopped (the disk budget), None if they did not
    last_error: str | None = None

    def rate(self) -> float:
        """Bytes per second over the running round."""
        if not self.running or self.round_started_at is None:
            return 0.0
        return self.round_bytes / max(time.monotonic() - self.round_started_at, 1e-3)

    def as_dict(self) -> dict[str, object]:
        return {
            "running": self.running,
            "downloading": len(self.in_flight),
            # A copy first: download threads add and remove entries.
            "in_flight_bytes": sum(got for got, _ in list(self.in_flight.values())),
            "rate_bytes_per_second": round(self.rate()),
            "fetched_files": self.fetched_files,
            "fetched_bytes": self.fetched_bytes,
            "failures": self.failures,
            "blocked": self.blocked,
            "last_error": self.last_error,
        }


@dataclass
class DownloadRound:
    """The outcome of one pass over the queue."""

    done: int = 0
    bytes: int = 0
    expired: int = 0
    failed: int = 0  # tries that failed (a file may try again later)
    removed: int = 0
    blocked: str | None = None

    @property
    def eventful(self) -> bool:
        return bool(self.done or self.removed or self.failed or self.expired or self.blocked)


# ---- the downloader ------------------------------------------------------------------------


class Downloader:
    """`async with Downloader(store, files_dir, ...) as d: await d.run_round()`."""

    def __init__(
        self,
        store: Store,
        files_dir: Path,
        *,
        max_disk: int,
        concurrency: int = 4,
        timeout: float = 30.0,
        status: DownloadStatus | None = None,
    ) -> None:
        self.store = store
        self.files_dir = files_dir
        self.max_disk = max_disk
        self.concurrency = max(1, concurrency)
        self.timeout = timeout
        self.status = status or DownloadStatus()
        self._client: fetch.Client | None = None
        self._threads: ThreadPoolExecutor | None = None  # one per download slot
        self._status_lock = threading.Lock()  # the status's figures, counted by the threads
        # The budget, the round's listing and the complete parts, shared by the threads:
        self._lock = threading.Lock()
        self._reserved: dict[tuple[int, str], int] = {}  # bytes running downloads may add
        self._used = 0  # bytes on disk at the round's start, plus what finished since
        self._complete: list[_Complete] = []  # complete parts waiting to be published
        self._no_more = asyncio.Event()  # set when the round's downloads are over
        self._stale_parts: dict[Path, list[Path]] = {}  # final -> parts found at round start
        self._part_sizes: dict[Path, int] = {}  # those parts' lengths, until a download takes one
        self._free: int | None = None  # free bytes on the files' disk when last asked, ...
        self._free_at = 0.0  # ... at this time.monotonic(), ...
        self._promised = 0  # ... and bytes reserved since
        self._directories: set[Path] = set()  # directories known to exist this round

    @classmethod
    def for_config(
        cls, config: Config, store: Store, status: DownloadStatus | None = None
    ) -> Downloader:
        storage = config.storage
        return cls(
            store,
            storage.files_dir,
            max_disk=storage.max_disk,
            concurrency=storage.download_concurrency,
            timeout=config.upstream.timeout,
            status=status,
        )

    async def __aenter__(self) -> Downloader:
        # No total timeout: a 20 MB file on a slow link takes as long as it takes. A link that
        # stops moving for `timeout` seconds fails the try.
        self._client = fetch.Client(
            timeout=self.timeout,
            connections=self.concurrency,
            user_agent=f"mirrord/{__version__}",
        )
        self._threads = ThreadPoolExecutor(self.concurrency, thread_name_prefix="mirrord-download")
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._threads is not None:
            self._threads.shutdown(wait=False)  # idle: every download was awaited
            self._threads = None
        if self._client is not None:
            self._client.close()
            self._client = None

    # ---- a round ------------------------------------------------------------------------------

    async def run_round(self) -> DownloadRound:
        """Remove what must go, then download pending files until none is left to try now,
        or the disk budget is reached. Never raises for download or disk trouble."""
        result = DownloadRound()
        status = self.status
        status.running, status.round_started_at, status.round_bytes = True, time.monotonic(), 0
        status.blocked = None
        try:
            result.removed = await self.remove_unwanted()
            parts = self._parts()
            self._part_sizes = {part: _size_of(part) for part in parts}
            self._used = await self.store.bytes_on_disk() + sum(self._part_sizes.values())
            self._stale_parts, self._directories, self._free = {}, set(), None
            for part in parts:
                self._stale_parts.setdefault(_final_of(part), []).append(part)
            await self._download_all(result)
        except (StoreError, OSError) as e:
            status.last_error = result.blocked = f"file downloads stopped: {_describe(e)}"
        finally:
            status.running = False
            status.in_flight.clear()
        status.blocked = result.blocked
        return result

    def _parts(self) -> list[Path]:
        return list(part_files(self.files_dir))

    async def remove_unwanted(self) -> int:
        """Delete the files of deleted images and of out-of-date versions."""
        removed = 0
        for collection_id, sentera_id, _ in await self.store.files_to_remove():
            final = file_path(self.files_dir, collection_id, sentera_id)
            with contextlib.suppress(FileNotFoundError):
                final.unlink()
                removed += 1
            for part in final.parent.glob(f"{final.name}.*.part"):
                part.unlink(missing_ok=True)
            await self.store.file_removed(collection_id, sentera_id)
        return removed

    async def _download_all(self, result: DownloadRound) -> None:
        """Keep the download threads fed from the queue, and deal with what they report. The
        loop wakes for a batch of jobs or a problem, not for each file (per file it cost more
        CPU than the rest of the download's own Python)."""
        assert self._threads is not None
        loop = asyncio.get_running_loop()
        hand_over = _HandOver(loop, low_water=max(JOB_BATCH // 2, self.concurrency))
        threads = [
            loop.run_in_executor(self._threads, self._download_thread, hand_over)
            for _ in range(self.concurrency)
        ]
        for thread in threads:
            thread.add_done_callback(lambda _: hand_over.wake.set())
        publishing = asyncio.ensure_future(self._publish_batches(result))
        tried: set[tuple[int, str]] = set()
        more = True
        try:
            while not all(thread.done() for thread in threads):
                hand_over.wake.clear()
                await self._reports(hand_over, result)
                if result.blocked is not None:
                    hand_over.close()  # the running downloads finish; no new ones start
                elif more and hand_over.waiting() < hand_over.low_water:
                    jobs = [j for j in await self._next_jobs(len(tried)) if j.key not in tried]
                    tried.update(job.key for job in jobs)
                    more = hand_over.give(jobs)
                    continue
                await hand_over.wake.wait()
            await asyncio.gather(*threads)  # a bug in a thread surfaces here
            await self._reports(hand_over, result)
        except BaseException:
            hand_over.close(abort=True)
            await asyncio.shield(asyncio.gather(*threads, return_exceptions=True))
            raise
        finally:
            # Even when the round is cancelled: publishing takes milliseconds, and what is not
            # published stays a complete part for the next round.
            self._no_more.set()
            await asyncio.shield(self._publish_rest(publishing, result))

    async def _next_jobs(self, skip: int) -> list[FileJob]:
        # A URL past its life is not worth a request: the next sync brings a fresh one.
        not_before = time.time() - 55 * 60
        return await self.store.file_jobs(JOB_BATCH + skip, not_before)

    async def _reports(self, hand_over: _HandOver, result: DownloadRound) -> None:
        """What the threads could not do: a problem with a file, the budget reached."""
        while hand_over.reports:
            job, e = hand_over.reports.popleft()
            if isinstance(e, OverBudget):
                result.blocked = result.blocked or str(e)
            elif isinstance(e, FileProblem):
                await self._record_problem(job, e, result)
            else:
                # The files directory, not the link: unwritable, full, gone. The file stays
                # pending; the reason shows in status until a round gets past it.
                self.status.last_error = f"cannot write {self.files_dir}: {_describe(e)}"
                result.failed += 1

    def _download_thread(self, hand_over: _HandOver) -> None:
        """A download slot: files one after the other until the round is over."""
        try:
            while (job := hand_over.take()) is not None:
                problem = self._tries(job, hand_over)
                if isinstance(problem, OverBudget):
                    hand_over.close()  # no new downloads; the running ones finish
                if problem is not None:
                    hand_over.report(job, problem)
        finally:
            hand_over.signal()

    def _tries(self, job: FileJob, hand_over: _HandOver) -> Exception | None:
        """Download a file; when the link cut it off, try again a moment later (from where it
        stopped). What still went wrong is returned, for the loop to record."""
        for attempt in range(TRIES_PER_ROUND):
            try:
                self._fetch(job, hand_over, retry=attempt > 0)
                return None
            except FileProblem as e:
                with self._status_lock:
                    self.status.failures += 1
                last = attempt + 1 == TRIES_PER_ROUND
                delay = random.uniform(0.2, 0.5) * 2**attempt
                if e.state != "pending" or last or hand_over.pause(delay):
                    return e
            except (OverBudget, OSError) as e:
                if isinstance(e, OSError):
                    with self._status_lock:
                        self.status.failures += 1
                return e
        raise AssertionError("unreachable")

    async def _record_problem(self, job: FileJob, e: FileProblem, result: DownloadRound) -> None:
        state = e.state
        if state == "pending" and job.attempts + 1 >= MAX_ATTEMPTS:
            state = "failed"
        if state == "expired":
            result.expired += 1
        else:
            result.failed += 1
            self.status.last_error = f"{job.sentera_id}: {e.reason}"
        log.info("file not downloaded", id=job.sentera_id, state=state, reason=e.reason)
        await self.store.file_failed(job, state, e.reason)

    # ---- one file -----------------------------------------------------------------------

    def _fetch(self, job: FileJob, hand_over: _HandOver, *, retry: bool) -> None:
        """In a download thread: one file into a complete part, queued for publishing.
        Raises FileProblem, OverBudget and OSError."""
        final = file_path(self.files_dir, job.collection_id, job.sentera_id)
        part = part_path(final, job.content_hash)
        with self._lock:
            self._prepare_directory(final, part)
            # The round's listing knows the parts that exist; only a retry made one since.
            have = _size_of(part) if retry else self._part_sizes.pop(part, 0)
            if job.size is not None and have > job.size:
                part.unlink()
                have = 0
            self._reserve(job, have)
        abort = hand_over.started()
        try:
            if job.size is None or have < job.size:
                have, content_type = self._transfer(job, part, have, abort)
            else:  # complete before a crash or a failed publish: no request needed
                content_type = _type_from_url(job.url)
            self._finish(job, part, final, have, content_type)
        finally:
            hand_over.ended(abort)
            with self._lock:
                self._reserved.pop(job.key, None)
            with self._status_lock:
                self.status.in_flight.pop(job.sentera_id, None)

    def _reserve(self, job: FileJob, have: int) -> None:
        """Claim the disk a download still needs (its part is already counted in _used)."""
        need = 0 if job.size is None else job.size - have
        planned = self._used + sum(self._reserved.values())
        if planned + need > self.max_disk:
            raise OverBudget(
                f"disk budget reached: {_mb(planned)} of {_mb(self.max_disk)} used or promised, "
                f"and the next file needs {_mb(need)} more (raise [storage] max_disk, or set "
                'files = "none" on a survey)'
            )
        free = self._free_space()
        if free is not None and free - need < MIN_FREE:
            raise OverBudget(
                f"the disk holding {self.files_dir} is nearly full ({_mb(free)} free): "
                "downloads wait until there is room"
            )
        self._promised += need
        self._reserved[job.key] = need
        with self._status_lock:
            self.status.in_flight[job.sentera_id] = (have, job.size)

    def _free_space(self) -> int | None:
        """Free bytes on the files' disk, asked at most every FREE_RECHECK seconds; in between,
        less what downloads were promised since (so a little less than the truth)."""
        now = time.monotonic()
        if self._free is None or now - self._free_at >= FREE_RECHECK:
            self._free, self._free_at, self._promised = _free_bytes(self.files_dir), now, 0
        return None if self._free is None else self._free - self._promised

    def _transfer(self, job: FileJob, part: Path, have: int, abort: fetch.Abort) -> tuple[int, str]:
        """In a download thread: GET (from `have` on, with Range), the body into the part."""
        assert self._client is not None and job.url is not None
        headers = {"Accept-Encoding": "identity"}
        if have:
            headers["Range"] = f"bytes={have}-"
        try:
            with self._client.get(job.url, headers, abort) as answer:
                if answer.status == 416:
                    part.unlink(missing_ok=True)  # our part is no prefix of upstream's file
                have = _resume_point(answer, have)
                content_type = _answer_type(answer) or _type_from_url(job.url)
                progress = self._progress(job)
                return transfer.receive_body(answer, part, have, progress), content_type
        except (fetch.FetchError, TimeoutError) as e:
            raise FileProblem("pending", f"download interrupted: {_describe(e)}") from None

    def _progress(self, job: FileJob) -> transfer.Progress:
        """Counts a download's bytes as they come (in its thread); stops it past its size."""
        size, status, sentera_id = job.size, self.status, job.sentera_id

        def received(n: int, have: int) -> None:
            if size is None:
                self._check_unsized(have)
            elif have > size:
                raise FileProblem("failed", f"upstream sent more than the {size} bytes of its size")
            with self._status_lock:  # several download threads count into the same figures
                status.round_bytes += n
                status.fetched_bytes += n
                status.in_flight[sentera_id] = (have, size)

        return received

    def _check_unsized(self, have: int) -> None:
        # Without a size nothing was reserved: stop before the budget is passed.
        with self._lock:
            planned = self._used + sum(self._reserved.values())
        if planned + have > self.max_disk:
            raise OverBudget(f"disk budget reached ({_mb(self.max_disk)}) during a download")

    def _prepare_directory(self, final: Path, part: Path) -> None:
        directory = final.parent
        if directory not in self._directories:
            directory.mkdir(parents=True, exist_ok=True)
            self._directories.add(directory)
        # Parts of other versions of this image can never be resumed. A part is only ever
        # created for the version being fetched, so the round's first listing has them all.
        for other in self._stale_parts.pop(final, ()):
            if other != part:
                other.unlink(missing_ok=True)

    def _finish(self, job: FileJob, part: Path, final: Path, have: int, content_type: str) -> None:
        if job.size is not None and have != job.size:
            part.unlink(missing_ok=True)
            raise FileProblem(
                "failed", f"upstream's file is {have} bytes but its metadata says {job.size}"
            )
        with self._lock:
            self._used += self._reserved.pop(job.key, 0) if job.size is not None else have
            self._complete.append(_Complete(job, part, final, have, content_type))

    # ---- publishing -----------------------------------------------------------------------

    async def _publish_batches(self, result: DownloadRound) -> None:
        """Publish what completed, every PUBLISH_DELAY, until the round's downloads are over."""
        while not self._no_more.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(PUBLISH_DELAY):
                    await self._no_more.wait()
            await self._publish(result)

    async def _publish_rest(self, publishing: asyncio.Task[None], result: DownloadRound) -> None:
        try:
            with contextlib.suppress(asyncio.CancelledError):
                await publishing
            await self._publish(result)
        finally:
            self._no_more.clear()

    async def _publish(self, result: DownloadRound) -> None:
        """fsync complete parts, rename them into place, make that durable (one fsync per
        directory), then mark them done in one transaction: a file is visible only once its
        bytes are safe on disk, and done only once its name is."""
        with self._lock:
            batch, self._complete = self._complete, []
        if not batch:
            return
        try:
            await asyncio.to_thread(_publish_files, [(c.part, c.final) for c in batch])
            current = await self.store.files_done([(c.job, c.size, c.content_type) for c in batch])
        except (OSError, StoreError) as e:
            # The rows stay pending: the next round publishes the parts still complete, and
            # downloads the others again.
            self.status.last_error = f"cannot record {len(batch)} downloaded files: {e}"
            log.warning("downloaded files not recorded", error=str(e), files=len(batch))
            result.failed += len(batch)
            return
        for complete, is_current in zip(batch, current, strict=True):
            if not is_current:
                log.info("file outdated before it arrived; it will be replaced", id=complete.id)
            result.done += 1
            result.bytes += complete.size
        self.status.fetched_files += len(batch)


class _HandOver:
    """A round's exchange between the event loop and its download threads: jobs one way,
    reports of what went wrong the other, and the means to stop the threads at once."""

    def __init__(self, loop: asyncio.AbstractEventLoop, low_water: int) -> None:
        self.low_water = low_water  # fewer jobs waiting than this: the threads ask for more
        self.reports: collections.deque[tuple[FileJob, Exception]] = collections.deque()
        self.wake = asyncio.Event()  # set (on the loop) when a thread has something to say
        self._loop = loop
        self._jobs: collections.deque[FileJob] = collections.deque()
        self._ready = threading.Condition()
        self._closed = False  # no more jobs will come
        self._stopping = threading.Event()  # the round is being cancelled
        self._aborts: set[fetch.Abort] = set()
        self._wake_pending = False

    # ---- the loop's side

    def waiting(self) -> int:
        return len(self._jobs)

    def give(self, jobs: list[FileJob]) -> bool:
        """Queue jobs for the threads. An empty list (the queue has no more) closes the hand-over;
        returns whether more may come."""
        with self._ready:
            if not jobs:
                self._closed = True
                self._ready.notify_all()
                return False
            self._jobs.extend(jobs)
            self._ready.notify(len(jobs))
        return True

    def close(self, *, abort: bool = False) -> None:
        """No new downloads; with `abort`, the running ones stop now too."""
        with self._ready:
            self._closed = True
            self._jobs.clear()
            self._ready.notify_all()
            if abort:
                self._stopping.set()
            aborts = list(self._aborts) if abort else []
        for running in aborts:
            running.abort()

    # ---- the threads' side

    def take(self) -> FileJob | None:
        """The next file to download, waiting for one; None when the round is over."""
        with self._ready:
            while not self._jobs and not self._closed:
                self._ready.wait()
            job = self._jobs.popleft() if self._jobs else None
            low = not self._closed and len(self._jobs) < self.low_water
        if low:
            self.signal()  # more before the queue runs dry
        return job

    def started(self) -> fetch.Abort:
        abort = fetch.Abort()
        with self._ready:
            self._aborts.add(abort)
        if self._stopping.is_set():
            abort.abort()
        return abort

    def ended(self, abort: fetch.Abort) -> None:
        with self._ready:
            self._aborts.discard(abort)

    def pause(self, seconds: float) -> bool:
        """Wait before trying a file again; True if the round is cancelled meanwhile."""
        return self._stopping.wait(seconds)

    def report(self, job: FileJob, problem: Exception) -> None:
        self.reports.append((job, problem))
        self.signal()

    def signal(self) -> None:
        """Wake the loop (once, however many threads ask before it wakes)."""
        with self._ready:
            if self._wake_pending:
                return
            self._wake_pending = True
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody to tell
            self._loop.call_soon_threadsafe(self._woken)

    def _woken(self) -> None:
        with self._ready:
            self._wake_pending = False
        self.wake.set()


@dataclass(frozen=True, slots=True)
class _Complete:
    """A complete part waiting to be fsynced, renamed into place and recorded."""

    job: FileJob
    part: Path
    final: Path
    size: int
    content_type: str

    @property
    def id(self) -> str:
        return self.job.sentera_id


# ---- helpers -------------------------------------------------------------------------------


def _resume_point(resp: fetch.Answer, have: int) -> int:
    """Where the body starts, by the answer's status; raises FileProblem for the others."""
    if resp.status == 200:
        return 0  # no Range support (or a fresh start): the whole file again
    if resp.status == 206:
        start = _range_start(resp.headers.get("content-range", ""))
        if start != have:
            raise FileProblem("pending", f"upstream resumed at byte {start}, not {have}")
        return have
    if resp.status == 416:
        raise FileProblem("pending", "upstream refused the resume point; starting over next try")
    if resp.status in (401, 403):
        raise FileProblem("expired", "the signed URL expired; the next sync brings a fresh one")
    if resp.status in (404, 410):
        raise FileProblem("failed", f"upstream has no file for this image (HTTP {resp.status})")
    if resp.status == 429 or resp.status >= 500:
        raise FileProblem("pending", f"upstream answered HTTP {resp.status}")
    raise FileProblem("failed", f"upstream answered HTTP {resp.status}")


def _range_start(content_range: str) -> int | None:
    match = re.fullmatch(r"\s*bytes\s+(\d+)-\d+/(\d+|\*)\s*", content_range)
    return int(match[1]) if match else None


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish_files(moves: Sequence[tuple[Path, Path]]) -> None:
    """Make complete parts the files, durably: fsync each part, then rename it into place,
    then fsync the directories (for the renames). One call per batch, in a thread."""
    parts = [part for part, _ in moves]
    if len(parts) == 1:
        _fsync_file(parts[0])
    else:
        # Concurrent fsyncs share the filesystem's journal commits: one after the other,
        # each would wait for a commit of its own.
        with ThreadPoolExecutor(min(len(parts), FSYNC_THREADS)) as pool:
            list(pool.map(_fsync_file, parts))
    directories = set()
    for part, final in moves:
        os.replace(part, final)
        directories.add(final.parent)
    for directory in directories:
        _fsync_file(directory)


_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".tif": "image/tiff", ".tiff": "image/tiff"}
_TYPES |= {".png": "image/png"}


def _answer_type(resp: fetch.Answer) -> str | None:
    """The server's Content-Type, if it names a real type (S3 often says octet-stream)."""
    kind = resp.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if not re.fullmatch(r"[a-z0-9.+-]+/[a-z0-9.+-]+", kind) or kind == "application/octet-stream":
        return None
    return kind


def _type_from_url(url: str | None) -> str:
    suffix = Path(urlsplit(url or "").path).suffix.lower()
    return _TYPES.get(suffix, "application/octet-stream")


def _free_bytes(path: Path) -> int | None:
    try:
        return shutil.disk_usage(path if path.exists() else path.parent).free
    except OSError:
        return None


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def _describe(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return "no data for too long"
    text = str(e) or type(e).__name__
    return text.split("\n", 1)[0][:200]


# ---- one-shot use: `mirrord sync` and `mirrord verify` --------------------------------------


def files_configured(config: Config) -> bool:
    return any(s.files == "all" for s in config.surveys) or any(
        f.files == "all" for f in config.fields
    )


async def download_once(config: Config, store: Store) -> DownloadRound:
    async with Downloader.for_config(config, store) as downloader:
        return await downloader.run_round()


async def sync_and_download(
    config: Config,
    *,
    surveys: Sequence[str] | None = None,
    fields: Sequence[str] | None = None,
    full: bool = False,
    progress: ProgressCallback | None = None,
) -> tuple[list[SyncRun], DownloadRound | None]:
    """`mirrord sync`: the metadata, then the files it queued. URLs that expired while files
    downloaded are renewed by one more (cheap) sync, then those files are fetched."""
    async with await Store.open(config.storage.path) as store:
        runs = await sync_from_config(
            config, surveys=surveys, fields=fields, full=full, progress=progress, store=store
        )
        if not files_configured(config) and not await store.bytes_on_disk():
            return runs, None
        result = await download_once(config, store)
        if result.expired and not any(r.retryable for r in runs):
            await sync_from_config(config, surveys=surveys, fields=fields, store=store)
            more = await download_once(config, store)
            result.done += more.done
            result.bytes += more.bytes
            result.failed += more.failed
            result.removed += more.removed
            result.expired, result.blocked = more.expired, more.blocked
        return runs, result


@dataclass
class VerifyReport:
    checked: int = 0
    missing: list[str] = field(default_factory=list)  # done files not on disk, or wrong size
    stray: list[Path] = field(default_factory=list)  # files on disk the mirror does not know
    fixed: int = 0

    @property
    def clean(self) -> bool:
        return not self.missing and not self.stray


async def verify_files(store: Store, files_dir: Path, *, fix: bool) -> VerifyReport:
    """Compare the files table with the disk. Only numbered collection directories under
    files_dir are mirrord's: nothing else there is ever touched."""
    report = VerifyReport()
    rows = await store.file_rows()
    expected: dict[Path, tuple[int, str, str, int, int | None]] = {}
    for row in rows:
        collection_id, sentera_id, state, size_on_disk, _ = row
        path = file_path(files_dir, collection_id, sentera_id)
        expected[path] = row
        if state != "done":
            continue
        report.checked += 1
        if _size_of(path) != size_on_disk or not path.is_file():
            report.missing.append(sentera_id)
            if fix:
                await store.requeue_file(collection_id, sentera_id, "missing or damaged on disk")
                path.unlink(missing_ok=True)
                report.fixed += 1
    for path in _mirrord_files(files_dir):
        owner = expected.get(_final_of(path))
        wanted = owner is not None and (
            (path.suffix != ".part" and owner[3] > 0)
            or (path.suffix == ".part" and owner[2] == "pending")
        )
        if not wanted:
            report.stray.append(path)
            if fix:
                path.unlink(missing_ok=True)
                report.fixed += 1
    return report


def _mirrord_files(files_dir: Path) -> Iterator[Path]:
    with contextlib.suppress(FileNotFoundError):
        for directory in sorted(files_dir.iterdir()):
            if directory.name.isdigit() and directory.is_dir():
                yield from (p for p in sorted(directory.iterdir()) if p.is_file())


def _final_of(path: Path) -> Path:
    """`<name>.<version>.part` -> `<name>`; a final file is itself."""
    if path.suffix != ".part":
        return path
    return path.with_name(path.name.rsplit(".", 2)[0])
