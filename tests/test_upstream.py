"""The upstream client: error classification, retries, and what a bad answer costs the mirror."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from graphql import build_schema, parse, validate

from mirrord.config import Secret
from mirrord.fake_upstream import FakeUpstream
from mirrord.store import Store
from mirrord.upstream import (
    SYNC_IMAGES,
    SYNC_SURVEYS,
    AuthError,
    BadAnswer,
    ProtocolError,
    QueryRejected,
    RateLimited,
    RetryPolicy,
    UpstreamClient,
    UpstreamServerError,
    UpstreamUnavailable,
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
    ],
)
def test_contract_violations_name_the_problem(payload: dict, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ProtocolError, match=message):
        parse_answer(SYNC_IMAGES, payload)


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
