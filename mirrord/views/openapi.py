"""`GET /v1/openapi.json`: the OpenAPI 3.1 description of every endpoint.

Written by hand, next to the views, because the views are plain aiohttp handlers; the tests
(tests/test_openapi.py) keep it honest: the document must validate, and every route must be
documented and every documented path routed.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from mirrord import __version__
from mirrord.views.data import MAX_CHANGES, MAX_SEQ, MAX_WAIT

JSON = "application/json"
GEOJSON = "application/geo+json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": _ref("Error")}}}


def _ok(description: str, schema: dict[str, Any], media: str = JSON) -> dict[str, Any]:
    return {"description": description, "content": {media: {"schema": schema}}}


# Every endpoint can answer these (the security middlewares and the router).
_COMMON_ERRORS = {
    "401": _error("`[http] token` is set and the bearer token is missing or wrong"),
    "403": _error("Host header not accepted (DNS-rebinding defence)"),
    "405": _error("method not allowed"),
}


def _op(
    summary: str,
    responses: dict[str, Any],
    *,
    params: list[dict[str, Any]] | None = None,
    body: dict[str, Any] | None = None,
    secured: bool = True,
    tag: str = "data",
    method: str = "get",
) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "tags": [tag], "responses": responses}
    op["responses"] |= {k: v for k, v in _COMMON_ERRORS.items() if secured or k != "401"}
    op["responses"]["500"] = _error("internal error (logged by the daemon)")
    op["responses"]["503"] = _error("the mirror database failed (corrupted, disk error)")
    if params:
        op["parameters"] = params
    if body is not None or method == "post":
        # Every body is read within a deadline and a size cap (views/limits.py, app.MAX_BODY).
        op["responses"]["408"] = _error("the request body did not arrive in time")
        op["responses"]["413"] = _error("body larger than 8 MiB")
    if body:
        op["requestBody"] = body
    if not secured:
        op["security"] = []  # open even when `[http] token` is set
    return op


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


def _path(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "schema": {"type": "string"},
        "description": description,
    }


_SURVEY_ID = _path("id", "the survey's sentera_id")
# A GraphQL document: not blank.
_GRAPHQL_DOCUMENT = {"type": "string", "pattern": r"\S"}
_NOT_FOUND = {"404": _error("no such survey in the mirror")}
_BAD_REQUEST = {"400": _error("a query parameter is invalid")}
_FEED_RESET = {
    "410": _error(
        "`feed_reset`: the change-feed position named is one this mirror no longer holds "
        "(restored from an older copy, or started afresh): start again from 0"
    )
}

_IMAGE_QUERY = [
    _query(
        "limit",
        {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
        "images per page",
    ),
    _query("cursor", {"type": "string"}, "opaque: next_cursor of the previous page"),
    _query(
        "bbox",
        {"type": "string", "pattern": r"^-?[0-9.]+(,-?[0-9.]+){3}$"},
        "minlon,minlat,maxlon,maxlat (WGS84): only images inside",
    ),
    _query(
        "since_seq",
        {"type": "integer", "minimum": 0, "maximum": MAX_SEQ},
        "only images changed after this change-feed sequence number",
    ),
]

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {
                    "code": {"type": "string", "examples": ["not_found"]},
                    "message": {"type": "string"},
                },
            }
        },
    },
    "Image": {
        "type": "object",
        "description": "an image as upstream serves it (sentera_id, content_hash, ...), plus "
        "local_file",
        "required": ["sentera_id", "local_file"],
        "properties": {
            "sentera_id": {"type": "string"},
            "content_hash": {"type": "string"},
            "local_file": {
                "type": "boolean",
                "description": "true when GET /v1/images/{sentera_id}/file serves its file",
            },
        },
        "additionalProperties": True,
    },
    "ImagePage": {
        "type": "object",
        "required": ["images", "next_cursor"],
        "properties": {
            "images": {"type": "array", "items": _ref("Image")},
            "next_cursor": {"type": ["string", "null"], "description": "null on the last page"},
        },
    },
    "FeatureCollection": {
        "type": "object",
        "description": "GeoJSON (RFC 7946): one Point feature per image",
        "required": ["type", "features"],
        "properties": {
            "type": {"const": "FeatureCollection"},
            "features": {"type": "array", "items": {"type": "object"}},
        },
    },
    "Survey": {
        "type": "object",
        "description": "a mirrored survey: its id, upstream data and mirror status",
        "additionalProperties": True,
    },
    "Change": {
        "type": "object",
        "required": ["seq", "survey_id", "sentera_id", "content_hash", "deleted"],
        "properties": {
            "seq": {"type": "integer"},
            "survey_id": {"type": "string"},
            "sentera_id": {"type": "string"},
            "content_hash": {"type": ["string", "null"]},
            "deleted": {"type": "boolean"},
        },
    },
    "Status": {
        "type": "object",
        "required": ["version", "uptime_seconds", "online", "config_error", "targets"],
        "properties": {
            "version": {"type": "string"},
            "uptime_seconds": {"type": "number"},
            "online": {"type": ["boolean", "null"]},
            "config_error": {"type": ["string", "null"]},
            "database_error": {
                "type": ["string", "null"],
                "description": "why the mirror database cannot be read, if it cannot",
            },
            "targets": {"type": "array", "items": {"type": "object"}},
            "collections": {"type": "array", "items": {"type": "object"}},
        },
    },
    "GraphQLRequest": {
        "type": "object",
        "required": ["query"],
        "properties": {
            "query": _GRAPHQL_DOCUMENT,
            "variables": {"type": ["object", "null"]},
            "operationName": {"type": ["string", "null"]},
        },
    },
    "GraphQLResponse": {
        "type": "object",
        "properties": {"data": {"type": ["object", "null"]}, "errors": {"type": "array"}},
    },
}

_PATHS: dict[str, Any] = {
    "/healthz": {
        "get": _op(
            "liveness: the daemon answers",
            {"200": _ok("alive", {"type": "object", "properties": {"status": {"const": "ok"}}})},
            secured=False,
            tag="ops",
        )
    },
    "/v1/status": {
        "get": _op(
            "the daemon's state per survey and field",
            {"200": _ok("status", _ref("Status"))},
            tag="ops",
        )
    },
    "/metrics": {
        "get": _op(
            "Prometheus metrics",
            {"200": _ok("text exposition format", {"type": "string"}, "text/plain")},
            tag="ops",
        )
    },
    "/v1/openapi.json": {
        "get": _op("this document", {"200": _ok("OpenAPI 3.1", {"type": "object"})}, tag="ops")
    },
    "/graphql": {
        "post": _op(
            "GraphQL over the mirror (the upstream schema's read and sync queries)",
            {
                "200": _ok("a GraphQL answer", _ref("GraphQLResponse")),
                **_BAD_REQUEST,
            },
            body={"required": True, "content": {JSON: {"schema": _ref("GraphQLRequest")}}},
            method="post",
            tag="graphql",
        ),
        "get": _op(
            "GraphQL query in the URL",
            {"200": _ok("a GraphQL answer", _ref("GraphQLResponse")), **_BAD_REQUEST},
            params=[
                {"name": "query", "in": "query", "required": True, "schema": _GRAPHQL_DOCUMENT},
                _query("variables", {"type": "string"}, "JSON object"),
                _query("operationName", {"type": "string"}, "operation to run"),
            ],
            tag="graphql",
        ),
    },
    "/v1/surveys": {
        "get": _op(
            "the mirrored surveys",
            {
                "200": _ok(
                    "surveys",
                    {
                        "type": "object",
                        "required": ["surveys"],
                        "properties": {"surveys": {"type": "array", "items": _ref("Survey")}},
                    },
                )
            },
        )
    },
    "/v1/surveys/{id}": {
        "get": _op(
            "one survey",
            {"200": _ok("the survey", _ref("Survey")), **_NOT_FOUND},
            params=[_SURVEY_ID],
        )
    },
    "/v1/surveys/{id}/images": {
        "get": _op(
            "a survey's images, a page at a time (GeoJSON with Accept: application/geo+json)",
            {
                "200": {
                    "description": "a page of images",
                    "content": {
                        JSON: {"schema": _ref("ImagePage")},
                        GEOJSON: {"schema": _ref("FeatureCollection")},
                    },
                },
                **_BAD_REQUEST,
                **_NOT_FOUND,
                **_FEED_RESET,
            },
            params=[_SURVEY_ID, *_IMAGE_QUERY],
        )
    },
    "/v1/surveys/{id}/images.geojson": {
        "get": _op(
            "a survey's images as a GeoJSON FeatureCollection",
            {
                "200": _ok("features", _ref("FeatureCollection"), GEOJSON),
                **_BAD_REQUEST,
                **_NOT_FOUND,
                **_FEED_RESET,
            },
            params=[_SURVEY_ID, *_IMAGE_QUERY],
        )
    },
    "/v1/images/{sentera_id}": {
        "get": _op(
            "one image",
            {"200": _ok("the image", _ref("Image")), "404": _error("no such image")},
            params=[_path("sentera_id", "the image's sentera_id")],
        )
    },
    "/v1/images/{sentera_id}/file": {
        "get": _op(
            'the image\'s file, once downloaded (surveys with files = "all"); supports Range',
            {
                "200": {
                    "description": "the file",
                    "content": {"image/*": {"schema": {"type": "string", "format": "binary"}}},
                },
                "206": {"description": "the requested byte range"},
                "304": {"description": "not modified (If-None-Match)"},
                "404": _error("no such image, or its file is not (yet) on this laptop"),
                "416": _error("a Range that is malformed or outside the file"),
            },
            params=[_path("sentera_id", "the image's sentera_id")],
        )
    },
    "/v1/changes": {
        "get": _op(
            "the change feed: what changed after `since` (long-polls up to `wait` seconds)",
            {
                "200": _ok(
                    "changes",
                    {
                        "type": "object",
                        "required": ["changes", "last_seq"],
                        "properties": {
                            "changes": {"type": "array", "items": _ref("Change")},
                            "last_seq": {"type": "integer"},
                        },
                    },
                ),
                **_BAD_REQUEST,
                **_FEED_RESET,
            },
            params=[
                _query(
                    "since",
                    {"type": "integer", "minimum": 0, "maximum": MAX_SEQ, "default": 0},
                    "sequence number already seen",
                ),
                _query(
                    "limit",
                    {"type": "integer", "minimum": 1, "maximum": MAX_CHANGES, "default": 1000},
                    "at most this many changes",
                ),
                _query(
                    "wait",
                    {"type": "number", "minimum": 0, "maximum": MAX_WAIT},
                    "seconds to wait for a change when there is none",
                ),
            ],
        )
    },
    "/": {
        "get": _op(
            "the status page (HTML for a browser; live through the change feed). Open without a "
            "token, but with `[http] token` set it shows data only to a request bearing it",
            {
                "200": _ok("the page", {"type": "string"}, "text/html"),
            },
            params=[
                _query("survey", {"type": "string"}, "the survey whose images are plotted"),
                _query(
                    "color",
                    {"type": "string", "examples": ["age", "sensor"]},
                    "colour the points by `age` (the default) or `sensor`; a page for people, so "
                    "any other value means the default rather than an error",
                ),
            ],
            secured=False,
            tag="ops",
        )
    },
    "/v1/fields/{id}/sync": {
        "post": _op(
            "sync a configured field (its survey list and every survey in it) now",
            {
                "202": _ok("sync started", {"type": "object"}),
                "404": _error("not a configured field"),
                "409": _error("a sync of it is already running"),
            },
            params=[_path("id", "the field's sentera_id")],
        )
    },
    "/v1/surveys/{id}/sync": {
        "post": _op(
            "sync a configured survey now",
            {
                "202": _ok("sync started", {"type": "object"}),
                "404": _error("not a configured survey"),
                "409": _error("a sync of it is already running"),
            },
            params=[_SURVEY_ID],
            method="post",
        )
    },
}


def document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "mirrord local API",
            "version": __version__,
            "description": (
                "The local mirror of Sentera FieldAgent image surveys. Every error is "
                '`{"error": {"code", "message"}}`. Requests must carry a loopback Host (or one '
                "of `[http] hosts`); with `[http] token`, every request but /healthz needs "
                "`Authorization: Bearer <token>`."
            ),
        },
        "servers": [{"url": "http://127.0.0.1:8765"}],
        # {}: no auth is also valid (a loopback daemon without [http] token).
        "security": [{"bearer": []}, {}],
        "paths": _PATHS,
        "components": {
            "schemas": _SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/v1/openapi.json", openapi_view)


async def openapi_view(request: web.Request) -> web.Response:
    return web.json_response(document())
