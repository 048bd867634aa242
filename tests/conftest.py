"""Shared fixtures: a real fake upstream on 127.0.0.1 and a real SQLite mirror in tmp_path."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

from mirrord.config import Secret
from mirrord.fake_upstream import FakeData, FakeUpstream
from mirrord.store import Store
from mirrord.sync import SyncEngine
from mirrord.upstream import RetryPolicy, UpstreamClient

# CI runs a quick set; `HYPOTHESIS_PROFILE=soak pytest tests/test_sync_properties.py` digs deeper.
settings.register_profile("ci", max_examples=60, deadline=None)
settings.register_profile("soak", max_examples=3000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

TOKEN = "test-token-5f1d9c"  # distinctive, so a leak is easy to grep for


def _sqlite_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if "_connection_worker_thread" in t.name]


@pytest.fixture(autouse=True)
def no_leaked_connections() -> Iterator[None]:
    """Each open aiosqlite connection owns a non-daemon thread: a leak hangs the interpreter
    at exit (and so CI). Fail the test that leaked instead."""
    before = set(_sqlite_threads())
    yield
    deadline = time.monotonic() + 3
    while set(_sqlite_threads()) - before and time.monotonic() < deadline:
        time.sleep(0.01)
    leaked = set(_sqlite_threads()) - before
    assert not leaked, f"{len(leaked)} SQLite connection(s) left open"


@pytest.fixture
async def daemons() -> AsyncIterator[list[Any]]:
    """Daemon processes a test started (tests.test_daemon.launch); killed if still running."""
    import signal

    started: list[Any] = []
    yield started
    for d in started:
        if d.proc and d.proc.returncode is None:
            await d.stop(signal.SIGKILL)


@pytest.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream(FakeData(seed=1), token=TOKEN) as server:
        yield server


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    db = await Store.open(tmp_path / "mirror.db")
    try:
        yield db
    finally:
        await db.close()


def make_client(fake: FakeUpstream, *, attempts: int = 6, timeout: float = 5.0) -> UpstreamClient:
    # Tiny backoff keeps fault tests fast; the policy itself is tested on its own.
    return UpstreamClient(
        fake.url,
        Secret(fake.token),
        timeout=timeout,
        retry=RetryPolicy(max_attempts=attempts, base=0.01, cap=0.05),
    )


class Mirror:
    """The engine wired to a fake and a store, as the CLI wires it."""

    def __init__(self, fake: FakeUpstream, store: Store, **engine_options: Any) -> None:
        self.fake = fake
        self.store = store
        self.engine_options = engine_options

    async def sync_survey(self, survey_id: str, *, full: bool = False, **client_options: Any):  # type: ignore[no-untyped-def]
        async with make_client(self.fake, **client_options) as client:
            engine = SyncEngine(self.store, client, **self.engine_options)
            from mirrord.upstream import SYNC_IMAGES

            return await engine.sync_collection(SYNC_IMAGES, survey_id, full=full)

    async def sync_all(self, surveys: list[str], fields: list[str], **client_options: Any):  # type: ignore[no-untyped-def]
        async with make_client(self.fake, **client_options) as client:
            engine = SyncEngine(self.store, client, **self.engine_options)
            return await engine.sync_all(surveys, fields)


@pytest.fixture
def mirror(fake: FakeUpstream, store: Store) -> Mirror:
    return Mirror(fake, store, reconcile_every=0)


def _strip(item: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in item.items() if k != "__typename"}


async def assert_mirrors(store: Store, fake: FakeUpstream, survey_id: str) -> None:
    """The mirror holds exactly upstream's images of the survey: ids, hashes, every field."""
    held = await store.items("images", survey_id)
    upstream = fake.data.images(survey_id)
    assert set(held) == set(upstream), (
        f"missing {len(set(upstream) - set(held))}, stale {len(set(held) - set(upstream))}"
    )
    for sid, item in upstream.items():
        chash, data = held[sid]
        assert chash == item["content_hash"]
        assert _strip(data) == _strip(item), sid


async def wait_for(
    condition: Callable[[], Awaitable[bool] | bool], timeout: float = 10.0, interval: float = 0.02
) -> None:
    """Poll a condition until it holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)
