"""What the benchmarks share: the machine they ran on, and how fast it was running then.

On a shared VM the same code takes up to twice the CPU time from one minute to the next (the
host's other guests share its cores and caches). So each benchmark prints the time of a fixed
piece of pure-Python work before and after its runs: figures taken while it reads well above
its usual value were taken on a slowed machine, whatever the load average says.
"""

from __future__ import annotations

import os
import platform
import resource
import time
from pathlib import Path

SPEED_WORK = 5_000_000  # squares summed by speed_check: 0.4-0.9 s on this project's VM (1.9 seen)


def cpu_seconds() -> float:
    """This process's user + system CPU seconds, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def machine() -> str:
    return (
        f"machine: {platform.machine()}, {os.cpu_count()} cores ({_cpu_model()}), Python "
        f"{platform.python_version()}, {platform.platform()}"
    )


def speed_check() -> float:
    """CPU seconds a fixed piece of pure-Python work takes now (lower: a faster machine)."""
    start = time.process_time()
    sum(i * i for i in range(SPEED_WORK))
    return time.process_time() - start


def speed_line(when: str) -> str:
    return (
        f"machine speed {when}: {speed_check():.2f} s CPU for a fixed piece of work "
        f"(lower is faster); load average {os.getloadavg()[0]:.1f}"
    )


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return "CPU model unknown"
