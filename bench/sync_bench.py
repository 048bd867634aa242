"""Benchmark: sync a large survey from the fake upstream, then re-sync it with nothing to do.

    .venv/bin/python bench/sync_bench.py [--images 100000] [--runs 3]

The fake upstream runs in its own process, so this process's CPU time and peak RSS are the
client's alone. Each measured run is itself a fresh process (`--child`), so peak RSS is per run.
The baseline, in the same run, is the loop a hand-written script would use: urllib, json,
stdlib sqlite3, one INSERT OR REPLACE per item and a commit per page, no sequence numbers, no
tombstones, no failure records. It shows what mirrord's guarantees cost on top of that loop.

CPU time on a shared VM varies from run to run by more than the differences worth measuring,
so `--runs N` measures mirrord and the baseline N times each, in turns, and reports the median
and the range of each figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _common import cpu_seconds, machine, speed_line  # noqa: E402  (bench/, next to this file)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


async def mirrord_run(url: str, token: str, survey: str, db: Path) -> dict[str, Any]:
    from mirrord.config import Secret
    from mirrord.store import Store
    from mirrord.sync import SyncEngine
    from mirrord.upstream import SYNC_IMAGES, UpstreamClient

    store = await Store.open(db)
    try:
        async with UpstreamClient(url, Secret(token), timeout=120) as client:
            engine = SyncEngine(store, client, reconcile_every=0)
            cpu, wall = cpu_seconds(), time.perf_counter()
            run = await engine.sync_collection(SYNC_IMAGES, survey)
            first = {
                "pages": run.pages,
                "images": run.item_count,
                "outcome": run.outcome,
                "seconds": time.perf_counter() - wall,
                "cpu": cpu_seconds() - cpu,
            }
            requests, cpu, wall = client.requests, cpu_seconds(), time.perf_counter()
            again = await engine.sync_collection(SYNC_IMAGES, survey)
            noop = {
                "round_trips": client.requests - requests,
                "outcome": again.outcome,
                "seconds": time.perf_counter() - wall,
                "cpu": cpu_seconds() - cpu,
            }
    finally:
        await store.close()
    return {"sync": first, "noop": noop, "peak_rss_mb": peak_rss_mb()}


def baseline_run(url: str, token: str, survey: str, db: Path) -> dict[str, Any]:
    from mirrord.upstream import SYNC_IMAGES

    con = sqlite3.connect(db)
    con.execute("CREATE TABLE images (sentera_id TEXT PRIMARY KEY, content_hash TEXT, data TEXT)")
    held: dict[str, str] = {}
    pages = 0
    cpu, wall = cpu_seconds(), time.perf_counter()
    while True:
        body = json.dumps(
            {
                "query": SYNC_IMAGES.document,
                "variables": {"parent": survey, "hashes": list(held.values())},
            }
        )
        req = urllib.request.Request(
            url,
            body.encode(),
            {"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
        )
        with urllib.request.urlopen(req, timeout=120) as resp:
            result = json.loads(resp.read())["data"]["sync_images"]
        pages += 1
        for item in result["upserted"]:
            con.execute(
                "INSERT OR REPLACE INTO images VALUES (?, ?, ?)",
                (item["sentera_id"], item["content_hash"], json.dumps(item)),
            )
            held[item["sentera_id"]] = item["content_hash"]
        for item in result["deleted"]:
            con.execute("DELETE FROM images WHERE sentera_id = ?", (item["sentera_id"],))
            held.pop(item["sentera_id"], None)
        con.commit()
        if result["remaining_count"] == 0 or not (result["upserted"] or result["deleted"]):
            break
    sync = {
        "pages": pages,
        "images": len(held),
        "outcome": "converged",
        "seconds": time.perf_counter() - wall,
        "cpu": cpu_seconds() - cpu,
    }
    con.close()
    return {"sync": sync, "peak_rss_mb": peak_rss_mb()}


def child(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "mirror.db"
        if args.child == "mirrord":
            result = asyncio.run(mirrord_run(args.url, args.token, args.survey, db))
        else:
            result = baseline_run(args.url, args.token, args.survey, db)
    print(json.dumps(result))


def measure(which: str, upstream: dict[str, Any]) -> dict[str, Any]:
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            which,
            "--url",
            upstream["url"],
            "--token",
            upstream["token"],
            "--survey",
            upstream["survey_ids"][0],
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3, help="runs of each, in turns")
    parser.add_argument("--child", choices=["mirrord", "baseline"], help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--token", help=argparse.SUPPRESS)
    parser.add_argument("--survey", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mirrord.fake_upstream",
            "--port",
            "0",
            "--seed",
            "1",
            "--surveys",
            "1",
            "--images",
            str(args.images),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert server.stdout is not None
        upstream = json.loads(server.stdout.readline())
        print(speed_line("before the runs"), flush=True)
        ours, base = [], []
        for n in range(max(1, args.runs)):
            ours.append(measure("mirrord", upstream))
            base.append(measure("baseline", upstream))
            print(
                f"run {n + 1}: {cpu_per_image(ours[-1], args.images):.1f} µs/image "
                f"(baseline {cpu_per_image(base[-1], args.images):.1f}), load average "
                f"{os.getloadavg()[0]:.1f}",
                flush=True,
            )
        speed_after = speed_line("after the runs")
        report(args.images, median_run(ours), median_run(base))
        spread(args.images, ours, base)
        print(speed_after)
    finally:
        server.terminate()
        server.wait(timeout=10)


def cpu_per_image(result: dict[str, Any], images: int) -> float:
    return float(result["sync"]["cpu"]) / images * 1e6


def median_run(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median client CPU (the upper median: a run that happened)."""
    return sorted(results, key=lambda r: r["sync"]["cpu"])[len(results) // 2]


def spread(images: int, ours: list[dict[str, Any]], base: list[dict[str, Any]]) -> None:
    if len(ours) < 2:
        return
    print(f"\nover {len(ours)} runs (median, min-max):")
    for label, results in (("mirrord", ours), ("baseline", base)):
        figures = [cpu_per_image(r, images) for r in results]
        print(
            f"  {label:10} client CPU µs per image {statistics.median(figures):6.1f}  "
            f"({min(figures):.1f}-{max(figures):.1f})"
        )
    rss = [r["peak_rss_mb"] for r in ours]
    print(f"  mirrord    peak RSS MB {statistics.median(rss):.0f} ({min(rss):.0f}-{max(rss):.0f})")


def report(images: int, ours: dict[str, Any], base: dict[str, Any]) -> None:
    print(machine())
    print(f"survey: {images:,} images from the fake upstream (separate process, loopback)")
    print("the run with the median client CPU of each:\n")
    print(f"{'':28}{'mirrord':>14}{'baseline':>14}")
    rows = [
        ("pages", "pages", "{:,}"),
        ("images", "images", "{:,}"),
        ("wall seconds", "seconds", "{:.2f}"),
        ("client CPU seconds", "cpu", "{:.2f}"),
    ]
    for label, key, fmt in rows:
        print(f"{label:28}{fmt.format(ours['sync'][key]):>14}{fmt.format(base['sync'][key]):>14}")
    for label, run in (("images/s", "sync"),):
        a = ours[run]["images"] / ours[run]["seconds"]
        b = base[run]["images"] / base[run]["seconds"]
        print(f"{label:28}{a:>14,.0f}{b:>14,.0f}")
    a = ours["sync"]["cpu"] / images * 1e6
    b = base["sync"]["cpu"] / images * 1e6
    print(f"{'client CPU µs per image':28}{a:>14.1f}{b:>14.1f}")
    print(f"{'peak RSS MB':28}{ours['peak_rss_mb']:>14.0f}{base['peak_rss_mb']:>14.0f}")
    noop = ours["noop"]
    print(
        f"\nno-op re-sync: {noop['round_trips']} round trip(s), {noop['seconds']:.2f}s, "
        f"client CPU {noop['cpu']:.2f}s, outcome {noop['outcome']}"
    )


if __name__ == "__main__":
    main()
