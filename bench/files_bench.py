"""Benchmark: download a survey's image files with mirrord, and with curl as the baseline.

    .venv/bin/python bench/files_bench.py [--files 2000] [--size 1000000] [--runs 3]

Needs `curl` (Debian: apt-get install curl); without it the benchmark says so and exits 2.

The fake upstream runs in its own process (`python -m mirrord.fake_upstream --file-sizes S S`).
Each run then measures, in separate fresh processes and fresh directories:

- mirrord: a child syncs the metadata (not timed), which queues the files; another child runs
  `download_once` (what `mirrord sync` runs after the metadata) and reports the CPU seconds
  and wall time of that call (resource.getrusage) and its peak RSS.
- curl: a child syncs the metadata into a mirror of its own, so its signed URLs are as fresh
  as mirrord's; then `curl --parallel --parallel-max <concurrency>` fetches those URLs. Its CPU
  and peak RSS come from wait4, its wall time is the process's.

Both results are checked byte for byte: the SHA-256 of every file against the fake's
deterministic bytes (mirrord.fake_files.file_chunks). The fake's own CPU over each download is
printed too: a share near 100% of one core means the fake, not the client, sets the pace.
mirrord fsyncs each file before renaming it into place; curl does not, so a child then fsyncs
curl's files (not counted in curl's figures) to show what the same durability adds to it. Each
download starts after a sync(2), so neither inherits the other's dirty pages; files are kept
until the end, and mirrord and curl take turns at going first.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _common import cpu_seconds, machine, speed_line  # noqa: E402  (bench/, next to this file)

URL_MARGIN = 10 * 60  # seconds a URL must still be valid for when a download starts


def peak_rss(pid: int | str = "self") -> tuple[str, float]:
    """(command name, peak RSS in MB) of a process, from /proc. Unlike getrusage's ru_maxrss,
    VmHWM starts afresh at exec: it does not count the forking Python parent's memory."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return fields["Name"].strip(), int(fields["VmHWM"].split()[0]) / 1024  # kB


def write_config(work: Path, upstream: dict[str, Any], concurrency: int) -> Path:
    config = work / "mirrord.toml"
    config.write_text(
        f'[upstream]\nurl = "{upstream["url"]}"\ntoken = "{upstream["token"]}"\n'
        '[storage]\npath = "mirror.db"\nfiles_dir = "files"\nmax_disk = "1TB"\n'
        f"download_concurrency = {concurrency}\n"
        '[sync]\nreconcile_every = "0"\n'
        f'[[surveys]]\nid = "{upstream["survey_ids"][0]}"\nfiles = "all"\n'
    )
    return config


# ---- the children ----------------------------------------------------------------------------


async def child_sync(config_path: Path) -> dict[str, Any]:
    """The metadata only: it queues every file (the downloads are the other child's)."""
    from mirrord.config import load_config
    from mirrord.store import Store
    from mirrord.sync import sync_from_config

    config = load_config(config_path)
    async with await Store.open(config.storage.path) as store:
        runs = await sync_from_config(config, store=store)
    return {"outcomes": [r.outcome for r in runs], "images": sum(r.item_count for r in runs)}


async def child_download(config_path: Path) -> dict[str, Any]:
    from mirrord.config import load_config
    from mirrord.files import download_once
    from mirrord.store import Store

    config = load_config(config_path)
    async with await Store.open(config.storage.path) as store:
        cpu, wall = cpu_seconds(), time.perf_counter()
        result = await download_once(config, store)
        seconds, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    return {
        "files": result.done,
        "bytes": result.bytes,
        "failed": result.failed,
        "expired": result.expired,
        "blocked": result.blocked,
        "seconds": seconds,
        "cpu": cpu,
        "peak_rss_mb": peak_rss()[1],
    }


def child_fsync(directory: Path, threads: int) -> dict[str, Any]:
    """What curl leaves out and mirrord does: make every file durable (fsync each, with as
    many threads as downloads, then their directories)."""
    from concurrent.futures import ThreadPoolExecutor

    def fsync(path: Path) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    cpu, wall = cpu_seconds(), time.perf_counter()
    files = [p for p in directory.rglob("*") if p.is_file()]
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(fsync, files))
    for path in {p.parent for p in files}:
        fsync(path)
    return {"seconds": time.perf_counter() - wall, "cpu": cpu_seconds() - cpu}


def run_child(
    which: str, config: Path, *, profile: Path | None = None, threads: int = 1
) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", which, "--config", str(config)]
    command += ["--concurrency", str(threads)]
    if profile is not None:
        command += ["--profile", str(profile)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=config.parent)
    if done.returncode != 0:
        sys.exit(f"the {which} child failed:\n{done.stderr.strip()}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


# ---- measuring ---------------------------------------------------------------------------------


def process_cpu(pid: int) -> float:
    """CPU seconds a running process has used so far (user + system), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def queued_files(db: Path) -> list[tuple[int, str, str, int, str]]:
    """(collection_id, sentera_id, content_hash, size, url) of every file a sync queued."""
    with sqlite3.connect(db) as con:
        rows = con.execute(
            "SELECT collection_id, sentera_id, content_hash, size, url FROM files "
            "ORDER BY sentera_id"
        ).fetchall()
    return [(int(c), s, h, int(n), u) for c, s, h, n, u in rows]


def check_fresh(urls: list[str]) -> None:
    soonest = min(int(parse_qs(urlsplit(u).query)["expires"][0]) for u in urls)
    if soonest - time.time() < URL_MARGIN:
        sys.exit("the signed URLs expire too soon for a fair run; start the benchmark again")


def expected_sha256(sentera_id: str, content_hash: str, size: int) -> str:
    """SHA-256 of the bytes the fake serves for a file (computed here, not asked)."""
    from mirrord.fake_files import file_chunks

    digest = hashlib.sha256()
    for chunk in file_chunks(sentera_id, content_hash, size):
        digest.update(chunk)
    return digest.hexdigest()


def verify(
    files_dir: Path, files: list[tuple[int, str, str, int, str]], expected: dict[Any, str]
) -> None:
    """Every file byte for byte, and nothing else. `expected` caches the right digests."""
    from mirrord.files import file_path

    bad = []
    for collection_id, sentera_id, content_hash, size, _ in files:
        key = (sentera_id, content_hash, size)
        if key not in expected:
            expected[key] = expected_sha256(*key)
        path = file_path(files_dir, collection_id, sentera_id)
        try:
            with path.open("rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
        except FileNotFoundError:
            digest = "missing"
        if digest != expected[key]:
            bad.append(f"{path}: {digest}")
    extra = sum(1 for p in files_dir.rglob("*") if p.is_file()) - len(files)
    if bad or extra:
        sys.exit(f"{len(bad)} files wrong, {extra} extra under {files_dir}: {bad[:3]}")


def bench_mirrord(
    work: Path, upstream: dict[str, Any], args: argparse.Namespace, expected: dict[Any, str]
) -> dict[str, Any]:
    config = write_config(work, upstream, args.concurrency)
    run_child("sync", config)
    files = queued_files(work / "mirror.db")
    check_fresh([f[4] for f in files])
    os.sync()
    fake_cpu = process_cpu(upstream["pid"])
    result = run_child("download", config, profile=args.profile)
    result["fake_cpu"] = process_cpu(upstream["pid"]) - fake_cpu
    if result["files"] != len(files) or result["failed"] or result["expired"]:
        sys.exit(f"mirrord did not download every file: {result}")
    verify(work / "files", files, expected)
    return result


def bench_curl(
    work: Path, upstream: dict[str, Any], args: argparse.Namespace, expected: dict[Any, str]
) -> dict[str, Any]:
    from mirrord.files import file_path

    config = write_config(work, upstream, args.concurrency)
    run_child("sync", config)  # a mirror of its own: URLs as fresh as mirrord's
    files = queued_files(work / "mirror.db")
    check_fresh([f[4] for f in files])
    out_dir = work / "curl"
    urls = work / "urls.txt"
    urls.write_text(
        "".join(
            f'url = "{url}"\noutput = "{file_path(out_dir, collection_id, sentera_id)}"\n'
            for collection_id, sentera_id, _, _, url in files
        )
    )
    command = ["curl", "--parallel", "--parallel-max", str(args.concurrency)]
    command += ["--fail", "--silent", "--show-error", "--create-dirs", "--config", str(urls)]
    os.sync()
    fake_cpu = process_cpu(upstream["pid"])
    wall = time.perf_counter()
    with open(work / "curl.err", "w") as errors:
        curl = subprocess.Popen(command, stderr=errors)
        rss = 0.0
        while True:  # curl's peak RSS: VmHWM, read until it exits (it only ever grows)
            pid, status, usage = os.wait4(curl.pid, os.WNOHANG)  # its own rusage alone
            if pid:
                break
            with contextlib.suppress(OSError, KeyError, ValueError):
                name, hwm = peak_rss(curl.pid)
                rss = hwm if name == "curl" else rss
            time.sleep(0.01)
    seconds = time.perf_counter() - wall
    fake_cpu = process_cpu(upstream["pid"]) - fake_cpu
    curl.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4 already
    if curl.returncode != 0:
        text = (work / "curl.err").read_text()[:500]
        sys.exit(f"curl failed (exit {curl.returncode}): {text}")
    durable = run_child("fsync", out_dir, threads=args.concurrency)
    verify(out_dir, files, expected)
    return {
        "files": len(files),
        "bytes": sum(f[3] for f in files),
        "seconds": seconds,
        "cpu": usage.ru_utime + usage.ru_stime,
        "peak_rss_mb": rss,
        "fake_cpu": fake_cpu,
        "fsync_seconds": durable["seconds"],
        "fsync_cpu": durable["cpu"],
    }


# ---- the run ----------------------------------------------------------------------------------


def start_fake(args: argparse.Namespace) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    command = [sys.executable, "-m", "mirrord.fake_upstream", "--port", "0", "--seed", "1"]
    command += ["--surveys", "1", "--images", str(args.files)]
    command += ["--file-sizes", str(args.size), str(args.size)]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert server.stdout is not None
    upstream = dict(json.loads(server.stdout.readline()))
    upstream["pid"] = server.pid
    return server, upstream


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--size", type=int, default=1_000_000, help="bytes per file")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--runs", type=int, default=1, help="mirrord and curl, in turns")
    parser.add_argument(
        "--profile", type=Path, help="write a cProfile of mirrord's download child here"
    )
    parser.add_argument("--child", choices=["sync", "download", "fsync"], help=argparse.SUPPRESS)
    parser.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if shutil.which("curl") is None:
        print("files_bench: curl is not installed; it is the baseline (apt-get install curl)")
        sys.exit(2)
    need = 2 * args.runs * args.files * args.size
    free = shutil.disk_usage(tempfile.gettempdir()).free
    if free < need + 2 * 10**9:
        sys.exit(f"files_bench: needs {need / 1e9:.1f} GB free in {tempfile.gettempdir()}")
    server, upstream = start_fake(args)
    results: list[tuple[dict[str, Any], dict[str, Any]]] = []
    order = [("mirrord", bench_mirrord), ("curl", bench_curl)]
    try:
        with tempfile.TemporaryDirectory(prefix="files-bench-") as tmp:
            expected: dict[Any, str] = {}
            print(machine())
            print(
                f"survey: {args.files:,} files of {args.size:,} bytes from the fake upstream "
                f"(separate process, loopback), concurrency {args.concurrency}"
            )
            print(speed_line("before the runs"), flush=True)
            for run in range(args.runs):
                load = os.getloadavg()[0]
                measured: dict[str, dict[str, Any]] = {}
                # In turns, so that neither always runs on what the other left behind.
                for name, bench in order if run % 2 == 0 else order[::-1]:
                    work = Path(tmp) / f"{run}-{name}"
                    work.mkdir()
                    # Files are deleted only at the end: ext4 skips the inodes of files
                    # deleted in the last minute or so when it creates one, and creating
                    # 2,000 files right after deleting 2,000 costs ~0.5 ms CPU each.
                    measured[name] = bench(work, upstream, args, expected)
                results.append((measured["mirrord"], measured["curl"]))
                first = order[run % 2][0]
                print(f"\nrun {run + 1} of {args.runs} ({first} first; load average {load:.1f})")
                report(measured["mirrord"], measured["curl"])
            print(speed_line("after the runs"))
    finally:
        server.terminate()
        server.wait(timeout=10)
    if len(results) > 1:
        spread(results)


def child(args: argparse.Namespace) -> None:
    if args.child == "sync":
        result = asyncio.run(child_sync(args.config))
    elif args.child == "fsync":
        result = child_fsync(args.config, args.concurrency)
    elif args.profile is not None:
        import cProfile

        profiler = cProfile.Profile()
        result = profiler.runcall(asyncio.run, child_download(args.config))
        profiler.dump_stats(args.profile)
    else:
        result = asyncio.run(child_download(args.config))
    print(json.dumps(result))


def mb_per_s(r: dict[str, Any]) -> float:
    return float(r["bytes"]) / 1e6 / float(r["seconds"])


def report(ours: dict[str, Any], curl: dict[str, Any]) -> None:
    print(f"{'':30}{'mirrord':>12}{'curl':>12}")
    rows: list[tuple[str, Any]] = [
        ("files", lambda r: f"{r['files']:,}"),
        ("total MB", lambda r: f"{r['bytes'] / 1e6:,.0f}"),
        ("wall seconds", lambda r: f"{r['seconds']:.2f}"),
        ("MB/s", lambda r: f"{mb_per_s(r):,.0f}"),
        ("client CPU seconds", lambda r: f"{r['cpu']:.2f}"),
        ("client CPU ms per MB", lambda r: f"{r['cpu'] / (r['bytes'] / 1e6) * 1e3:.2f}"),
        ("peak RSS MB", lambda r: f"{r['peak_rss_mb']:.0f}"),
        ("fake upstream CPU seconds", lambda r: f"{r['fake_cpu']:.2f}"),
        ("fake upstream CPU / wall", lambda r: f"{r['fake_cpu'] / r['seconds']:.0%}"),
    ]
    for label, show in rows:
        print(f"{label:30}{show(ours):>12}{show(curl):>12}")
    print(f"mirrord / curl throughput: {mb_per_s(ours) / mb_per_s(curl):.0%} (target: >= 80%)")
    durable = curl["fsync_seconds"] + curl["seconds"]
    print(
        f"curl's files made as durable as mirrord's (fsync each afterwards): "
        f"+{curl['fsync_seconds']:.2f} s and +{curl['fsync_cpu']:.2f} s CPU; "
        f"{curl['bytes'] / 1e6 / durable:,.0f} MB/s end to end, "
        f"mirrord / that: {mb_per_s(ours) / (curl['bytes'] / 1e6 / durable):.0%}"
    )


def spread(results: list[tuple[dict[str, Any], dict[str, Any]]]) -> None:
    ours = [mb_per_s(a) for a, _ in results]
    theirs = [mb_per_s(b) for _, b in results]
    ratios = [a / b for a, b in zip(ours, theirs, strict=True)]
    cpu = [a["cpu"] / (a["bytes"] / 1e6) * 1e3 for a, _ in results]
    curl_cpu = [b["cpu"] / (b["bytes"] / 1e6) * 1e3 for _, b in results]
    print(f"\nover {len(results)} runs (median, min-max):")
    for label, values, fmt in (
        ("mirrord MB/s", ours, "{:,.0f}"),
        ("curl MB/s", theirs, "{:,.0f}"),
        ("mirrord / curl", ratios, "{:.0%}"),
        ("mirrord CPU ms per MB", cpu, "{:.2f}"),
        ("curl CPU ms per MB", curl_cpu, "{:.2f}"),
    ):
        low, mid, high = min(values), statistics.median(values), max(values)
        print(f"  {label:24}{fmt.format(mid):>8}  ({fmt.format(low)}-{fmt.format(high)})")


if __name__ == "__main__":
    main()
