"""`mirrord demo` as a new user runs it: a real process that runs the fake upstream, writes a
config and runs the real daemon as its child; field life upstream; Ctrl-C."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import re
import signal
import socket
import sys
import tomllib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mirrord.demo import build_world
from tests.conftest import wait_for
from tests.test_cli import run_cli
from tests.test_daemon import free_port

TIMEOUT = aiohttp.ClientTimeout(total=10)


class DemoProcess:
    """`mirrord demo ...` in a session of its own, so that a signal to its process group is a
    terminal's Ctrl-C: it reaches the demo and the daemon it started."""

    def __init__(self, directory: Path, *args: str) -> None:
        self.directory = directory
        self.args = ["--dir", str(directory), *args]
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[str] = []
        self._reader: asyncio.Task[None] | None = None
        self.base = ""
        self.daemon_pid = 0

    async def start(self) -> DemoProcess:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "mirrord",
            "demo",
            *self.args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
        self._reader = asyncio.ensure_future(self._read())
        return self

    async def _read(self) -> None:
        assert self.proc and self.proc.stdout
        async for raw in self.proc.stdout:
            self.lines.append(raw.decode())

    @property
    def output(self) -> str:
        return "".join(self.lines)

    async def wait_line(self, pattern: str, timeout: float = 60) -> re.Match[str]:
        found: list[re.Match[str]] = []

        def seen() -> bool:
            found[:] = [m for m in map(re.compile(pattern).search, self.lines) if m]
            assert self.proc is not None
            if not found and self.proc.returncode is not None:
                raise AssertionError(f"demo exited {self.proc.returncode}:\n{self.output}")
            return bool(found)

        try:
            await wait_for(seen, timeout=timeout, interval=0.05)
        except AssertionError:
            raise AssertionError(f"no line matching {pattern!r} in:\n{self.output}") from None
        return found[0]

    async def ready(self) -> None:
        """Wait for the introduction; learn the URL and the daemon's pid from it."""
        self.base = (await self.wait_line(r"status page\s+(http://127\.0\.0\.1:\d+)/"))[1]
        self.daemon_pid = int((await self.wait_line(r"daemon\s+pid (\d+)"))[1])

    @property
    def port(self) -> int:
        return int(self.base.rsplit(":", 1)[1])

    def fake_base(self) -> str:
        config = tomllib.loads((self.directory / "mirrord.toml").read_text())
        return str(config["upstream"]["url"]).removesuffix("/graphql")

    async def get(self, path: str, base: str | None = None) -> Any:
        async with (
            aiohttp.ClientSession(timeout=TIMEOUT) as http,
            http.get((base or self.base) + path) as resp,
        ):
            assert resp.status == 200, await resp.text()
            return await resp.json()

    async def status(self) -> dict[str, Any]:
        return dict(await self.get("/v1/status"))

    async def wait_status(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 60
    ) -> dict[str, Any]:
        seen: dict[str, Any] = {}

        async def check() -> bool:
            nonlocal seen
            try:
                seen = await self.status()
            except (aiohttp.ClientError, AssertionError, TimeoutError):
                return False
            return bool(predicate(seen))

        await wait_for(check, timeout=timeout, interval=0.05)
        return seen

    def signal_group(self, sig: int) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    async def wait_exit(self, timeout: float = 30) -> int:
        assert self.proc is not None
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        if self._reader:
            await asyncio.wait_for(self._reader, 5)
        return code


@pytest.fixture
async def demos() -> AsyncIterator[list[DemoProcess]]:
    """Demo processes a test started; their whole process group is killed if still there."""
    started: list[DemoProcess] = []
    yield started
    for d in started:
        if d.proc is None:
            continue
        if d.proc.returncode is None:
            d.signal_group(signal.SIGKILL)
            await d.proc.wait()
        if d._reader:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(d._reader, 5)
        d.signal_group(signal.SIGKILL)  # a daemon left behind goes with it


async def launch(demos: list[DemoProcess], directory: Path, *args: str) -> DemoProcess:
    d = await DemoProcess(directory, *args).start()
    demos.append(d)
    await d.ready()
    return d


def alive(pid: int) -> bool:
    """Whether `pid` is a running process (a zombie waiting for its reaper counts as gone)."""
    if pid <= 0:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def port_closed(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


async def mirror_hashes(d: DemoProcess, survey: str) -> dict[str, str]:
    held: dict[str, str] = {}
    cursor = ""
    while True:
        page = await d.get(f"/v1/surveys/{survey}/images?limit=1000{cursor}")
        held |= {i["sentera_id"]: i["content_hash"] for i in page["images"]}
        if page["next_cursor"] is None:
            return held
        cursor = f"&cursor={page['next_cursor']}"


def backing_off(status: dict[str, Any]) -> bool:
    return status["online"] is False or any(t["state"] == "backoff" for t in status["targets"])


def recovered(status: dict[str, Any]) -> bool:
    return (
        status["online"] is True
        and all(t["state"] == "idle" for t in status["targets"])
        and any(t["last_offline_seconds"] is not None for t in status["targets"])
    )


async def test_demo_runs_the_daemon_and_the_mirror_follows_field_life(
    tmp_path: Path, demos: list[DemoProcess]
) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    busy = taken.getsockname()[1]
    try:
        d = await launch(
            demos,
            tmp_path / "demo",
            *("--images", "400", "--port", str(busy), "--tick", "0.5", "--interval", "1s"),
            *("--ticks", "40"),
        )
        assert busy < d.port <= busy + 50, "a busy port is skipped for the next free one"
    finally:
        taken.close()
    out = d.output
    for hint in ("/v1/status", "/images?limit=2", "/v1/changes?since=", "&wait=", "/graphql"):
        assert f"curl -s {d.base}" in out and hint in out, hint
    assert str(tmp_path / "demo" / "mirrord.toml") in out

    # The real daemon serves the mirror of the demo's surveys and fields.
    world = build_world(400)
    status = await d.wait_status(
        lambda s: all(t.get("last_success_at") for t in s["targets"]), timeout=60
    )
    assert {t["id"] for t in status["targets"]} == set(world.surveys) | set(world.fields)

    # The link drops (the daemon backs off, /v1/status says so) and comes back.
    await d.wait_line(r"link\s+down")
    await d.wait_status(backing_off, timeout=40)
    await d.wait_line(r"link\s+back up")

    # Field life ends after 40 ticks with the link up: the mirror then equals upstream exactly,
    # which by then differs from the generated start: added, changed and deleted images.
    await d.wait_line(r"field life paused", timeout=60)
    fake = d.fake_base()
    upstream: dict[str, dict[str, str]] = (await d.get("/_fake/state", base=fake))["surveys"]
    initial = {s: world.data.image_hashes(s) for s in world.all_surveys()}
    assert set(upstream) == set(initial)
    assert upstream != initial
    for survey in upstream:
        assert set(upstream[survey]) - set(initial[survey]), "no image was added"
    assert any(set(initial[s]) - set(upstream[s]) for s in upstream), "no image was deleted"

    async def mirrored() -> bool:
        return all([await mirror_hashes(d, s) == upstream[s] for s in upstream])

    await wait_for(mirrored, timeout=60, interval=0.5)
    changes = (await d.get("/v1/changes?since=0&limit=10000"))["changes"]
    assert any(c["deleted"] for c in changes)
    status = await d.wait_status(recovered, timeout=60)
    assert all(not t["stale"] for t in status["targets"])

    # Ctrl-C at the terminal: SIGINT to the whole process group.
    d.signal_group(signal.SIGINT)
    assert await d.wait_exit() == 0
    assert "Traceback" not in d.output
    assert "demo stopped." in d.output
    assert not alive(d.daemon_pid)
    assert port_closed(d.port)
    log = (tmp_path / "demo" / "daemon.log").read_text()
    assert '"event": "stopped"' in log and "Traceback" not in log


async def test_sigterm_to_the_demo_alone_stops_its_daemon(
    tmp_path: Path, demos: list[DemoProcess]
) -> None:
    d = await launch(
        demos, tmp_path / "demo", "--images", "50", "--port", str(free_port()), "--ticks", "0"
    )
    await d.wait_status(lambda s: all(t.get("last_success_at") for t in s["targets"]))
    # An open status page always has a change-feed long-poll waiting: it must not hold the stop.
    last = (await d.get("/v1/changes?since=0&limit=1"))["last_seq"]
    for _ in range(20):  # a sync may still write after the first successes: follow it
        last = max(last, (await d.get(f"/v1/changes?since={last}&limit=10000"))["last_seq"])
        poll = asyncio.ensure_future(d.get(f"/v1/changes?since={last}&wait=60"))
        await asyncio.sleep(0.3)  # let the long-poll reach the daemon
        if not poll.done():
            break
        last = (await poll)["last_seq"]
    assert not poll.done(), "the mirror kept changing"
    assert d.proc is not None
    d.proc.send_signal(signal.SIGTERM)  # the demo only: it must stop the daemon itself
    assert await asyncio.wait_for(poll, 10) == {"changes": [], "last_seq": last}
    assert await d.wait_exit() == 0
    assert "did not stop in time" not in d.output
    assert not alive(d.daemon_pid)
    assert port_closed(d.port)
    assert '"event": "stopped"' in (tmp_path / "demo" / "daemon.log").read_text()


async def test_a_killed_demo_takes_its_daemon_with_it(
    tmp_path: Path, demos: list[DemoProcess]
) -> None:
    d = await launch(
        demos, tmp_path / "demo", "--images", "50", "--port", str(free_port()), "--ticks", "0"
    )
    assert d.proc is not None
    d.proc.kill()  # kill -9 on the demo alone: no chance to stop the daemon
    await d.wait_exit()
    await wait_for(lambda: not alive(d.daemon_pid), timeout=20, interval=0.05)
    await wait_for(lambda: port_closed(d.port), timeout=10, interval=0.05)


async def test_demo_once_on_a_fresh_directory(tmp_path: Path) -> None:
    world = build_world(900)
    directory = str(tmp_path / "d")
    code, out, err = await run_cli("demo", "--once", "--dir", directory, "--images", "900")
    assert code == 0, err
    for survey in world.surveys:
        assert f"survey {survey}: converged" in out
    for field_surveys in (world.data.survey_ids(f) for f in world.fields):
        for survey in field_surveys:
            assert f"survey {survey}: converged" in out
    assert f"field {world.fields[0]}: converged" in out
    total = world.image_count()
    assert f"mirrored {total:,} images of 4 surveys" in out and "all converged" in out
    assert (tmp_path / "d" / "mirror.db").exists()


async def test_demo_refuses_a_directory_with_someone_elses_config(tmp_path: Path) -> None:
    mine = tmp_path / "mirrord.toml"
    mine.write_text('[upstream]\ntoken = "my-real-token"\n')
    code, _, err = await run_cli("demo", "--once", "--dir", str(tmp_path))
    assert code == 2
    assert "not written by `mirrord demo`" in err and "Traceback" not in err
    assert mine.read_text() == '[upstream]\ntoken = "my-real-token"\n'
    code, _, err = await run_cli("demo", "--dir", str(tmp_path / "x"), "--tick", "0")
    assert code == 2 and "--tick" in err


async def test_demo_refuses_a_directory_a_running_mirrord_uses(tmp_path: Path) -> None:
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "mirrord.toml").write_text("# Written by `mirrord demo`: the other one's\n")
    with (busy / "mirror.db.lock").open("w") as lock:
        lock.write("4242\n")
        lock.flush()
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, _, err = await run_cli("demo", "--once", "--dir", str(busy))
    assert code == 2
    assert "another mirrord (pid 4242) is using" in err and "Traceback" not in err
    assert "the other one's" in (busy / "mirrord.toml").read_text()  # left alone
