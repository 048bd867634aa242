"""`mirrord run` as systemd runs it: a real daemon process, a real config file it watches, the
fake upstream over real sockets, the local HTTP API over real HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import socket
import sqlite3
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp

from mirrord.fake_upstream import FakeUpstream
from mirrord.store import Store
from tests.conftest import TOKEN, assert_mirrors, wait_for
from tests.test_sync import feed_is_sane


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def config_text(
    fake: FakeUpstream,
    port: int,
    surveys: list[str],
    fields: list[str] = (),  # type: ignore[assignment]
    interval: str = "1s",
    extra_sync: str = "",
    intervals: dict[str, str] | None = None,
) -> str:
    intervals = intervals or {}
    return (
        f'[upstream]\nurl = "{fake.url}"\ntoken = "{TOKEN}"\ntimeout = "3s"\n'
        "max_attempts = 1\n"
        f'[storage]\npath = "mirror.db"\n'
        f'[sync]\ninterval = "{interval}"\njitter = "0"\nreconcile_every = "0"\n{extra_sync}'
        f'[http]\nlisten = "127.0.0.1:{port}"\n'
        + "".join(
            f'[[surveys]]\nid = "{s}"\n'
            + (f'interval = "{intervals[s]}"\n' if s in intervals else "")
            for s in surveys
        )
        + "".join(f'[[fields]]\nid = "{f}"\n' for f in fields)
    )


class DaemonProcess:
    """A `mirrord run` child process, its log lines, and its HTTP API."""

    def __init__(self, config: Path, port: int, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.port = port
        self.env = env or {}
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self._reader: asyncio.Task[None] | None = None

    def preexec(self) -> None:
        """Runs in the child before exec: subclasses set resource limits here."""

    async def start(self) -> DaemonProcess:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "mirrord",
            "run",
            "-c",
            str(self.config),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, **self.env},
            preexec_fn=self.preexec,
        )
        self._reader = asyncio.ensure_future(self._read())
        return self

    async def _read(self) -> None:
        assert self.proc and self.proc.stdout
        async for raw in self.proc.stdout:
            text = raw.decode()
            self.raw.append(text)
            with contextlib.suppress(json.JSONDecodeError):
                self.lines.append(json.loads(text))

    async def status(self) -> dict[str, Any]:
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{self.port}/v1/status") as resp,
        ):
            assert resp.status == 200
            return dict(await resp.json())

    async def wait_status(self, predicate: Any, timeout: float = 15) -> dict[str, Any]:
        seen: dict[str, Any] = {}

        async def check() -> bool:
            nonlocal seen
            try:
                seen = await self.status()
            except (aiohttp.ClientError, AssertionError):
                return False
            return bool(predicate(seen))

        await wait_for(check, timeout=timeout, interval=0.05)
        return seen

    def events(self, name: str) -> list[dict[str, Any]]:
        return [line for line in self.lines if line.get("event") == name]

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        try:
            code = await asyncio.wait_for(self.proc.wait(), timeout)
        finally:
            if self.proc.returncode is None:
                self.proc.kill()
                await self.proc.wait()
            if self._reader:
                await asyncio.wait_for(self._reader, 5)
        return code


async def launch(
    daemons: list[DaemonProcess], config: Path, port: int, env: dict[str, str] | None = None
) -> DaemonProcess:
    d = await DaemonProcess(config, port, env).start()
    daemons.append(d)
    return d


def targets(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {t["id"]: t for t in status["targets"]}


async def test_a_stop_during_start_up_is_clean(
    tmp_path: Path, fake: FakeUpstream, daemons: list[DaemonProcess]
) -> None:
    """systemd may stop a unit that is still starting: SIGTERM while the mirror is opened and
    migrated, or just as the first syncs are handed over, must end the daemon as cleanly as
    later (it used to die of the signal, or log a cancelled first sync as a crash)."""
    survey = fake.data.add_survey(n_images=50)
    port = free_port()
    config = tmp_path / "mirrord.toml"
    config.write_text(config_text(fake, port, [survey], interval="1s"))
    db = tmp_path / "mirror.db"
    moments = {
        "the mirror is being opened": lambda d: db.exists(),
        "the daemon says it started": lambda d: bool(d.events("started")),
    }
    for moment, reached in moments.items():
        db.unlink(missing_ok=True)
        d = await launch(daemons, config, port)
        await wait_for(lambda d=d, reached=reached: reached(d), timeout=15, interval=0.005)
        code = await d.stop()
        assert code == 0, f"{moment}: exit {code}: {d.raw[-3:]}"
        assert d.events("stopped"), moment
        assert not any("Traceback" in line for line in d.raw), f"{moment}: {d.raw}"


async def test_periodic_syncs_status_logs_and_clean_stop(
    tmp_path: Path, fake: FakeUpstream, daemons: list[DaemonProcess]
) -> None:
    a = fake.data.add_survey(n_images=1200)
    field = fake.data.add_field(n_surveys=2, images_per_survey=20)
    port = free_port()
    config = tmp_path / "mirrord.toml"
    config.write_text(config_text(fake, port, [a], [field], interval="1s"))
    d = await launch(daemons, config, port)
    status = await d.wait_status(
        lambda s: (
            len(s["targets"]) == 2
            and all(t.get("last_outcome") == "converged" for t in s["targets"])
            and s["online"] is True  # set when the job ends, just after the run's record
        )
    )
    assert targets(status)[a]["image_count"] == 1200 and not targets(status)[a]["stale"]
    assert status["online"] is True and status["config_error"] is None
    # Periodic: more runs follow at about the interval, each one round trip (nothing changed).
    fake.data.update_images(a, 5)
    await wait_for(lambda: len([r for r in d.events("sync") if r["id"] == a]) >= 4, timeout=10)
    starts = [
        datetime.fromisoformat(r["timestamp"]).timestamp() - r["seconds"]
        for r in d.events("sync")
        if r["id"] == a
    ]
    gaps = [later - earlier for earlier, later in itertools.pairwise(starts)]
    assert all(0.8 <= gap <= 2.5 for gap in gaps), gaps  # runs start about 1 s apart
    store = await Store.open(tmp_path / "mirror.db", readonly=True)
    try:
        await wait_for(lambda: _mirrors(store, fake, a), timeout=10)
        for sid in fake.data.surveys(field):
            await assert_mirrors(store, fake, sid)
    finally:
        await store.close()
    summary = d.events("sync")[0]
    assert {"target", "id", "outcome", "pages", "upserted", "deleted", "failed", "seconds"} <= set(
        summary
    )
    assert await d.stop() == 0
    assert d.events("stopped")
    assert not any(TOKEN in line for line in d.raw)
    feed_is_sane(tmp_path / "mirror.db")


async def _mirrors(store: Store, fake: FakeUpstream, survey: str) -> bool:
    try:
        await assert_mirrors(store, fake, survey)
    except AssertionError:
        return False
    return True


async def test_config_edits_take_effect_without_restart(
    tmp_path: Path, fake: FakeUpstream, daemons: list[DaemonProcess]
) -> None:
    a = fake.data.add_survey(n_images=50)
    b = fake.data.add_survey(n_images=60)
    c = fake.data.add_survey(n_images=70)
    port = free_port()
    config = tmp_path / "mirrord.toml"
    config.write_text(config_text(fake, port, [a], interval="1h"))
    d = await launch(daemons, config, port)
    await d.wait_status(lambda s: targets(s).get(a, {}).get("last_outcome") == "converged")

    # Written in place: a survey added is synced within seconds.
    config.write_text(config_text(fake, port, [a, b], interval="1h"))
    status = await d.wait_status(lambda s: targets(s).get(b, {}).get("image_count") == 60)
    assert status["config_error"] is None

    # Saved by rename (as editors do): one removed, one added, an interval changed.
    tmp = tmp_path / ".mirrord.toml.swp"
    tmp.write_text(config_text(fake, port, [b, c], interval="1h", intervals={b: "30m"}))
    os.replace(tmp, config)
    status = await d.wait_status(
        lambda s: set(targets(s)) == {b, c} and targets(s)[c].get("image_count") == 70
    )
    assert targets(status)[b]["interval_seconds"] == 1800
    # The removed survey's data stays until `mirrord prune`.
    assert a in {col["parent_id"] for col in status["collections"]}

    # An invalid edit is refused; the running config keeps working.
    config.write_text(
        config_text(fake, port, [b, c]).replace('interval = "1s"', 'interval = "soon"')
    )
    status = await d.wait_status(lambda s: s["config_error"] is not None)
    assert "sync.interval" in status["config_error"] and set(targets(status)) == {b, c}
    assert d.events("config not reloaded: keeping the running config")
    config.write_text(config_text(fake, port, [b, c], interval="1h"))
    await d.wait_status(lambda s: s["config_error"] is None)
    assert await d.stop() == 0


async def test_sighup_reloads_a_config_edited_behind_a_symlink(
    tmp_path: Path, fake: FakeUpstream, daemons: list[DaemonProcess]
) -> None:
    # The file lives elsewhere (configuration management, /etc symlinks): only SIGHUP tells.
    a = fake.data.add_survey(n_images=10)
    b = fake.data.add_survey(n_images=20)
    real_dir = tmp_path / "managed"
    real_dir.mkdir()
    (tmp_path / "etc").mkdir()
    port = free_port()
    real = real_dir / "mirrord.toml"
    real.write_text(
        config_text(fake, port, [a], interval="1h").replace(
            'path = "mirror.db"', f'path = "{tmp_path / "mirror.db"}"'
        )
    )
    link = tmp_path / "etc" / "mirrord.toml"
    link.symlink_to(real)
    d = await launch(daemons, link, port)
    await d.wait_status(lambda s: targets(s).get(a, {}).get("last_outcome") == "converged")
    real.write_text(real.read_text().replace(f'id = "{a}"', f'id = "{b}"'))
    await asyncio.sleep(0.5)  # give a (wrong) watcher the chance to fire: nothing may change
    assert set(targets(await d.status())) == {a}
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)
    await d.wait_status(lambda s: set(targets(s)) == {b} and targets(s)[b].get("image_count") == 20)
    assert await d.stop() == 0


async def test_offline_backs_off_stays_readable_and_recovers(
    tmp_path: Path, fake: FakeUpstream, daemons: list[DaemonProcess]
) -> None:
    a = fake.data.add_survey(n_images=300)
    port = free_port()
    config = tmp_path / "mirrord.toml"
    config.write_text(
        config_text(fake, port, [a], interval="500ms", extra_sync='backoff_cap = "3s"\n')
    )
    d = await launch(daemons, config, port)
    await d.wait_status(lambda s: targets(s).get(a, {}).get("last_outcome") == "converged")
    fake.faults.offline = True
    fake.data.add_images(a, 25)
    fake.data.delete_images(a, 5)
    start = len(fake.requests)
    await d.wait_status(lambda s: targets(s)[a]["state"] == "backoff" and s["online"] is False)
    await asyncio.sleep(6)  # the outage itself: what we measure is how often the daemon calls
    offline_calls = len(fake.requests) - start
    # Without backoff, a 500 ms interval would call ~12 times in 6 s; full jitter capped at
    # 3 s averages one call per 1.5 s.
    assert 1 <= offline_calls <= 9, offline_calls
    status = await d.status()  # the mirror stays readable throughout
    assert targets(status)[a]["image_count"] == 300 and targets(status)[a]["offline_since"]
    fake.faults.offline = False
    status = await d.wait_status(
        lambda s: targets(s)[a].get("image_count") == 320 and targets(s)[a]["state"] == "idle"
    )
    assert targets(status)[a]["last_offline_seconds"] >= 6
    assert status["online"] is True
    assert d.events("back online")
    assert await d.stop() == 0


async def test_sigterm_mid_sync_leaves_a_consistent_mirror(
    tmp_path: Path, fake: FakeUpstream, daemons: list[DaemonProcess]
) -> None:
    a = fake.data.add_survey(n_images=20_000)
    port = free_port()
    config = tmp_path / "mirrord.toml"
    config.write_text(config_text(fake, port, [a], interval="1h"))
    d = await launch(daemons, config, port)
    await wait_for(lambda: len(fake.requests) >= 4, timeout=30)
    started = asyncio.get_running_loop().time()
    assert await d.stop(signal.SIGTERM) == 0
    assert asyncio.get_running_loop().time() - started < 5
    db = tmp_path / "mirror.db"
    feed_is_sane(db)
    con = sqlite3.connect(db)
    held = con.execute("SELECT count(*) FROM items").fetchone()[0]
    con.close()
    assert 0 < held < 20_000 and held % 1000 == 0  # stopped at a page boundary
    d2 = await launch(daemons, config, port)
    await d2.wait_status(lambda s: targets(s)[a].get("image_count") == 20_000, timeout=60)
    assert await d2.stop() == 0


async def test_second_instance_and_busy_port_are_refused(
    tmp_path: Path, fake: FakeUpstream, daemons: list[DaemonProcess]
) -> None:
    a = fake.data.add_survey(n_images=5)
    port = free_port()
    config = tmp_path / "mirrord.toml"
    config.write_text(config_text(fake, port, [a], interval="1h"))
    d = await launch(daemons, config, port)
    await d.wait_status(lambda s: True)
    second = await launch(daemons, config, port)
    assert second.proc is not None
    assert await asyncio.wait_for(second.proc.wait(), 15) == 2
    await asyncio.wait_for(second._reader, 5)  # type: ignore[arg-type]
    assert any("another mirrord process" in line for line in second.raw)
    other = tmp_path / "other"
    other.mkdir()
    (other / "mirrord.toml").write_text(config.read_text())
    third = await launch(daemons, other / "mirrord.toml", port)
    assert third.proc is not None
    assert await asyncio.wait_for(third.proc.wait(), 15) == 2
    await asyncio.wait_for(third._reader, 5)  # type: ignore[arg-type]
    assert any(f"cannot listen on 127.0.0.1:{port}" in line for line in third.raw)
    assert not any("Traceback" in line for line in second.raw + third.raw)
    assert await d.stop() == 0


async def test_prune_deletes_what_is_no_longer_configured(
    tmp_path: Path, fake: FakeUpstream
) -> None:
    from tests.test_cli import run_cli, write_config

    a = fake.data.add_survey(n_images=30)
    b = fake.data.add_survey(n_images=40)
    config = write_config(tmp_path, fake, [a, b])
    assert (await run_cli("sync", "-c", str(config)))[0] == 0
    config = write_config(tmp_path, fake, [b])
    code, out, err = await run_cli("prune", "-c", str(config))
    assert code == 2 and "--yes" in err  # no terminal to ask on: nothing deleted
    code, out, _ = await run_cli("prune", "-c", str(config), "--yes")
    assert code == 0 and a in out and "30 images" in out
    store = await Store.open(tmp_path / "mirror.db", readonly=True)
    try:
        assert await store.items("images", a) == {}
        assert len(await store.items("images", b)) == 40
    finally:
        await store.close()
    con = sqlite3.connect(tmp_path / "mirror.db")
    assert con.execute("SELECT count(*) FROM tombstones").fetchone()[0] == 30
    con.close()
    code, out, _ = await run_cli("prune", "-c", str(config), "--yes")
    assert code == 0 and "nothing to prune" in out


async def test_sd_notify_ready_status_reloading_watchdog(
    tmp_path: Path, fake: FakeUpstream, daemons: list[DaemonProcess]
) -> None:
    a = fake.data.add_survey(n_images=20)
    port = free_port()
    config = tmp_path / "mirrord.toml"
    config.write_text(config_text(fake, port, [a], interval="1h"))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.setblocking(False)
    messages: list[str] = []

    def drain() -> list[str]:
        while True:
            try:
                messages.append(sock.recv(4096).decode())
            except BlockingIOError:
                return messages

    try:
        d = await launch(
            daemons,
            config,
            port,
            env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "400000"},
        )
        await wait_for(lambda: any("READY=1" in m for m in drain()), timeout=15)
        ready = next(m for m in messages if "READY=1" in m)
        assert "STATUS=" in ready
        # READY=1 comes only once the HTTP port answers.
        assert (await d.status())["version"]
        await wait_for(lambda: sum("WATCHDOG=1" in m for m in drain()) >= 3, timeout=10)
        assert d.proc is not None
        d.proc.send_signal(signal.SIGHUP)
        await wait_for(lambda: any("RELOADING=1" in m for m in drain()), timeout=10)
        reloading = next(m for m in messages if "RELOADING=1" in m)
        assert "MONOTONIC_USEC=" in reloading
        await wait_for(
            lambda: (
                "READY=1" in drain()[-1]
                or any("READY=1" in m for m in messages[messages.index(reloading) + 1 :])
            ),
            timeout=10,
        )
        assert await d.stop() == 0
        assert any("STOPPING=1" in m for m in drain())
    finally:
        sock.close()


async def test_waking_from_sleep_runs_one_catch_up_not_a_burst(
    tmp_path: Path, fake: FakeUpstream, daemons: list[DaemonProcess]
) -> None:
    a = fake.data.add_survey(n_images=10)
    port = free_port()
    config = tmp_path / "mirrord.toml"
    config.write_text(config_text(fake, port, [a], interval="500ms"))
    d = await launch(daemons, config, port)
    await d.wait_status(lambda s: targets(s).get(a, {}).get("last_outcome") == "converged")
    assert d.proc is not None
    d.proc.send_signal(signal.SIGSTOP)  # the lid closes: ~8 runs are missed
    await asyncio.sleep(4)
    before = len(fake.requests)
    d.proc.send_signal(signal.SIGCONT)
    await wait_for(lambda: len(fake.requests) > before, timeout=10)
    await asyncio.sleep(0.9)
    # One catch-up run, then the regular 500 ms rhythm: never the 8 missed runs at once.
    assert len(fake.requests) - before <= 3
    assert await d.stop() == 0


async def test_oauth_token_expiring_mid_run_is_refreshed_and_rotation_persisted(
    tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    from mirrord.fake_upstream import FakeData, FakeOAuth

    client_secret, seed = "cs-5b7e21f9d0c4", "rt-seed-93a0c4e7b2"
    data = FakeData(seed=4)
    survey = data.add_survey(n_images=30)
    oauth = FakeOAuth("laptop-7", client_secret, seed, expires_in=1.5)
    async with FakeUpstream(data, token="static-token-unused-1", oauth=oauth) as fake:
        port = free_port()
        config = tmp_path / "mirrord.toml"
        config.write_text(
            config_text(fake, port, [survey], interval="500ms").replace(f'token = "{TOKEN}"\n', "")
            + f'[upstream.oauth]\nclient_id = "laptop-7"\nclient_secret = "{client_secret}"\n'
            f'refresh_token = "{seed}"\n'
        )
        d = await launch(daemons, config, port)
        await d.wait_status(lambda s: targets(s).get(survey, {}).get("last_outcome") == "converged")
        # Tokens live 1.5 s; syncs every 500 ms keep working across several expiries.
        await wait_for(lambda: oauth.refreshes >= 3, timeout=20)
        data.add_images(survey, 5)
        await d.wait_status(lambda s: targets(s)[survey].get("image_count") == 35)
        assert not any(r.status == 401 for r in fake.requests[-3:])
        assert await d.stop() == 0
        state = tmp_path / "oauth-state.json"
        assert state.stat().st_mode & 0o777 == 0o600
        saved = json.loads(state.read_text())
        assert saved["refresh_token"] == oauth.refresh_token  # the newest one, rotated
        everything = "".join(d.raw)
        for secret in (client_secret, seed, *oauth.issued, oauth.refresh_token):
            assert secret not in everything
