"""Load (issue #7 item 6): many HTTP readers and change-feed long-pollers against the real
daemon while it syncs a big survey whose upstream keeps changing.

Three processes, as on a laptop: the fake upstream (`python -m mirrord.fake_upstream`, changed
through its control API), `mirrord run`, and this test's clients (aiohttp). Readers mix single
images, cursor walks over whole surveys, GeoJSON pages and the status; long-pollers follow
GET /v1/changes from 0 with `wait`. Meanwhile a churn task adds, updates and deletes images
upstream and asks for syncs. Then the churn stops and the mirror converges. Required:

- zero errors: every read 200 (a sync asked for while one runs may get its 409), every cursor
  walk without a repeated image;
- bounded memory: the daemon's RSS, sampled from /proc, stays under a fixed bound;
- every long-poller saw strictly increasing sequence numbers (no repeats, no going back), and
  what it saw, replayed, is exactly the final mirror: no change lost, none out of order;
- the final mirror equals upstream.

It prints requests, errors, latency percentiles per kind, and peak RSS. CI runs a short
version (10,000 images, 16 readers, 10 s); `pytest -m slow` the full one (50,000 images, 64
readers, 60 s).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import sqlite3
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tests.conftest import wait_for
from tests.test_daemon import DaemonProcess, free_port, launch, targets


@dataclass
class Load:
    images: int  # the big survey, synced while the load runs
    readers: int
    pollers: int
    seconds: float
    rss_bound_mb: float


@dataclass
class Stats:
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: list[str] = field(default_factory=list)
    rss_kb: list[int] = field(default_factory=list)
    mutations: int = 0
    walks: int = 0
    big_synced_during_load: bool = False

    def record(self, kind: str, seconds: float) -> None:
        self.latencies[kind].append(seconds)

    def percentile(self, kind: str, p: float) -> float:
        values = sorted(self.latencies[kind])
        return values[min(len(values) - 1, int(p / 100 * len(values)))] if values else 0.0

    def report(self, load: Load) -> str:
        lines = [
            f"load: {load.images} images synced under {load.readers} readers + "
            f"{load.pollers} long-pollers for {load.seconds:g} s; {self.mutations} upstream "
            f"changes; {self.walks} cursor walks; errors {len(self.errors)}; peak RSS "
            f"{max(self.rss_kb, default=0) / 1024:.0f} MB; the big survey's first sync "
            f"{'ended' if self.big_synced_during_load else 'was still running'} when the load "
            "stopped"
        ]
        for kind in sorted(self.latencies):
            n = len(self.latencies[kind])
            lines.append(
                f"  {kind:<12} {n:>7} requests  p50 {self.percentile(kind, 50) * 1000:7.1f} ms"
                f"  p99 {self.percentile(kind, 99) * 1000:7.1f} ms"
                f"  max {max(self.latencies[kind]) * 1000:7.1f} ms"
            )
        return "\n".join(lines)


class Fake:
    """The fake upstream in its own process, changed through its control API."""

    def __init__(self, work: Path) -> None:
        self.out = work / "fake.out"
        self.proc: asyncio.subprocess.Process | None = None
        self.info: dict[str, Any] = {}

    async def start(self) -> Fake:
        with self.out.open("wb") as out:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "mirrord.fake_upstream", "--port", "0", "--surveys", "1",
                "--images", "2000", "--seed", "11",
                stdout=out, stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
        await wait_for(lambda: b"\n" in self.out.read_bytes(), timeout=30)
        self.info = json.loads(self.out.read_bytes().split(b"\n", 1)[0])
        return self

    @property
    def url(self) -> str:
        return str(self.info["url"])

    async def call(self, http: aiohttp.ClientSession, path: str, body: Any = None) -> Any:
        method = "POST" if body is not None else "GET"
        async with http.request(method, f"{self.info['base']}/_fake/{path}", json=body) as r:
            assert r.status == 200, await r.text()
            return await r.json()

    async def mutate(self, http: aiohttp.ClientSession, op: str, **args: Any) -> Any:
        return (await self.call(http, "mutate", {"op": op, **args}))["result"]

    async def stop(self) -> None:
        if self.proc and self.proc.returncode is None:
            self.proc.terminate()
            await asyncio.wait_for(self.proc.wait(), 15)


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def mirror_state(db: Path) -> dict[str, dict[str, str]]:
    """survey -> {sentera_id: content_hash}, read from the database file."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = con.execute(
            "SELECT c.parent_id, i.sentera_id, i.content_hash FROM items i "
            "JOIN collections c ON c.id = i.collection_id WHERE c.kind = 'images'"
        ).fetchall()
    finally:
        con.close()
    state: dict[str, dict[str, str]] = defaultdict(dict)
    for survey, sid, chash in rows:
        state[survey][sid] = chash
    return dict(state)


def final_feed(db: Path) -> dict[int, tuple[str, str, str, bool]]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = con.execute(
            "SELECT x.seq, c.parent_id, x.sentera_id, x.content_hash, x.deleted FROM ("
            " SELECT seq, collection_id, sentera_id, content_hash, 0 AS deleted FROM items"
            " UNION ALL SELECT seq, collection_id, sentera_id, content_hash, 1 FROM tombstones"
            ") x JOIN collections c ON c.id = x.collection_id"
        ).fetchall()
    finally:
        con.close()
    return {seq: (parent, sid, chash, bool(deleted)) for seq, parent, sid, chash, deleted in rows}


async def run_load(tmp_path: Path, daemons: list[DaemonProcess], load: Load) -> Stats:
    stats = Stats()
    fake = await Fake(tmp_path).start()
    http = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=60)
    )
    try:
        return await _run(tmp_path, daemons, load, stats, fake, http)
    finally:
        await http.close()
        await fake.stop()


async def _run(
    tmp_path: Path,
    daemons: list[DaemonProcess],
    load: Load,
    stats: Stats,
    fake: Fake,
    http: aiohttp.ClientSession,
) -> Stats:
    small = fake.info["survey_ids"][0]  # 2,000 images, mirrored before the load starts
    big = await fake.mutate(http, "add_survey", n_images=load.images)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    config = tmp_path / "mirrord.toml"
    # The small survey first, alone; the big one is added by a reload once readers run.
    head = (
        f'[upstream]\nurl = "{fake.url}"\ntoken = "{fake.info["token"]}"\ntimeout = "30s"\n'
        f'[storage]\npath = "mirror.db"\n'
        f'[sync]\ninterval = "2s"\njitter = "0"\nreconcile_every = "0"\n'
        f'[http]\nlisten = "127.0.0.1:{port}"\n[[surveys]]\nid = "{small}"\n'
    )
    config.write_text(head)
    d = await launch(daemons, config, port)
    await d.wait_status(lambda s: targets(s).get(small, {}).get("last_outcome") == "converged")
    assert d.proc is not None
    pid = d.proc.pid
    stable_ids = sorted(mirror_state(tmp_path / "mirror.db")[small])  # never deleted below

    stop = asyncio.Event()  # readers and churn stop
    settled = asyncio.Event()  # the mirror equals upstream: pollers may finish
    final_seq = [0]

    async def get(kind: str, path: str, **params: Any) -> Any:
        started = time.monotonic()
        try:
            async with http.get(base + path, params=params) as resp:
                body = await resp.read()
                if resp.status != 200:
                    stats.errors.append(f"{kind} {path} {resp.status} {body[:200]!r}")
                    return None
        except (aiohttp.ClientError, TimeoutError) as e:
            stats.errors.append(f"{kind} {path} {type(e).__name__}: {e}")
            return None
        stats.record(kind, time.monotonic() - started)
        return orjson.loads(body)  # 4-10x faster than json: the client's CPU is not measured

    async def walk(rng: random.Random) -> None:
        survey = rng.choice([small, big])
        seen: set[str] = set()
        cursor = None
        limit = rng.choice([100, 500, 1000])
        while not stop.is_set():
            params: dict[str, Any] = {"limit": limit, **({"cursor": cursor} if cursor else {})}
            page = await get("page", f"/v1/surveys/{survey}/images", **params)
            if page is None:
                return
            ids = [i["sentera_id"] for i in page["images"]]
            if seen & set(ids):
                stats.errors.append(f"walk of {survey} served an image twice")
            seen.update(ids)
            cursor = page["next_cursor"]
            if cursor is None:
                stats.walks += 1
                return

    async def reader(n: int) -> None:
        rng = random.Random(n)
        while not stop.is_set():
            pick = rng.random()
            if pick < 0.5:
                await get("image", f"/v1/images/{rng.choice(stable_ids)}")
            elif pick < 0.75:
                await walk(rng)
            elif pick < 0.9:
                await get("geojson", f"/v1/surveys/{small}/images.geojson", limit=200)
            else:
                await get("status", "/v1/status")

    async def poller(seen: list[dict[str, Any]]) -> None:
        since = 0
        while not (settled.is_set() and since >= final_seq[0]):
            feed = await get("changes", "/v1/changes", since=since, limit=1000, wait=2)
            if feed is None:
                await asyncio.sleep(0.1)
                continue
            seen += feed["changes"]
            since = feed["last_seq"]

    async def churn() -> None:
        rng = random.Random(99)
        while not stop.is_set():
            survey = rng.choice([small, big])
            op = rng.random()
            if op < 0.4:
                await fake.mutate(http, "add_images", survey_id=survey, n=rng.randint(1, 50))
            elif op < 0.7:
                await fake.mutate(http, "update_images", survey_id=survey, n=rng.randint(1, 50))
            elif survey == big:  # the small survey's first images stay, for single reads
                await fake.mutate(http, "delete_images", survey_id=big, n=rng.randint(1, 30))
            stats.mutations += 1
            async with http.post(f"{base}/v1/surveys/{survey}/sync") as resp:
                if resp.status not in (202, 409):
                    stats.errors.append(f"sync now {resp.status}")
            await asyncio.sleep(0.3)

    async def sample() -> None:
        while not settled.is_set():
            stats.rss_kb.append(rss_kb(pid))
            await asyncio.sleep(0.25)

    # The big survey joins (a live reload); the load starts as soon as its sync does.
    config.write_text(head + f'[[surveys]]\nid = "{big}"\n')
    await d.wait_status(lambda s: targets(s).get(big, {}).get("last_attempt_at") is not None)
    seen_by: list[list[dict[str, Any]]] = [[] for _ in range(load.pollers)]
    tasks = [asyncio.ensure_future(reader(n)) for n in range(load.readers)]
    tasks += [asyncio.ensure_future(poller(seen)) for seen in seen_by]
    sampler = asyncio.ensure_future(sample())
    churner = asyncio.ensure_future(churn())
    synced_under_load = asyncio.ensure_future(
        d.wait_status(lambda s: targets(s)[big].get("image_count", 0) >= load.images, timeout=600)
    )
    await asyncio.sleep(load.seconds)
    stop.set()
    await churner
    stats.big_synced_during_load = synced_under_load.done()
    await synced_under_load

    # Upstream holds still now: the mirror must come to equal it.
    upstream: dict[str, dict[str, str]] = (await fake.call(http, "state"))["surveys"]

    def equal() -> bool:
        held = mirror_state(tmp_path / "mirror.db")
        return all(held.get(s) == upstream[s] for s in (small, big))

    await wait_for(equal, timeout=120, interval=0.5)
    final_seq[0] = (await get("changes", "/v1/changes", since=0, limit=1))["last_seq"]
    settled.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 60)
    await sampler
    assert await d.stop() == 0
    assert not any("Traceback" in line for line in d.raw)

    # Every long-poller: increasing seqs, and what it saw replays into the final mirror.
    final = mirror_state(tmp_path / "mirror.db")
    feed = final_feed(tmp_path / "mirror.db")
    for seen in seen_by:
        seqs = [c["seq"] for c in seen]
        assert all(a < b for a, b in itertools.pairwise(seqs)), "seq went back or repeated"
        assert set(feed) <= set(seqs), f"{len(set(feed) - set(seqs))} changes never seen"
        replay: dict[str, dict[str, str]] = defaultdict(dict)
        for c in seen:
            if c["deleted"]:
                replay[c["survey_id"]].pop(c["sentera_id"], None)
            else:
                replay[c["survey_id"]][c["sentera_id"]] = c["content_hash"]
            if c["seq"] in feed:
                assert feed[c["seq"]] == (
                    c["survey_id"],
                    c["sentera_id"],
                    c["content_hash"],
                    c["deleted"],
                ), c
        assert dict(replay) == final
    assert final == {s: upstream[s] for s in (small, big)}
    return stats


def check(stats: Stats, load: Load) -> None:
    print("\n" + stats.report(load))
    assert not stats.errors, stats.errors[:10]
    assert stats.walks > 0 and stats.mutations > 0
    assert len(stats.latencies["image"]) > 100
    assert max(stats.rss_kb) / 1024 < load.rss_bound_mb, max(stats.rss_kb)


async def test_load_short(tmp_path: Path, daemons: list[DaemonProcess]) -> None:
    load = Load(images=10_000, readers=16, pollers=4, seconds=10, rss_bound_mb=250)
    check(await run_load(tmp_path, daemons, load), load)


@pytest.mark.slow
async def test_load_full(tmp_path: Path, daemons: list[DaemonProcess]) -> None:
    load = Load(images=50_000, readers=64, pollers=8, seconds=60, rss_bound_mb=400)
    check(await run_load(tmp_path, daemons, load), load)
