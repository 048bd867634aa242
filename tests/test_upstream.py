"""The upstream client: error classification, retries, and what a bad answer costs the mirror."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from graphql import build_schema, parse, validate
from hypothesis import given, settings
from hypothesis import strategies as st

from mirrord.config import Secret
from mirrord.fake_upstream import Behaviour, FakeUpstream
from mirrord.store import Store
from mirrord.upstream import (
    SYNC_IMAGES,
    SYNC_SURVEYS,
    AuthError,
    BadAnswer,
    HashList,
    ProtocolError,
    QueryRejected,
    RateLimited,
    RetryPolicy,
    SyncAnswer,
    UpstreamClient,
    UpstreamServerError,
    UpstreamUnavailable,
    _reader,
    parse_answer,
)
from tests.conftest import TOKEN, Mirror, assert_mirrors, make_client

SCHEMA = build_schema((Path(__file__).parents[1] / "mirrord" / "upstream.graphql").read_text())


@pytest.mark.parametrize("query", [SYNC_IMAGES, SYNC_SURVEYS])
def test_queries_validate_against_the_upstream_schema(query) -> None:  # type: ignore[no-untyped-def]
    assert validate(SCHEMA, parse(query.document)) == []


@pytest.mark.parametrize(
    ("kind", "params", "error"),
    [
        ("http_500", {}, UpstreamServerError),
        ("http_502", {}, UpstreamServerError),
        ("http_503", {}, UpstreamServerError),
        ("http_429", {"retry_after": 0}, RateLimited),
        ("cutoff", {}, BadAnswer),
        ("reset", {}, UpstreamUnavailable),
        ("graphql_error", {}, UpstreamServerError),
        ("html", {}, BadAnswer),
        ("not_json", {}, BadAnswer),
        ("hang", {"delay": 3}, UpstreamUnavailable),
    ],
)
async def test_retryable_faults_are_classified_and_retried(
    fake: FakeUpstream, kind: str, params: dict[str, float], error: type[Exception]
) -> None:
    survey = fake.data.add_survey(n_images=5)
    fake.faults.push(kind, times=1, **params)
    async with make_client(fake, attempts=1, timeout=1.0) as client:
        with pytest.raises(error) as caught:
            await client.sync_page(SYNC_IMAGES, survey, [])
    assert caught.value.retryable  # type: ignore[attr-defined]
    assert TOKEN not in str(caught.value)
    assert "upstream" in str(caught.value)
    fake.faults.push(kind, times=2, **params)
    async with make_client(fake, attempts=3, timeout=1.0) as client:
        answer = await client.sync_page(SYNC_IMAGES, survey, [])
    assert len(answer.upserted) == 5


@pytest.mark.parametrize(("kind", "error"), [("http_401", AuthError), ("bad_shape", ProtocolError)])
async def test_fatal_faults_are_not_retried(
    fake: FakeUpstream, kind: str, error: type[Exception]
) -> None:
    survey = fake.data.add_survey(n_images=5)
    fake.faults.push(kind, times=1)
    async with make_client(fake, attempts=5) as client:
        with pytest.raises(error) as caught:
            await client.sync_page(SYNC_IMAGES, survey, [])
    assert not caught.value.retryable  # type: ignore[attr-defined]
    assert fake.requests[-1].fault == kind
    assert len(fake.requests) == 1


async def test_wrong_token_and_unknown_survey(fake: FakeUpstream) -> None:
    async with UpstreamClient(fake.url, Secret("wrong-secret-123")) as client:
        with pytest.raises(AuthError) as caught:
            await client.sync_page(SYNC_IMAGES, "x", [])
    assert "wrong-secret-123" not in str(caught.value)
    async with make_client(fake) as client:
        with pytest.raises(QueryRejected, match="NOT_FOUND"):
            await client.sync_page(SYNC_IMAGES, "no_such_survey", [])


async def test_the_request_body_goes_out_whole_with_its_length(fake: FakeUpstream) -> None:
    """The body is handed over in parts (the held hashes straight from their buffer): it must
    still go out as one body with a Content-Length, not chunked, and be sent again whole on a
    retry."""
    survey = fake.data.add_survey(n_images=5)
    hashes = HashList(f"h{n:015d}" for n in range(2000))
    fake.faults.push("http_503")
    async with make_client(fake) as client:
        answer = await client.sync_page(SYNC_IMAGES, survey, hashes)
    assert answer.remaining_count == 0 and len(answer.upserted) == 5
    first, retry = fake.requests[-2:]
    assert first.fault == "http_503" and retry.fault is None
    open_list, close = hashes.parts()
    assert retry.n_hashes == 2000
    assert retry.content_length == first.content_length
    assert retry.content_length is not None and retry.content_length > len(open_list) + len(close)


async def test_retry_after_is_honoured(fake: FakeUpstream) -> None:
    survey = fake.data.add_survey(n_images=1)
    fake.faults.push("http_429", times=1, retry_after=0.3)
    async with make_client(fake, attempts=3) as client:
        client._retry = type(client._retry)(max_attempts=3, base=0.01, cap=5.0)
        started = time.monotonic()
        await client.sync_page(SYNC_IMAGES, survey, [])
    assert time.monotonic() - started >= 0.3


async def test_retry_after_beyond_the_cap_ends_the_attempt(fake: FakeUpstream) -> None:
    survey = fake.data.add_survey(n_images=1)
    fake.faults.push("http_429", times=1, retry_after=3600)
    async with make_client(fake, attempts=5) as client:
        with pytest.raises(RateLimited) as caught:
            await client.sync_page(SYNC_IMAGES, survey, [])
    assert caught.value.retry_after == 3600
    assert len(fake.requests) == 1


async def test_unreachable_upstream(tmp_path: Path) -> None:
    async with UpstreamClient("http://127.0.0.1:9/graphql", Secret(TOKEN), timeout=2) as client:
        client._retry = type(client._retry)(max_attempts=2, base=0.01, cap=0.02)
        with pytest.raises(UpstreamUnavailable, match="cannot reach upstream"):
            await client.sync_page(SYNC_IMAGES, "s", [])


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"data": None}, "no data.sync_images"),
        (
            {"data": {"sync_images": {"remaining_count": "7", "upserted": [], "deleted": []}}},
            "remaining_count",
        ),
        (
            {"data": {"sync_images": {"remaining_count": 0, "upserted": {}, "deleted": []}}},
            "upserted is not a list",
        ),
        (
            {
                "data": {
                    "sync_images": {
                        "remaining_count": 0,
                        "upserted": [{"sentera_id": "a"}],
                        "deleted": [],
                    }
                }
            },
            r"upserted\[0\] \(a\) has no content_hash",
        ),
        (
            {
                "data": {
                    "sync_images": {
                        "remaining_count": 0,
                        "upserted": [],
                        "deleted": [{"content_hash": "h"}],
                    }
                }
            },
            "has no sentera_id",
        ),
        (
            {
                "data": {
                    "sync_images": {
                        "remaining_count": 0,
                        "upserted": [],
                        "deleted": [],
                        "failed": [{"message": "m"}],
                    }
                }
            },
            r"failed\[0\] has no key",
        ),
        *(
            ({"data": {"sync_images": {"upserted": [], "deleted": [], **result}}}, message)
            for result, message in [
                ({"remaining_count": -1}, "remaining_count is not a count"),
                ({"remaining_count": True}, "remaining_count is not a count"),
                ({"remaining_count": 1.0}, "remaining_count is not a count"),
                ({"remaining_count": 0, "upserted": [None]}, r"upserted\[0\] is not an object"),
                ({"remaining_count": 0, "upserted": [[]]}, r"upserted\[0\] is not an object"),
                (
                    {"remaining_count": 0, "upserted": [{"sentera_id": "", "content_hash": "h"}]},
                    r"upserted\[0\] has no sentera_id",
                ),
                (
                    {"remaining_count": 0, "upserted": [{"sentera_id": 7, "content_hash": "h"}]},
                    r"upserted\[0\] has no sentera_id",
                ),
                (
                    {"remaining_count": 0, "upserted": [{"sentera_id": "a", "content_hash": ""}]},
                    r"upserted\[0\] \(a\) has no content_hash",
                ),
                (
                    {"remaining_count": 0, "upserted": [{"sentera_id": "a", "content_hash": 1}]},
                    r"upserted\[0\] \(a\) has no content_hash",
                ),
                ({"remaining_count": 0, "deleted": None}, "deleted is not a list"),
                ({"remaining_count": 0, "deleted": [3]}, r"deleted\[0\] is not an object"),
                ({"remaining_count": 0, "failed": {"key": "k"}}, "failed is not a list"),
            ]
        ),
        ({"data": {"sync_images": {"remaining_count": 0, "upserted": []}}}, "deleted is not"),
        ({"data": [{"sync_images": {}}]}, "no data.sync_images"),
    ],
)
def test_contract_violations_name_the_problem(payload: dict, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ProtocolError, match=message):
        parse_answer(SYNC_IMAGES, payload)
    # The answer reader (well-formed answers) leaves them to parse_answer, and its message.
    for files in (False, True):
        assert _reader(SYNC_IMAGES, files).read(json.dumps(payload).encode()) is None


@pytest.mark.parametrize("kind", ["bad_shape", "html", "not_json", "http_401", "cutoff"])
async def test_a_bad_answer_loses_nothing_already_mirrored(
    fake: FakeUpstream, store: Store, kind: str
) -> None:
    mirror = Mirror(fake, store, reconcile_every=0)
    survey = fake.data.add_survey(n_images=1500)
    assert (await mirror.sync_survey(survey)).outcome == "converged"
    fake.data.update_images(survey, 200)
    fake.faults.push(kind, times=10)
    run = await mirror.sync_survey(survey, attempts=2)
    assert run.outcome == "failed"
    assert run.error and "upstream" in run.error and TOKEN not in run.error
    held = await store.items("images", survey)
    assert len(held) == 1500
    status = {s.parent_id: s for s in await store.statuses()}[survey]
    assert status.last_error == run.error and status.last_success_at is not None
    fake.faults.clear()
    assert (await mirror.sync_survey(survey)).outcome == "converged"
    await assert_mirrors(store, fake, survey)


async def test_faults_during_a_sync_are_ridden_out(fake: FakeUpstream, store: Store) -> None:
    mirror = Mirror(fake, store, reconcile_every=0)
    survey = fake.data.add_survey(n_images=4000)
    fake.faults.random(
        rate=0.4,
        kinds=["http_500", "http_503", "cutoff", "reset", "graphql_error", "html", "not_json"],
        seed=3,
    )
    run = await mirror.sync_survey(survey, attempts=12)
    fake.faults.clear()
    assert run.outcome == "converged", run.error
    assert any(r.fault for r in fake.requests)
    await assert_mirrors(store, fake, survey)


async def test_offline_then_back(fake: FakeUpstream, store: Store) -> None:
    mirror = Mirror(fake, store, reconcile_every=0)
    survey = fake.data.add_survey(n_images=1200)
    await mirror.sync_survey(survey)
    fake.data.add_images(survey, 10)
    fake.faults.offline = True
    run = await mirror.sync_survey(survey, attempts=2)
    assert run.outcome == "failed" and "upstream" in (run.error or "")
    assert len(await store.items("images", survey)) == 1200
    fake.faults.offline = False
    assert (await mirror.sync_survey(survey)).outcome == "converged"
    await assert_mirrors(store, fake, survey)


async def test_each_round_trip_reports_its_outcome(fake: FakeUpstream) -> None:
    survey = fake.data.add_survey(n_images=2)
    outcomes: list[str] = []
    fake.faults.push("http_503")
    fake.faults.push("reset")
    fake.faults.push("html")
    async with UpstreamClient(
        fake.url,
        Secret(TOKEN),
        retry=RetryPolicy(max_attempts=4, base=0.01, cap=0.02),
        on_request=outcomes.append,
    ) as client:
        await client.sync_page(SYNC_IMAGES, survey, [])
    assert outcomes == ["server_error", "unavailable", "bad_answer", "ok"]


# ---- the answer reader: well-formed answers without a dict per item -------------------------


def _both_ways(raw: bytes, files: bool = False) -> tuple[SyncAnswer | None, SyncAnswer | Exception]:
    """What the reader makes of an answer's bytes, and what the general path makes of them."""
    fast = _reader(SYNC_IMAGES, files).read(raw)
    general: SyncAnswer | Exception
    try:
        general = parse_answer(SYNC_IMAGES, orjson.loads(raw), files=files)
    except (ProtocolError, orjson.JSONDecodeError, AttributeError) as e:
        general = e  # AttributeError: a payload that is not an object (_decode refuses those)
    return fast, general


def _assert_same(fast: SyncAnswer, general: SyncAnswer, raw: bytes) -> None:
    assert [(u.sentera_id, u.content_hash) for u in fast.upserted] == [
        (u.sentera_id, u.content_hash) for u in general.upserted
    ]
    for up, expected in zip(fast.upserted, general.upserted, strict=True):
        assert orjson.loads(up.data) == orjson.loads(expected.data)
        assert up.data.encode() in raw  # upstream's own text, not a re-serialisation
    assert fast.deleted == general.deleted
    assert fast.failed == general.failed
    assert fast.remaining_count == general.remaining_count
    assert fast.files == general.files


@pytest.mark.parametrize("files", [False, True])
async def test_the_fakes_answers_are_read_without_the_general_path(
    fake: FakeUpstream, files: bool
) -> None:
    survey = fake.data.add_survey(n_images=30)
    fake.behaviour = Behaviour(unknown_hashes="deleted")
    body = {
        "query": SYNC_IMAGES.document,
        "variables": {"parent": survey, "hashes": ["never-issued"]},
    }
    async with (
        aiohttp.ClientSession() as session,
        session.post(fake.url, json=body, headers={"Authorization": f"Bearer {TOKEN}"}) as resp,
    ):
        raw = await resp.read()
    for text in (raw, orjson.dumps(orjson.loads(raw))):  # as the fake spaces it, and compact
        fast, general = _both_ways(text, files)
        assert fast is not None and isinstance(general, SyncAnswer)
        assert len(fast.upserted) == 30 and fast.deleted == [("", "never-issued")]
        assert all(isinstance(w.size, int) and w.url for w in fast.files) and (
            len(fast.files) == (30 if files else 0)
        )
        _assert_same(fast, general, text)


_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
)
_json = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
_ids = st.one_of(st.sampled_from(["", "a", 0, 1.5, None, True, [], {}]), _json)


@st.composite
def _item(draw: st.DrawFn, keys: tuple[str, ...]) -> Any:
    if draw(st.integers(0, 20)) == 0:
        return draw(_json)  # not an object, most likely
    item = draw(st.dictionaries(st.sampled_from(["__typename", "size", "url", "x", "y"]), _json))
    for key in keys:  # mostly right, sometimes missing or wrong
        odds = draw(st.integers(0, 20))
        if odds > 1:
            item[key] = draw(st.text(min_size=1, max_size=6))
        elif odds == 1:
            item[key] = draw(_ids)
    if draw(st.booleans()):
        item["size"] = draw(st.integers(-5, 2**64) | _json)
        item["url"] = draw(st.sampled_from(["", "https://x/y"]) | _json)
    return item


def _sometimes(strategy: st.SearchStrategy[Any], odd: st.SearchStrategy[Any]) -> Any:
    """Mostly `strategy`, one time in ten `odd`."""
    return st.integers(0, 9).flatmap(lambda n: odd if n == 0 else strategy)


_answers = st.fixed_dictionaries(
    {
        "data": _sometimes(
            st.fixed_dictionaries(
                {
                    "sync_images": _sometimes(
                        st.fixed_dictionaries(
                            {
                                "remaining_count": _sometimes(
                                    st.integers(0, 2**63 - 1),
                                    st.sampled_from([-1, 2**63, 2**64, 2**65, True, 1.0, "7"])
                                    | _json,
                                ),
                                "upserted": _sometimes(
                                    st.lists(_item(("sentera_id", "content_hash")), max_size=5),
                                    _json,
                                ),
                                "deleted": _sometimes(
                                    st.lists(_item(("sentera_id", "content_hash")), max_size=3),
                                    _json,
                                ),
                            },
                            optional={
                                "failed": _sometimes(
                                    st.lists(
                                        st.fixed_dictionaries(
                                            {"key": _ids},
                                            optional={k: _json for k in ("message", "code")},
                                        ),
                                        max_size=2,
                                    ),
                                    _json,
                                ),
                                "other": _json,
                            },
                        ),
                        _json,
                    )
                }
            ),
            _json,
        )
    },
    optional={"errors": _sometimes(st.sampled_from([None, []]), _json), "extensions": _json},
)


@settings(max_examples=400, deadline=None)
@given(answer=_answers, compact=st.booleans(), files=st.booleans())
def test_the_reader_accepts_nothing_the_general_path_refuses(
    answer: dict[str, Any], compact: bool, files: bool
) -> None:
    """Whatever the answer, the reader either gives exactly what the general path gives, or
    hands the answer over to it (which then refuses it with its own error, or reads it)."""
    raw = orjson.dumps(answer) if compact and _orjson_can(answer) else json.dumps(answer).encode()
    fast, general = _both_ways(raw, files)
    if isinstance(general, Exception):
        assert fast is None
    elif fast is not None:
        _assert_same(fast, general, raw)
        assert not answer.get("errors")


def _orjson_can(value: Any) -> bool:
    try:
        orjson.dumps(value)
    except TypeError:
        return False  # integers beyond 64 bits
    return True


@pytest.mark.parametrize(
    "raw",
    [
        # Not UTF-8 (orjson refuses the whole body): in an item, and outside any item.
        b'{"data": {"sync_images": {"remaining_count": 0, "upserted": '
        b'[{"sentera_id": "a", "content_hash": "h", "x": "\xff"}], "deleted": []}}}',
        b'{"data": {"sync_images": {"remaining_count": 0, "upserted": [], "deleted": []}},'
        b' "extensions": "\xfe"}',
        # A number beyond a double's range outside the items.
        b'{"data": {"sync_images": {"remaining_count": 0, "upserted": [], '
        b'"deleted": [{"sentera_id": "a", "content_hash": "h", "n": 1e400}]}}}',
        b'{"data": {"sync_images": {"remaining_count": 0, "upserted": [], "deleted": []}},'
        b' "extensions": {"cost": 1e400}}',
        # A key no answer to the query holds (the general path reads past it).
        b'{"data": {"sync_images": {"remaining_count": 0, "upserted": [], "deleted": [],'
        b' "cursor": "x"}}}',
        # GraphQL errors beside data.
        b'{"data": {"sync_images": {"remaining_count": 0, "upserted": [], "deleted": []}},'
        b' "errors": [{"message": "partly failed"}]}',
        # A failed entry without a key; a remaining_count past 63 bits.
        b'{"data": {"sync_images": {"remaining_count": 0, "upserted": [], "deleted": [],'
        b' "failed": [{"message": "m"}]}}}',
        b'{"data": {"sync_images": {"remaining_count": 9223372036854775808, "upserted": [],'
        b' "deleted": []}}}',
    ],
)
def test_answers_the_reader_hands_to_the_general_path(raw: bytes) -> None:
    assert _reader(SYNC_IMAGES, False).read(raw) is None


def test_the_reader_keeps_numbers_as_upstream_wrote_them() -> None:
    raw = (
        b'{"data":{"sync_images":{"remaining_count":0,"deleted":[],"upserted":'
        b'[{"sentera_id":"a","content_hash":"h","size":123456789012345678901234567890,'
        b'"pitch":-0.10}]}}}'
    )
    answer = _reader(SYNC_IMAGES, True).read(raw)
    assert answer is not None
    assert answer.upserted[0].data == (
        '{"sentera_id":"a","content_hash":"h","size":123456789012345678901234567890,"pitch":-0.10}'
    )
    assert answer.files[0].size is None  # not a size SQLite can hold
