"""The fake upstream's image files at their signed URLs: real sockets, Range, file faults."""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import sys
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest

from mirrord.fake_files import CHUNK, file_chunks, parse_range
from mirrord.fake_upstream import FakeData, FakeUpstream, FileFaults
from tests.conftest import wait_for

AUTH = {"Authorization": "Bearer test-token"}
URL_QUERY = """
query Urls($survey: ID!) {
  sync_images(survey_sentera_id: $survey, content_hashes: []) {
    upserted { sentera_id ... on Image { url } }
  }
}"""


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client_session:
        yield client_session


@pytest.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    # Every file spans two to four chunks, so ranges and cuts cross chunk boundaries.
    data = FakeData(seed=3, file_sizes=(70_000, 200_000))
    data.add_survey(4)
    async with FakeUpstream(data) as upstream:
        yield upstream


def _image(fake: FakeUpstream, k: int = 0) -> dict[str, Any]:
    survey = fake.data.survey_ids()[0]
    return list(fake.data.images(survey).values())[k]


async def _get(
    session: aiohttp.ClientSession,
    url: str,
    headers: dict[str, str] | None = None,
    method: str = "GET",
) -> tuple[int, Any, bytes]:
    async with session.request(method, url, headers=headers) as response:
        return response.status, response.headers, await response.read()


def _signed(fake: FakeUpstream, sentera_id: str, expires: int) -> str:
    sig = fake.data.url_signature(sentera_id, expires)
    return f"{fake.base}/files/{sentera_id}?expires={expires}&sig={sig}"


# ---- the data -----------------------------------------------------------------------------


def test_file_sizes_are_drawn_in_range_deterministically() -> None:
    def sizes(file_sizes: tuple[int, int] | None) -> list[int]:
        data = FakeData(seed=5, file_sizes=file_sizes)
        survey = data.add_survey(200)
        return [image["size"] for image in data.images(survey).values()]

    tiny = sizes((1_000, 50_000))
    assert tiny == sizes((1_000, 50_000))
    assert all(1_000 <= s <= 50_000 for s in tiny) and len(set(tiny)) > 150
    assert set(sizes((1_000_000, 1_000_000))) == {1_000_000}
    assert all(1_000_000 <= s <= 20_005_150 for s in sizes(None))
    for bad in ((0, 10), (10, 5)):
        with pytest.raises(ValueError):
            FakeData(file_sizes=bad)


def test_file_bytes_are_exact_deterministic_and_sliceable() -> None:
    data = FakeData(seed=2, file_sizes=(150_000, 150_000))
    survey = data.add_survey(2)
    first, second = data.images(survey)
    whole = data.file_bytes(first)
    assert len(whole) == 150_000 and whole == data.file_bytes(first)
    assert data.file_sha256(first) == hashlib.sha256(whole).hexdigest()
    assert whole != data.file_bytes(second)
    # No two chunks alike: a download resumed at a whole-chunk offset error cannot match.
    assert whole[:CHUNK] != whole[CHUNK : 2 * CHUNK]
    chash = data.image_hashes(survey)[first]
    for start, stop in ((0, 1), (CHUNK - 3, CHUNK + 3), (1, 149_999), (2 * CHUNK, 150_000)):
        pieces = list(file_chunks(first, chash, 150_000, start, stop))
        assert b"".join(pieces) == whole[start:stop]
        assert all(len(p) <= CHUNK for p in pieces)
    with pytest.raises(KeyError):
        data.file_bytes("nope")


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("bytes=0-9", (0, 10, True)),
        ("bytes=5-", (5, 100, True)),
        ("bytes=-30", (70, 100, True)),
        ("bytes=-500", (0, 100, True)),
        ("bytes=90-5000", (90, 100, True)),
        ("bytes=100-", None),
        ("bytes=-0", None),
        ("bytes=9-3", (0, 100, False)),
        ("bytes=0-1,5-6", (0, 100, False)),
        ("items=0-5", (0, 100, False)),
        ("bytes=+1-5", (0, 100, False)),
        ("bytes=abc", (0, 100, False)),
        (f"bytes=0-{'9' * 5000}", (0, 100, True)),
        (f"bytes={'9' * 5000}-", None),
    ],
)
def test_parse_range(header: str, expected: tuple[int, int, bool] | None) -> None:
    assert parse_range(header, 100) == expected


# ---- serving --------------------------------------------------------------------------------


async def test_full_download_needs_no_bearer_token(
    fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    image = _image(fake)
    status, headers, body = await _get(session, image["url"])
    assert status == 200
    assert body == fake.data.file_bytes(image["sentera_id"])
    assert hashlib.sha256(body).hexdigest() == fake.data.file_sha256(image["sentera_id"])
    assert headers["Content-Type"] == "image/jpeg"
    assert headers["Content-Length"] == str(image["size"]) == str(len(body))
    assert headers["ETag"] == f'"{image["content_hash"]}"'
    assert headers["Accept-Ranges"] == "bytes"
    (record,) = fake.file_requests
    assert (record.method, record.sentera_id, record.range_header) == (
        "GET",
        image["sentera_id"],
        None,
    )
    assert (record.status, record.bytes_sent, record.fault) == (200, image["size"], None)
    assert fake.file_bytes_sent == image["size"]


async def test_head(fake: FakeUpstream, session: aiohttp.ClientSession) -> None:
    image = _image(fake)
    status, headers, body = await _get(session, image["url"], method="HEAD")
    assert (status, body) == (200, b"")
    assert headers["Content-Length"] == str(image["size"])
    assert headers["ETag"] == f'"{image["content_hash"]}"'
    status, headers, _ = await _get(session, image["url"], {"Range": "bytes=-10"}, "HEAD")
    assert status == 206 and headers["Content-Range"].endswith(f"/{image['size']}")
    assert fake.file_bytes_sent == 0


@pytest.mark.parametrize(
    "form", ["bytes=0-9", "bytes={c}-{c2}", "bytes=100-", "bytes=-500", "bytes=7-99999999"]
)
async def test_range_forms(fake: FakeUpstream, session: aiohttp.ClientSession, form: str) -> None:
    image = _image(fake)
    header = form.format(c=CHUNK - 5, c2=CHUNK + 5)  # the second one crosses a chunk boundary
    start, stop, _ = parse_range(header, image["size"]) or (0, 0, False)
    status, headers, body = await _get(session, image["url"], {"Range": header})
    assert status == 206
    assert body == fake.data.file_bytes(image["sentera_id"])[start:stop]
    assert headers["Content-Range"] == f"bytes {start}-{stop - 1}/{image['size']}"
    assert headers["Content-Length"] == str(stop - start)
    assert fake.file_bytes_sent == stop - start


@pytest.mark.parametrize("form", ["bytes={size}-", "bytes=-0"])
async def test_unsatisfiable_range(
    fake: FakeUpstream, session: aiohttp.ClientSession, form: str
) -> None:
    image = _image(fake)
    header = form.format(size=image["size"])
    status, headers, _ = await _get(session, image["url"], {"Range": header})
    assert status == 416 and headers["Content-Range"] == f"bytes */{image['size']}"
    assert fake.file_requests[-1].status == 416


async def test_if_range_with_another_version_sends_everything(
    fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    image = _image(fake)
    same = {"Range": "bytes=10-", "If-Range": f'"{image["content_hash"]}"'}
    assert (await _get(session, image["url"], same))[0] == 206
    stale = {"Range": "bytes=10-", "If-Range": '"an-older-hash"'}
    status, _, body = await _get(session, image["url"], stale)
    assert status == 200 and body == fake.data.file_bytes(image["sentera_id"])


# ---- refusals -------------------------------------------------------------------------------


async def test_bad_signatures_get_403(fake: FakeUpstream, session: aiohttp.ClientSession) -> None:
    image, other = _image(fake, 0), _image(fake, 1)
    url = image["url"]
    query = parse_qs(urlsplit(url).query)
    expires, sig = query["expires"][0], query["sig"][0]
    base = f"{fake.base}/files/{image['sentera_id']}"
    bad_urls = [
        f"{base}?expires={expires}&sig={'0' * len(sig)}",
        f"{base}?expires={expires}",
        f"{base}?expires={int(expires) + 1}&sig={sig}",  # the signature covers the expiry
        f"{base}?expires=soon&sig={sig}",
        f"{base}?expires={'9' * 5000}&sig={sig}",
        other["url"].replace(other["sentera_id"], image["sentera_id"]),  # another image's sig
    ]
    for bad in bad_urls:
        status, headers, body = await _get(session, bad)
        assert status == 403 and b"SignatureDoesNotMatch" in body, bad
        assert headers["Content-Type"].startswith("application/xml")
    assert (await _get(session, url))[0] == 200


async def test_expired_url_gets_403(fake: FakeUpstream, session: aiohttp.ClientSession) -> None:
    image = _image(fake)
    past = _signed(fake, image["sentera_id"], int(time.time()) - 5)
    status, _, body = await _get(session, past)
    assert status == 403 and b"Request has expired" in body


async def _answered_urls(
    session: aiohttp.ClientSession, fake: FakeUpstream, survey: str
) -> dict[str, str]:
    body = {"query": URL_QUERY, "variables": {"survey": survey}}
    async with session.post(fake.url, json=body, headers=AUTH) as response:
        answer = await response.json()
    return {i["sentera_id"]: i["url"] for i in answer["data"]["sync_images"]["upserted"]}


async def test_expire_urls_voids_issued_urls_and_later_answers_work(
    fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    survey = fake.data.survey_ids()[0]
    before = await _answered_urls(session, fake, survey)
    sentera_id, old_url = next(iter(before.items()))
    assert (await _get(session, old_url))[0] == 200
    fake.data.expire_urls()
    status, _, body = await _get(session, old_url)
    assert status == 403 and b"Request has expired" in body
    new_url = (await _answered_urls(session, fake, survey))[sentera_id]
    assert new_url != old_url
    status, _, body = await _get(session, new_url)
    assert status == 200 and body == fake.data.file_bytes(sentera_id)


async def test_expire_urls_voids_urls_issued_under_an_expiry_set_by_hand(
    fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    image = _image(fake)
    fake.data.url_expires = int(time.time()) - 10  # new answers now carry dead URLs
    fake.data.expire_urls()
    assert (await _get(session, image["url"]))[0] == 403  # issued before, still in the future
    assert (await _get(session, _image(fake)["url"]))[0] == 200


async def test_deleted_image_gets_404_after_the_signature_check(
    fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    image = _image(fake)
    fake.data.delete_images(fake.data.survey_ids()[0], ids=[image["sentera_id"]])
    status, _, body = await _get(session, image["url"])
    assert status == 404 and b"NoSuchKey" in body
    assert (await _get(session, image["url"].replace("sig=", "sig=0")))[0] == 403


async def test_an_update_changes_the_bytes_behind_the_same_url(
    fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    image = _image(fake)
    _, _, old = await _get(session, image["url"])
    fake.data.update_images(fake.data.survey_ids()[0], ids=[image["sentera_id"]])
    status, headers, new = await _get(session, image["url"])  # signed for the old version
    assert status == 200 and len(new) == len(old) and new != old
    assert new == fake.data.file_bytes(image["sentera_id"])
    assert headers["ETag"] == f'"{_image(fake)["content_hash"]}"' != f'"{image["content_hash"]}"'


# ---- file faults ----------------------------------------------------------------------------


async def test_cut_then_resume_fetches_only_the_missing_bytes(
    fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    image = _image(fake)
    fake.file_faults.push("cut", after=10_000)
    received = bytearray()
    with pytest.raises(aiohttp.ClientPayloadError):
        async with session.get(image["url"]) as response:
            assert response.status == 200 and response.content_length == image["size"]
            async for chunk in response.content.iter_any():
                received += chunk
    assert len(received) == 10_000 and fake.file_requests[-1].fault == "cut"
    status, _, rest = await _get(session, image["url"], {"Range": f"bytes={len(received)}-"})
    assert status == 206
    assert bytes(received) + rest == fake.data.file_bytes(image["sentera_id"])
    assert [r.bytes_sent for r in fake.file_requests] == [10_000, image["size"] - 10_000]
    assert fake.file_bytes_sent == image["size"]


async def test_cut_never_sends_a_whole_body(
    fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    image = _image(fake)
    fake.file_faults.push("cut", after=10**9)
    fake.file_faults.push("cut")  # half
    for expected in (image["size"] - 1, image["size"] // 2):
        with pytest.raises(aiohttp.ClientPayloadError):
            await _get(session, image["url"])
        assert fake.file_requests[-1].bytes_sent == expected
    assert (await _get(session, image["url"]))[0] == 200


async def test_status_faults(fake: FakeUpstream, session: aiohttp.ClientSession) -> None:
    url = _image(fake)["url"]
    fake.file_faults.push("status", retry_after=2)
    fake.file_faults.push("status", code=500)
    status, headers, _ = await _get(session, url)
    assert status == 503 and headers["Retry-After"] == "2"
    assert (await _get(session, url))[0] == 500
    assert (await _get(session, url))[0] == 200
    assert [r.fault for r in fake.file_requests] == ["status", "status", None]


@pytest.mark.parametrize("how", ["fault", "persistent"])
async def test_slow_downloads(fake: FakeUpstream, session: aiohttp.ClientSession, how: str) -> None:
    image = _image(fake)
    rate = image["size"] / 0.3  # the whole file in 0.3 s
    if how == "fault":
        fake.file_faults.push("slow", rate=rate)
    else:
        fake.file_faults.rate = rate
    started = time.monotonic()
    status, _, body = await _get(session, image["url"])
    assert time.monotonic() - started >= 0.27
    assert status == 200 and body == fake.data.file_bytes(image["sentera_id"])
    if how == "fault":  # a one-shot fault slows one download only
        await _get(session, image["url"])
        assert [r.fault for r in fake.file_requests] == ["slow", None]
    else:
        started = time.monotonic()
        await _get(session, image["url"])
        assert time.monotonic() - started >= 0.27


async def test_hang_times_the_client_out_and_stop_is_prompt(
    session: aiohttp.ClientSession,
) -> None:
    data = FakeData(seed=4, file_sizes=(1_000, 1_000))
    data.add_survey(1)
    fake = FakeUpstream(data)
    await fake.start()
    url = next(iter(data.images(data.survey_ids()[0]).values()))["url"]
    try:
        fake.file_faults.push("hang", seconds=60, times=2)
        timeout = aiohttp.ClientTimeout(sock_read=0.3)
        async with session.get(url, timeout=timeout) as response:
            assert response.status == 200  # the headers came; then nothing
            with pytest.raises(asyncio.TimeoutError):
                await response.read()
        pending = asyncio.create_task(_get(session, url))
        await wait_for(lambda: len(fake.file_requests) == 2 and fake.file_requests[1].status == 200)
    finally:
        started = time.monotonic()
        await fake.stop()
    assert time.monotonic() - started < 3.0
    with pytest.raises((aiohttp.ClientPayloadError, aiohttp.ClientConnectionError)):
        await pending  # a hung download dies with the server instead of holding it up


async def test_ranges_off_sends_whole_files(
    fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    image = _image(fake)
    fake.file_faults.ranges = False
    status, headers, body = await _get(session, image["url"], {"Range": "bytes=100-"})
    assert status == 200 and body == fake.data.file_bytes(image["sentera_id"])
    assert "Accept-Ranges" not in headers and "Content-Range" not in headers
    assert (await _get(session, image["url"], {"Range": f"bytes={10**9}-"}))[0] == 200


async def test_file_and_graphql_faults_do_not_take_each_other(
    fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    image = _image(fake)
    fake.faults.push("http_500")
    fake.file_faults.push("status")
    # A HEAD and a refusal take no file fault: it waits for the download it was meant for.
    assert (await _get(session, image["url"], method="HEAD"))[0] == 200
    assert (await _get(session, image["url"].replace("sig=", "sig=0")))[0] == 403
    assert (await _get(session, image["url"]))[0] == 503
    assert (await _get(session, image["url"]))[0] == 200
    assert fake.faults.queued == 1 and fake.file_faults.queued == 0
    urls = {"query": URL_QUERY, "variables": {"survey": fake.data.survey_ids()[0]}}
    async with session.post(fake.url, json=urls, headers=AUTH) as response:
        assert response.status == 500


async def test_offline_drops_file_requests(
    fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    fake.faults.offline = True
    with pytest.raises(aiohttp.ClientConnectionError):
        await _get(session, _image(fake)["url"])
    assert fake.file_requests[-1].status is None
    fake.faults.offline = False
    assert (await _get(session, _image(fake)["url"]))[0] == 200


def test_file_fault_typos_are_rejected() -> None:
    faults = FileFaults()
    for kind, params in [
        ("explode", {}),
        ("cut", {"aftr": 1}),
        ("cut", {"after": -1}),
        ("status", {"code": 200}),
        ("status", {"code": 600}),
        ("slow", {"rate": 0}),
        ("hang", {"seconds": "long"}),
    ]:
        with pytest.raises(ValueError):
            faults.push(kind, **params)
    with pytest.raises(ValueError):
        faults.apply({"rate": -5})
    assert faults.queued == 0


# ---- control API and runner -----------------------------------------------------------------


async def _control(
    session: aiohttp.ClientSession, fake: FakeUpstream, path: str, body: Any = None
) -> tuple[int, Any]:
    url = f"{fake.base}/_fake/{path}"
    request = session.get(url) if body is None else session.post(url, json=body)
    async with request as response:
        return response.status, await response.json(content_type=None)


async def test_control_api_round_trip(fake: FakeUpstream, session: aiohttp.ClientSession) -> None:
    image = _image(fake)
    change = {"push": [{"kind": "cut", "after": 5, "times": 2}], "ranges": False, "rate": 1e9}
    status, state = await _control(session, fake, "file_faults", change)
    assert status == 200 and state == {"queued": 2, "ranges": False, "rate": 1e9, "chunked": False}
    assert fake.file_faults.ranges is False and fake.file_faults.rate == 1e9
    with pytest.raises(aiohttp.ClientPayloadError):
        await _get(session, image["url"], {"Range": "bytes=3-"})  # ranges off: a cut 200
    assert (await _control(session, fake, "file_faults", {"clear": True}))[1] == {
        "queued": 0,
        "ranges": True,
        "rate": None,
        "chunked": False,
    }
    assert (await _control(session, fake, "file_faults"))[1]["queued"] == 0
    bogus = {"push": [{"kind": "bogus"}]}
    assert (await _control(session, fake, "file_faults", bogus))[0] == 400

    status, expiry = await _control(session, fake, "expire_urls", {})
    assert status == 200 and expiry["url_expires"] == fake.data.url_expires
    assert expiry["revoked_through"] == fake.data.url_revoked_through < expiry["url_expires"]
    assert (await _get(session, image["url"]))[0] == 403
    mutate = {"op": "expire_urls"}
    assert (await _control(session, fake, "mutate", mutate))[1]["result"] > expiry["url_expires"]

    status, records = await _control(session, fake, "file_requests")
    assert status == 200
    assert [(r["status"], r["bytes_sent"], r["fault"]) for r in records] == [
        (200, 5, "cut"),
        (403, 0, None),
    ]


async def test_standalone_runner_serves_files_of_the_given_sizes(
    session: aiohttp.ClientSession,
) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mirrord.fake_upstream",
        "--port", "0", "--images", "3", "--file-sizes", "2000", "2000",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        info = json.loads(await asyncio.wait_for(process.stdout.readline(), timeout=20))
        body = {"query": URL_QUERY, "variables": {"survey": info["survey_ids"][0]}}
        headers = {"Authorization": "Bearer test-token"}
        async with session.post(info["url"], json=body, headers=headers) as response:
            images = (await response.json())["data"]["sync_images"]["upserted"]
        for image in images:
            status, _, data = await _get(session, image["url"])
            assert status == 200 and len(data) == 2000
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), timeout=10) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
