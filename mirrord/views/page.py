"""`GET /`: the status page, for a person at the laptop.

Server-rendered HTML: every number, name and message is rendered here, in Python, and every
piece of text that came from upstream, the config or an error (survey names, ids, error
messages, sensor types) goes through `html.escape`. The page's CSS and JS are package data
(mirrord/static/), inlined into the one response and allowed by their SHA-256 in the
Content-Security-Policy, so nothing else may run or load: no CDN, no web font, no tile
server; it works offline. The JS (mirrord/static/status.js) keeps the page live: it long-polls
the change feed (`/v1/changes?wait=`) and re-fetches this page when the mirror changes, re-fetches
it calmly (every 10 s; every second while a sync runs) for states and ages, and swaps the
`data-live` parts in. "Sync now" buttons POST to the API.

With `[http] token` set, a browser cannot send the bearer header on a plain page load, so `/`
is open (the Host check still applies), but without the token it renders no data at all: only
a form asking for the token. The JS keeps the token in the tab's sessionStorage and sends it
as `Authorization: Bearer` on every request it makes (re-fetches of this page included), so
the data is served exactly as the rest of the API serves it: to holders of the token.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import html
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from string import Template
from typing import Any
from urllib.parse import quote, urlencode

from aiohttp import web

from mirrord import __version__
from mirrord.context import CONTEXT, MirrorContext
from mirrord.views.security import bearer_ok
from mirrord.views.status import status_snapshot

MAX_POINTS = 4000  # a bigger survey is plotted from an even sample
MAX_ERROR = 240  # characters of an error shown in a row (the whole text is in its tooltip)
AGE_BUCKETS = 6
SENSORS = ("RGB", "NIR", "RED_EDGE", "CIR", "MULTISPECTRAL", "THERMAL")
PLOT_WIDTH = 1000.0
PLOT_PAD = 24.0
PLOT_HEIGHT_PX = 440.0  # the plot's height on screen at most (status.css)
METRES_PER_DEGREE = 111_320.0


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


# ---- assets ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Assets:
    page: Template
    css: str
    js: str
    csp: str


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


@functools.cache
def assets() -> _Assets:
    static = resources.files("mirrord") / "static"
    css = (static / "status.css").read_text(encoding="utf-8")
    js = (static / "status.js").read_text(encoding="utf-8")
    page = Template((static / "status.html").read_text(encoding="utf-8"))
    csp = "; ".join(
        [
            "default-src 'none'",
            f"script-src {_sha256(js)}",
            f"style-src {_sha256(css)}",
            "connect-src 'self'",
            "img-src data:",
            "form-action 'none'",
            "base-uri 'none'",
            "frame-ancestors 'none'",
        ]
    )
    return _Assets(page, css, js, csp)


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/", status_page)


async def status_page(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    token = ctx.config.http.token
    if token is None or bearer_ok(request.headers.get("Authorization"), token.reveal()):
        body = await render(ctx, request.query.get("survey"), request.query.get("color"))
    else:
        body = render_locked()
    a = assets()
    return web.Response(
        text=body,
        content_type="text/html",
        charset="utf-8",
        headers={
            "Content-Security-Policy": a.csp,
            "Cache-Control": "no-store",
            "X-Content-Type-Options": "nosniff",
            "X-Frame-Options": "DENY",
            "Referrer-Policy": "no-referrer",
        },
    )


def _fill(*, title: str, seq: int, locked: bool, **parts: str) -> str:
    a = assets()
    return a.page.substitute(
        title=esc(title),
        seq=seq,
        locked="1" if locked else "0",
        version=esc(__version__),
        css=a.css,
        js=a.js,
        **parts,
    )


def render_locked() -> str:
    """The page without data: what a browser gets before it has the API token."""
    head = (
        '<div class="linkstate is-unknown"><span class="dot"></span>Locked</div>'
        '<div class="meta">this daemon needs its API token</div>'
    )
    notice = (
        '<div class="locked"><p>The HTTP API of this daemon is protected by a token '
        "(<code>[http] token</code> in its config). Enter it to see the status; it is kept in "
        "this browser tab only and sent as <code>Authorization: Bearer</code>.</p></div>"
    )
    return _fill(
        title="mirrord · locked", seq=0, locked=True, head=head, notice=notice, targets="", plot=""
    )


# ---- the data page --------------------------------------------------------------------------


async def render(ctx: MirrorContext, survey: str | None, color: str | None) -> str:
    snap = await status_snapshot(ctx)
    names = await _survey_names(ctx)
    names |= {s.id: s.name for s in ctx.config.surveys if s.name}
    names |= {f.id: f.name for f in ctx.config.fields if f.name}
    seq = await ctx.store.last_seq()
    plottable = _plottable(snap)
    chosen = survey if survey in plottable else _default_survey(snap, plottable)
    colour = color if color in ("age", "sensor") else "age"
    link = _Links(chosen, colour)
    title = {True: "online", False: "offline", None: "starting"}[snap["online"]]
    return _fill(
        title=f"mirrord · {title}",
        seq=seq,
        locked=False,
        head=_head(snap),
        notice=_notice(snap),
        targets=_targets(snap, names, link),
        plot=await _plot(ctx, plottable, names, link),
    )


@dataclass(frozen=True)
class _Links:
    survey: str | None
    color: str

    def to(self, *, survey: str | None = None, color: str | None = None) -> str:
        params = {"survey": survey or self.survey or "", "color": color or self.color}
        return esc("?" + urlencode({k: v for k, v in params.items() if v}))


async def _survey_names(ctx: MirrorContext) -> dict[str, str]:
    """Upstream's names of the surveys the mirrored fields list."""
    rows = await ctx.store.read(
        "SELECT i.sentera_id, json_extract(i.data, '$.name') FROM items i "
        "JOIN collections c ON c.id = i.collection_id "
        "WHERE c.kind = 'surveys' AND c.dropped_at IS NULL"
    )
    return {str(sid): str(name) for sid, name in rows if isinstance(name, str) and name.strip()}


def _field_surveys(snap: dict[str, Any], field_id: str) -> list[dict[str, Any]]:
    origin = f"field:{field_id}"
    return [c for c in snap["collections"] if c["kind"] == "images" and c.get("origin") == origin]


def _ordered(snap: dict[str, Any]) -> list[dict[str, Any]]:
    """Targets as the page lists them: configured surveys, then fields (config order)."""
    return sorted(snap["targets"], key=lambda t: t["kind"] != "survey")


def _plottable(snap: dict[str, Any]) -> list[str]:
    """Surveys in the order the page lists them: configured ones, then those of fields."""
    found: list[str] = []
    for t in _ordered(snap):
        if t["kind"] == "survey":
            found.append(t["id"])
        else:
            found += [c["parent_id"] for c in _field_surveys(snap, t["id"])]
    return list(dict.fromkeys(found))


def _default_survey(snap: dict[str, Any], plottable: list[str]) -> str | None:
    """The survey with the most images (the first listed of equals)."""
    counts = {c["parent_id"]: c["item_count"] for c in snap["collections"] if c["kind"] == "images"}
    return max(plottable, key=lambda s: counts.get(s, 0), default=None)


# ---- time ---------------------------------------------------------------------------------


def _parse(timestamp: str | None) -> datetime | None:
    if not timestamp:
        return None
    try:
        then = datetime.fromisoformat(timestamp)
    except ValueError:
        return None
    return then if then.tzinfo else then.replace(tzinfo=UTC)


def span(seconds: float) -> str:
    """A calm duration, as `mirrord status` says it: "12 seconds", "3 minutes", "5 days"."""
    seconds = max(0, int(seconds))
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            n = seconds // size
            return f"{n} {unit}{'' if n == 1 else 's'}"
    return f"{seconds} second{'' if seconds == 1 else 's'}"


def ago(timestamp: str | None, now: datetime | None = None) -> str:
    then = _parse(timestamp)
    if then is None:
        return "never"
    seconds = ((now or datetime.now(UTC)) - then).total_seconds()
    if seconds < 5:
        return "just now"
    return f"{span(seconds)} ago"


def _until(timestamp: str | None) -> str | None:
    then = _parse(timestamp)
    if then is None:
        return None
    seconds = (then - datetime.now(UTC)).total_seconds()
    return "due now" if seconds < 1 else f"in {span(seconds)}"


def _utc(timestamp: str | None) -> str:
    then = _parse(timestamp)
    return then.strftime("%Y-%m-%d %H:%M:%S UTC") if then else ""


def _num(n: int | None) -> str:
    return "–" if n is None else f"{n:,}"


# ---- header and notices -------------------------------------------------------------------


def _head(snap: dict[str, Any]) -> str:
    targets = snap["targets"]
    online = snap["online"]
    meta = [f"mirrord {esc(snap['version'])}", f"up {span(snap['uptime_seconds'])}"]
    if online is False:
        since = [_parse(t["offline_since"]) for t in targets if t.get("offline_since")]
        started = min((s for s in since if s), default=None)
        state, label = "is-offline", "Offline"
        if started is not None:
            down = (datetime.now(UTC) - started).total_seconds()
            meta.insert(0, f"no link for {span(down)} · retrying · the mirror stays readable")
    elif online is True:
        state, label = "is-online", "Online"
        waiting = sum(1 for t in targets if t["state"] == "backoff")
        outages = [t["last_offline_seconds"] for t in targets if t.get("last_offline_seconds")]
        if waiting:
            meta.insert(0, f"{waiting} waiting to retry after losing the link")
        elif outages:
            meta.insert(0, f"last outage {span(max(outages))}")
    else:
        state, label = "is-unknown", "Connecting"
        meta.insert(0, "no contact with upstream yet")
    return (
        f'<div class="linkstate {state}" data-online="{esc(online)}">'
        f'<span class="dot"></span>{label}</div>'
        f'<div class="meta">{" · ".join(meta)}</div>'
    )


def _notice(snap: dict[str, Any]) -> str:
    if not snap["config_error"]:
        return ""
    return (
        '<div class="banner">The config file has an error, so the daemon keeps running on the '
        f'previous one: <span class="msg">{esc(snap["config_error"])}</span></div>'
    )


# ---- the table ------------------------------------------------------------------------------

_PILLS = {
    "syncing": ("Syncing", "p-sync"),
    "backoff": ("Waiting for link", "p-wait"),
    "error": ("Error", "p-err"),
}


def _pill(t: dict[str, Any]) -> str:
    state = t["state"]
    if state in _PILLS:
        label, cls = _PILLS[state]
    elif t.get("last_success_at") is None:
        label, cls = "Not synced yet", "p-none"
    elif t.get("last_outcome") == "partial":
        label, cls = "Partial", "p-warn"
    elif t["stale"]:
        label, cls = "Stale", "p-warn"
    else:
        label, cls = "Up to date", "p-ok"
    return f'<span class="pill {cls}">{label}</span>'


def _age(timestamp: str | None, stale: bool) -> str:
    cls = "never" if timestamp is None else ("stale" if stale else "fresh")
    title = f' title="{esc(_utc(timestamp))}"' if timestamp else ""
    return f'<span class="age {cls}"{title}>{esc(ago(timestamp))}</span>'


def _sync_cell(t: dict[str, Any]) -> str:
    p = t.get("progress")
    if t["state"] == "syncing" and p:
        total = p["applied"] + p["remaining"]
        return (
            f'<progress max="{max(total, 1)}" value="{p["applied"]}"></progress>'
            f'<span class="small">{_num(p["applied"])} / {_num(total)} · page {p["pages"]}</span>'
        )
    if t["state"] == "syncing":
        return '<span class="small">asking upstream…</span>'
    parts = []
    if t.get("remaining_count"):
        parts.append(f"{_num(t['remaining_count'])} remaining")
    if t.get("failed_count"):
        parts.append(f"{_num(t['failed_count'])} failed upstream")
    when = _until(t.get("next_run_at"))
    if when:
        parts.append(("retry " if t["state"] == "backoff" else "next ") + when)
    return f'<span class="small">{" · ".join(parts)}</span>'


def _error_cell(message: str | None) -> str:
    if not message:
        return ""
    short = message if len(message) <= MAX_ERROR else message[: MAX_ERROR - 1] + "…"
    return f'<span class="err" title="{esc(message)}">{esc(short)}</span>'


def _current(flag: bool) -> str:
    return ' aria-current="true"' if flag else ""


def _name_cell(label: str | None, ident: str, link: _Links | None, note: str = "") -> str:
    title = esc(label or ident)
    if link is not None:
        title = f'<a href="{link.to(survey=ident)}"{_current(link.survey == ident)}>{title}</a>'
    ident_line = f'<span class="id">{esc(ident)}</span>' if label else ""
    return f'<div class="name">{title}{note}</div>{ident_line}'


def _files_note(tally: dict[str, int] | None) -> str:
    """Under an image count, for surveys whose files are mirrored: how many are on disk."""
    if not tally:
        return ""
    wanted = tally["done"] + tally["pending"] + tally["failed"] + tally["expired"]
    note = f"files {_num(tally['done'])} / {_num(wanted)}"
    if tally["failed"]:
        note += f", {_num(tally['failed'])} failed"
    return f'<div class="small">{esc(note)}</div>'


def _sync_button(path: str, state: str) -> str:
    disabled = " disabled" if state == "syncing" else ""
    return f'<button type="button" class="sync" data-sync="{esc(path)}"{disabled}>Sync now</button>'


def _targets(snap: dict[str, Any], names: dict[str, str], link: _Links) -> str:
    if not snap["targets"]:
        return '<p class="empty">No surveys or fields are configured.</p>'
    rows = []
    for t in _ordered(snap):
        ident = t["id"]
        attrs = (
            f'data-id="{esc(ident)}" data-kind="{esc(t["kind"])}" data-state="{esc(t["state"])}" '
            f'data-last-attempt="{esc(t.get("last_attempt_at") or "")}"'
        )
        if t["kind"] == "survey":
            name = _name_cell(names.get(ident), ident, link)
            count = _num(t.get("image_count")) + _files_note(t.get("files"))
            path = f"/v1/surveys/{quote(ident, safe='')}/sync"
            subs: list[dict[str, Any]] = []
        else:
            subs = _field_surveys(snap, ident)
            name = _name_cell(names.get(ident), ident, None, ' <span class="tag">field</span>')
            images = sum(c["item_count"] for c in subs)
            count = f'{_num(images)}<span class="small"> in {len(subs)} surveys</span>'
            path = f"/v1/fields/{quote(ident, safe='')}/sync"
        rows.append(
            f'<tr class="target" {attrs}><td>{name}</td><td>{_pill(t)}</td>'
            f'<td class="num">{count}</td><td>{_age(t.get("last_success_at"), t["stale"])}</td>'
            f'<td class="sync">{_sync_cell(t)}</td>'
            f"<td>{_error_cell(t.get('last_error'))}</td>"
            f'<td class="act">{_sync_button(path, t["state"])}</td></tr>'
        )
        for c in subs:
            age = _seconds_since(c.get("last_success_at"))
            stale = age is None or age > 2 * t["interval_seconds"]
            sub_state = "syncing" if t["state"] == "syncing" else "idle"
            # The field's own error says it already; a survey's own problem shows here.
            sub_error = c.get("last_error") if c.get("last_error") != t.get("last_error") else None
            rows.append(
                f'<tr class="sub" data-id="{esc(c["parent_id"])}" data-kind="field-survey" '
                f'data-state="{sub_state}"><td>'
                f"{_name_cell(names.get(c['parent_id']), c['parent_id'], link)}</td><td></td>"
                f'<td class="num">{_num(c["item_count"])}{_files_note(c.get("files"))}</td>'
                f"<td>{_age(c.get('last_success_at'), stale)}</td>"
                f'<td class="sync">{_sync_cell({"state": "idle", **_sub_counts(c)})}</td>'
                f"<td>{_error_cell(sub_error)}</td><td></td></tr>"
            )
    return (
        '<table class="targets"><thead><tr><th>Survey or field</th><th>State</th>'
        '<th class="num">Images</th><th>Last success</th><th>Sync</th><th>Last error</th>'
        "<th></th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
    )


def _sub_counts(c: dict[str, Any]) -> dict[str, Any]:
    return {"remaining_count": c.get("remaining_count"), "failed_count": c.get("failed_count")}


def _seconds_since(timestamp: str | None) -> float | None:
    then = _parse(timestamp)
    return None if then is None else (datetime.now(UTC) - then).total_seconds()


# ---- the plot -------------------------------------------------------------------------------

_COLLECTION = (
    "(SELECT id FROM collections WHERE kind = 'images' AND parent_id = ? AND dropped_at IS NULL)"
)
_COUNT_SQL = f"SELECT count(*) FROM items WHERE collection_id = {_COLLECTION}"
# Every `step`-th image by sentera_id: the sample is picked on the (collection_id, sentera_id)
# index alone, and only the sampled rows' JSON is read (a 100,000-image survey stays quick).
_POINTS_SQL = (
    "SELECT json_extract(data, '$.longitude'), json_extract(data, '$.latitude'), "
    "json_extract(data, '$.sensor_type'), json_extract(data, '$.updated_at') "
    "FROM items WHERE seq IN (SELECT seq FROM ("
    f" SELECT seq, row_number() OVER (ORDER BY sentera_id) - 1 AS n FROM items"
    f" WHERE collection_id = {_COLLECTION}) WHERE n % ? = 0)"
)


@dataclass(frozen=True)
class _Point:
    lon: float
    lat: float
    sensor: str
    updated: float | None


def _point(row: tuple[Any, ...]) -> _Point | None:
    lon, lat, sensor, updated = row
    ok = all(isinstance(v, int | float) and math.isfinite(v) for v in (lon, lat))
    if not ok or not (-180 <= lon <= 180 and -90 <= lat <= 90):
        return None
    when = _parse(updated) if isinstance(updated, str) else None
    kind = sensor if sensor in SENSORS else "other"
    return _Point(float(lon), float(lat), kind, when.timestamp() if when else None)


async def _plot(
    ctx: MirrorContext, plottable: list[str], names: dict[str, str], link: _Links
) -> str:
    if link.survey is None:
        return '<p class="empty">Nothing mirrored yet: the first sync is on its way.</p>'
    total = int((await ctx.store.read(_COUNT_SQL, (link.survey,)))[0][0])
    step = max(1, math.ceil(total / MAX_POINTS))
    rows = await ctx.store.read(_POINTS_SQL, (link.survey, step))
    points = [p for p in map(_point, rows) if p is not None]
    label = names.get(link.survey) or link.survey
    shown = (
        f"{len(points):,} of {total:,} images (an even sample)" if step > 1 else f"{total:,} images"
    )
    chooser = "".join(
        f'<a class="chip" href="{link.to(survey=s)}"{_current(s == link.survey)}>'
        f"{esc(names.get(s) or s)}</a>"
        for s in plottable
    )
    colours = " ".join(
        f'<a href="{link.to(color=c)}"{_current(c == link.color)}>{c}</a>'
        for c in ("age", "sensor")
    )
    geojson = esc(f"/v1/surveys/{quote(link.survey, safe='')}/images.geojson?limit=1000")
    if points:
        svg, legend, extent = _svg(points, link.color, label)
        body = (
            f'{svg}<div class="side">{legend}<p class="facts">spans about {extent} · '
            f'<a href="{geojson}">GeoJSON</a></p></div>'
        )
    else:
        body = '<p class="empty">This survey has no image with a location.</p>'
    return (
        f'<div class="plot-head"><h2>Image locations <span class="of">{esc(label)}</span></h2>'
        f'<div class="small">{shown} · colour by {colours}</div></div>'
        f'<nav class="chips" aria-label="survey to plot">{chooser}</nav>'
        f'<div class="plot-wrap">{body}</div>'
    )


def _svg(points: list[_Point], color: str, label: str) -> tuple[str, str, str]:
    """The points, north up, to the survey's bounding box with its true shape (but no thinner
    than 3:1 nor taller than 1.5:1), and a scale bar; sizes aim at a plot ~850x460 px."""
    west, east = min(p.lon for p in points), max(p.lon for p in points)
    south, north = min(p.lat for p in points), max(p.lat for p in points)
    squash = max(math.cos(math.radians((south + north) / 2)), 0.01)  # shorter lon degrees
    span_x = max((east - west) * squash, 1e-5)
    span_y = max(north - south, 1e-5)
    span_y = max(span_y, span_x / 3)
    span_x = max(span_x, span_y / 1.5)
    inner_w = PLOT_WIDTH - 2 * PLOT_PAD
    scale = inner_w / span_x
    inner_h = span_y * scale
    px = min(0.85, PLOT_HEIGHT_PX / (inner_h + 2 * PLOT_PAD))  # screen pixels per unit, about
    height = inner_h + 2 * PLOT_PAD + 30 / px  # a strip below for the scale bar
    cx, cy = (west + east) / 2 * squash, (south + north) / 2
    spacing = math.sqrt(inner_w * inner_h / len(points))
    radius = min(5 / px, max(1.5 / px, 0.3 * spacing))

    def xy(p: _Point) -> str:
        x = PLOT_WIDTH / 2 + (p.lon * squash - cx) * scale
        y = PLOT_PAD + inner_h / 2 - (p.lat - cy) * scale
        return f'cx="{x:.1f}" cy="{y:.1f}"'

    groups, legend = _classify(points, color)
    metres_x = (east - west) * squash * METRES_PER_DEGREE
    metres_y = (north - south) * METRES_PER_DEGREE
    extent = f"{_metres(metres_x)} × {_metres(metres_y)}"
    r = f'r="{radius:.1f}"'
    circles = "".join(
        f'<g class="{cls}">' + "".join(f"<circle {xy(p)} {r}/>" for p in members) + "</g>"
        for cls, members in groups
    )
    size = f'width="{PLOT_WIDTH:.0f}" height="{height:.0f}"'
    screen = f'width="{PLOT_WIDTH * px:.0f}" height="{height * px:.0f}"'  # CSS shrinks it to fit
    svg = (
        f'<svg class="plot" {screen} viewBox="0 0 {PLOT_WIDTH:.0f} {height:.0f}" role="img" '
        f'aria-label="{len(points):,} image locations of {esc(label)}" data-points="{len(points)}">'
        f'<rect class="plot-bg" x="0" y="0" {size} rx="{8 / px:.0f}"/>'
        f"{circles}{_scale_bar(scale, height, px)}</svg>"
    )
    return svg, legend, extent


def _metres(m: float) -> str:
    return f"{m / 1000:.1f} km" if m >= 1000 else f"{m:.0f} m"


def _scale_bar(scale: float, height: float, px: float) -> str:
    """A round-number scale bar of at most a fifth of the width, bottom left."""
    metres_per_unit = METRES_PER_DEGREE / scale
    target = PLOT_WIDTH / 5 * metres_per_unit
    magnitude = 10 ** math.floor(math.log10(target))
    length = max(m * magnitude for m in (1, 2, 5) if m * magnitude <= target)
    width = length / metres_per_unit
    text = f"{length / 1000:g} km" if length >= 1000 else f"{length:g} m"
    x0, y0 = PLOT_PAD, height - 10 / px
    return (
        f'<g class="scale" stroke-width="{2 / px:.1f}" font-size="{12 / px:.1f}">'
        f'<line x1="{x0:.1f}" y1="{y0:.1f}" x2="{x0 + width:.1f}" y2="{y0:.1f}"/>'
        f'<text x="{x0 + width + 6 / px:.1f}" y="{y0 + 4 / px:.1f}">{text}</text></g>'
    )


def _classify(points: list[_Point], color: str) -> tuple[list[tuple[str, list[_Point]]], str]:
    """Points grouped by colour class (drawn newest or rarest last), and the legend."""
    if color == "sensor":
        by: dict[str, list[_Point]] = {}
        for p in points:
            by.setdefault(p.sensor, []).append(p)
        order = sorted(by, key=lambda s: -len(by[s]))
        groups = [(f"s-{s.lower().replace('_', '-')}", by[s]) for s in order]
        items = "".join(
            f'<li><span class="sw s-{s.lower().replace("_", "-")}"></span>'
            f"{esc(s.replace('_', ' ').title() if s not in ('RGB', 'NIR', 'CIR') else s)}"
            f' <span class="small">{len(by[s]):,}</span></li>'
            for s in order
        )
        return groups, f'<div class="legend"><h3>Sensor</h3><ul>{items}</ul></div>'
    known = [p.updated for p in points if p.updated is not None]
    oldest, newest = (min(known), max(known)) if known else (0.0, 0.0)
    buckets: dict[str, list[_Point]] = {f"a{k}": [] for k in range(AGE_BUCKETS)}
    buckets["s-other"] = []
    for p in points:
        if p.updated is None:
            k = "s-other"
        elif newest == oldest:
            k = "a2"  # one moment for all: a calm colour, nothing stands out
        else:
            share = (p.updated - oldest) / (newest - oldest)
            k = f"a{min(AGE_BUCKETS - 1, int(share * AGE_BUCKETS))}"
        buckets[k].append(p)
    groups = [(k, members) for k, members in buckets.items() if members]

    def day(epoch: float) -> str:
        return datetime.fromtimestamp(epoch, UTC).strftime("%d %b %H:%M")

    if not known:
        text = "no image says when it last changed"
    elif newest == oldest:
        text = f'<span class="sw a2"></span> all at {day(oldest)} UTC'
    else:
        ramp = "".join(f'<span class="sw a{k}"></span>' for k in range(AGE_BUCKETS))
        text = (
            f'<span class="ramp">{ramp}</span>'
            f'<span class="ends"><span>{day(oldest)}</span><span>{day(newest)}</span></span>'
            '<span class="small">warmer: changed more recently (times in UTC)</span>'
        )
    return groups, f'<div class="legend"><h3>Last changed upstream</h3>{text}</div>'
