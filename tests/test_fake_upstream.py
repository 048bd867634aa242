"""The fake upstream, exercised from the client side: real sockets, real GraphQL, real faults."""

from __future__ import annotations

import asyncio
import json
import math
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import aiohttp
import pytest

from mirrord.fake_upstream import (
    IMAGE_FIELDS,
    SURVEY_FIELDS,
    Behaviour,
    FakeData,
    FakeUpstream,
    Faults,
)

Json = dict[str, Any]
TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
NEVER_ISSUED = "AAAAAAAAAAAAAAAA"


def _selection(fields: Sequence[str]) -> str:
    return " ".join(f"{f} {{ sentera_id }}" if f.endswith("_by") else f for f in fields)


# Every field of each type, so answers can be compared with FakeData's own view.
IMAGE_QUERY = f"""
query SyncImages($survey: ID!, $hashes: [String!]!) {{
  sync_images(survey_sentera_id: $survey, content_hashes: $hashes) {{
    remaining_count
    upserted {{ sentera_id ... on Image {{ {_selection(IMAGE_FIELDS)} }} }}
    deleted {{ sentera_id content_hash }}
    failed {{ key message code }}
  }}
}}"""
SURVEY_QUERY = f"""
query SyncSurveys($field: ID!, $hashes: [String!]!) {{
  sync_surveys(field_sentera_id: $field, content_hashes: $hashes) {{
    remaining_count
    upserted {{ ... on Survey {{ {_selection(SURVEY_FIELDS)} }} }}
    deleted {{ sentera_id content_hash }}
    failed {{ key message code }}
  }}
}}"""


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client_session:
        yield client_session


@pytest.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    data = FakeData(seed=7)
    data.add_survey(20)
    async with FakeUpstream(data) as upstream:
        yield upstream


def _first_survey(fake: FakeUpstream) -> str:
    return fake.data.survey_ids()[0]


async def _post(
    session: aiohttp.ClientSession,
    fake: FakeUpstream,
    query: str,
    variables: Json | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Json]:
    body = {"query": query, "variables": variables}
    async with session.post(fake.url, json=body, headers=AUTH if headers is None else headers) as r:
        return r.status, await r.json()


async def _sync_page(
    session: aiohttp.ClientSession, fake: FakeUpstream, survey_id: str, hashes: Sequence[str]
) -> Json:
    variables = {"survey": survey_id, "hashes": list(hashes)}
    status, body = await _post(session, fake, IMAGE_QUERY, variables)
    assert status == 200 and "errors" not in body, body
    result: Json = body["data"]["sync_images"]
    return result


class Client:
    """A correct mirror client in miniature: replace by sentera_id, delete by (id, hash)."""

    def __init__(self, session: aiohttp.ClientSession, fake: FakeUpstream, survey_id: str):
        self.session, self.fake, self.survey_id = session, fake, survey_id
        self.held: dict[str, Json] = {}
        self.answers: list[Json] = []

    def hashes(self) -> list[str]:
        return [item["content_hash"] for item in self.held.values()]

    async def page(self, extra: Sequence[str] = ()) -> Json:
        answer = await _sync_page(self.session, self.fake, self.survey_id, [*self.hashes(), *extra])
        for gone in answer["deleted"]:
            mine = self.held.get(gone["sentera_id"])
            if mine is not None and mine["content_hash"] == gone["content_hash"]:
                del self.held[gone["sentera_id"]]
        for item in answer["upserted"]:
            self.held[item["sentera_id"]] = item
        self.answers.append(answer)
        return answer

    async def run(self, max_pages: int = 100) -> int:
        """Sync to the end as documented; returns the number of pages it took."""
        for pages in range(1, max_pages + 1):
            answer = await self.page()
            if not (answer["upserted"] or answer["deleted"]) or answer["remaining_count"] == 0:
                return pages
        raise AssertionError("sync did not converge")


# ---- transport and auth --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("authorization", "status"),
    [
        (f"Bearer {TOKEN}", 200),
        (f"bearer {TOKEN}", 200),
        (TOKEN, 200),  # older clients send the bare token
        ("Bearer wrong-token", 401),
        ("wrong-token", 401),
        (None, 401),
    ],
)
async def test_auth(
    fake: FakeUpstream, session: aiohttp.ClientSession, authorization: str | None, status: int
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    variables = {"survey": _first_survey(fake), "hashes": []}
    got, body = await _post(session, fake, IMAGE_QUERY, variables, headers)
    assert got == status
    if status == 401:
        assert body["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"
    else:
        assert len(body["data"]["sync_images"]["upserted"]) == 20


async def test_get_form_answers_like_post(
    fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    variables = {"survey": _first_survey(fake), "hashes": []}
    params = {"query": IMAGE_QUERY, "variables": json.dumps(variables)}
    async with session.get(fake.url, params=params, headers=AUTH) as response:
        assert response.status == 200
        via_get = await response.json()
    _, via_post = await _post(session, fake, IMAGE_QUERY, variables)
    assert via_get == via_post
    assert fake.requests[0].method == "GET" and fake.requests[0].field == "sync_images"


async def test_graphql_and_http_errors(fake: FakeUpstream, session: aiohttp.ClientSession) -> None:
    survey = _first_survey(fake)
    status, body = await _post(session, fake, "{ sync_images { bogus } }")
    assert status == 200 and "data" not in body
    assert {e["extensions"]["code"] for e in body["errors"]} == {"GRAPHQL_VALIDATION_FAILED"}

    status, body = await _post(session, fake, "{ sync_images(")
    assert status == 200 and body["errors"][0]["extensions"]["code"] == "GRAPHQL_PARSE_FAILED"

    status, body = await _post(session, fake, IMAGE_QUERY, {"survey": "nope", "hashes": []})
    assert status == 200 and body["data"] is None
    assert body["errors"][0]["message"] == "Survey not found"
    assert body["errors"][0]["extensions"]["code"] == "NOT_FOUND"

    status, body = await _post(session, fake, IMAGE_QUERY, {"survey": survey, "hashes": None})
    assert status == 200 and body["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT"

    async with session.post(fake.url, data=b"{not json", headers=AUTH) as response:
        assert response.status == 400
        assert (await response.json())["errors"][0]["extensions"]["code"] == "BAD_REQUEST"
    async with session.post(fake.url, json={"variables": {}}, headers=AUTH) as response:
        assert response.status == 400


async def test_hash_list_coercion_matches_graphql_core(
    fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    """The fast path for `[String!]!` variables changes nothing a client can observe."""
    survey = _first_survey(fake)
    held = list(fake.data.image_hashes(survey).values())[:5]
    via_variable = await _sync_page(session, fake, survey, held)
    # The seed example's form: hashes inline, coerced by graphql-core itself.
    inline = IMAGE_QUERY.replace("($survey: ID!, $hashes: [String!]!)", "")
    inline = inline.replace("$survey", json.dumps(survey)).replace("$hashes", json.dumps(held))
    _, body = await _post(session, fake, inline)
    assert body["data"]["sync_images"] == via_variable and len(via_variable["upserted"]) == 15
    # A lone string is a one-item list under GraphQL input coercion.
    _, body = await _post(session, fake, IMAGE_QUERY, {"survey": survey, "hashes": held[0]})
    assert len(body["data"]["sync_images"]["upserted"]) == 19
    assert fake.requests[-1].n_hashes == 0  # not a list on the wire
    # Anything but strings is still graphql-core's to reject, with its own message.
    _, body = await _post(session, fake, IMAGE_QUERY, {"survey": survey, "hashes": ["a", 5]})
    error = body["errors"][0]
    assert error["extensions"]["code"] == "BAD_USER_INPUT" and "$hashes" in error["message"]


# ---- data ----------------------------------------------------------------------------------


def test_data_is_deterministic_and_hashes_unique() -> None:
    def build() -> tuple[FakeData, str]:
        data = FakeData(seed=3)
        survey = data.add_survey(50)
        data.update_images(survey, 10)
        data.delete_images(survey, 5)
        data.add_images(survey, 5)
        return data, survey

    (a, survey_a), (b, survey_b) = build(), build()
    assert survey_a == survey_b and a.image_hashes(survey_a) == b.image_hashes(survey_b)
    assert a.images(survey_a).keys() == b.images(survey_b).keys()
    before = a.image_hashes(survey_a)
    updated = a.update_images(survey_a, ids=list(before)[:20])
    after = a.image_hashes(survey_a)
    assert not {after[i] for i in updated} & set(before.values())  # always a new hash
    assert len(set(after.values())) == len(after)
    image = next(iter(a.images(survey_a).values()))
    assert list(image) == list(IMAGE_FIELDS)
    assert image["camera_make"] == "Sentera" and 1_000_000 <= image["size"] <= 21_000_000
    assert len(image["content_hash"]) == 16 and "_IM_" in image["sentera_id"]


def test_generation_is_fast() -> None:
    started = time.perf_counter()
    data = FakeData(seed=1)
    survey = data.add_survey(n_images=100_000)
    elapsed = time.perf_counter() - started
    assert len(data.image_hashes(survey)) == 100_000
    assert elapsed < 4.0, f"generating 100,000 images took {elapsed:.2f} s"


def test_behaviour_rejects_typos() -> None:
    with pytest.raises(ValueError, match="order"):
        Behaviour(order="random")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="image_page_limit"):
        Behaviour(image_page_limit=0)


async def test_answers_carry_every_field_exactly(
    fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    survey = _first_survey(fake)
    answer = await _sync_page(session, fake, survey, [])
    assert {i["sentera_id"]: i for i in answer["upserted"]} == fake.data.images(survey)
    assert answer["upserted"][0]["url"].startswith(f"{fake.base}/files/")
    field_id = fake.data.field_of(survey)
    variables = {"field": field_id, "hashes": []}
    _, body = await _post(session, fake, SURVEY_QUERY, variables)
    surveys = body["data"]["sync_surveys"]["upserted"]
    assert {s["sentera_id"]: s for s in surveys} == fake.data.surveys(field_id)


# ---- the sync contract ---------------------------------------------------------------------


@pytest.mark.parametrize("n_images", [0, 1, 1000, 1001])
async def test_full_sync_converges(session: aiohttp.ClientSession, n_images: int) -> None:
    data = FakeData(seed=n_images)
    survey = data.add_survey(n_images)
    async with FakeUpstream(data) as fake:
        client = Client(session, fake, survey)
        pages = await client.run()
    assert client.held == data.images(survey)
    assert pages == max(1, math.ceil(n_images / 1000))
    assert all(len(a["upserted"]) <= 1000 for a in client.answers)
    assert client.answers[-1]["remaining_count"] == 0


def _mutate(data: FakeData, survey: str) -> None:
    data.update_images(survey, 15)
    data.delete_images(survey, 7)
    data.add_images(survey, 12)


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("order", ["deleted_first", "upserted_first", "shuffled"])
@pytest.mark.parametrize("mode", ["never", "same_answer", "before", "after"])
async def test_resync_converges_in_every_behaviour(
    session: aiohttp.ClientSession, mode: Any, order: Any, shared: bool
) -> None:
    data = FakeData(seed=11)
    survey = data.add_survey(60)
    behaviour = Behaviour(
        old_hash_in_deleted=mode, order=order, shared_limit=shared, image_page_limit=10
    )
    async with FakeUpstream(data, behaviour=behaviour, seed=5) as fake:
        client = Client(session, fake, survey)
        await client.run()
        _mutate(data, survey)
        await client.run()
        assert client.held == data.images(survey)
        await client.run()  # a later sync also drains anything still owed
    assert client.held == data.images(survey)
    for answer in client.answers:
        n_up, n_del = len(answer["upserted"]), len(answer["deleted"])
        assert n_up + n_del <= 10 if shared else max(n_up, n_del) <= 10


async def _synced_then_changed(
    session: aiohttp.ClientSession, fake: FakeUpstream
) -> tuple[Client, dict[str, str], dict[str, str]]:
    """A client synced to 10 images; then 3 are updated and 2 deleted. Returns the old hashes."""
    survey = _first_survey(fake)
    client = Client(session, fake, survey)
    await client.run()
    before = fake.data.image_hashes(survey)
    ids = list(before)
    updated = fake.data.update_images(survey, ids=ids[:3])
    deleted = fake.data.delete_images(survey, ids=ids[3:5])
    return client, {i: before[i] for i in updated}, {i: before[i] for i in deleted}


def _pairs(items: list[Json]) -> set[tuple[str, str]]:
    return {(i["sentera_id"], i["content_hash"]) for i in items}


@pytest.mark.parametrize("mode", ["never", "same_answer", "before", "after"])
async def test_old_hash_in_deleted_modes(session: aiohttp.ClientSession, mode: Any) -> None:
    data = FakeData(seed=2)
    data.add_survey(10)
    async with FakeUpstream(data, behaviour=Behaviour(old_hash_in_deleted=mode)) as fake:
        client, updated, deleted = await _synced_then_changed(session, fake)
        old_updated, gone = set(updated.items()), set(deleted.items())
        first = await client.page()
        ups = {i["sentera_id"] for i in first["upserted"]}
        # A deleted item's stale hash is reported in every mode, with its sentera_id.
        assert gone <= _pairs(first["deleted"])
        if mode == "never":
            assert ups == set(updated) and _pairs(first["deleted"]) == gone
            assert first["remaining_count"] == 0
        elif mode == "same_answer":
            assert ups == set(updated) and _pairs(first["deleted"]) == gone | old_updated
            assert first["remaining_count"] == 0
        elif mode == "before":
            assert ups == set() and _pairs(first["deleted"]) == gone | old_updated
            assert first["remaining_count"] == 3  # the withheld new versions
            second = await client.page()
            assert {i["sentera_id"] for i in second["upserted"]} == set(updated)
            assert second["remaining_count"] == 0
        else:
            assert ups == set(updated) and _pairs(first["deleted"]) == gone
            assert first["remaining_count"] == 3  # the old hashes it now owes
            sent = set(client.hashes())
            assert not sent & set(updated.values())  # the client no longer holds them
            second = await client.page()
            assert _pairs(second["deleted"]) == old_updated and not second["upserted"]
            assert second["remaining_count"] == 0
            assert not (await client.page())["deleted"]  # reported once only
        assert client.held == data.images(client.survey_id)


async def test_after_mode_owes_per_token(session: aiohttp.ClientSession) -> None:
    data = FakeData(seed=2)
    data.add_survey(10)
    async with FakeUpstream(data, behaviour=Behaviour(old_hash_in_deleted="after")) as fake:
        client, _, _ = await _synced_then_changed(session, fake)
        await client.page()
        fake.token = "rotated"  # a different client (token) is owed nothing
        variables = {"survey": client.survey_id, "hashes": client.hashes()}
        _, body = await _post(session, fake, IMAGE_QUERY, variables, {"Authorization": "rotated"})
        assert body["data"]["sync_images"]["deleted"] == []


@pytest.mark.parametrize(
    ("order", "first_has"),
    [("deleted_first", "deleted"), ("upserted_first", "upserted")],
)
async def test_order_decides_who_fills_the_page(
    session: aiohttp.ClientSession, order: Any, first_has: str
) -> None:
    data = FakeData(seed=4)
    survey = data.add_survey(30)
    behaviour = Behaviour(order=order, image_page_limit=5)
    async with FakeUpstream(data, behaviour=behaviour) as fake:
        client = Client(session, fake, survey)
        await client.run()
        data.delete_images(survey, 8)
        data.add_images(survey, 8)
        first = await client.page()
        assert len(first[first_has]) == 5 and first["remaining_count"] == 11
        other = "upserted" if first_has == "deleted" else "deleted"
        assert first[other] == []


async def test_shuffled_is_replayable(session: aiohttp.ClientSession) -> None:
    async def run_once() -> tuple[list[Json], list[str]]:
        data = FakeData(seed=9)
        survey = data.add_survey(40)
        in_data_order = list(data.image_hashes(survey))
        behaviour = Behaviour(order="shuffled", image_page_limit=7)
        async with FakeUpstream(data, behaviour=behaviour, seed=1) as fake:
            client = Client(session, fake, survey)
            await client.run()
            _mutate(data, survey)
            await client.run()
            assert client.held == data.images(survey)
            trace = [
                {k: [i["sentera_id"] for i in a[k]] for k in ("upserted", "deleted")}
                for a in client.answers
            ]
            return trace, in_data_order

    (first, in_data_order), (second, _) = await run_once(), await run_once()
    assert first == second
    assert first[0]["upserted"] != in_data_order[:7]


@pytest.mark.parametrize("shared", [True, False])
async def test_page_limit(session: aiohttp.ClientSession, shared: bool) -> None:
    data = FakeData(seed=5)
    survey = data.add_survey(30)
    behaviour = Behaviour(shared_limit=shared, image_page_limit=10, order="upserted_first")
    async with FakeUpstream(data, behaviour=behaviour) as fake:
        client = Client(session, fake, survey)
        await client.run()
        data.delete_images(survey, 12)
        data.add_images(survey, 12)
        await client.run()
    assert client.held == data.images(survey)
    sizes = [(len(a["upserted"]), len(a["deleted"])) for a in client.answers]
    if shared:
        assert all(up + dl <= 10 for up, dl in sizes)
    else:
        assert all(up <= 10 and dl <= 10 for up, dl in sizes)
        assert any(up + dl > 10 for up, dl in sizes)


async def test_page_limit_of_one_still_converges(session: aiohttp.ClientSession) -> None:
    data = FakeData(seed=6)
    survey = data.add_survey(4)
    async with FakeUpstream(data, behaviour=Behaviour(image_page_limit=1)) as fake:
        client = Client(session, fake, survey)
        await client.run()
        data.update_images(survey, 2)  # a same_answer pair cannot fit a page of one
        await client.run()
    assert client.held == data.images(survey)


@pytest.mark.parametrize("mode", ["ignore", "deleted", "failed"])
async def test_unknown_hashes(
    fake: FakeUpstream, session: aiohttp.ClientSession, mode: Any
) -> None:
    fake.behaviour = Behaviour(unknown_hashes=mode)
    client = Client(session, fake, _first_survey(fake))
    await client.run()
    answer = await client.page(extra=[NEVER_ISSUED])
    assert answer["upserted"] == []
    if mode == "ignore":
        assert answer["deleted"] == [] and answer["failed"] == []
        assert answer["remaining_count"] == 0
    elif mode == "deleted":
        assert answer["deleted"] == [{"sentera_id": "", "content_hash": NEVER_ISSUED}]
        assert answer["remaining_count"] == 0
    else:
        assert answer["deleted"] == []
        assert [(f["key"], f["code"]) for f in answer["failed"]] == [(NEVER_ISSUED, "UNKNOWN_HASH")]
        assert answer["remaining_count"] == 1  # failed_in_remaining defaults to True


@pytest.mark.parametrize("counted", [True, False])
async def test_failed_in_remaining(
    fake: FakeUpstream, session: aiohttp.ClientSession, counted: bool
) -> None:
    fake.behaviour = Behaviour(failed_in_remaining=counted, image_page_limit=5)
    survey = _first_survey(fake)
    failing = set(list(fake.data.image_hashes(survey))[:3])
    fake.data.set_failing(failing)
    client = Client(session, fake, survey)
    first = await client.page()
    assert len(first["upserted"]) == 5 and {f["key"] for f in first["failed"]} == failing
    assert {f["code"] for f in first["failed"]} == {"INTERNAL"}
    # 17 to send, 5 sent: 12 left, plus the 3 failures when they count.
    assert first["remaining_count"] == 12 + (3 if counted else 0)
    await client.run()
    last = await client.page()
    assert last["upserted"] == [] and len(last["failed"]) == 3
    assert last["remaining_count"] == (3 if counted else 0)
    assert set(fake.data.images(survey)) - set(client.held) == failing
    fake.data.set_failing(set())
    await client.run()
    assert client.held == fake.data.images(survey)
    assert client.answers[-1]["failed"] == [] and client.answers[-1]["remaining_count"] == 0


async def test_empty_failed_can_be_null(fake: FakeUpstream, session: aiohttp.ClientSession) -> None:
    fake.behaviour = Behaviour(empty_failed="null")
    answer = await _sync_page(session, fake, _first_survey(fake), [])
    assert answer["failed"] is None


async def test_data_changing_between_pages(session: aiohttp.ClientSession) -> None:
    data = FakeData(seed=8)
    survey = data.add_survey(500)
    async with FakeUpstream(data, behaviour=Behaviour(image_page_limit=100)) as fake:
        edits = iter(range(3))

        def other_users_edit() -> None:
            if next(edits, None) is not None:
                data.add_images(survey, 5)
                data.update_images(survey, 5)
                data.delete_images(survey, 2)

        fake.on_answer = other_users_edit
        client = Client(session, fake, survey)
        await client.run()
        fake.on_answer = None
        await client.run()  # the run above may stop while edits are still unseen
    assert client.held == data.images(survey)


async def test_sync_surveys_and_deleted_survey(session: aiohttp.ClientSession) -> None:
    data = FakeData(seed=12)
    field_id = data.add_field(n_surveys=3, images_per_survey=2)
    async with FakeUpstream(data) as fake:
        variables = {"field": field_id, "hashes": []}
        _, body = await _post(session, fake, SURVEY_QUERY, variables)
        held = {
            s["sentera_id"]: s["content_hash"] for s in body["data"]["sync_surveys"]["upserted"]
        }
        assert held == data.survey_hashes(field_id)
        doomed, edited = data.survey_ids(field_id)[:2]
        old_hash = held[edited]
        data.delete_survey(doomed)
        data.update_survey(edited)
        variables = {"field": field_id, "hashes": list(held.values())}
        _, body = await _post(session, fake, SURVEY_QUERY, variables)
        answer = body["data"]["sync_surveys"]
        assert _pairs(answer["deleted"]) == {(doomed, held[doomed]), (edited, old_hash)}
        assert [s["sentera_id"] for s in answer["upserted"]] == [edited]
        _, body = await _post(session, fake, IMAGE_QUERY, {"survey": doomed, "hashes": []})
        assert body["errors"][0]["extensions"]["code"] == "NOT_FOUND"
        assert fake.requests[-1].field == "sync_images" and fake.requests[-1].parent_id == doomed


async def test_request_records(fake: FakeUpstream, session: aiohttp.ClientSession) -> None:
    survey = _first_survey(fake)
    fake.behaviour = Behaviour(image_page_limit=8)
    await _sync_page(session, fake, survey, [NEVER_ISSUED, "x"])
    record = fake.requests[-1]
    assert (record.field, record.parent_id, record.n_hashes) == ("sync_images", survey, 2)
    assert (record.status, record.fault, record.upserted, record.deleted) == (200, None, 8, 0)
    assert record.remaining_count == 12


async def test_big_request_is_answered_quickly(session: aiohttp.ClientSession) -> None:
    data = FakeData(seed=1)
    survey = data.add_survey(25_000)
    hashes = list(data.image_hashes(survey).values())
    data.update_images(survey, 100)
    async with FakeUpstream(data) as fake:
        started = time.perf_counter()
        answer = await _sync_page(session, fake, survey, hashes)
        elapsed = time.perf_counter() - started
    assert len(answer["upserted"]) == len(answer["deleted"]) == 100
    assert elapsed < 3.0, f"25,000 hashes took {elapsed:.2f} s"


# ---- faults --------------------------------------------------------------------------------


async def _wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    for _ in range(100_000):
        if condition():
            return
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def _raw(
    session: aiohttp.ClientSession, fake: FakeUpstream, timeout: float = 10.0
) -> tuple[int, str, bytes, aiohttp.ClientResponse]:
    body = {"query": IMAGE_QUERY, "variables": {"survey": _first_survey(fake), "hashes": []}}
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    async with session.post(fake.url, json=body, headers=AUTH, timeout=client_timeout) as r:
        return r.status, r.content_type, await r.read(), r


@pytest.mark.parametrize(
    ("kind", "params", "status", "content_type"),
    [
        ("http_500", {}, 500, "application/json"),
        ("http_502", {}, 502, "text/html"),
        ("http_503", {}, 503, "text/html"),
        ("http_401", {}, 401, "application/json"),
        ("html", {}, 200, "text/html"),
        ("html", {"status": 502}, 502, "text/html"),
    ],
)
async def test_status_faults(
    fake: FakeUpstream,
    session: aiohttp.ClientSession,
    kind: str,
    params: Json,
    status: int,
    content_type: str,
) -> None:
    fake.faults.push(kind, **params)
    got, got_type, _, _ = await _raw(session, fake)
    assert (got, got_type) == (status, content_type)
    assert fake.requests[-1].fault == kind and fake.requests[-1].status == status
    assert (await _raw(session, fake))[0] == 200  # one-shot


@pytest.mark.parametrize(("params", "header"), [({}, "1"), ({"retry_after": 7}, "7")])
async def test_http_429_sends_retry_after(
    fake: FakeUpstream, session: aiohttp.ClientSession, params: Json, header: str
) -> None:
    fake.faults.push("http_429", **params)
    status, _, _, response = await _raw(session, fake)
    assert status == 429 and response.headers["Retry-After"] == header


async def test_graphql_error_fault(fake: FakeUpstream, session: aiohttp.ClientSession) -> None:
    fake.faults.push("graphql_error")
    status, _, body, _ = await _raw(session, fake)
    answer = json.loads(body)
    assert status == 200 and answer["data"] is None
    assert answer["errors"][0]["extensions"]["code"] == "INTERNAL_SERVER_ERROR"


async def test_not_json_fault(fake: FakeUpstream, session: aiohttp.ClientSession) -> None:
    fake.faults.push("not_json")
    status, content_type, body, _ = await _raw(session, fake)
    assert (status, content_type) == (200, "application/json")
    with pytest.raises(ValueError):
        json.loads(body)


@pytest.mark.parametrize(
    "variant", ["missing_content_hash", "remaining_count_string", "upserted_null", "data_list"]
)
async def test_bad_shape_fault(
    fake: FakeUpstream, session: aiohttp.ClientSession, variant: str
) -> None:
    fake.faults.push("bad_shape", variant=variant)
    status, _, body, _ = await _raw(session, fake)
    answer = json.loads(body)
    assert status == 200
    if variant == "data_list":
        assert answer == {"data": []}
        return
    result = answer["data"]["sync_images"]
    if variant == "missing_content_hash":
        assert "content_hash" not in result["upserted"][0]
    elif variant == "remaining_count_string":
        assert isinstance(result["remaining_count"], str)
    else:
        assert result["upserted"] is None


async def test_cutoff_fault(fake: FakeUpstream, session: aiohttp.ClientSession) -> None:
    fake.faults.push("cutoff", fraction=0.3)
    body = {"query": IMAGE_QUERY, "variables": {"survey": _first_survey(fake), "hashes": []}}
    async with session.post(fake.url, json=body, headers=AUTH) as response:
        assert response.status == 200 and response.content_length
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    assert fake.requests[-1].upserted == 20  # the server did compute (and "send") the answer
    assert (await _raw(session, fake))[0] == 200


@pytest.mark.parametrize("how", ["reset", "offline"])
async def test_connection_killing_faults(
    fake: FakeUpstream, session: aiohttp.ClientSession, how: str
) -> None:
    if how == "reset":
        fake.faults.push("reset")
    else:
        fake.faults.offline = True
    attempts = 1 if how == "reset" else 3
    for _ in range(attempts):
        with pytest.raises(aiohttp.ClientConnectionError):
            await _raw(session, fake)
    assert [r.status for r in fake.requests] == [None] * attempts
    fake.faults.offline = False
    assert (await _raw(session, fake))[0] == 200


async def test_slow_fault(fake: FakeUpstream, session: aiohttp.ClientSession) -> None:
    fake.faults.push("slow", delay=0.3)
    started = time.perf_counter()
    status, _, body, _ = await _raw(session, fake)
    assert time.perf_counter() - started >= 0.3
    assert status == 200 and len(json.loads(body)["data"]["sync_images"]["upserted"]) == 20


async def test_hang_fault_times_the_client_out_and_stop_is_prompt(
    session: aiohttp.ClientSession,
) -> None:
    data = FakeData(seed=1)
    data.add_survey(3)
    fake = FakeUpstream(data)
    await fake.start()
    try:
        fake.faults.push("hang", delay=60)
        with pytest.raises(asyncio.TimeoutError):
            await _raw(session, fake, timeout=0.3)
        fake.faults.push("hang", delay=60)
        pending = asyncio.create_task(_raw(session, fake))
        await _wait_until(lambda: len(fake.requests) == 2)
    finally:
        started = time.perf_counter()
        await fake.stop()
    assert time.perf_counter() - started < 3.0
    with pytest.raises(aiohttp.ClientConnectionError):
        await pending  # a hung request dies with the server instead of holding it up


async def test_stop_frees_the_port(session: aiohttp.ClientSession) -> None:
    async with FakeUpstream() as fake:
        url = fake.url
    with pytest.raises(aiohttp.ClientConnectionError):
        async with session.post(url, json={"query": "{ x }"}):
            pass


async def test_queued_faults_apply_in_order(
    fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    fake.faults.push("http_503", times=2, retry_after=0)
    fake.faults.push("http_500")
    statuses = [(await _raw(session, fake))[0] for _ in range(4)]
    assert statuses == [503, 503, 500, 200]
    assert [r.fault for r in fake.requests] == ["http_503", "http_503", "http_500", None]


async def test_random_faults_are_replayable(
    fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    kinds = ["http_500", "http_503", "graphql_error"]
    fake.faults.random(0.5, kinds, seed=42)
    for _ in range(16):
        await _raw(session, fake)
    seen = [r.fault for r in fake.requests]
    replay = Faults()
    replay.random(0.5, kinds, seed=42)
    expected = [f.kind if (f := replay.next()) else None for _ in range(16)]
    assert seen == expected and 0 < seen.count(None) < 16
    fake.faults.clear()
    assert fake.faults.next() is None


def test_fault_typos_are_rejected() -> None:
    faults = Faults()
    with pytest.raises(ValueError, match="unknown fault kind"):
        faults.push("http_999")
    with pytest.raises(ValueError, match="takes no"):
        faults.push("slow", dealy=1)
    with pytest.raises(ValueError):
        faults.random(0.5, ["nope"], seed=1)


# ---- control API and runner ----------------------------------------------------------------


async def _control(
    session: aiohttp.ClientSession, fake: FakeUpstream, path: str, body: Json | None = None
) -> tuple[int, Any]:
    url = f"{fake.base}/_fake/{path}"
    request = session.get(url) if body is None else session.post(url, json=body)
    async with request as response:
        return response.status, await response.json(content_type=None)


async def test_control_api_round_trip(fake: FakeUpstream, session: aiohttp.ClientSession) -> None:
    survey = _first_survey(fake)
    status, state = await _control(session, fake, "state")
    assert status == 200 and state["surveys"][survey] == fake.data.image_hashes(survey)
    assert state["fields"][fake.data.field_of(survey)][survey]

    add = {"op": "add_images", "survey_id": survey, "n": 3}
    status, added = await _control(session, fake, "mutate", add)
    assert status == 200 and len(added["result"]) == 3
    update = {"op": "update_images", "survey_id": survey, "ids": added["result"][:1]}
    _, changed = await _control(session, fake, "mutate", update)
    assert changed["result"] == added["result"][:1]
    _, state = await _control(session, fake, "state")
    assert len(state["surveys"][survey]) == 23
    _, new_survey = await _control(session, fake, "mutate", {"op": "add_survey", "n_images": 2})
    assert len(fake.data.image_hashes(new_survey["result"])) == 2
    assert (await _control(session, fake, "mutate", {"op": "explode"}))[0] == 400
    missing = {"op": "add_images", "survey_id": "no", "n": 1}
    assert (await _control(session, fake, "mutate", missing))[0] == 404

    push = {"push": [{"kind": "http_503", "times": 2}]}
    status, faults = await _control(session, fake, "faults", push)
    assert status == 200 and faults == {"offline": False, "queued": 2}
    assert (await _raw(session, fake))[0] == 503
    await _control(session, fake, "faults", {"clear": True})
    assert (await _raw(session, fake))[0] == 200
    assert (await _control(session, fake, "faults", {"push": [{"kind": "bogus"}]}))[0] == 400

    change = {"order": "shuffled", "image_page_limit": 3}
    status, behaviour = await _control(session, fake, "behaviour", change)
    assert status == 200 and behaviour["order"] == "shuffled"
    assert fake.behaviour.order == "shuffled" and fake.behaviour.image_page_limit == 3
    assert (await _control(session, fake, "behaviour", {"order": "sideways"}))[0] == 400

    _, records = await _control(session, fake, "requests")
    assert [r["status"] for r in records] == [503, 200]


async def test_standalone_runner(session: aiohttp.ClientSession) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mirrord.fake_upstream",
        "--port", "0", "--seed", "1", "--surveys", "2", "--images", "50", "--token", "T",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), timeout=20)
        info = json.loads(line)
        assert info["token"] == "T" and len(info["survey_ids"]) == 2 and info["field_ids"]
        body = {"query": IMAGE_QUERY, "variables": {"survey": info["survey_ids"][0], "hashes": []}}
        async with session.post(info["url"], json=body, headers={"Authorization": "T"}) as r:
            assert len((await r.json())["data"]["sync_images"]["upserted"]) == 50
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), timeout=10) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
