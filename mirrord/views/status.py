"""`GET /healthz` and `GET /v1/status`."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from mirrord import __version__
from mirrord.context import CONTEXT, MirrorContext, targets_of
from mirrord.store import CollectionStatus, FileTally, StoreError


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/healthz", healthz)
    router.add_get("/v1/status", status)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def status(request: web.Request) -> web.Response:
    return web.json_response(await status_snapshot(request.app[CONTEXT]))


def _seconds_since(timestamp: str | None) -> float | None:
    if timestamp is None:
        return None
    then = datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    return round(time.time() - then.timestamp(), 1)


async def status_snapshot(ctx: MirrorContext) -> dict[str, Any]:
    """The daemon's state: what a person or a monitor needs to see that all is well."""
    config = ctx.config
    # A failing database must not hide the daemon's own state: that is when it is needed.
    database_error = None
    tallies: dict[str, FileTally] = {}
    try:
        collections = {(s.kind, s.parent_id): s for s in await ctx.store.statuses()}
        tallies = await ctx.store.file_tallies()
    except StoreError as e:
        collections, database_error = {}, str(e)
    targets = []
    for job_id, target in targets_of(config).items():
        state = ctx.states.get(job_id)
        kind = "images" if target.kind == "survey" else "surveys"
        row = collections.get((kind, target.id))
        age = _seconds_since(row.last_success_at if row else None)
        next_run = ctx.next_run_at(job_id)
        entry: dict[str, Any] = row.as_dict() if row else {}
        entry |= {
            "kind": target.kind,
            "id": target.id,
            "state": state.state if state else "idle",
            "interval_seconds": target.interval,
            "next_run_at": next_run.isoformat() if next_run else None,
            "seconds_since_success": age,
            # Stale: no success for more than two intervals (or never).
            "stale": age is None or age > 2 * target.interval,
            "offline_since": _iso(state.offline_since) if state else None,
            "last_offline_seconds": state.last_offline_seconds if state else None,
        }
        if row is not None:
            entry["image_count" if kind == "images" else "survey_count"] = row.item_count
        if target.kind == "survey" and target.id in tallies:
            entry["files"] = tallies[target.id].as_dict()
        own = [
            r
            for r in (state.last_runs if state else [])
            if r.kind == kind and r.parent_id == target.id
        ]
        if own:
            # The live outcome: a run the database could not record (locked, read-only, full)
            # must still show here, not the last one it could.
            entry["last_outcome"], entry["last_error"] = own[-1].outcome, own[-1].error
        if state and state.progress:
            p = state.progress
            entry["progress"] = {
                "id": p.parent_id,
                "pages": p.pages,
                "applied": p.applied,
                "remaining": p.remaining,
            }
        targets.append(entry)
    return {
        "version": __version__,
        "uptime_seconds": round(time.time() - ctx.started, 1),
        "online": ctx.online,
        "config_error": ctx.config_error,
        "database_error": database_error,
        "targets": targets,
        "collections": [_collection(s, tallies) for s in collections.values()],
        "files": await _files_summary(ctx, tallies),
    }


def _collection(s: CollectionStatus, tallies: dict[str, FileTally]) -> dict[str, Any]:
    entry = s.as_dict()
    if s.kind == "images" and s.parent_id in tallies:
        entry["files"] = tallies[s.parent_id].as_dict()
    return entry


async def _files_summary(ctx: MirrorContext, tallies: dict[str, FileTally]) -> dict[str, Any]:
    """Every survey's files together, the disk they take, and what the downloader does."""
    total: dict[str, Any] = {key: 0 for key in FileTally().as_dict()}
    for tally in tallies.values():
        for key, value in tally.as_dict().items():
            total[key] += value
    storage = ctx.config.storage
    try:
        on_disk: int | None = await ctx.store.bytes_on_disk()
    except StoreError:
        on_disk = None  # said once, in database_error
    total |= {
        "bytes_on_disk": on_disk,
        "max_disk": storage.max_disk,
        "files_dir": str(storage.files_dir),
    }
    return total | ctx.downloads.as_dict()


def _iso(epoch: float | None) -> str | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, UTC).isoformat()
