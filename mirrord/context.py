"""What the HTTP API sees of the running daemon: the config, the store, live sync state.

The daemon implements `MirrorContext`; the views read it and never reach into the daemon, so
tests can serve the API over any object that has these parts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from aiohttp import web

from mirrord.config import Config
from mirrord.files import DownloadStatus
from mirrord.store import Store
from mirrord.sync import SyncProgress, SyncRun


@dataclass(frozen=True)
class Target:
    """A scheduled thing to sync: one configured survey or field."""

    kind: str  # "survey" | "field"
    id: str
    interval: float

    @property
    def job_id(self) -> str:
        return f"{self.kind}:{self.id}"


@dataclass
class TargetState:
    """What the daemon knows about a target beyond the database: live state and backoff."""

    state: str = "idle"  # idle | syncing | backoff | error
    failures: int = 0  # consecutive failed contacts, for the backoff
    offline_since: float | None = None
    last_offline_seconds: float | None = None
    progress: SyncProgress | None = None
    last_runs: list[SyncRun] = field(default_factory=list)


def targets_of(config: Config) -> dict[str, Target]:
    found = [Target("field", f.id, f.interval or config.sync.interval) for f in config.fields]
    found += [Target("survey", s.id, s.interval or config.sync.interval) for s in config.surveys]
    return {t.job_id: t for t in found}


class MirrorContext(Protocol):
    config: Config
    config_error: str | None
    started: float
    online: bool | None
    states: dict[str, TargetState]
    downloads: DownloadStatus  # the image-file downloader's live state

    @property
    def store(self) -> Store: ...

    def next_run_at(self, job_id: str) -> datetime | None: ...

    def sync_now(self, job_id: str) -> str:
        """Start a sync of a target now: "started", "running" (one runs) or "unknown"."""
        ...


CONTEXT: web.AppKey[MirrorContext] = web.AppKey("mirror")
