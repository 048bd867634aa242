"""`GET /v1/images/{sentera_id}/file`: an image's file, when mirrord has downloaded it.

Served by aiohttp's FileResponse (sendfile, Range, If-None-Match/If-Modified-Since, an ETag
from the file's mtime and size). Only files the database calls done are served; anything else
is a JSON 404 saying why, so an app can tell "not yet" from "no such image".
"""

from __future__ import annotations

from aiohttp import web

from mirrord.context import CONTEXT
from mirrord.files import file_path
from mirrord.views.errors import ApiError

_WHY_NOT = {
    "pending": "is queued for download",
    "expired": "waits for a fresh download URL from the next sync",
    "failed": "could not be downloaded",
}


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/v1/images/{sentera_id}/file", get_file)


async def get_file(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CONTEXT]
    sid = request.match_info["sentera_id"]
    rows = await ctx.store.read(
        "SELECT i.collection_id, f.state, f.bytes, f.content_type, f.reason FROM items i "
        "LEFT JOIN files f ON f.collection_id = i.collection_id AND f.sentera_id = i.sentera_id "
        "WHERE i.collection_id IN (SELECT id FROM collections WHERE kind = 'images') "
        "AND i.sentera_id = ? LIMIT 1",
        (sid,),
    )
    if not rows:
        raise ApiError(404, "unknown_image", f"the mirror holds no image {sid!r}")
    collection_id, state, size, content_type, reason = rows[0]
    if state is None or state == "gone":
        raise ApiError(
            404,
            "file_not_mirrored",
            f'image {sid!r} is mirrored without its file (set files = "all" on its survey)',
        )
    if state != "done":
        why = _WHY_NOT.get(state, state) + (f": {reason}" if reason else "")
        raise ApiError(404, "file_not_local", f"the file of image {sid!r} {why}")
    path = file_path(ctx.config.storage.files_dir, int(collection_id), sid)
    try:
        on_disk = path.stat().st_size
    except OSError:
        on_disk = -1
    if on_disk != size:
        raise ApiError(
            404,
            "file_missing",
            f"the file of image {sid!r} is missing or damaged on disk "
            "(run `mirrord verify --fix` to fetch it again)",
        )
    _check_range(request, size)
    return web.FileResponse(
        path, headers={"Content-Type": content_type or "application/octet-stream"}
    )


def _check_range(request: web.Request, size: int) -> None:
    """A Range FileResponse would refuse gets the API's JSON error instead of a bare 416."""
    try:
        start = request.http_range.start
    except ValueError:
        start = size  # malformed: refused like one past the end
    if start is None or start < size:
        return
    if "Range" not in request.headers:
        return
    raise ApiError(
        416,
        "bad_range",
        f"Range must be bytes=START-[END] or bytes=-SUFFIX within the file's {size} bytes",
        headers={"Content-Range": f"bytes */{size}"},
    )
