"""Benchmark: the daemon's HTTP reads under load while it syncs a large survey, against Datasette.

    .venv/bin/python bench/http_bench.py [--images 100000] [--small 20000] [--seconds 10]
                                         [--live-upstream] [--upstream-latency 0.5]

The fake upstream runs in its own process with two surveys: a small one the daemon mirrors
first (so reads have data), and a large one it then syncs while the load runs (writes in
progress). The large survey's answers are recorded first and replayed to the daemon after
`--upstream-latency` seconds each, so that the fake's own CPU (a remote server's, in
production) does not share the machine with the daemon; see serve_upstream.

The daemon is the real `mirrord run`, on a temporary directory and config. `wrk` (apt-get
install wrk) generates the load: 32 connections, 2 threads, a random path per request from a
list (random image ids of the mirrored survey; random keyset cursors into it), so the client
is not written in Python and is not the bottleneck it would be on 2 cores. It still shares
the 2 cores with the daemon and its sync, as a laptop would.

The baseline, in the same run and under the same load, is Datasette (`pip install -e .[bench]`)
serving the same SQLite file read-only with its JSON API, in its fastest form found: the SQL
endpoint with the queries mirrord runs (on the unique (collection_id, sentera_id) index).
The daemon's CPU seconds include its sync; Datasette's are its reads alone. Each run also
counts the fake's and wrk's CPU, and that of every other program on the machine (from
/proc/stat): on a shared machine, that is what the figures must be read against. Every child
process is stopped at the end, on Ctrl-C and on errors too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import random
import resource
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _common import machine, speed_line  # noqa: E402  (bench/, next to this file)

CONNECTIONS, THREADS = 32, 2
WARM_UP = 2.0  # seconds of load before each measured run, not counted
ONLY = {"one": "GET one image", "page": "GET page of 100"}
CLK_TCK = os.sysconf("SC_CLK_TCK")
# Datasette at its cheapest: no facet suggestions; a generous time limit so none is cut off.
DS_SET = ["--setting", "suggest_facets", "off", "--setting", "sql_time_limit_ms", "5000"]

WRK_SCRIPT = r"""
local paths = {}
local n = 0
function setup(thread)
  n = n + 1
  thread:set("tid", n)
end
function init(args)
  for line in io.lines(args[1]) do paths[#paths + 1] = line end
  math.randomseed(tid * 7919 + tonumber(args[2]))
end
function request()
  return wrk.format(nil, paths[math.random(#paths)])
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,' ..
    '"write":%d,"status":%d,"timeout":%d,"p50":%d,"p90":%d,"p99":%d,"max":%d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max))
end
"""


# ---- the fake upstream, in its own process ------------------------------------------------

# The upstream is a remote server in production, but the fake builds each answer here: about
# 0.2 s of CPU per 1,000-image page (graphql-core executing every field of every item), a
# third of a core while the sync runs, taken from the daemon and wrk on this 2-core machine.
# So by default the fake answers the large survey's pages from a recording: before the
# daemon starts, mirrord's own sync engine syncs that survey from the live fake into a
# throwaway mirror, and every answer is kept by the request's bytes. The daemon's sync then
# sends the very same requests (the same engine from the same empty start) and gets the very
# same answers, each after UPSTREAM_LATENCY seconds, the time a page of 1,000 images (1.5 MB)
# takes from a remote API; the daemon does all of its own work for every page. A request
# with no recording (the small survey, anything unexpected) gets the live fake.
UPSTREAM_LATENCY = 0.5


async def serve_upstream(small: int, large: int, latency: float | None) -> None:
    from aiohttp import web

    from mirrord.fake_upstream import FakeData, FakeUpstream

    class ReplayingUpstream(FakeUpstream):
        """The fake, answering requests it answered while recording from their bytes."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.recording, self.latency = True, 0.0
            self.answers: dict[bytes, bytes] = {}

        async def _handle_graphql(self, request: web.Request) -> web.StreamResponse:
            key = hashlib.sha256(await request.read()).digest()
            if not self.recording and key in self.answers:
                await asyncio.sleep(self.latency)
                return web.Response(body=self.answers[key], content_type="application/json")
            response = await super()._handle_graphql(request)
            if self.recording and response.status == 200 and isinstance(response, web.Response):
                assert isinstance(response.body, bytes)
                self.answers[key] = response.body
            return response

    data = FakeData(1)
    field = data.add_field()
    first = data.add_survey(small, field)
    second = data.add_survey(large, field)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    fake = ReplayingUpstream(data, token="bench-token", seed=1)
    async with fake:
        if latency is not None:
            await record_answers(fake.url, fake.token, second)
            fake.recording, fake.latency = False, latency
        else:
            fake.recording = False
        line = {
            "url": fake.url,
            "token": fake.token,
            "small": first,
            "large": second,
            "recorded": len(fake.answers),
        }
        print(json.dumps(line), flush=True)
        await stop.wait()


async def record_answers(url: str, token: str, survey: str) -> None:
    """Sync `survey` once with mirrord's engine, as the daemon will, into a throwaway mirror."""
    from mirrord.config import Secret
    from mirrord.store import Store
    from mirrord.sync import SyncEngine
    from mirrord.upstream import SYNC_IMAGES, UpstreamClient

    with tempfile.TemporaryDirectory(prefix="http-bench-record-") as tmp:
        async with (
            await Store.open(Path(tmp) / "mirror.db") as store,
            UpstreamClient(url, Secret(token), timeout=120) as client,
        ):
            run = await SyncEngine(store, client, reconcile_every=0).sync_collection(
                SYNC_IMAGES, survey
            )
    assert run.outcome == "converged", run


# ---- processes, ports, /proc --------------------------------------------------------------


class Children:
    """Child processes, each stopped (TERM, then KILL) when the benchmark ends, however."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[Any]] = []

    def start(self, argv: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        proc = subprocess.Popen(argv, cwd=ROOT, **kwargs)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proc_cpu(pid: int, thread: int | None = None) -> float:
    """CPU seconds of a process, or of one of its threads."""
    stat = Path(f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat")
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def _children_cpu() -> float:
    """CPU seconds of the waited-for children (wrk, once subprocess.run has reaped it)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _machine_cpu() -> float:
    """CPU seconds every program on the machine has used (all cores), from /proc/stat."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def proc_mem_mb(pid: int) -> dict[str, float]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024  # KiB
    return out


def get_json(url: str, timeout: float = 10) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def wait_for(what: str, check: Any, timeout: float, every: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError, StopIteration):
            result = check()
            if result:
                return result
        time.sleep(every)
    raise SystemExit(f"gave up after {timeout:.0f}s waiting for {what}")


def target(status: dict[str, Any], survey: str) -> dict[str, Any]:
    return next(t for t in status["targets"] if t["id"] == survey)


# ---- one measured run ---------------------------------------------------------------------


class Sampler(threading.Thread):
    """Samples the server's RSS every 0.1 s and the large survey's sync every 0.5 s."""

    def __init__(self, pid: int, status_url: str, survey: str) -> None:
        super().__init__(daemon=True)
        self.pid, self.status_url, self.survey = pid, status_url, survey
        self.stopping = threading.Event()
        self.peak_rss = 0.0
        self.sync: list[tuple[bool, int]] = []  # (syncing, images of the large survey applied)

    def sync_sample(self) -> None:
        with contextlib.suppress(OSError, ValueError, StopIteration):
            t = target(get_json(self.status_url, timeout=2), self.survey)
            progress = t.get("progress") or {}
            applied = progress.get("applied") or t.get("image_count") or 0
            self.sync.append((t["state"] == "syncing", int(applied)))

    def run(self) -> None:
        ticks = 0
        while not self.stopping.wait(0.1):
            with contextlib.suppress(OSError):
                self.peak_rss = max(self.peak_rss, proc_mem_mb(self.pid).get("VmRSS", 0.0))
            ticks += 1
            if ticks % 5 == 0:
                self.sync_sample()


def wrk(base: str, script: Path, path_file: Path, seconds: float, timeout: float) -> str:
    """One wrk run: its output (the script's done() prints BENCHJSON with the figures)."""
    return subprocess.run(
        [
            "wrk",
            f"-t{THREADS}",
            f"-c{CONNECTIONS}",
            f"-d{seconds:g}s",
            "--timeout",
            "5s",
            "-s",
            str(script),
            base,
            "--",
            str(path_file),
            str(random.randrange(1 << 20)),
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    ).stdout


def run_wrk(
    base: str,
    paths: list[str],
    seconds: float,
    pid: int,
    status_url: str,
    survey: str,
    tmp: Path,
    upstream_pid: int,
    also: tuple[int, ...] = (),
) -> dict[str, Any]:
    """One wrk run against `pid`'s server. CPU is counted for the server, the fake upstream,
    wrk, this benchmark's other processes (`also`, e.g. the daemon while Datasette is loaded)
    and the whole machine, whose other programs share the 2 cores too."""
    path_file = tmp / f"paths-{random.randrange(1 << 30)}.txt"
    path_file.write_text("\n".join(paths) + "\n")
    script = tmp / "random_paths.lua"
    script.write_text(WRK_SCRIPT)
    # Warm-up, not counted: the first requests fill the servers' caches (SQLite's pages, the
    # item texts mirrord keeps) and the measured run sees the steady state.
    wrk(base, script, path_file, WARM_UP, timeout=WARM_UP + 30)
    sampler = Sampler(pid, status_url, survey)
    sampler.sync_sample()
    cpu, upstream_cpu = proc_cpu(pid), proc_cpu(upstream_pid)
    main_cpu = proc_cpu(pid, pid)
    wrk_cpu, own_cpu = _children_cpu(), _self_cpu()
    also_cpu, machine_cpu = sum(map(proc_cpu, also)), _machine_cpu()
    sampler.start()
    try:
        out = wrk(base, script, path_file, seconds, timeout=seconds + 30)
    finally:
        sampler.stopping.set()
        sampler.join()
    cpu, upstream_cpu = proc_cpu(pid) - cpu, proc_cpu(upstream_pid) - upstream_cpu
    main_cpu = proc_cpu(pid, pid) - main_cpu
    wrk_cpu, own_cpu = _children_cpu() - wrk_cpu, _self_cpu() - own_cpu
    also_cpu = sum(map(proc_cpu, also)) - also_cpu
    machine_cpu = _machine_cpu() - machine_cpu
    sampler.sync_sample()
    line = next(x for x in out.splitlines() if x.startswith("BENCHJSON "))
    result: dict[str, Any] = json.loads(line.removeprefix("BENCHJSON "))
    syncing = [s for s, _ in sampler.sync]
    result |= {
        "seconds": result["duration_us"] / 1e6,
        "cpu": cpu,
        "main_cpu": main_cpu,
        "upstream_cpu": upstream_cpu,
        "wrk_cpu": wrk_cpu,
        "machine_cpu": machine_cpu,
        "foreign_cpu": max(0.0, machine_cpu - cpu - upstream_cpu - wrk_cpu - own_cpu - also_cpu),
        "peak_rss": sampler.peak_rss,
        "hwm": proc_mem_mb(pid).get("VmHWM", 0.0),
        "syncing": sum(syncing) / len(syncing) if syncing else 0.0,
        "applied": sampler.sync[-1][1] - sampler.sync[0][1] if sampler.sync else 0,
        "errors": sum(result[k] for k in ("connect", "read", "write", "status", "timeout")),
    }
    return result


# ---- the benchmark ------------------------------------------------------------------------


def cursor(after: str) -> str:
    from mirrord.views.data import encode_cursor

    return encode_cursor(after)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--images", type=int, default=100_000, help="the survey synced under load")
    parser.add_argument("--small", type=int, default=20_000, help="the survey read under load")
    parser.add_argument("--seconds", type=float, default=10.0, help="per measured run")
    parser.add_argument("--no-after", action="store_true", help="skip the runs after the sync")
    parser.add_argument(
        "--only", choices=("one", "page"), help="measure one workload only (when tuning one)"
    )
    parser.add_argument("--no-datasette", action="store_true", help="skip the baseline")
    parser.add_argument(
        "--live-upstream",
        action="store_true",
        help="the fake builds every answer while the load runs (its CPU shares the machine)",
    )
    parser.add_argument(
        "--upstream-latency",
        type=float,
        default=UPSTREAM_LATENCY,
        help="seconds before each recorded answer (default %(default)s)",
    )
    parser.add_argument("--upstream-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.upstream_child:
        latency = None if args.live_upstream else args.upstream_latency
        asyncio.run(serve_upstream(args.small, args.images, latency))
        return
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install -y wrk")
    # SIGTERM ends the run like Ctrl-C does: through the finally that stops the children.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    children = Children()
    print(speed_line("before the runs"), flush=True)
    try:
        with tempfile.TemporaryDirectory(prefix="http-bench-") as tmp:
            bench(args, children, Path(tmp))
    finally:
        children.stop_all()
    print(speed_line("after the runs"))


def bench(args: argparse.Namespace, children: Children, tmp: Path) -> None:
    sizes = ["--small", str(args.small), "--images", str(args.images)]
    mode = ["--live-upstream"] if args.live_upstream else []
    mode += ["--upstream-latency", str(args.upstream_latency)]
    if not args.live_upstream:
        print(f"recording the fake's answers for the {args.images:,}-image survey...", flush=True)
    upstream_proc = children.start(
        [sys.executable, __file__, "--upstream-child", *sizes, *mode],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert upstream_proc.stdout is not None
    up = json.loads(upstream_proc.stdout.readline())
    small, large = up["small"], up["large"]
    if not args.live_upstream:
        print(f"{up['recorded']} answers recorded", flush=True)

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    config = tmp / "mirrord.toml"
    head = (
        f'[upstream]\nurl = "{up["url"]}"\ntoken = "{up["token"]}"\ntimeout = "120s"\n'
        f'[storage]\npath = "mirror.db"\n'
        f'[sync]\ninterval = "1h"\njitter = "0"\nreconcile_every = "0"\n'
        f'[http]\nlisten = "127.0.0.1:{port}"\n'
        f'[[surveys]]\nid = "{small}"\n'
    )
    config.write_text(head)
    log = (tmp / "mirrord.log").open("w")
    daemon = children.start(
        [sys.executable, "-m", "mirrord", "run", "-c", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    status_url = base + "/v1/status"
    started = time.monotonic()
    wait_for(
        "the small survey to be mirrored",
        lambda: (
            target(get_json(status_url), small).get("last_outcome") is not None
            and target(get_json(status_url), small)["state"] != "syncing"
        ),
        timeout=600,
    )
    mirrored = target(get_json(status_url), small)
    print(
        f"small survey: {mirrored.get('image_count', 0):,} images mirrored in "
        f"{time.monotonic() - started:.1f}s ({mirrored['last_outcome']})",
        flush=True,
    )

    db = tmp / "mirror.db"
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
        cid = con.execute(
            "SELECT id FROM collections WHERE kind = 'images' AND parent_id = ?", (small,)
        ).fetchone()[0]
        ids = [
            r[0]
            for r in con.execute("SELECT sentera_id FROM items WHERE collection_id = ?", (cid,))
        ]
    rng = random.Random(1)
    picks = [rng.choice(ids) for _ in range(20_000)]
    # Page cursors: random positions, plus first pages (an empty cursor) one time in ten.
    afters = [rng.choice(ids) if rng.random() > 0.1 else "" for _ in range(20_000)]

    ds_port = free_port()
    ds_base = f"http://127.0.0.1:{ds_port}"
    ds_log = (tmp / "datasette.log").open("w")
    datasette_bin = Path(sys.executable).parent / "datasette"
    datasette = None
    if args.no_datasette:
        print("baseline skipped (--no-datasette)")
    elif datasette_bin.exists():
        datasette = children.start(
            [str(datasette_bin), "serve", str(db), "-h", "127.0.0.1", "-p", str(ds_port), *DS_SET],
            stdout=ds_log,
            stderr=subprocess.STDOUT,
        )
        wait_for("datasette", lambda: get_json(ds_base + "/-/versions.json"), timeout=60)
    else:
        print("datasette is not installed (pip install -e '.[bench]'): baseline skipped")

    # Datasette's arbitrary-SQL JSON endpoint: 2-3x faster than its table view
    # (/mirror/items.json?collection_id=..&sentera_id=..) here, so the stronger baseline.
    # The same joins as mirrord's: the files table tells whether each image's file is local.
    one_sql = quote(
        "select i.data, f.state from items i left join files f "
        "on f.collection_id = i.collection_id and f.sentera_id = i.sentera_id "
        "where i.collection_id = :c and i.sentera_id = :s"
    )
    page_sql = quote(
        "select i.data, f.state from items i left join files f "
        "on f.collection_id = i.collection_id and f.sentera_id = i.sentera_id "
        "where i.collection_id = :c and i.sentera_id > :a order by i.sentera_id limit 100"
    )
    workloads: dict[str, dict[str, list[str]]] = {
        "GET one image": {
            "mirrord": [f"/v1/images/{i}" for i in picks],
            "datasette": [f"/mirror.json?sql={one_sql}&c={cid}&s={i}&_shape=array" for i in picks],
        },
        "GET page of 100": {
            "mirrord": [
                f"/v1/surveys/{small}/images?limit=100" + (f"&cursor={cursor(a)}" if a else "")
                for a in afters
            ],
            "datasette": [
                f"/mirror.json?sql={page_sql}&c={cid}&a={a}&_shape=array" for a in afters
            ],
        },
    }
    check_answers(base, ds_base if datasette else None, workloads, ids)
    if args.only:
        workloads = {k: v for k, v in workloads.items() if k == ONLY[args.only]}

    # Start the large survey's sync (a config reload adds it and runs it at once).
    config.write_text(head + f'[[surveys]]\nid = "{large}"\n')
    daemon.send_signal(signal.SIGHUP)

    def large_syncing() -> bool:
        t = target(get_json(status_url), large)
        return bool(t["state"] == "syncing" and (t.get("progress") or {}).get("applied", 0) > 0)

    wait_for("the large survey's sync to start writing", large_syncing, timeout=120, every=0.1)
    sync_started = time.monotonic()
    print(f"large survey: {args.images:,} images, sync running\n", flush=True)

    servers = {"mirrord": (base, daemon.pid)}
    if datasette is not None:
        servers["datasette"] = (ds_base, datasette.pid)
    results: dict[tuple[str, str], dict[str, Any]] = {}
    for name, paths_by_server in workloads.items():
        for server, (url, pid) in servers.items():
            results[name, server] = run_wrk(
                url,
                paths_by_server[server],
                args.seconds,
                pid,
                status_url,
                large,
                tmp,
                upstream_proc.pid,
                also=tuple(p for _, p in servers.values() if p != pid),
            )
    after: dict[str, dict[str, Any]] = {}
    if not args.no_after:
        wait_for(
            "the large survey's sync to finish",
            lambda: target(get_json(status_url), large)["state"] != "syncing",
            timeout=900,
            every=0.5,
        )
        t = target(get_json(status_url), large)
        print(
            f"large survey synced: {t.get('image_count', 0):,} images, {t['last_outcome']}, "
            f"{time.monotonic() - sync_started:.0f}s after the load began\n"
        )
        for name, paths_by_server in workloads.items():
            after[name] = run_wrk(
                base,
                paths_by_server["mirrord"],
                args.seconds,
                daemon.pid,
                status_url,
                large,
                tmp,
                upstream_proc.pid,
            )
    report(args, results, after, list(servers))


def check_answers(
    base: str, ds_base: str | None, workloads: dict[str, dict[str, list[str]]], ids: list[str]
) -> None:
    """Each server answers each kind of path, with the same items, before any load runs."""
    one = get_json(base + workloads["GET one image"]["mirrord"][0])
    page = get_json(base + workloads["GET page of 100"]["mirrord"][0])
    assert len(page["images"]) == 100 or page["next_cursor"] is None, page
    if ds_base is None:
        return
    ds_one = get_json(ds_base + workloads["GET one image"]["datasette"][0])
    ds_page = get_json(ds_base + workloads["GET page of 100"]["datasette"][0])

    def image(row: dict[str, Any]) -> Any:
        return json.loads(row["data"]) | {"local_file": row["state"] == "done"}

    assert image(ds_one[0]) == one, (ds_one, one)
    assert [image(r) for r in ds_page] == page["images"], "pages differ"


def report(
    args: argparse.Namespace,
    results: dict[tuple[str, str], dict[str, Any]],
    after: dict[str, dict[str, Any]],
    servers: list[str],
) -> None:
    print(machine())
    upstream = (
        "the fake upstream building every answer live"
        if args.live_upstream
        else f"the fake upstream replaying recorded answers after {args.upstream_latency:g}s each"
    )
    print(
        f"load: wrk, {CONNECTIONS} connections, {THREADS} threads, {args.seconds:g}s per run, "
        f"random paths into a {args.small:,}-image survey; sync of a {args.images:,}-image "
        f"survey running in the daemon, from {upstream}; load average {os.getloadavg()[0]:.1f}\n"
    )
    rows: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        ("req/s", lambda r: f"{r['requests'] / r['seconds']:,.0f}"),
        ("p50 ms", lambda r: f"{r['p50'] / 1000:.2f}"),
        ("p99 ms", lambda r: f"{r['p99'] / 1000:.2f}"),
        ("max ms", lambda r: f"{r['max'] / 1000:.1f}"),
        ("errors (non-2xx, socket)", lambda r: f"{r['errors']:,}"),
        ("MB/s received", lambda r: f"{r['bytes'] / r['seconds'] / 1e6:.1f}"),
        ("server CPU seconds", lambda r: f"{r['cpu']:.2f}"),
        ("server CPU µs per request", lambda r: f"{r['cpu'] / max(r['requests'], 1) * 1e6:.0f}"),
        (
            "… of it the main thread",
            lambda r: f"{r['main_cpu'] / max(r['requests'], 1) * 1e6:.0f}",
        ),
        ("fake upstream CPU seconds", lambda r: f"{r['upstream_cpu']:.2f}"),
        ("wrk CPU seconds", lambda r: f"{r['wrk_cpu']:.2f}"),
        ("other programs' CPU seconds", lambda r: f"{r['foreign_cpu']:.2f}"),
        ("server peak RSS MB (run)", lambda r: f"{r['peak_rss']:.0f}"),
        ("run overlapped the sync", lambda r: f"{r['syncing']:.0%}"),
        ("images synced during run", lambda r: f"{r['applied']:,}"),
    ]
    names = [name for name in ONLY.values() if (name, "mirrord") in results]
    columns = [(name, server) for name in names for server in servers]
    width = 18
    print(f"{'':28}" + "".join(f"{n.removeprefix('GET '):>{width}}" for n, _ in columns))
    print(f"{'':28}" + "".join(f"{s:>{width}}" for _, s in columns))
    for label, fmt in rows:
        print(f"{label:28}" + "".join(f"{fmt(results[c]):>{width}}" for c in columns))
    if after:
        print("\nmirrord after the sync finished (no writes):")
        for name, r in after.items():
            print(
                f"  {name:18}{r['requests'] / r['seconds']:>9,.0f} req/s"
                f"  p50 {r['p50'] / 1000:.2f} ms  p99 {r['p99'] / 1000:.2f} ms"
                f"  errors {r['errors']}  CPU {r['cpu']:.2f}s"
                f" ({r['cpu'] / max(r['requests'], 1) * 1e6:.0f} µs/request)"
                f"  other programs' CPU {r['foreign_cpu']:.2f}s"
            )
    print("\ntargets (during the sync):")
    if ("GET one image", "mirrord") in results:
        one = results["GET one image", "mirrord"]
        rps = one["requests"] / one["seconds"]
        met = "met" if rps >= 4000 else "NOT met"
        print(f"  >= 4,000 req/s, GET one image: {met} ({rps:,.0f})")
    for name in names:
        p99 = results[name, "mirrord"]["p99"] / 1000
        print(f"  p99 <= 25 ms, {name}: {'met' if p99 <= 25 else 'NOT met'} ({p99:.1f} ms)")
    if "datasette" in servers:
        for name in names:
            ours = results[name, "mirrord"]
            theirs = results[name, "datasette"]
            ratio = (ours["requests"] / ours["seconds"]) / (theirs["requests"] / theirs["seconds"])
            print(f"  >= 2x Datasette, {name}: {'met' if ratio >= 2 else 'NOT met'} ({ratio:.2f}x)")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
