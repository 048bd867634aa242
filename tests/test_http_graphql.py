"""The mirror's local GraphQL endpoint, served by a real `mirrord run` process: upstream's sync
contract answered from the mirror, good enough that mirrord's own engine can mirror the mirror."""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import Any

import aiohttp

from mirrord.config import Secret
from mirrord.fake_upstream import FakeUpstream
from mirrord.store import Store
from mirrord.sync import SyncEngine, SyncRun
from mirrord.upstream import SYNC_IMAGES, SYNC_SURVEYS, UpstreamClient
from tests.conftest import assert_mirrors, make_client, wait_for
from tests.test_daemon import DaemonProcess, config_text, free_port, launch, targets


async def _start(
    tmp_path: Path,
    fake: FakeUpstream,
    daemons: list[DaemonProcess],
    surveys: list[str],
    fields: list[str] = [],  # noqa: B006  (never mutated)
) -> DaemonProcess:
    """A daemon syncing every second (so it picks upstream changes up), once converged."""
    port = free_port()
    config = tmp_path / "mirrord.toml"
    config.write_text(config_text(fake, port, surveys, fields, interval="1s"))
    d = await launch(daemons, config, port)
    await d.wait_status(
        lambda s: (
            len(s["targets"]) == len(surveys) + len(fields)
            and all(t.get("last_outcome") == "converged" for t in s["targets"])
        ),
        timeout=30,
    )
    return d


def _url(d: DaemonProcess) -> str:
    return f"http://127.0.0.1:{d.port}/graphql"


async def _post(d: DaemonProcess, body: Any) -> tuple[int, dict[str, Any]]:
    data = body if isinstance(body, bytes) else None
    json_body = None if isinstance(body, bytes) else body
    async with (
        aiohttp.ClientSession() as http,
        http.post(_url(d), data=data, json=json_body) as resp,
    ):
        return resp.status, dict(await resp.json())


async def _sync(d: DaemonProcess, field: str, parent: str, hashes: list[str]) -> dict[str, Any]:
    """One sync answer, asked with the engine's own query document."""
    query = SYNC_IMAGES if field == "sync_images" else SYNC_SURVEYS
    status, body = await _post(
        d,
        {
            "query": query.document,
            "operationName": query.operation_name,
            "variables": {"parent": parent, "hashes": hashes},
        },
    )
    assert status == 200 and "errors" not in body, body
    return dict(body["data"][field])


async def _snapshot(store: Store) -> dict[tuple[str, str], Any]:
    """Everything a mirror holds that a reader sees: collections, and their items whole."""
    return {
        (s.kind, s.parent_id): await store.items(s.kind, s.parent_id)
        for s in await store.statuses()
    }


async def _mirror_the_mirror(
    d: DaemonProcess, second: Store, surveys: list[str], fields: list[str]
) -> list[SyncRun]:
    # Exactly as the CLI wires them; the mirror takes any token.
    async with UpstreamClient(_url(d), Secret("any-token")) as client:
        return await SyncEngine(second, client).sync_all(surveys, fields)


async def _converged(d_store: Store, fake: FakeUpstream, surveys: list[str]) -> bool:
    try:
        for sid in surveys:
            await assert_mirrors(d_store, fake, sid)
    except AssertionError:
        return False
    return True


async def test_the_engine_mirrors_the_mirror_deletes_and_updates_included(
    tmp_path: Path, fake: FakeUpstream, daemons: list[DaemonProcess]
) -> None:
    big = fake.data.add_survey(n_images=2300)  # three pages of sync_images
    field = fake.data.add_field(n_surveys=3, images_per_survey=40)
    d = await _start(tmp_path, fake, daemons, [big], [field])
    mirror = await Store.open(tmp_path / "mirror.db", readonly=True)
    second = await Store.open(tmp_path / "second" / "mirror.db")
    try:
        assert await _converged(mirror, fake, [big, *fake.data.survey_ids(field)])
        runs = await _mirror_the_mirror(d, second, [big], [field])
        assert all(r.outcome == "converged" for r in runs), runs
        assert {r.parent_id: r.pages for r in runs}[big] == 3  # paged by 1,000
        assert {r.parent_id for r in runs} == {big, field, *fake.data.survey_ids(field)}
        assert await _snapshot(second) == await _snapshot(mirror)

        # Upstream changes; the daemon picks them up; the second mirror follows the first.
        ids = list(fake.data.image_hashes(big))
        fake.data.update_images(big, ids=ids[:30])
        fake.data.delete_images(big, ids=ids[30:50])
        fake.data.add_images(big, 1100)
        doomed, edited, _ = fake.data.survey_ids(field)
        fake.data.delete_survey(doomed)
        fake.data.update_survey(edited)
        fake.data.update_images(edited, 5)
        added = fake.data.add_survey(n_images=15, field_id=field)
        current = [big, *fake.data.survey_ids(field)]
        await wait_for(lambda: _converged(mirror, fake, current), timeout=30)
        await wait_for(
            lambda: _no_collection(mirror, "images", doomed), timeout=10
        )  # the daemon dropped the deleted survey's images
        runs = await _mirror_the_mirror(d, second, [big], [field])
        assert all(r.outcome == "converged" for r in runs), runs
        by_id = {r.parent_id: r for r in runs}
        assert by_id[big].deleted == 20 and by_id[big].upserted == 1130
        assert added in by_id and doomed not in by_id
        assert await _snapshot(second) == await _snapshot(mirror)
        assert await second.find_collection("images", doomed) is None
        # Nothing differs any more: one round trip per collection, nothing applied.
        runs = await _mirror_the_mirror(d, second, [big], [field])
        assert all(r.pages == 1 and r.upserted == r.deleted == 0 for r in runs), runs
    finally:
        await second.close()
        await mirror.close()
    assert await d.stop() == 0


async def _no_collection(store: Store, kind: str, parent: str) -> bool:
    return await store.find_collection(kind, parent) is None


async def test_contract_pages_remaining_deleted_and_errors(
    tmp_path: Path, fake: FakeUpstream, daemons: list[DaemonProcess]
) -> None:
    survey = fake.data.add_survey(n_images=1500)
    # A field of 2,001 surveys, mirrored beforehand (its list only: its surveys hold no
    # images, and syncing 2,001 of them would take the daemon a while); the daemon serves it
    # although it no longer syncs it.
    wide = fake.data.add_field(n_surveys=2001)
    async with await Store.open(tmp_path / "mirror.db") as pre, make_client(fake) as client:
        assert (await SyncEngine(pre, client).sync_collection(SYNC_SURVEYS, wide)).ok
    d = await _start(tmp_path, fake, daemons, [survey])
    held = fake.data.image_hashes(survey)  # sentera_id -> hash, as the daemon holds them
    hashes = list(held.values())

    # Page limits: 1,000 images, 2,000 surveys; remaining_count counts what was left out.
    first = await _sync(d, "sync_images", survey, [])
    assert len(first["upserted"]) == 1000 and first["remaining_count"] == 500
    assert first["deleted"] == [] and first["failed"] == []
    assert first["upserted"][0]["__typename"] == "Image"
    assert {i["sentera_id"] for i in first["upserted"]} <= held.keys()
    surveys = await _sync(d, "sync_surveys", wide, [])
    assert len(surveys["upserted"]) == 2000 and surveys["remaining_count"] == 1
    assert {i["__typename"] for i in surveys["upserted"]} == {"Survey"}

    # Upserts fill the page first, deletions the rest; every differing entry is counted.
    unknown = [secrets.token_hex(16) for _ in range(700)]
    mixed = await _sync(d, "sync_images", survey, hashes[:600] + unknown)
    assert len(mixed["upserted"]) == 900 and len(mixed["deleted"]) == 100
    assert mixed["remaining_count"] == 600
    # A hash the mirror never held: the hash-only form.
    assert mixed["deleted"][0] == {"sentera_id": "", "content_hash": unknown[0]}
    done = await _sync(d, "sync_images", survey, hashes)
    assert done == {"upserted": [], "deleted": [], "failed": [], "remaining_count": 0}

    # Upstream deletes one image and updates another; the daemon picks both up.
    gone, changed = list(held)[:2]
    fake.data.delete_images(survey, ids=[gone])
    fake.data.update_images(survey, ids=[changed])
    mirror = await Store.open(tmp_path / "mirror.db", readonly=True)
    try:
        await wait_for(lambda: _converged(mirror, fake, [survey]), timeout=15)
    finally:
        await mirror.close()
    after = await _sync(d, "sync_images", survey, hashes)
    # The deleted image's hash is known from its tombstone; the old version's is not.
    assert sorted(after["deleted"], key=lambda i: i["sentera_id"]) == [
        {"sentera_id": "", "content_hash": held[changed]},
        {"sentera_id": gone, "content_hash": held[gone]},
    ]
    assert [i["sentera_id"] for i in after["upserted"]] == [changed]
    assert after["upserted"][0]["content_hash"] == fake.data.image_hashes(survey)[changed]
    assert after["remaining_count"] == 0

    # An unknown survey: a GraphQL error NOT_FOUND, HTTP 200, data null, as upstream.
    status, body = await _post(
        d,
        {"query": SYNC_IMAGES.document, "variables": {"parent": "nope", "hashes": []}},
    )
    assert status == 200 and body["data"] is None
    assert body["errors"][0]["extensions"]["code"] == "NOT_FOUND"
    assert body["errors"][0]["path"] == ["sync_images"]

    # GET with query parameters, like upstream.
    query = '{ sync_surveys(field_sentera_id: "%s", content_hashes: []) { remaining_count } }'
    async with (
        aiohttp.ClientSession() as http,
        http.get(_url(d), params={"query": query % wide}) as resp,
    ):
        assert resp.status == 200
        assert await resp.json() == {"data": {"sync_surveys": {"remaining_count": 1}}}

    # Malformed requests: mirrord's JSON error, HTTP 400.
    for bad in (b"{not json", b"[1, 2]", b'{"variables": {}}', b'{"query": "  "}'):
        status, body = await _post(d, bad)
        assert status == 400, bad
        assert body["error"]["code"] == "bad_request" and body["error"]["message"], bad
    # A document that does not validate: HTTP 200 and `errors`, as GraphQL servers answer.
    status, body = await _post(
        d, {"query": '{ sync_images(survey_sentera_id: "x") { remaining_count nope } }'}
    )
    assert status == 200 and "data" not in body
    codes = {e["extensions"]["code"] for e in body["errors"]}
    assert codes == {"GRAPHQL_VALIDATION_FAILED"} and len(body["errors"]) == 2
    assert all(e["locations"] for e in body["errors"])
    status, body = await _post(d, {"query": "{ sync_images("})
    assert status == 200 and body["errors"][0]["extensions"]["code"] == "GRAPHQL_PARSE_FAILED"
    # A variable of the wrong type is still graphql-core's to refuse, shortcut or not.
    status, body = await _post(
        d,
        {
            "query": SYNC_IMAGES.document,
            "variables": {"parent": survey, "hashes": ["a", 1]},
        },
    )
    assert status == 200 and body.get("data") is None
    assert "$hashes" in body["errors"][0]["message"]
    assert body["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT"
    assert await d.stop() == 0


async def test_failures_upstream_reported_are_passed_on(
    tmp_path: Path, fake: FakeUpstream, daemons: list[DaemonProcess]
) -> None:
    survey = fake.data.add_survey(n_images=30)
    ids = list(fake.data.image_hashes(survey))
    port = free_port()
    config = tmp_path / "mirrord.toml"
    config.write_text(config_text(fake, port, [survey], interval="1s"))
    fake.data.set_failing({ids[0]})
    d = await launch(daemons, config, port)
    await d.wait_status(lambda s: targets(s).get(survey, {}).get("last_outcome") == "partial")
    answer = await _sync(d, "sync_images", survey, [])
    assert [f["key"] for f in answer["failed"]] == [ids[0]]
    assert len(answer["upserted"]) == 29 and answer["remaining_count"] == 0
    assert await d.stop() == 0


async def test_a_request_with_100k_hashes_is_answered_fast(
    tmp_path: Path, fake: FakeUpstream, daemons: list[DaemonProcess]
) -> None:
    survey = fake.data.add_survey(n_images=3000)
    d = await _start(tmp_path, fake, daemons, [survey])
    held = list(fake.data.image_hashes(survey).values())
    # What a client holding a 100,000-image survey sends; most hashes unknown here.
    hashes = held + [secrets.token_hex(16) for _ in range(100_000 - len(held))]
    timings = []
    for _ in range(3):  # cold (index built), then warm (index cached)
        started = time.perf_counter()
        answer = await _sync(d, "sync_images", survey, hashes)
        timings.append(time.perf_counter() - started)
        assert len(answer["deleted"]) == 1000 and answer["upserted"] == []
        assert answer["remaining_count"] == 100_000 - len(held) - 1000
    # Includes the client's own JSON encoding and decoding; the bound is generous for CI.
    assert max(timings) < 2.0, timings  # generous: a shared 2-core CI box; quadratic is 10s+
    steady = time.perf_counter()
    assert (await _sync(d, "sync_images", survey, held))["remaining_count"] == 0
    assert time.perf_counter() - steady < 1.0
    assert await d.stop() == 0


async def test_an_item_with_a_number_past_a_double_is_still_served(tmp_path: Path) -> None:
    """Items are stored as upstream wrote them; orjson refuses 1e400, the endpoint does not."""
    from mirrord.store import PageChanges
    from mirrord.upstream import _reader
    from mirrord.views.graphql import _items

    raw = (
        b'{"data":{"sync_images":{"remaining_count":0,"deleted":[],"upserted":[{"__typename":'
        b'"Image","sentera_id":"a","content_hash":"h","altitude":1e400,"pitch":1.5}]}}}'
    )
    answer = _reader(SYNC_IMAGES, False).read(raw)
    assert answer is not None
    store = await Store.open(tmp_path / "mirror.db")
    try:
        coll = await store.collection("images", "s1", "config")
        run_id = await store.begin_run(coll, full_walk=False)
        changes = PageChanges(upserts=answer.upserted, new_ids={"a"})
        await store.apply_page(coll, run_id, changes, 0, 1)
        (item,) = await _items(store, coll.id, ["a"], "Image")
        assert item["altitude"] == float("inf") and item["pitch"] == 1.5
    finally:
        await store.close()
