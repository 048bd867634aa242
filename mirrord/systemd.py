"""A dependency-free client for systemd's notification protocol (sd_notify(3)).

The daemon tells systemd when it is ready, what it is doing, when it reloads and stops, and
proves it is alive to the watchdog. Outside systemd (a terminal, the tests, a container without
it) ``$NOTIFY_SOCKET`` is unset and every call is a cheap no-op, so callers never need to ask
whether they run under systemd.

Sending never raises and never logs: a lost notification must not take the daemon down, and
systemd itself reports a service that never became ready or stopped pinging its watchdog.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time

__all__ = [
    "MAX_STATUS_CHARS",
    "notify",
    "ready",
    "reloading",
    "status",
    "stopping",
    "watchdog_interval",
    "watchdog_loop",
]

# systemd drops a notification whose datagram does not fit its receive buffer (PIPE_BUF, 4096
# bytes in systemd 252), so a long error message in STATUS= would silently lose READY=1 with it.
# Status text is cut well below that, leaving room for the other lines and multi-byte UTF-8.
MAX_STATUS_CHARS = 512

# PID 1 drains its socket promptly; the bound only matters if it is wedged, and then the
# daemon's event loop must not hang behind it.
_SEND_TIMEOUT = 1.0


def _address(raw: str) -> bytes | None:
    """The socket address $NOTIFY_SOCKET names, as sd_notify(3) reads it; None if unusable."""
    if raw.startswith("@"):
        # Linux abstract namespace: a leading NUL byte instead of "@", no file involved.
        return b"\0" + os.fsencode(raw[1:])
    if raw.startswith("/"):
        return os.fsencode(raw)
    # Relative paths are refused by libsystemd too; "vsock:" addresses (systemd 253+, for VMs)
    # do not apply to a laptop service.
    return None


def notify(*lines: str) -> bool:
    """Send ``lines`` ("KEY=value" each) to systemd as one datagram.

    Returns True when the datagram was handed to the socket, False when ``$NOTIFY_SOCKET`` is
    unset or unusable or sending failed. Never raises for socket problems. A line containing a
    newline would smuggle in another assignment, so that (a caller's bug) raises ValueError.
    """
    for line in lines:
        if "\n" in line or "=" not in line:
            raise ValueError(f"not a single KEY=value line: {line!r}")
    raw = os.environ.get("NOTIFY_SOCKET", "")
    if not raw or not lines:
        return False
    address = _address(raw)
    if address is None:
        return False
    payload = "\n".join(lines).encode("utf-8", "replace")
    try:
        # A socket per call rather than a cached one: notifications are rare (a watchdog ping
        # every 30 s at most), and a fresh socket cannot be left broken by a systemd restart
        # (daemon-reexec) or inherited across a fork.
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(_SEND_TIMEOUT)
            sent = sock.sendto(payload, address)
    except (OSError, ValueError):
        # OSError: no such socket, nobody listening, timeout, path too long. ValueError: a NUL
        # byte inside a filesystem path.
        return False
    return sent == len(payload)


def _status_line(text: str) -> str:
    # One line, bounded: exception messages often span several lines.
    flat = " ".join(text.split())
    if len(flat) > MAX_STATUS_CHARS:
        flat = flat[: MAX_STATUS_CHARS - 1] + "…"
    return f"STATUS={flat}"


def _with_status(line: str, text: str | None) -> tuple[str, ...]:
    return (line,) if text is None else (line, _status_line(text))


def ready(status: str | None = None) -> bool:
    """Startup (or a reload) is complete: systemd finishes `systemctl start`/`reload` now."""
    return notify(*_with_status("READY=1", status))


def status(text: str) -> bool:
    """Free-form status shown by `systemctl status` (flattened to one line, truncated)."""
    return notify(_status_line(text))


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, the clock systemd compares MONOTONIC_USEC= against."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def reloading(status: str | None = None) -> bool:
    """A reload has started; send ``ready()`` when it is done.

    MONOTONIC_USEC= lets systemd 253+ (Type=notify-reload) tell this reload from an older one;
    older systemd ignores the extra line.
    """
    return notify(*_with_status("RELOADING=1", status), f"MONOTONIC_USEC={monotonic_usec()}")


def stopping(status: str | None = None) -> bool:
    """Shutdown has begun, so systemd shows "deactivating" rather than a hung service."""
    return notify(*_with_status("STOPPING=1", status))


def watchdog_interval() -> float | None:
    """Seconds between watchdog pings, or None when systemd expects none.

    Half of ``$WATCHDOG_USEC``, as sd_watchdog_enabled(3) advises, so one late ping is not yet
    fatal. ``$WATCHDOG_PID``, when set, names the process the watchdog is meant for: a child
    that inherited the environment must not ping on its parent's behalf.
    """
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    try:
        usec_value = int(usec)
        if pid and int(pid) != os.getpid():
            return None
    except ValueError:
        return None
    if usec_value <= 0:
        return None
    return usec_value / 2 / 1_000_000


async def watchdog_loop(interval: float) -> None:
    """Ping the watchdog now and every ``interval`` seconds until cancelled.

    It runs on the daemon's event loop on purpose: if the loop hangs, the pings stop and
    systemd restarts the service, which is the point of the watchdog.
    """
    if not interval > 0:
        raise ValueError(f"watchdog interval must be positive, got {interval!r}")
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)
