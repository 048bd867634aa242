"""The mirror's data: surveys, images (JSON or GeoJSON), single images, the change feed, and
"sync now". Reads go through the store's read connections, so they never wait on a sync;
single images and the survey -> collection lookups are point reads on the serving thread
(Store.read_point, Store.survey_collection_id).

Image lists page by keyset on `sentera_id` with an opaque cursor: stable while syncs change
the data (a client that must see every change follows the change feed, or `since_seq`).
Item JSON is served as stored, spliced into the answer without re-parsing.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
from typing import Any, NamedTuple

from aiohttp import web

from mirrord import __version__
from mirrord.context import CONTEXT, MirrorContext, targets_of
from mirrord.views.errors import ApiError

DEFAULT_LIMIT, MAX_LIMIT = 100, 1000
MAX_CHANGES = 10_000
MAX_WAIT = 300.0  # seconds a long-poll may hold the connection
MAX_SEQ = 2**62  # the largest change-feed position a client may name
GEOJSON = "application/geo+json"

# Set when the server shuts down: long-polls answer at once instead of holding the stop up.


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/v1/surveys", list_surveys)
    router.add_get("/v1/surveys/{id}", get_survey)
    router.add_get("/v1/surveys/{id}/images", list_images)
    router.add_get("/v1/surveys/{id}/images.geojson", list_images_geojson)
    router.add_get("/v1/images/{sentera_id}", get_image)
    router.add_get("/v1/changes", changes)
    router.add_post("/v1/surveys/{id}/sync", sync_now)
    router.add_post("/v1/fields/{id}/sync", sync_field_now)


# ---- answers with ETags -------------------------------------------------------------------


def _answer(
    request: web.Request,
    body: str | bytes,
    content_type: str = "application/json",
    etag: str | None = None,
) -> web.Response:
    """A JSON body (UTF-8) with a strong ETag; 304 when the client already has it."""
    data = body.encode() if isinstance(body, str) else body
    tag = etag or hashlib.blake2b(data, digest_size=12).hexdigest()
    quoted = f'"{tag}"'
    if quoted in request.headers.get("If-None-Match", ""):
        return web.Response(status=304, headers={"ETag": quoted})
    return web.Response(
        body=data, content_type=content_type, charset="utf-8", headers={"ETag": quoted}
    )


# ---- surveys ------------------------------------------------------------------------------


_SURVEY_SQL = (
    "SELECT c.id, c.parent_id, c.origin, c.item_count, c.remaining_count, c.failed_count, "
    "c.last_attempt_at, c.last_success_at, c.last_outcome, c.last_error, "
    "(SELECT s.data FROM items s JOIN collections f ON f.id = s.collection_id "
    " WHERE f.kind = 'surveys' AND s.sentera_id = c.parent_id LIMIT 1) "
    "FROM collections c WHERE c.kind = 'images' AND c.dropped_at IS NULL"
)


def _survey(row: tuple[Any, ...]) -> dict[str, Any]:
    _, sid, origin, count, remaining, failed, attempt, success, outcome, error, meta = row
    return {
        "id": sid,
        "image_count": count,
        "origin": origin,
        "remaining_count": remaining,
        "failed_count": failed,
        "last_attempt_at": attempt,
        "last_success_at": success,
        "last_outcome": outcome,
        "last_error": error,
        "survey": None if meta is None else json.loads(meta),  # upstream's Survey, via a field
    }


async def list_surveys(request: web.Request) -> web.Response:
    rows = await request.app[CONTEXT].store.read(_SURVEY_SQL + " ORDER BY c.parent_id")
    return _answer(request, json.dumps({"surveys": [_survey(r) for r in rows]}))


async def _collection_id(ctx: MirrorContext, survey_id: str) -> int:
    cid = await ctx.store.survey_collection_id(survey_id)
    if cid is None:
        raise ApiError(404, "unknown_survey", f"the mirror holds no survey {survey_id!r}")
    return cid


async def get_survey(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    cid = await _collection_id(ctx, request.match_info["id"])
    rows = await ctx.store.read(_SURVEY_SQL + " AND c.id = ?", (cid,))
    return _answer(request, json.dumps(_survey(rows[0])))


# ---- images -------------------------------------------------------------------------------


def _int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    return int(_number_param(request, name, default, low, high, int, "an integer"))


def _check_feed_position(request: web.Request, name: str, since: int) -> None:
    """A change-feed position a client names must be one this mirror still holds: after a
    restore from an older copy, a client ahead of it would otherwise miss what differs.
    Checked after every other parameter: a request that is wrong gets its 400 first."""
    lost = request.app[CONTEXT].store.lost_position(since, name) if since else None
    if lost is not None:
        raise ApiError(410, "feed_reset", lost)


def _float_param(request: web.Request, name: str, default: float, low: float, high: float) -> float:
    return _number_param(request, name, default, low, high, float, "a number of seconds")


def _number_param(
    request: web.Request,
    name: str,
    default: float,
    low: float,
    high: float,
    parse: type[int] | type[float],
    what: str,
) -> float:
    """A numeric query parameter within [low, high]; a 400 `bad_<name>` otherwise."""
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = parse(raw)
    except ValueError:
        raise ApiError(400, f"bad_{name}", f"{name} must be {what}, not {raw[:40]!r}") from None
    if not (math.isfinite(value) and low <= value <= high):
        raise ApiError(400, f"bad_{name}", f"{name} must be between {low:g} and {high:g}")
    return value


def _bbox(request: web.Request) -> tuple[float, float, float, float] | None:
    raw = request.query.get("bbox")
    if raw is None:
        return None
    problem = "bbox must be minlon,minlat,maxlon,maxlat in degrees"
    try:
        values = [float(part) for part in raw.split(",")]
    except ValueError:
        raise ApiError(400, "bad_bbox", problem) from None
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise ApiError(400, "bad_bbox", problem)
    west, south, east, north = values
    if not (-180 <= west <= east <= 180 and -90 <= south <= north <= 90):
        raise ApiError(400, "bad_bbox", problem + " (min <= max, within ±180/±90)")
    return west, south, east, north


def encode_cursor(after: str) -> str:
    return base64.urlsafe_b64encode(json.dumps(["v1", after]).encode()).decode().rstrip("=")


MAX_CURSOR = 2048  # characters: a cursor holds one sentera_id


def decode_cursor(cursor: str) -> str:
    try:
        if len(cursor) > MAX_CURSOR:
            raise ValueError("too long")
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        version, after = json.loads(raw)
    # RecursionError: a forged cursor of nested brackets ("[[[[...") is too deep for json.
    except (binascii.Error, ValueError, TypeError, UnicodeDecodeError, RecursionError):
        raise ApiError(400, "bad_cursor", "cursor is not one this API gave out") from None
    if version != "v1" or not isinstance(after, str):
        raise ApiError(400, "bad_cursor", "cursor is not one this API gave out")
    return after


class _PageQuery(NamedTuple):
    """A list page's rows: those after the cursor, in sentera_id order, one more than the page
    holds (that one says whether a next page exists)."""

    rows: str  # FROM ... LIMIT ?, as `i` (items) and `f` (files)
    params: list[Any]
    limit: int
    # Filtered by the cursor only: a range of limit + 1 entries of the items' unique index,
    # short enough to read on the serving thread (Store.read_point). A since_seq or bbox
    # filter may pass over most of a survey to fill a page: those go to the reader thread.
    bounded: bool


async def _page_query(request: web.Request) -> _PageQuery:
    ctx = request.app[CONTEXT]
    cid = await _collection_id(ctx, request.match_info["id"])
    limit = _int_param(request, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
    since = _int_param(request, "since_seq", 0, 0, MAX_SEQ)
    cursor = request.query.get("cursor")
    after = decode_cursor(cursor) if cursor else ""
    box = _bbox(request)
    _check_feed_position(request, "since_seq", since)
    rows = (
        "FROM items i "
        "LEFT JOIN files f ON f.collection_id = i.collection_id AND f.sentera_id = i.sentera_id "
        "WHERE i.collection_id = ? AND i.sentera_id > ?"
    )
    params: list[Any] = [cid, after]
    if since:
        rows += " AND i.seq > ?"
        params.append(since)
    if box is not None:
        rows += (
            " AND json_extract(i.data, '$.longitude') BETWEEN ? AND ?"
            " AND json_extract(i.data, '$.latitude') BETWEEN ? AND ?"
        )
        params += [box[0], box[2], box[1], box[3]]
    rows += " ORDER BY i.sentera_id LIMIT ?"
    params.append(limit + 1)
    return _PageQuery(rows, params, limit, bounded=not since and box is None)


async def _image_page(request: web.Request, query: _PageQuery) -> tuple[list[str], str | None, str]:
    """The page's items (stored JSON with local_file), its next cursor, and its version: what
    its ETag is made of (see _page_etag). Row by row, with each item's text: for GeoJSON,
    which parses each item, and for the JSON pages _json_page leaves to it."""
    rows = await request.app[CONTEXT].store.read(
        "SELECT i.sentera_id, i.data, ifnull(f.state, ''), i.seq " + query.rows, query.params
    )
    more = len(rows) > query.limit
    if more:
        del rows[query.limit :]
    items = [with_local_file(data, state) for _, data, state, _ in rows]
    next_cursor = encode_cursor(rows[-1][0]) if more else None
    seqs = ",".join(str(row[3]) for row in rows)
    states = ",".join(row[2] for row in rows)
    return items, next_cursor, f"{seqs}|{states}"


# A JSON page's keys in one row: the item texts come from the store's kept texts by seq
# (Store.item_prefixes), which a running sync's commits leave alone. One row means one step
# of SQLite with the GIL released; row by row, a thread that wants the GIL (a running sync's)
# would take it at every row.
_PAGE_KEYS_SQL = (
    "SELECT group_concat(sentera_id, X'1E'), group_concat(seq), group_concat(state), count(*) "
    "FROM (SELECT i.sentera_id, i.seq, ifnull(f.state, '') AS state {})"
)


_PAGE_HEAD = b'{"images":['


def _page_tail(next_cursor: str | None) -> bytes:
    return b'],"next_cursor":' + json.dumps(next_cursor).encode() + b"}"


class _JsonPage(NamedTuple):
    """A JSON page's body, its next cursor and its version (see _page_etag)."""

    body: bytes
    next_cursor: str | None
    version: str


async def _json_page(request: web.Request, query: _PageQuery) -> _JsonPage | None:
    """The JSON page from its keys and the store's kept texts; None when it must be read row
    by row instead (_image_page): an item that is not a plain JSON object's text (a hand
    edit), or one a sync replaced while the page was read."""
    store = request.app[CONTEXT].store
    read = store.read_point if query.bounded else store.read
    [(id_text, seq_text, states, count)] = await read(
        _PAGE_KEYS_SQL.format(query.rows), query.params
    )
    if count == 0:
        return _JsonPage(_PAGE_HEAD + _page_tail(None), None, "|")
    ids = id_text.split("\x1e")
    # group_concat joins in the order its rows come: SQLite does not promise that order
    # before 3.44, so it is checked. Anything else takes the row-by-row way.
    if len(ids) != count or ids != sorted(ids):
        return None
    more = count > query.limit
    n = count - more
    seqs = seq_text.split(",")
    if more:  # the row read ahead: not on this page
        del seqs[n:]
        seq_text, states = seq_text.rpartition(",")[0], states.rpartition(",")[0]
    texts = await store.item_prefixes(seqs)
    if texts is None:
        return None
    next_cursor = encode_cursor(ids[n - 1]) if more else None
    head, tail = _PAGE_HEAD, _page_tail(next_cursor)
    kinds = set(states.split(","))
    if len(kinds) == 1:  # one join closes them all, in one copy of the page
        end = _LOCAL_END if "done" in kinds else _NOT_LOCAL_END
        texts[0] = head + texts[0]
        texts[-1] = texts[-1] + end + tail
        body = (end + b",").join(texts)
    else:
        ends = [_LOCAL_END if s == "done" else _NOT_LOCAL_END for s in states.split(",")]
        body = b"".join([head, b",".join([t + e for t, e in zip(texts, ends, strict=True)]), tail])
    return _JsonPage(body, next_cursor, f"{seq_text}|{states}")


def _page_etag(kind: str, version: str, next_cursor: str | None) -> str:
    """A list page's ETag, without hashing its body (blake2b over a 100-item page cost about
    as much CPU as the rest of the request): an item gets a new seq with every change, its
    file's state decides local_file, and the cursor and the format (mirrord's version, JSON
    or GeoJSON) decide the rest of the body of a given URL."""
    key = f"{__version__}|{kind}|{next_cursor}|{version}"
    return hashlib.blake2b(key.encode(), digest_size=12).hexdigest()


_LOCAL, _NOT_LOCAL = ',"local_file":true}', ',"local_file":false}'
_LOCAL_END, _NOT_LOCAL_END = _LOCAL.encode(), _NOT_LOCAL.encode()


def with_local_file(data: str, file_state: str | None) -> str:
    """The stored item with `local_file` added: whether GET /v1/images/{id}/file serves its
    file now. Spliced into the stored JSON text, never re-parsed (_json_page does the same
    to the texts the store keeps)."""
    if data[-1:] == "}" and data != "{}":
        return data[:-1] + (_LOCAL if file_state == "done" else _NOT_LOCAL)
    return data


async def list_images(request: web.Request) -> web.Response:
    if GEOJSON in request.headers.get("Accept", ""):
        return await list_images_geojson(request)
    query = await _page_query(request)
    page = await _json_page(request, query)
    if page is None:
        items, next_cursor, version = await _image_page(request, query)
        body = _PAGE_HEAD + ",".join(items).encode() + _page_tail(next_cursor)
        page = _JsonPage(body, next_cursor, version)
    return _answer(request, page.body, etag=_page_etag("json", page.version, page.next_cursor))


async def list_images_geojson(request: web.Request) -> web.Response:
    items, next_cursor, version = await _image_page(request, await _page_query(request))
    features = []
    for text in items:
        item = json.loads(text)
        lon, lat = item.get("longitude"), item.get("latitude")
        geometry = (
            None if lon is None or lat is None else {"type": "Point", "coordinates": [lon, lat]}
        )
        features.append(
            {
                "type": "Feature",
                "id": item.get("sentera_id"),
                "geometry": geometry,
                "properties": item,
            }
        )
    body = json.dumps(
        {"type": "FeatureCollection", "features": features, "next_cursor": next_cursor}
    )
    return _answer(
        request, body, content_type=GEOJSON, etag=_page_etag("geojson", version, next_cursor)
    )


_IMAGE_SQL = (
    "SELECT i.data, i.content_hash, i.seq, f.state FROM items i LEFT JOIN files f "
    "ON f.collection_id = i.collection_id AND f.sentera_id = i.sentera_id "
    "WHERE i.collection_id = ? AND i.sentera_id = ?"
)


async def get_image(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    sid = request.match_info["sentera_id"]
    # The unique (collection_id, sentera_id) index, probed once per collection: point reads.
    rows: list[tuple[Any, ...]] = []
    for cid in await ctx.store.image_collection_ids():
        rows = await ctx.store.read_point(_IMAGE_SQL, (cid, sid))
        if rows:
            break
    else:
        raise ApiError(404, "unknown_image", f"the mirror holds no image {sid!r}")
    data, content_hash, seq, state = rows[0]
    local = state == "done"
    return _answer(request, with_local_file(data, state), etag=f"{seq}-{content_hash}-{local:d}")


# ---- the change feed ----------------------------------------------------------------------


async def changes(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    since = _int_param(request, "since", 0, 0, MAX_SEQ)
    limit = _int_param(request, "limit", 1000, 1, MAX_CHANGES)
    wait = _float_param(request, "wait", 0.0, 0.0, MAX_WAIT)
    _check_feed_position(request, "since", since)
    rows = await _changes_after(ctx, since, limit)
    if not rows and wait > 0 and await ctx.store.wait_for_change(since, wait):
        rows = await _changes_after(ctx, since, limit)
    last = rows[-1][0] if rows else max(since, await ctx.store.last_seq())
    feed = [
        {
            "seq": seq,
            "kind": "image" if kind == "images" else "survey",
            "survey_id": parent,
            "sentera_id": sid,
            "content_hash": chash,
            "deleted": bool(deleted),
        }
        for seq, kind, parent, sid, chash, deleted in rows
    ]
    return web.json_response({"changes": feed, "last_seq": last})


async def _changes_after(ctx: MirrorContext, since: int, limit: int) -> list[tuple[Any, ...]]:
    # Both tables are keyed by seq (their rowid): each side is a range scan.
    return await ctx.store.read(
        "SELECT x.seq, c.kind, c.parent_id, x.sentera_id, x.content_hash, x.deleted FROM ("
        " SELECT seq, collection_id, sentera_id, content_hash, 0 AS deleted FROM items"
        " WHERE seq > ? UNION ALL"
        " SELECT seq, collection_id, sentera_id, content_hash, 1 FROM tombstones WHERE seq > ?"
        ") x JOIN collections c ON c.id = x.collection_id ORDER BY x.seq LIMIT ?",
        (since, since, limit),
    )


# ---- sync now -----------------------------------------------------------------------------


async def sync_now(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    sid = request.match_info["id"]
    return _started(ctx, await _job_for_survey(ctx, sid), "survey", sid)


async def sync_field_now(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    fid = request.match_info["id"]
    job_id = f"field:{fid}"
    return _started(ctx, job_id if job_id in targets_of(ctx.config) else None, "field", fid)


def _started(ctx: MirrorContext, job_id: str | None, what: str, ident: str) -> web.Response:
    outcome = ctx.sync_now(job_id) if job_id else "unknown"
    if outcome == "unknown":
        raise ApiError(404, f"unknown_{what}", f"{ident!r} is not a configured {what}")
    if outcome == "running":
        raise ApiError(409, "sync_running", f"a sync of {ident!r} is already running")
    return web.json_response({"status": "started", "job": job_id}, status=202)


async def _job_for_survey(ctx: MirrorContext, survey_id: str) -> str | None:
    """A survey syncs in its own job, or in the job of the configured field that lists it."""
    jobs = targets_of(ctx.config)
    if f"survey:{survey_id}" in jobs:
        return f"survey:{survey_id}"
    rows = await ctx.store.read(
        "SELECT origin FROM collections WHERE kind = 'images' AND parent_id = ?", (survey_id,)
    )
    if rows and str(rows[0][0]).startswith("field:"):
        job = "field:" + str(rows[0][0]).removeprefix("field:")
        return job if job in jobs else None
    return None
