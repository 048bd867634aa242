"""The systemd unit as shipped, and the sd_notify client against real Unix datagram sockets."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from mirrord import systemd

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "systemd" / "mirrord.service"
ANALYZE_MISSING = (
    "systemd-analyze is not installed (.ci/run installs Debian's systemd package; "
    "apt-get was unavailable or failed)"
)

# --------------------------------------------------------------------------- the unit file


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections → key → every value, in order: systemd allows a key to repeat (and an empty
    assignment to reset it), which configparser cannot express."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        assert not line.endswith("\\"), f"line {number}: keep directives on one line"
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None and "=" in line, f"line {number}: {raw!r}"
        key, value = line.split("=", 1)
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


@pytest.fixture(scope="module")
def unit() -> dict[str, dict[str, list[str]]]:
    return parse_unit(UNIT.read_text())


def one(unit: dict[str, dict[str, list[str]]], section: str, key: str) -> str:
    values = unit[section].get(key)
    assert values, f"[{section}] {key}= is missing"
    assert len(values) == 1, f"[{section}] {key}= is set {len(values)} times"
    return values[0]


def test_unit_runs_the_daemon_as_a_notify_service(unit: dict[str, dict[str, list[str]]]) -> None:
    service_type = one(unit, "Service", "Type")
    assert service_type in {"notify", "notify-reload"}
    if service_type == "notify":
        assert one(unit, "Service", "ExecReload").split()[-2:] == ["-HUP", "$MAINPID"]
    assert one(unit, "Service", "ExecStart").split() == [
        "/usr/local/bin/mirrord",
        "run",
        "-c",
        "/etc/mirrord/mirrord.toml",
    ]
    assert one(unit, "Service", "Restart") == "on-failure"
    assert one(unit, "Service", "RestartSec")
    assert one(unit, "Service", "TimeoutStopSec")
    assert one(unit, "Service", "WatchdogSec") == "60"
    assert one(unit, "Install", "WantedBy") == "multi-user.target"
    # Offline-first: starting must not wait for a network that may never come.
    assert "network-online.target" not in " ".join(
        unit["Unit"].get("Wants", []) + unit["Unit"].get("After", [])
    )


def test_unit_identity_directories_and_token_credential(
    unit: dict[str, dict[str, list[str]]],
) -> None:
    assert one(unit, "Service", "DynamicUser") == "yes"
    assert one(unit, "Service", "StateDirectory") == "mirrord"
    assert one(unit, "Service", "StateDirectoryMode") == "0700"
    assert one(unit, "Service", "ConfigurationDirectory") == "mirrord"
    assert one(unit, "Service", "UMask") == "0077"
    # Credentials named without a path come from the credential store and are optional, so
    # one unit serves a static token and OAuth alike; a path would make a missing file fatal.
    credentials = unit["Service"]["LoadCredential"]
    assert "mirrord-token" in credentials
    config_source = (ROOT / "mirrord" / "config.py").read_text()
    for name in credentials:
        assert ":" not in name and "/" not in name, name
        assert f'"{name}"' in config_source, f"mirrord.config does not read credential {name}"
    assert "/etc/credstore/mirrord-token" in UNIT.read_text()  # the install notes say where


def test_unit_hardening(unit: dict[str, dict[str, list[str]]]) -> None:
    for key in (
        "ProtectHome",
        "PrivateTmp",
        "PrivateDevices",
        "NoNewPrivileges",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectKernelLogs",
        "ProtectControlGroups",
        "RestrictNamespaces",
        "LockPersonality",
        "MemoryDenyWriteExecute",
        "RestrictRealtime",
        "RestrictSUIDSGID",
    ):
        assert one(unit, "Service", key) == "yes", key
    assert one(unit, "Service", "ProtectSystem") == "strict"
    assert one(unit, "Service", "CapabilityBoundingSet") == ""
    assert one(unit, "Service", "SystemCallArchitectures") == "native"
    assert unit["Service"]["SystemCallFilter"][0] == "@system-service"
    families = one(unit, "Service", "RestrictAddressFamilies").split()
    assert sorted(families) == ["AF_INET", "AF_INET6", "AF_UNIX"]


def test_no_timer_unit_is_shipped() -> None:
    # The daemon schedules its own syncs; a leftover timer would start a second writer.
    assert not list((ROOT / "systemd").glob("*.timer"))


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A directory removed after the test (pytest keeps its tmp_path ones around)."""
    with tempfile.TemporaryDirectory(prefix="mirrord-unit-") as directory:
        yield Path(directory)


def _analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.skip(ANALYZE_MISSING)
    return path


def _installable_copy(directory: Path) -> Path:
    """The unit with ExecStart pointing at this checkout's mirrord: verify insists that the
    binary exists, and /usr/local/bin/mirrord does not on a developer's machine or in CI."""
    script = Path(sys.executable).parent / "mirrord"
    assert script.exists(), f"{script} is missing (pip install -e . installs it)"
    text = UNIT.read_text()
    assert "ExecStart=/usr/local/bin/mirrord " in text
    copy = directory / UNIT.name
    copy.write_text(text.replace("ExecStart=/usr/local/bin/mirrord ", f"ExecStart={script} "))
    return copy


def test_unit_passes_systemd_analyze_verify(scratch: Path) -> None:
    analyze = _analyze()
    if not os.access("/bin/kill", os.X_OK):
        pytest.skip("/bin/kill (ExecReload=) is missing: .ci/run installs Debian's procps")
    copy = _installable_copy(scratch)
    # --man=no: a Documentation= line need not name an installed man page; --generators=no:
    # nothing to generate in a container; --recursive-errors=no: only this unit's own errors
    # count, not those of the host's units it names (multi-user.target, network.target).
    result = subprocess.run(
        [analyze, "verify", "--man=no", "--generators=no", "--recursive-errors=no", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # Any line naming the unit is a complaint (a misspelt directive is "ignoring"), whatever
    # the exit code: not every systemd version fails verify on warnings.
    complaints = [line for line in output.splitlines() if UNIT.name in line]
    assert not complaints, output


def test_unit_hardening_scores_ok_in_systemd_analyze_security(scratch: Path) -> None:
    analyze = _analyze()
    copy = _installable_copy(scratch)
    # Exposure is shown as 0.0-10.0 and --threshold is on the 0-100 scale: 20 means "2.0,
    # rated OK". The shipped unit scores 1.1; this guards against losing hardening by accident.
    result = subprocess.run(
        [analyze, "security", "--offline=yes", "--threshold=20", "--no-pager", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------- sd_notify


@pytest.fixture(params=["path", "abstract"])
def receiver(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[socket.socket]:
    """A real AF_UNIX datagram socket standing in for systemd's, named by $NOTIFY_SOCKET."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)  # every wait in these tests is bounded
        if request.param == "path":
            # Not tmp_path: a socket path must fit in 108 bytes and pytest's can be longer.
            with tempfile.TemporaryDirectory(prefix="mirrord-sd-") as directory:
                path = os.path.join(directory, "notify")
                sock.bind(path)
                monkeypatch.setenv("NOTIFY_SOCKET", path)
                yield sock
        else:
            name = f"mirrord-test-{uuid.uuid4().hex}"
            sock.bind("\0" + name)
            monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
            yield sock


def lines(sock: socket.socket) -> list[str]:
    return sock.recv(65536).decode().split("\n")


def test_ready_sends_one_datagram_with_status(receiver: socket.socket) -> None:
    assert systemd.ready("mirroring 2 surveys")
    assert lines(receiver) == ["READY=1", "STATUS=mirroring 2 surveys"]
    assert systemd.ready()
    assert lines(receiver) == ["READY=1"]


def test_notify_sends_the_given_lines(receiver: socket.socket) -> None:
    assert systemd.notify("READY=1", "STATUS=x", "MAINPID=1234")
    assert lines(receiver) == ["READY=1", "STATUS=x", "MAINPID=1234"]


def test_status_is_one_bounded_line(receiver: socket.socket) -> None:
    assert systemd.status("sync failed:\n  connection refused\n")
    assert lines(receiver) == ["STATUS=sync failed: connection refused"]
    assert systemd.status("x" * 10_000)
    (line,) = lines(receiver)
    assert line.startswith("STATUS=xxx")
    assert len(line) == len("STATUS=") + systemd.MAX_STATUS_CHARS


def test_reloading_carries_the_monotonic_clock(receiver: socket.socket) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert systemd.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = lines(receiver)
    assert first == "RELOADING=1"
    key, value = second.split("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after
    assert systemd.reloading("re-reading config")
    assert lines(receiver)[:2] == ["RELOADING=1", "STATUS=re-reading config"]


def test_stopping(receiver: socket.socket) -> None:
    assert systemd.stopping()
    assert lines(receiver) == ["STOPPING=1"]
    assert systemd.stopping("finishing a page")
    assert lines(receiver) == ["STOPPING=1", "STATUS=finishing a page"]


def test_notify_refuses_a_line_that_would_inject_another(receiver: socket.socket) -> None:
    with pytest.raises(ValueError):
        systemd.notify("STATUS=a\nREADY=1")
    with pytest.raises(ValueError):
        systemd.notify("READY")


def test_everything_is_a_noop_without_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not systemd.notify("READY=1")
    assert not systemd.ready("x")
    assert not systemd.status("x")
    assert not systemd.reloading()
    assert not systemd.stopping()


def test_a_missing_or_closed_socket_returns_false(monkeypatch: pytest.MonkeyPatch) -> None:
    with tempfile.TemporaryDirectory(prefix="mirrord-sd-") as directory:
        missing = os.path.join(directory, "missing")
        closed = os.path.join(directory, "closed")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(closed)  # the file stays behind, with nobody receiving
        for value in (
            missing,
            closed,
            "@mirrord-nobody-" + uuid.uuid4().hex,
            "relative/path",
            "/" + "x" * 200,  # longer than a socket path may be
        ):
            monkeypatch.setenv("NOTIFY_SOCKET", value)
            assert not systemd.ready("x"), value
            assert not systemd.notify("WATCHDOG=1"), value


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "60000000"}, 30.0),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "{pid}"}, 30.0),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "1"}, None),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "nope"}, None),
        ({"WATCHDOG_USEC": "1500"}, 0.00075),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "60s"}, None),
        ({"WATCHDOG_USEC": ""}, None),
    ],
)
def test_watchdog_interval(
    env: dict[str, str], expected: float | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value.format(pid=os.getpid()))
    assert systemd.watchdog_interval() == expected


async def test_watchdog_loop_pings_until_cancelled(receiver: socket.socket) -> None:
    receiver.setblocking(False)
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(systemd.watchdog_loop(0.01))
    try:
        for _ in range(3):
            data = await asyncio.wait_for(loop.sock_recv(receiver, 65536), timeout=5)
            assert data == b"WATCHDOG=1"
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_watchdog_loop_first_ping_is_immediate(receiver: socket.socket) -> None:
    receiver.setblocking(False)
    loop = asyncio.get_running_loop()
    # An interval far longer than the wait: only the ping at start can arrive in time.
    task = asyncio.ensure_future(systemd.watchdog_loop(3600))
    try:
        data = await asyncio.wait_for(loop.sock_recv(receiver, 65536), timeout=5)
        assert data == b"WATCHDOG=1"
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


@pytest.mark.parametrize("interval", [0, -1.0, float("nan")])
async def test_watchdog_loop_rejects_a_bad_interval(interval: float) -> None:
    with pytest.raises(ValueError):
        await systemd.watchdog_loop(interval)
