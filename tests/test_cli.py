"""The `mirrord` command run as a user runs it: a real process, a real config file, real HTTP."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import random
import signal
import sqlite3
import sys
from pathlib import Path

import pytest

from mirrord import __version__
from mirrord.fake_upstream import FakeUpstream
from mirrord.store import Store
from tests.conftest import TOKEN, assert_mirrors, wait_for
from tests.test_sync import feed_is_sane


async def run_cli(
    *args: str, timeout: float = 60.0, env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mirrord",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def write_config(
    tmp_path: Path,
    fake: FakeUpstream,
    surveys: list[str],
    fields: list[str] = (),
    token: str = TOKEN,
) -> Path:  # type: ignore[assignment]
    text = (
        f'[upstream]\nurl = "{fake.url}"\ntoken = "{token}"\ntimeout = "5s"\n'
        'max_attempts = 2\nretry_cap = "100ms"\n'
        '[storage]\npath = "mirror.db"\n[sync]\nreconcile_every = "0"\n'
        + "".join(f'[[surveys]]\nid = "{s}"\n' for s in surveys)
        + "".join(f'[[fields]]\nid = "{f}"\n' for f in fields)
    )
    path = tmp_path / "mirrord.toml"
    path.write_text(text)
    return path


def no_traceback(*texts: str) -> None:
    for text in texts:
        assert "Traceback" not in text


async def test_version() -> None:
    code, out, _ = await run_cli("--version")
    assert (code, out.strip()) == (0, f"mirrord {__version__}")


async def test_check_config(tmp_path: Path, fake: FakeUpstream) -> None:
    good = write_config(tmp_path, fake, ["s1"])
    code, out, err = await run_cli("check-config", str(good))
    assert code == 0 and "ok" in out and err == ""
    bad = tmp_path / "bad.toml"
    bad.write_text(good.read_text().replace('timeout = "5s"', 'timeout = "soon"'))
    code, out, err = await run_cli("check-config", str(bad))
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "upstream.timeout" in err
    broken = tmp_path / "broken.toml"
    broken.write_text("[upstream\nurl = 1\n")
    code, _, err = await run_cli("check-config", str(broken))
    assert code == 2 and "broken.toml:1:" in err and "invalid TOML" in err
    code, _, err = await run_cli("check-config", str(tmp_path / "missing.toml"))
    assert code == 2 and "missing.toml" in err
    no_traceback(err)


async def test_sync_status_and_exit_codes(tmp_path: Path, fake: FakeUpstream) -> None:
    a = fake.data.add_survey(n_images=1500)
    b = fake.data.add_survey(n_images=20)
    field = fake.data.add_field(n_surveys=2, images_per_survey=30)
    config = write_config(tmp_path, fake, [a, b], [field])
    code, out, err = await run_cli("sync", "-c", str(config))
    assert code == 0, err
    assert f"survey {a}: converged" in out and f"field {field}: converged" in out
    store = await Store.open(tmp_path / "mirror.db", readonly=True)
    try:
        for sid in [a, b, *fake.data.surveys(field)]:
            await assert_mirrors(store, fake, sid)
    finally:
        await store.close()

    code, out, _ = await run_cli("status", "-c", str(config), "--json")
    status = json.loads(out)
    rows = {c["parent_id"]: c for c in status["collections"]}
    assert code == 0 and rows[a]["item_count"] == 1500 and rows[a]["last_outcome"] == "converged"
    code, out, _ = await run_cli("status", "-c", str(config))
    assert code == 0 and a in out and "1,500" in out and "just now" in out

    broken = fake.data.update_images(b, 1)  # its new version cannot be served
    fake.data.set_failing(set(broken))
    code, out, err = await run_cli("sync", "-c", str(config), "--survey", b)
    assert code == 1
    assert f"survey {b}: partial" in err and "failed upstream" in err

    code, _, err = await run_cli("sync", "-c", str(config), "--survey", "no_such_survey")
    assert code == 1 and "NOT_FOUND" in err
    no_traceback(out, err)


async def test_bad_token_is_clear_and_never_printed(tmp_path: Path, fake: FakeUpstream) -> None:
    survey = fake.data.add_survey(n_images=3)
    secret = "wrong-token-7c3a91"
    config = write_config(tmp_path, fake, [survey], token=secret)
    code, out, err = await run_cli("sync", "-c", str(config))
    assert code == 1 and "refused the token" in err
    code2, out2, err2 = await run_cli("status", "-c", str(config), "--json")
    assert code2 == 0
    for text in (out, err, out2, err2):
        assert secret not in text
    assert secret.encode() not in (tmp_path / "mirror.db").read_bytes()
    no_traceback(err, err2)


async def test_status_without_a_mirror(tmp_path: Path, fake: FakeUpstream) -> None:
    config = write_config(tmp_path, fake, ["s"])
    code, _, err = await run_cli("status", "-c", str(config))
    assert code == 2 and "no mirror" in err and "mirrord sync" in err


async def test_second_writer_is_refused(tmp_path: Path, fake: FakeUpstream) -> None:
    survey = fake.data.add_survey(n_images=3)
    config = write_config(tmp_path, fake, [survey])
    store = await Store.open(tmp_path / "mirror.db")
    try:
        code, _, err = await run_cli("sync", "-c", str(config))
    finally:
        await store.close()
    assert code == 2 and "another mirrord process" in err and str(os.getpid()) in err
    code, _, _ = await run_cli("sync", "-c", str(config))
    assert code == 0


async def test_kill_9_mid_sync_then_resume(tmp_path: Path, fake: FakeUpstream) -> None:
    survey = fake.data.add_survey(n_images=20_000)
    config = write_config(tmp_path, fake, [survey])
    db = tmp_path / "mirror.db"
    rng = random.Random(5)
    kills = 0
    for _ in range(4):
        start = len(fake.requests)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "mirrord",
            "sync",
            "-c",
            str(config),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            await wait_for(
                lambda s=start, p=proc: len(fake.requests) - s >= 2 or p.returncode is not None,
                timeout=30,
            )
            # Land the kill anywhere: awaiting an answer, parsing it, or inside its transaction.
            await asyncio.sleep(rng.uniform(0, 0.15))
            if proc.returncode is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
        finally:
            await proc.wait()
        feed_is_sane(db)
        fake.data.update_images(survey, 300)  # the world moves on while the laptop is down
    assert kills >= 3
    code, _, err = await run_cli("sync", "-c", str(config))
    assert code == 0, err
    store = await Store.open(db, readonly=True)
    try:
        await assert_mirrors(store, fake, survey)
    finally:
        await store.close()
    feed_is_sane(db)
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()


async def test_demo_once(tmp_path: Path) -> None:
    code, out, err = await run_cli(
        "demo", "--once", "--dir", str(tmp_path / "demo"), "--images", "1200"
    )
    assert code == 0, err
    assert "mirrored" in out and "all converged" in out
    code, out, _ = await run_cli("status", "-c", str(tmp_path / "demo" / "mirrord.toml"))
    assert code == 0 and "1,200" in out


@pytest.mark.parametrize("args", [["sync"], ["bogus"], ["sync", "--nope"]])
async def test_usage_errors_exit_2(tmp_path: Path, args: list[str]) -> None:
    code, _, err = await run_cli(*args, env={"MIRRORD_CONFIG": str(tmp_path / "none.toml")})
    assert code == 2
    no_traceback(err)


async def test_progress_bar_on_a_terminal(tmp_path: Path, fake: FakeUpstream) -> None:
    survey = fake.data.add_survey(n_images=3500)
    config = write_config(tmp_path, fake, [survey])
    leader, follower = pty.openpty()
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "mirrord",
            "sync",
            "-c",
            str(config),
            stdout=asyncio.subprocess.PIPE,
            stderr=follower,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        os.set_blocking(leader, False)
        screen = os.read(leader, 65536).decode()
    finally:
        os.close(leader)
        os.close(follower)
    assert proc.returncode == 0
    assert "[" in screen and "3,500/3,500" in screen and "page 4" in screen
    assert f"survey {survey}: converged" in out.decode()
    assert "3,500" not in out.decode().split(":")[0]  # the bar went to the terminal only
