"""`GET /metrics`: Prometheus text exposition.

Each app has its own `CollectorRegistry` (not prometheus_client's global one), so tests and
several apps in one process never share or clash over metrics.

Most metrics are computed at scrape time from what the daemon already keeps (the store's
collections and `sync_runs`, `ctx.states`, `ctx.online`): no hook in the sync path, and the
sync-run counter survives restarts because it is counted from the database. Only the HTTP
requests (a middleware here) and upstream request outcomes (`record_upstream_request`, which
the daemon's upstream clients call) are counted live.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mirrord.context import CONTEXT, MirrorContext, targets_of
from mirrord.views.errors import Handler

UNMATCHED = "(unmatched)"  # route label of requests no route matched: paths are unbounded


class _Snapshot(Collector):
    """Serves the metric families the /metrics handler computed just before rendering."""

    def __init__(self) -> None:
        self.families: list[Metric] = []

    def collect(self) -> Iterable[Metric]:
        return list(self.families)


class _HttpRequests(Collector):
    """`mirrord_http_requests`: a plain count per (route, method, status), rendered as a
    counter at scrape time. A prometheus-client Counter would take a lock (and `labels()`
    validate its arguments) on every request; only the serving loop counts here."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str, str], int] = {}
        self.created: dict[tuple[str, str, str], float] = {}

    def count(self, route: str, method: str, status: str) -> None:
        key = (route, method, status)
        try:
            self.counts[key] += 1
        except KeyError:
            self.counts[key] = 1
            self.created[key] = time.time()

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(
            "mirrord_http_requests",
            "HTTP API requests answered, by route, method and status.",
            labels=["route", "method", "status"],
        )
        for key, count in list(self.counts.items()):
            family.add_metric(list(key), float(count), created=self.created.get(key))
        return [family]


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    snapshot: _Snapshot = field(default_factory=_Snapshot)
    http_requests: _HttpRequests = field(default_factory=_HttpRequests)

    def __post_init__(self) -> None:
        self.registry.register(self.http_requests)
        self.upstream_requests = Counter(
            "mirrord_upstream_requests",
            "Requests sent to the upstream API, by outcome (ok, unavailable, server_error, "
            "rate_limited, bad_answer, auth, rejected).",
            ["outcome"],
            registry=self.registry,
        )
        self.registry.register(self.snapshot)


METRICS: web.AppKey[Metrics] = web.AppKey("metrics", Metrics)


def setup(app: web.Application) -> None:
    """Give the app its registry and the /metrics route (before the app starts)."""
    app[METRICS] = Metrics()
    app.router.add_get("/metrics", metrics_view)


def record_upstream_request(app: web.Application, outcome: str) -> None:
    """Count one upstream round trip; the daemon's upstream clients report each outcome."""
    app[METRICS].upstream_requests.labels(outcome=outcome).inc()


def _route_label(request: web.Request) -> str:
    route = request.match_info.route
    resource = getattr(route, "resource", None)
    return resource.canonical if resource is not None else UNMATCHED


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Counts every request by route template (not path: ids would explode the series)."""
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as e:
        status = e.status_code
        raise
    finally:
        metrics = request.app.get(METRICS)
        if metrics is not None:
            metrics.http_requests.count(_route_label(request), request.method, str(status))


def _epoch(timestamp: str | None) -> float | None:
    if timestamp is None:
        return None
    return datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


async def _families(ctx: MirrorContext) -> list[Metric]:
    statuses = await ctx.store.statuses()
    runs = CounterMetricFamily(
        "mirrord_sync_runs",
        "Finished sync runs, by collection kind (images: a survey, surveys: a field) and outcome.",
        labels=["kind", "outcome"],
    )
    rows = await ctx.store.read(
        "SELECT c.kind, r.outcome, count(*) FROM sync_runs r "
        "JOIN collections c ON c.id = r.collection_id "
        "WHERE r.outcome IS NOT NULL GROUP BY c.kind, r.outcome"
    )
    for kind, outcome, count in rows:
        runs.add_metric([str(kind), str(outcome)], float(count))
    images = GaugeMetricFamily(
        "mirrord_survey_images", "Images held in the mirror, per survey.", labels=["survey"]
    )
    for row in statuses:
        if row.kind == "images":
            images.add_metric([row.parent_id], float(row.item_count))
    by_collection = {(s.kind, s.parent_id): s for s in statuses}
    last_success = GaugeMetricFamily(
        "mirrord_target_last_success_timestamp_seconds",
        "When each configured survey or field last synced completely (Unix time).",
        labels=["target"],
    )
    state = GaugeMetricFamily(
        "mirrord_target_state",
        "1 for each configured target's current state (idle, syncing, backoff, error).",
        labels=["target", "state"],
    )
    for job_id, target in targets_of(ctx.config).items():
        held = by_collection.get(("images" if target.kind == "survey" else "surveys", target.id))
        success = _epoch(held.last_success_at) if held else None
        if success is not None:
            last_success.add_metric([job_id], success)
        live = ctx.states.get(job_id)
        state.add_metric([job_id, live.state if live else "idle"], 1.0)
    online = GaugeMetricFamily(
        "mirrord_upstream_online",
        "1 if the last contact with upstream succeeded, 0 if not (absent until the first).",
    )
    families: list[Metric] = [runs, images, last_success, state]
    if ctx.online is not None:
        online.add_metric([], 1.0 if ctx.online else 0.0)
        families.append(online)
    uptime = GaugeMetricFamily("mirrord_start_time_seconds", "When the daemon started (Unix time).")
    uptime.add_metric([], ctx.started)
    return [*families, uptime, *_item_cache_families(ctx), *await _file_families(ctx)]


def _item_cache_families(ctx: MirrorContext) -> list[Metric]:
    stats = ctx.store.item_cache
    kept = GaugeMetricFamily(
        "mirrord_item_cache_bytes", "Bytes of item texts kept in memory for list pages."
    )
    kept.add_metric([], float(stats.kept_bytes))
    hits = CounterMetricFamily(
        "mirrord_item_cache_hits", "Item texts list pages found kept in memory."
    )
    hits.add_metric([], float(stats.hits))
    misses = CounterMetricFamily(
        "mirrord_item_cache_misses", "Item texts list pages read from the database."
    )
    misses.add_metric([], float(stats.misses))
    return [kept, hits, misses]


async def _file_families(ctx: MirrorContext) -> list[Metric]:
    tallies = await ctx.store.file_tallies()
    files = GaugeMetricFamily(
        "mirrord_files",
        "Image files of surveys with files on, by state (pending, done, failed, expired).",
        labels=["survey", "state"],
    )
    for survey, tally in tallies.items():
        for state in ("pending", "done", "failed", "expired"):
            files.add_metric([survey, state], float(getattr(tally, state)))
    on_disk = GaugeMetricFamily("mirrord_files_disk_bytes", "Bytes of image files kept on disk.")
    on_disk.add_metric([], float(await ctx.store.bytes_on_disk()))
    budget = GaugeMetricFamily("mirrord_files_max_disk_bytes", "[storage] max_disk.")
    budget.add_metric([], float(ctx.config.storage.max_disk))
    live = ctx.downloads
    fetched = CounterMetricFamily(
        "mirrord_files_fetched_bytes", "Bytes of image files received since the daemon started."
    )
    fetched.add_metric([], float(live.fetched_bytes))
    downloading = GaugeMetricFamily(
        "mirrord_files_downloading", "Image files being downloaded right now."
    )
    downloading.add_metric([], float(len(live.in_flight)))
    blocked = GaugeMetricFamily(
        "mirrord_files_blocked", "1 while downloads wait for disk room (max_disk or a full disk)."
    )
    blocked.add_metric([], 1.0 if live.blocked else 0.0)
    return [files, on_disk, budget, fetched, downloading, blocked]


async def metrics_view(request: web.Request) -> web.Response:
    metrics = request.app[METRICS]
    families = await _families(request.app[CONTEXT])
    # No await between filling the snapshot and rendering it: concurrent scrapes cannot mix.
    metrics.snapshot.families = families
    body = generate_latest(metrics.registry)
    metrics.snapshot.families = []
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
