"""Image files: the engine queues them, the downloader fetches them from the fake upstream over
real sockets into a real directory, and the mirror's files equal upstream's bytes."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mirrord.fake_upstream import FakeData, FakeUpstream
from mirrord.files import Downloader, DownloadRound, file_path, part_files, verify_files
from mirrord.store import Store
from mirrord.sync import SyncEngine, SyncRun
from mirrord.upstream import SYNC_IMAGES
from tests.conftest import TOKEN, make_client, wait_for

pytestmark = pytest.mark.asyncio


@pytest.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    data = FakeData(seed=11, file_sizes=(1_000, 300_000))
    async with FakeUpstream(data, token=TOKEN) as server:
        yield server


class FileMirror:
    """The engine with files on for every survey, and a downloader, over one store."""

    def __init__(self, fake: FakeUpstream, store: Store, files_dir: Path) -> None:
        self.fake, self.store, self.files_dir = fake, store, files_dir
        self.max_disk = 10**9
        self.files_on = True

    async def sync(self, survey: str, *, full: bool = False) -> SyncRun:
        async with make_client(self.fake) as client:
            engine = SyncEngine(
                self.store,
                client,
                reconcile_every=0,
                files_surveys=[survey] if self.files_on else [],
            )
            run = await engine.sync_collection(SYNC_IMAGES, survey, full=full)
        assert run.outcome == "converged", run
        return run

    async def download(self, concurrency: int = 4, timeout: float = 5.0) -> DownloadRound:
        async with Downloader(
            self.store,
            self.files_dir,
            max_disk=self.max_disk,
            concurrency=concurrency,
            timeout=timeout,
        ) as downloader:
            return await downloader.run_round()

    async def collection_id(self, survey: str) -> int:
        coll = await self.store.find_collection("images", survey)
        assert coll is not None
        return coll.id

    async def path(self, survey: str, sentera_id: str) -> Path:
        return file_path(self.files_dir, await self.collection_id(survey), sentera_id)

    async def assert_files_equal_upstream(self, survey: str) -> None:
        """Exactly upstream's files, by hash; nothing else in the survey's directory."""
        upstream = self.fake.data.images(survey)
        cid = await self.collection_id(survey)
        expected = {file_path(self.files_dir, cid, sid): sid for sid in upstream}
        on_disk = set((self.files_dir / str(cid)).iterdir())
        assert on_disk == set(expected), (
            f"missing {len(set(expected) - on_disk)}, extra {sorted(on_disk - set(expected))[:3]}"
        )
        for path, sid in expected.items():
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            assert digest == self.fake.data.file_sha256(sid), sid


@pytest.fixture
def files(fake: FakeUpstream, store: Store, tmp_path: Path) -> FileMirror:
    return FileMirror(fake, store, tmp_path / "files")


def requests_for(fake: FakeUpstream, sentera_id: str) -> list[tuple[str | None, int | None, int]]:
    return [
        (r.range_header, r.status, r.bytes_sent)
        for r in fake.file_requests
        if r.sentera_id == sentera_id and r.method == "GET"
    ]


async def test_a_survey_converges_to_exactly_the_servers_bytes(files: FileMirror) -> None:
    survey = files.fake.data.add_survey(40)
    await files.sync(survey)
    result = await files.download()
    assert result.done == 40 and result.failed == 0 and result.blocked is None
    await files.assert_files_equal_upstream(survey)
    tally = (await files.store.file_tallies())[survey]
    assert (tally.done, tally.pending, tally.failed) == (40, 0, 0)
    sizes = sum(i["size"] for i in files.fake.data.images(survey).values())
    assert tally.bytes_done == sizes == await files.store.bytes_on_disk()
    # Unchanged images are never fetched again, whatever syncs and rounds follow.
    before = len(files.fake.file_requests)
    await files.sync(survey)
    await files.sync(survey, full=True)
    again = await files.download()
    assert again.done == 0 and len(files.fake.file_requests) == before
    assert not list(part_files(files.files_dir))


async def test_an_update_replaces_the_file_and_a_delete_removes_it(files: FileMirror) -> None:
    survey = files.fake.data.add_survey(12)
    await files.sync(survey)
    await files.download()
    changed = files.fake.data.update_images(survey, 3)
    deleted = files.fake.data.delete_images(survey, 2)
    gone_paths = [await files.path(survey, sid) for sid in deleted]
    assert all(p.exists() for p in gone_paths)
    before = len(files.fake.file_requests)
    await files.sync(survey)
    result = await files.download()
    # Removed: the 2 deleted images' files and the 3 out-of-date versions (before the new ones
    # are fetched, so the disk never holds both).
    assert result.done == 3 and result.removed == 5
    assert not any(p.exists() for p in gone_paths)
    fetched = {r.sentera_id for r in files.fake.file_requests[before:]}
    assert fetched == set(changed)  # only the changed images
    await files.assert_files_equal_upstream(survey)
    # The rows of deleted images are forgotten once their files are off the disk.
    rows = await files.store.file_rows()
    assert {sid for _, sid, *_ in rows} == set(files.fake.data.images(survey))


async def test_a_cut_download_resumes_without_fetching_what_it_has(files: FileMirror) -> None:
    survey = files.fake.data.add_survey(1)
    (image,) = files.fake.data.images(survey).values()
    size = image["size"]
    await files.sync(survey)
    files.fake.file_faults.push("cut", after=size // 3)
    result = await files.download()
    assert result.done == 1
    tries = requests_for(files.fake, image["sentera_id"])
    assert len(tries) == 2, tries
    (first_range, _, cut_at), (second_range, status, rest) = tries
    assert first_range is None and 0 < cut_at < size
    assert status == 206 and second_range is not None
    resumed_at = int(second_range.removeprefix("bytes=").rstrip("-"))
    # The resume starts where the received bytes end: nothing fetched twice.
    assert resumed_at > 0 and resumed_at + rest == size
    await files.assert_files_equal_upstream(survey)


async def test_without_range_support_a_cut_download_starts_over(files: FileMirror) -> None:
    survey = files.fake.data.add_survey(1)
    (image,) = files.fake.data.images(survey).values()
    await files.sync(survey)
    files.fake.file_faults.ranges = False
    files.fake.file_faults.push("cut", after=image["size"] // 2)
    assert (await files.download()).done == 1
    statuses = [status for _, status, _ in requests_for(files.fake, image["sentera_id"])]
    assert statuses == [200, 200]
    await files.assert_files_equal_upstream(survey)


async def test_chunked_answers_download_and_resume(files: FileMirror) -> None:
    survey = files.fake.data.add_survey(6)
    await files.sync(survey)
    files.fake.file_faults.chunked = True  # no Content-Length: the parser frames the bodies
    files.fake.file_faults.push("cut", after=500)
    result = await files.download(concurrency=1)
    assert result.done == 6 and result.failed == 0
    await files.assert_files_equal_upstream(survey)
    gets = [r for r in files.fake.file_requests if r.method == "GET"]
    assert len(gets) == 7 and gets[0].fault == "cut"
    assert gets[1].sentera_id == gets[0].sentera_id
    assert gets[1].range_header == "bytes=500-" and gets[1].status == 206


async def test_connections_are_kept_alive_and_carry_no_token(files: FileMirror) -> None:
    survey = files.fake.data.add_survey(24)
    await files.sync(survey)
    assert (await files.download(concurrency=3)).done == 24
    gets = [r for r in files.fake.file_requests if r.method == "GET"]
    assert len(gets) == 24 and len({r.client_port for r in gets}) <= 3
    for request in gets:
        assert request.headers["Accept-Encoding"] == "identity"
        assert "Authorization" not in request.headers and TOKEN not in str(request.headers)


async def test_a_download_that_stops_moving_times_out_and_is_retried(
    files: FileMirror,
) -> None:
    survey = files.fake.data.add_survey(1)
    (image,) = files.fake.data.images(survey).values()
    await files.sync(survey)
    files.fake.file_faults.push("hang", seconds=60)  # the head, then nothing
    started = time.monotonic()
    result = await files.download(timeout=0.5)
    assert result.done == 1 and time.monotonic() - started < 5
    assert [status for _, status, _ in requests_for(files.fake, image["sentera_id"])] == [200, 200]
    await files.assert_files_equal_upstream(survey)


async def test_a_cancelled_round_leaves_no_task_behind_and_a_part_that_resumes(
    files: FileMirror,
) -> None:
    survey = files.fake.data.add_survey(1)
    (image,) = files.fake.data.images(survey).values()
    await files.sync(survey)
    files.fake.file_faults.rate = 4_000  # bytes/s: still downloading when cancelled
    running = asyncio.ensure_future(files.download())
    await wait_for(lambda: any(p.stat().st_size > 0 for p in part_files(files.files_dir)))
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    ours = ("Downloader.", "Client.", "_Connection.")
    assert not [t for t in asyncio.all_tasks() if t.get_coro().__qualname__.startswith(ours)]
    (part,) = part_files(files.files_dir)
    have = part.stat().st_size
    assert 0 < have < image["size"]
    files.fake.file_faults.rate = None
    assert (await files.download()).done == 1
    header, status, sent = requests_for(files.fake, image["sentera_id"])[-1]
    assert header == f"bytes={have}-" and status == 206 and sent == image["size"] - have
    await files.assert_files_equal_upstream(survey)


async def test_a_crash_leaves_a_part_that_the_next_round_resumes(files: FileMirror) -> None:
    survey = files.fake.data.add_survey(1)
    (image,) = files.fake.data.images(survey).values()
    await files.sync(survey)
    # What a power cut mid-download leaves: the first bytes in the part file, row pending.
    final = await files.path(survey, image["sentera_id"])
    from mirrord.files import part_path

    part = part_path(final, image["content_hash"])
    part.parent.mkdir(parents=True)
    part.write_bytes(files.fake.data.file_bytes(image["sentera_id"])[:5000])
    assert (await files.download()).done == 1
    ((header, status, sent),) = requests_for(files.fake, image["sentera_id"])
    assert header == "bytes=5000-" and status == 206 and sent == image["size"] - 5000
    await files.assert_files_equal_upstream(survey)


async def test_a_complete_part_left_by_a_crash_is_published_without_a_request(
    files: FileMirror,
) -> None:
    survey = files.fake.data.add_survey(3)
    await files.sync(survey)
    # What a crash after the download but before publishing leaves: every byte in the part.
    from mirrord.files import part_path

    for image in files.fake.data.images(survey).values():
        final = await files.path(survey, image["sentera_id"])
        final.parent.mkdir(parents=True, exist_ok=True)
        body = files.fake.data.file_bytes(image["sentera_id"])
        part_path(final, image["content_hash"]).write_bytes(body)
    result = await files.download()
    assert result.done == 3 and not files.fake.file_requests
    await files.assert_files_equal_upstream(survey)
    assert not list(part_files(files.files_dir))


async def test_files_done_records_only_the_version_still_wanted(files: FileMirror) -> None:
    survey = files.fake.data.add_survey(2)
    await files.sync(survey)
    old, other = await files.store.file_jobs(10, 0)
    files.fake.data.update_images(survey, ids=[old.sentera_id])
    await files.sync(survey)  # the row now wants a newer version
    assert await files.store.files_done([(old, 5, None), (other, 7, "image/jpeg")]) == [
        False,
        True,
    ]
    rows = {sid: (state, size) for _, sid, state, size, _ in await files.store.file_rows()}
    # The outdated file keeps its bytes on the row, so the next round removes it.
    assert rows[old.sentera_id] == ("pending", 5) and rows[other.sentera_id] == ("done", 7)


async def test_server_errors_are_retried_and_counted(files: FileMirror) -> None:
    survey = files.fake.data.add_survey(3)
    await files.sync(survey)
    files.fake.file_faults.push("status", times=2, code=503)
    result = await files.download(concurrency=1)
    assert result.done == 3 and result.failed == 0
    await files.assert_files_equal_upstream(survey)


async def test_an_expired_url_is_renewed_by_the_next_sync(files: FileMirror) -> None:
    survey = files.fake.data.add_survey(10)
    await files.sync(survey)
    files.fake.data.expire_urls()
    gone = files.fake.data.delete_images(survey, 1)[0]
    result = await files.download()
    assert result.done == 0 and result.expired == 10 and result.failed == 0
    tally = (await files.store.file_tallies())[survey]
    assert tally.expired == 10
    # The next delta sync leaves the expired images' hashes out: upstream re-sends them with
    # fresh URLs (no new versions: the images did not change), and the one deleted meanwhile
    # is found gone, since upstream did not re-send it.
    run = await files.sync(survey)
    assert run.upserted == 0 and run.deleted == 1
    held = await files.store.items("images", survey)
    assert gone not in held and len(held) == 9
    result = await files.download()
    assert result.done == 9
    await files.assert_files_equal_upstream(survey)


async def test_urls_too_old_to_trust_are_renewed_before_they_are_tried(
    files: FileMirror, tmp_path: Path
) -> None:
    survey = files.fake.data.add_survey(5)
    await files.sync(survey)
    # As if the laptop slept for two hours after that sync: the URLs have aged.
    with sqlite3.connect(tmp_path / "mirror.db") as db:
        db.execute("UPDATE files SET url_seen_at = url_seen_at - 7200")
    result = await files.download()
    assert result.done == 0 and not files.fake.file_requests  # not worth a request
    seq_before = await files.store.last_seq()
    run = await files.sync(survey)
    # Upstream re-sent the 5 images (their hashes were left out): fresh URLs, same versions,
    # so the change feed does not move.
    assert run.upserted == 0 and await files.store.last_seq() == seq_before
    with sqlite3.connect(tmp_path / "mirror.db") as db:
        (oldest,) = db.execute("SELECT min(url_seen_at) FROM files").fetchone()
    assert oldest > time.time() - 60
    assert (await files.download()).done == 5
    await files.assert_files_equal_upstream(survey)


async def test_the_disk_budget_stops_downloads_cleanly(files: FileMirror) -> None:
    survey = files.fake.data.add_survey(20)
    sizes = sorted(i["size"] for i in files.fake.data.images(survey).values())
    files.max_disk = sum(sizes) // 2
    await files.sync(survey)
    result = await files.download()
    assert result.blocked is not None and "max_disk" in result.blocked
    on_disk = sum(p.stat().st_size for p in (files.files_dir).rglob("*") if p.is_file())
    assert 0 < on_disk <= files.max_disk
    tally = (await files.store.file_tallies())[survey]
    assert tally.done == result.done and tally.pending == 20 - result.done
    # More room: the queue finishes, nothing fetched twice.
    files.max_disk = 10**9
    more = await files.download()
    assert more.done == 20 - result.done and more.blocked is None
    await files.assert_files_equal_upstream(survey)


async def test_turning_files_off_removes_them_and_on_fetches_them(files: FileMirror) -> None:
    survey = files.fake.data.add_survey(6)
    await files.sync(survey)
    await files.download()
    files.files_on = False
    await files.sync(survey)
    result = await files.download()
    assert result.removed == 6 and await files.store.bytes_on_disk() == 0
    assert not any(p.is_file() for p in files.files_dir.rglob("*"))
    assert await files.store.file_tallies() == {}
    files.files_on = True
    await files.sync(survey)  # the URLs held are days old as far as it knows: renewed
    assert (await files.download()).done == 6
    await files.assert_files_equal_upstream(survey)


async def test_verify_finds_and_fixes_a_deleted_file_and_a_stray_one(files: FileMirror) -> None:
    survey = files.fake.data.add_survey(5)
    await files.sync(survey)
    await files.download()
    clean = await verify_files(files.store, files.files_dir, fix=False)
    assert clean.clean and clean.checked == 5
    victim = next(iter(files.fake.data.images(survey)))
    (await files.path(survey, victim)).unlink()
    stray = files.files_dir / str(await files.collection_id(survey)) / "holiday.jpg"
    stray.write_bytes(b"not ours")
    outside = files.files_dir / "README.txt"  # not in a collection directory: never touched
    outside.write_text("left alone")
    found = await verify_files(files.store, files.files_dir, fix=False)
    assert found.missing == [victim] and found.stray == [stray]
    fixed = await verify_files(files.store, files.files_dir, fix=True)
    assert fixed.fixed == 2 and not stray.exists() and outside.exists()
    # The missing file is fetched again, with a fresh URL, after the next sync.
    await files.sync(survey)
    assert (await files.download()).done == 1
    await files.assert_files_equal_upstream(survey)
    assert (await verify_files(files.store, files.files_dir, fix=False)).clean


async def test_odd_ids_never_escape_the_files_directory(tmp_path: Path) -> None:
    for hostile in ("../../etc/passwd", "..", ".", "a/b", "x" * 400, "ok.part", "\x00", "é"):
        path = file_path(tmp_path, 3, hostile)
        assert path.parent == tmp_path / "3" and "/" not in path.name
        assert path.name not in ("..", ".") and not path.name.endswith(".part")
    assert file_path(tmp_path, 3, "abc_IM_123").name == "abc_IM_123"


async def test_a_cancelled_round_stops_its_downloads_at_once_and_keeps_their_bytes(
    files: FileMirror,
) -> None:
    """Downloads run in threads (mirrord.transfer): cancelling the round (the daemon stopping,
    a config reload) must stop them mid-body, not wait for slow files to end."""
    survey = files.fake.data.add_survey(4)
    await files.sync(survey)
    files.fake.file_faults.rate = 20_000  # bytes/s: each file would take many seconds
    downloading = asyncio.ensure_future(files.download(timeout=30))

    def started() -> bool:
        return any(p.stat().st_size > 10_000 for p in part_files(files.files_dir))

    await wait_for(started, timeout=15)
    cancelled_at = time.monotonic()
    downloading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await downloading
    assert time.monotonic() - cancelled_at < 2  # not the files' remaining seconds
    had = {p.name.rsplit(".", 2)[0]: p.stat().st_size for p in part_files(files.files_dir)}
    assert had and all(had.values())
    # The next round resumes each from what its part holds.
    files.fake.file_faults.rate = None
    before = len(files.fake.file_requests)
    assert (await files.download()).done == len(had)
    resumed = {r.sentera_id: r.range_header for r in files.fake.file_requests[before:]}
    assert resumed == {sentera_id: f"bytes={size}-" for sentera_id, size in had.items()}
    await files.assert_files_equal_upstream(survey)
