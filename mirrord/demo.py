"""`mirrord demo`: the whole mirror working against the built-in fake upstream, no account.

`mirrord demo --once` syncs the generated surveys once and prints what it mirrored.

`mirrord demo` keeps going: it runs the fake upstream in this process, writes a config for it
into the demo directory and starts the real daemon on that config as a child process
(`python -m mirrord run -c DIR/mirrord.toml`, its log in DIR/daemon.log), exactly as a user
would run it. While it runs it simulates field life upstream: every tick images are added,
changed and deleted in one of the surveys, and now and then the link drops for a few ticks
(`Faults.offline`: every request to the fake is cut) and comes back, so the status page and
/v1/status show the daemon backing off and recovering.

Ctrl-C (or SIGTERM) stops the simulation, then the daemon (SIGTERM, reaped; SIGKILL after 15 s),
then the fake upstream, and exits 0: Ctrl-C is how a demo is meant to end. A terminal's Ctrl-C
reaches the daemon too (same process group); it stops on it just the same. Exit 1 if the daemon
could not start or died on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import itertools
import json
import math
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from random import Random

import aiohttp

from mirrord.config import load_config
from mirrord.fake_upstream import FakeData, FakeUpstream
from mirrord.files import sync_and_download
from mirrord.sync import SyncRun

DEMO_TOKEN = "demo-token"  # the fake upstream's own token: not a secret
DEFAULT_PORT = 8765
PORT_TRIES = 50  # 8765 taken: try the next ones
HEADER = "# Written by `mirrord demo`"
READY_TIMEOUT = 30.0  # seconds the daemon may take to answer /healthz
STOP_TIMEOUT = 15.0  # seconds the daemon may take to stop before it is killed
# Field life, in ticks: the link first drops at tick 6, then every 12 ticks, for 3 ticks.
OFFLINE_FIRST, OFFLINE_EVERY, OFFLINE_FOR = 6, 12, 3


class DemoError(Exception):
    """The demo cannot go on; one line for the user (exit 2)."""


# ---- the generated world -------------------------------------------------------------------


@dataclass
class World:
    """The fake upstream's data and what the demo config asks the mirror to follow."""

    data: FakeData
    surveys: list[str]  # configured one by one
    fields: list[str]  # configured as fields (their surveys come with them)
    names: dict[str, str] = field(default_factory=dict)  # survey or field id -> upstream name
    files: list[str] = field(default_factory=list)  # surveys whose image files are mirrored

    def all_surveys(self) -> list[str]:
        return self.data.survey_ids()

    def image_count(self) -> int:
        return sum(len(self.data.image_hashes(s)) for s in self.all_surveys())


def build_world(images: int) -> World:
    """Two fields: one big survey (`images`) and a small one configured as surveys, and a field
    of two more surveys configured as a field. Deterministic (seed 7)."""
    # Files of 10-120 kB (real ones are 1-20 MB): the demo shows file mirroring in seconds.
    data = FakeData(seed=7, file_sizes=(10_000, 120_000))
    home = data.add_field()
    big = data.add_survey(images, home, grid_cols=_cols(images))
    small_n = max(1, images // 6)
    small = data.add_survey(small_n, home, grid_cols=_cols(small_n))
    far = data.add_field()
    for _ in range(2):
        n = max(1, images // 10)
        data.add_survey(n, far, grid_cols=_cols(n))
    names = {sid: item["name"] for f in data.field_ids() for sid, item in data.surveys(f).items()}
    names[far] = "Field 2"
    return World(data, [big, small], [far], names, files=[small])


def _cols(n: int) -> int:
    """Images per flight line for a roughly square survey."""
    return max(8, math.isqrt(max(n, 1)))


def demo_config(
    url: str,
    world: World,
    *,
    port: int | None = None,
    interval: str = "10s",
) -> str:
    def entry(table: str, ident: str) -> str:
        name = world.names.get(ident)
        named = f"name = {json.dumps(name)}\n" if name else ""
        files = 'files = "all"\n' if ident in world.files else ""
        return f"\n[[{table}]]\nid = {json.dumps(ident)}\n{named}{files}"

    http = f'\n[http]\nlisten = "127.0.0.1:{port}"\n' if port is not None else ""
    return (
        f"{HEADER}: a config for the built-in fake upstream, which lives\n"
        "# inside `mirrord demo` and only as long as it runs. Edit this file while the demo runs:\n"
        "# the daemon reloads it. Every key is explained in config.example.toml.\n"
        f'[upstream]\nurl = "{url}"\ntoken = "{DEMO_TOKEN}"\ntimeout = "5s"\n'
        # Fail fast when the demo drops the link, so the backoff shows within seconds.
        'max_attempts = 2\nretry_cap = "500ms"\n\n'
        '[storage]\npath = "mirror.db"\n\n'
        f'[sync]\ninterval = {json.dumps(interval)}\njitter = "1s"\nbackoff_cap = "20s"\n'
        f"{http}"
        + "".join(entry("surveys", s) for s in world.surveys)
        + "".join(entry("fields", f) for f in world.fields)
    )


def _write_config(directory: Path, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    _check_unused(directory)
    path = directory / "mirrord.toml"
    if path.exists() and not path.read_text(errors="replace").startswith(HEADER):
        raise DemoError(
            f"{path} exists and was not written by `mirrord demo`: "
            "choose another --dir (the demo rewrites its config on every start)"
        )
    path.write_text(text)
    return path


def _check_unused(directory: Path) -> None:
    """Refuse a directory whose mirror another mirrord holds (a demo already running there):
    rewriting the config under it would make its daemon reload onto this demo's upstream."""
    lock = directory / "mirror.db.lock"  # the store's lock file (mirrord/store.py)
    try:
        f = lock.open("rb")
    except FileNotFoundError:
        return
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = f.read(32).decode(errors="replace").strip() or "unknown"
            raise DemoError(
                f"another mirrord (pid {holder}) is using {directory}: stop it, "
                "or give this demo another --dir"
            ) from None
        fcntl.flock(f, fcntl.LOCK_UN)


# ---- --once ---------------------------------------------------------------------------------


def run_demo(
    directory: Path,
    *,
    images: int,
    once: bool = False,
    port: int = DEFAULT_PORT,
    tick: float = 5.0,
    interval: str = "10s",
    ticks: int | None = None,
) -> int:
    if once:
        return asyncio.run(_demo_once(directory, images))
    live = LiveDemo(directory, images=images, port=port, tick=tick, interval=interval, ticks=ticks)
    return asyncio.run(live.run())


async def _demo_once(directory: Path, images: int) -> int:
    from mirrord.cli import describe_files, describe_run

    world = build_world(images)
    async with FakeUpstream(world.data, token=DEMO_TOKEN) as fake:
        config_path = _write_config(directory, demo_config(fake.url, world))
        config = load_config(config_path)
        print(f"demo: fake upstream at {fake.url}; config written to {config_path}")
        started = time.monotonic()
        runs, files = await sync_and_download(config)
        seconds = time.monotonic() - started
    for run in runs:
        print(describe_run(run), file=sys.stdout if run.ok else sys.stderr)
    if files is not None:
        print(describe_files(files))
    print(_summary(runs, config.storage.path, seconds))
    print(f"next: mirrord status -c {config_path}   (or `mirrord demo` to keep it running)")
    return 0 if all(run.ok for run in runs) else 1


def _summary(runs: list[SyncRun], db: Path, seconds: float) -> str:
    images = sum(r.item_count for r in runs if r.kind == "images")
    surveys = sum(1 for r in runs if r.kind == "images")
    return (
        f"mirrored {images:,} images of {surveys} surveys into {db} in {seconds:.1f}s "
        f"({'all converged' if all(r.ok for r in runs) else 'NOT all converged'})"
    )


# ---- the live demo ------------------------------------------------------------------------


def pick_port(first: int, tries: int = PORT_TRIES) -> int:
    """`first` if it is free on 127.0.0.1, else the next free one; 0 picks any free port."""
    candidates = [0] if first == 0 else range(first, min(first + tries, 65536))
    for port in candidates:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise DemoError(f"no free port in {first}-{first + tries - 1} on 127.0.0.1: pass --port")


def _say(text: str = "") -> None:
    print(text, flush=True)


def _log(kind: str, text: str) -> None:
    _say(f"{time.strftime('%H:%M:%S')}  {kind:<8}  {text}")


class FieldLife:
    """What happens upstream while the demo runs: one change per tick, and link drops."""

    def __init__(self, world: World, fake: FakeUpstream, tick: float, seed: int = 7) -> None:
        self.world = world
        self.fake = fake
        self.tick = tick
        self.rng = Random(seed)

    async def run(self, ticks: int | None) -> None:
        try:
            for t in itertools.count(1) if ticks is None else range(1, ticks + 1):
                await asyncio.sleep(self.tick)
                self.step(t)
        finally:
            self.fake.faults.offline = False
        _log("upstream", f"field life paused after {ticks} ticks: upstream stays as it is now")

    def step(self, t: int) -> None:
        down_at = t >= OFFLINE_FIRST and (t - OFFLINE_FIRST) % OFFLINE_EVERY == 0
        up_at = t > OFFLINE_FIRST and (t - OFFLINE_FIRST) % OFFLINE_EVERY == OFFLINE_FOR
        if down_at and not self.fake.faults.offline:
            self.fake.faults.offline = True
            seconds = OFFLINE_FOR * self.tick
            _log(
                "link",
                f"down for {seconds:g} s: the daemon backs off; the mirror stays readable",
            )
        elif up_at and self.fake.faults.offline:
            self.fake.faults.offline = False
            _log("link", "back up: the daemon catches up at its next try")
        self.change_something()

    def change_something(self) -> None:
        data, rng = self.world.data, self.rng
        survey = rng.choice(self.world.all_surveys())
        n = len(data.image_hashes(survey))
        added = data.add_images(survey, rng.randint(1, max(2, n // 150)))
        changed = data.update_images(survey, rng.randint(0, max(2, n // 100)))
        deleted = data.delete_images(survey, rng.randint(0, max(1, n // 250)))
        name = self.world.names.get(survey, survey)
        _log(
            "upstream",
            f"{name}: +{len(added)} new, {len(changed)} changed, {len(deleted)} deleted",
        )


def _prctl() -> Callable[[int, int], int] | None:
    """libc's prctl, looked up before fork (a dlopen after fork is not safe); None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn: Callable[[int, int], int] = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return fn


class LiveDemo:
    def __init__(
        self,
        directory: Path,
        *,
        images: int,
        port: int,
        tick: float,
        interval: str,
        ticks: int | None,
    ) -> None:
        self.directory = directory
        self.images = images
        self.port = port
        self.tick = tick
        self.interval = interval
        self.ticks = ticks
        self.stop = asyncio.Event()
        self.proc: asyncio.subprocess.Process | None = None

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop.set)
        world = build_world(self.images)
        async with FakeUpstream(world.data, token=DEMO_TOKEN) as fake:
            port = pick_port(self.port)
            text = demo_config(fake.url, world, port=port, interval=self.interval)
            config_path = _write_config(self.directory, text)
            load_config(config_path)  # a bad --interval stops here, with the key and the fix
            try:
                return await self._supervise(world, fake, config_path, port)
            finally:
                await self._stop_daemon()
                _say("demo stopped.")

    async def _supervise(
        self, world: World, fake: FakeUpstream, config_path: Path, port: int
    ) -> int:
        log_path = self.directory / "daemon.log"
        self.proc = await self._spawn(config_path, log_path)
        base = f"http://127.0.0.1:{port}"
        if not await self._wait_ready(base):
            if self.stop.is_set():
                return 0
            _say(f"mirrord demo: the daemon did not start; the end of {log_path}:")
            _say(_tail(log_path))
            return 1
        self._introduce(world, fake, config_path, log_path, base)
        life = asyncio.ensure_future(FieldLife(world, fake, self.tick).run(self.ticks))
        exited = asyncio.ensure_future(self.proc.wait())
        stopping = asyncio.ensure_future(self.stop.wait())
        try:
            await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (life, stopping):
                task.cancel()
            await asyncio.gather(life, stopping, return_exceptions=True)
        if not self.stop.is_set():
            _say(f"mirrord demo: the daemon stopped on its own (exit {self.proc.returncode}):")
            _say(_tail(log_path))
            return 1
        _say("\nstopping: the daemon, then the fake upstream ...")
        return 0

    async def _spawn(self, config_path: Path, log_path: Path) -> asyncio.subprocess.Process:
        prctl = _prctl()

        def die_with_parent() -> None:
            # PR_SET_PDEATHSIG: should the demo be killed outright (kill -9), the daemon gets
            # SIGTERM instead of running on against an upstream that is gone.
            if prctl is not None:
                prctl(1, signal.SIGTERM)

        with log_path.open("wb") as log:
            return await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "mirrord",
                "run",
                "-c",
                str(config_path),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,
            )

    async def _wait_ready(self, base: str) -> bool:
        """True once the daemon answers /healthz; False if it exited, or on Ctrl-C."""
        assert self.proc is not None
        deadline = time.monotonic() + READY_TIMEOUT
        timeout = aiohttp.ClientTimeout(total=2)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            while time.monotonic() < deadline:
                if self.proc.returncode is not None or self.stop.is_set():
                    return False
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with http.get(f"{base}/healthz") as resp:
                        if resp.status == 200:
                            return True
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), 0.1)
        return False

    async def _stop_daemon(self) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT)
            except TimeoutError:
                _say("mirrord demo: the daemon did not stop in time; killing it")
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()

    def _introduce(
        self, world: World, fake: FakeUpstream, config_path: Path, log_path: Path, base: str
    ) -> None:
        assert self.proc is not None
        big, field_id = world.surveys[0], world.fields[0]
        gql = json.dumps(
            {
                "query": f'{{ sync_surveys(field_sentera_id: "{field_id}", content_hashes: []) '
                "{ remaining_count upserted { sentera_id ... on Survey { name } } } }"
            }
        )
        offline_at = OFFLINE_FIRST * self.tick
        _say(
            "\n".join(
                [
                    "mirrord demo: the real daemon, mirroring a fake Sentera upstream that runs "
                    "in this process.",
                    "",
                    f"  status page  {base}/",
                    f"  config       {config_path}   (edit it: the daemon reloads it)",
                    f"  mirror       {self.directory / 'mirror.db'}",
                    f"  daemon       pid {self.proc.pid}, log {log_path}",
                    f"  upstream     {fake.url}   ({len(world.all_surveys())} surveys, "
                    f"{world.image_count():,} images)",
                    "",
                    "Try:",
                    f"  curl -s {base}/v1/status",
                    f"  curl -s '{base}/v1/surveys/{big}/images?limit=2'",
                    f"  curl -s '{base}/v1/changes?since=0&limit=5'",
                    f"  curl -s '{base}/v1/changes?since=LAST_SEQ&wait=60'"
                    "   # answers as soon as the mirror changes",
                    f"  curl -s -X POST {base}/v1/surveys/{big}/sync   # sync now",
                    *(
                        f"  curl -s -o image.jpg {base}/v1/images/{image}/file"
                        "   # an image file, served offline"
                        for image in list(world.data.image_hashes(world.files[0]))[:1]
                        if world.files
                    ),
                    f"  curl -s {base}/graphql -H 'Content-Type: application/json' -d '{gql}'",
                    f"  mirrord status -c {config_path}",
                    "",
                    f"Field life: every {self.tick:g} s upstream adds, changes and deletes images; "
                    f"the link drops after {offline_at:g} s, then every "
                    f"{OFFLINE_EVERY * self.tick:g} s, for {OFFLINE_FOR * self.tick:g} s.",
                    f"The daemon syncs every {self.interval}. Ctrl-C stops it all "
                    f"(exit 0); the mirror stays in {self.directory}.",
                    "",
                ]
            )
        )


def _tail(path: Path, lines: int = 8) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return f"  (cannot read {path}: {e.strerror})"
    return "\n".join("  " + line for line in text.splitlines()[-lines:])
