"""`POST /graphql` (and `GET /graphql?query=...`): upstream's delta-sync queries, answered from
the mirror.

A tool written against Sentera's API (mirrord's own sync engine included) can point at the
laptop instead of the cloud and keep working offline. The contract is upstream's
(../shared/upstream/PROTOCOL.md), checked by graphql-core against the same schema file,
mirrord/upstream.graphql, that the fake upstream serves:

- `sync_images(survey_sentera_id, content_hashes)` / `sync_surveys(field_sentera_id, ...)`
  answer for a survey / field the mirror holds; any other id is a GraphQL error with
  extensions.code "NOT_FOUND" (HTTP 200, data null), as upstream answers.
- `upserted`: held items whose content_hash the client did not send, exactly as upstream sent
  them to the mirror (stored JSON, `__typename` included), except an image's `url`: where the
  mirror holds the image's file (surveys with files = "all"), `url` is this API's
  /v1/images/{sentera_id}/file, which works offline and never expires. Otherwise it is the
  signed URL of the mirror's last sync, which expires about an hour after that sync.
- `deleted`: hashes the client sent that are not current here. A hash the mirror saw deleted
  (its tombstone keeps the last deleted hash per item) comes with its sentera_id; any other
  (an updated item's old hash, a hash never issued) in the hash-only form, sentera_id "", as
  the fake reports unknown hashes: clients resolve those by the hash they hold.
- Page limits are upstream's, 1,000 images / 2,000 surveys, shared by `upserted` and `deleted`,
  upserts first: an updated item's new version reaches the client before (or with) its old
  hash's report, so a client never drops an item it is about to get back.
- `remaining_count`: the differing entries (upserts and deletions) left out of this answer.
- `failed`: the failures upstream reported in the mirror's last complete sync of that
  collection (the mirror serves its last good copy of such items, if it has one): a downstream
  client learns that the copy may be stale, as it would from upstream. Like upstream's, they
  are listed in every answer, outside the page limit, and NOT counted in remaining_count, so
  "loop until remaining_count is 0" ends.

Bounds, so that one request cannot hold the daemon: a document has at most `MAX_TOKENS`
tokens (a long hash list goes in a variable, as the sync engine sends it: parsing 200,000
tokens costs seconds of CPU), a long document is parsed and validated off the event loop, and
an operation runs at most `MAX_SYNC_FIELDS` sync fields (aliases make any number of them): the
rest are GraphQL errors.

Authorization is the HTTP API's, not upstream's (mirrord/views/security.py): without an
`[http] token` any bearer token (or none) is accepted; with one, a client sends that token,
exactly where it would send its upstream token.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from inspect import isawaitable
from typing import Any
from urllib.parse import quote

import orjson
from aiohttp import web
from graphql import (
    DocumentNode,
    ExecutionResult,
    GraphQLError,
    GraphQLResolveInfo,
    VariableNode,
    execute,
)

from mirrord import gql as gql_common
from mirrord.context import CONTEXT
from mirrord.store import Store
from mirrord.views.errors import ApiError

Item = dict[str, Any]


@dataclass(frozen=True)
class _Query:
    kind: str  # the mirror's collection kind
    item_type: str  # the GraphQL type of its items
    page_limit: int
    parent_noun: str


_QUERIES: dict[str, _Query] = {
    "sync_images": _Query("images", "Image", 1000, "Survey"),
    "sync_surveys": _Query("surveys", "Survey", 2000, "Field"),
}

# Re-reads when a sync commits between the reads of one answer (see _answer).
_CONSISTENT_READ_ATTEMPTS = 3
# Collections whose hash index is kept between requests: a sync walks one or two at a time.
_CACHED_COLLECTIONS = 4
MAX_TOKENS = 20_000  # tokens in one document (graphql-java's default is 15,000)
MAX_SYNC_FIELDS = 8  # sync fields one operation may run
_PARSE_INLINE = 64 * 1024  # characters: a longer document is parsed in a worker thread


def add_routes(router: web.UrlDispatcher) -> None:
    endpoint = GraphQLEndpoint()
    router.add_post("/graphql", endpoint.handle)
    router.add_get("/graphql", endpoint.handle)


# ---- GraphQL over HTTP ------------------------------------------------------------------------


@dataclass(frozen=True)
class GraphQLRequest:
    query: str
    variables: dict[str, Any] | None
    operation_name: str | None


async def read_request(request: web.Request) -> GraphQLRequest:
    """The GraphQL-over-HTTP request; ApiError 400 (mirrord's JSON error) if malformed."""
    raw: Any
    if request.method == "GET":
        raw = dict(request.query)
    else:
        try:
            raw = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            raise ApiError(400, "bad_request", "the body is not valid JSON") from None
    if not isinstance(raw, dict):
        raise ApiError(400, "bad_request", "the body must be a JSON object")
    query, variables, operation = raw.get("query"), raw.get("variables"), raw.get("operationName")
    if not isinstance(query, str) or not query.strip():
        raise ApiError(400, "bad_request", "missing `query`: a GraphQL document is required")
    if isinstance(variables, str):  # GET carries variables as JSON text
        try:
            variables = orjson.loads(variables) if variables else None
        except orjson.JSONDecodeError:
            raise ApiError(400, "bad_request", "`variables` is not valid JSON") from None
    if variables is not None and not isinstance(variables, dict):
        raise ApiError(400, "bad_request", "`variables` must be a JSON object")
    if operation is not None and not isinstance(operation, str):
        raise ApiError(400, "bad_request", "`operationName` must be a string")
    return GraphQLRequest(query, variables, operation or None)


def _error_code(error: Item) -> Item:
    # graphql-core leaves codes to the server; upstream's always sends one.
    if "code" not in error.get("extensions", {}):
        code = "BAD_USER_INPUT" if "path" not in error else "INTERNAL_SERVER_ERROR"
        error["extensions"] = {**error.get("extensions", {}), "code": code}
    return error


def _json(body: Item) -> web.Response:
    # orjson: an answer holds up to 2,000 items, and json.dumps is several times slower.
    return web.Response(body=orjson.dumps(body), content_type="application/json")


# ---- answering from the mirror ----------------------------------------------------------------


@dataclass(frozen=True)
class _Index:
    """One collection's current items as of the mirror's `seq`: the diff's whole input."""

    seq: int
    hashes: dict[str, str]  # sentera_id -> content_hash, in the table's order
    owners: dict[str, str]  # content_hash -> sentera_id


@dataclass
class _RequestContext:
    endpoint: GraphQLEndpoint
    store: Store
    hash_lists: dict[str, list[str]]
    base_url: str  # this API as the client reached it, for local file URLs
    sync_fields: list[str] = field(default_factory=list)


def _resolve_type(value: Item, info: GraphQLResolveInfo[Any], _abstract: object) -> str | None:
    # Stored items carry the __typename upstream sent; deleted entries are built with one.
    typename = value.get("__typename")
    return typename if isinstance(typename, str) else None


async def _resolve_sync(
    _root: object, info: GraphQLResolveInfo[Any], content_hashes: list[str], **parent: str
) -> Item:
    context = info.context
    assert isinstance(context, _RequestContext)
    context.sync_fields.append(info.field_name)
    if len(context.sync_fields) > MAX_SYNC_FIELDS:
        raise GraphQLError(
            f"too many sync fields in one operation (at most {MAX_SYNC_FIELDS})",
            extensions={"code": "BAD_USER_INPUT"},
        )
    for argument in info.field_nodes[0].arguments or ():
        value = argument.value
        if argument.name.value == "content_hashes" and isinstance(value, VariableNode):
            content_hashes = context.hash_lists.get(value.name.value, content_hashes)
    (parent_id,) = parent.values()
    return await context.endpoint.answer(
        context.store, _QUERIES[info.field_name], parent_id, content_hashes
    )


_LOCAL_FILE = "\0local_file"  # marks a stored item whose file the mirror holds


def _field_resolver(source: Any, info: GraphQLResolveInfo[Any], **args: Any) -> Any:
    if info.parent_type is info.schema.query_type:
        return _resolve_sync(source, info, **args)
    if not isinstance(source, dict):
        return None
    if info.field_name == "url" and source.get(_LOCAL_FILE):
        context = info.context
        assert isinstance(context, _RequestContext)
        return f"{context.base_url}/v1/images/{quote(source['sentera_id'], safe='')}/file"
    # Default behaviour for item fields: stored JSON objects are dicts; absent keys are null.
    return source.get(info.field_name)


class GraphQLEndpoint:
    """The handler and what it keeps between requests: a small cache of hash indexes."""

    def __init__(self) -> None:
        self._indexes: dict[tuple[int, int], _Index] = {}  # (id(store), collection id)

    async def handle(self, request: web.Request) -> web.Response:
        gql = await read_request(request)
        if len(gql.query) > _PARSE_INLINE:  # seconds of CPU for the biggest: not on the loop
            prepared = await asyncio.to_thread(gql_common.prepare, gql.query, MAX_TOKENS)
        else:
            prepared = gql_common.prepare(gql.query, MAX_TOKENS)
        if not isinstance(prepared, DocumentNode):
            return _json({"errors": list(prepared)})  # a copy: the cached errors stay intact
        operation = gql_common.operation_of(prepared, gql.operation_name)
        variables, hash_lists = gql_common.take_hash_lists(operation, gql.variables)
        store = request.app[CONTEXT].store
        result = execute(
            gql_common.schema(),
            prepared,
            context_value=_RequestContext(self, store, hash_lists, str(request.url.origin())),
            variable_values=variables,
            operation_name=gql.operation_name,
            field_resolver=_field_resolver,
            type_resolver=_resolve_type,
        )
        if isawaitable(result):
            result = await result
        assert isinstance(result, ExecutionResult)
        body: Item = {"data": result.data}
        if result.errors:
            body["errors"] = [_error_code(dict(e.formatted)) for e in result.errors]
        return _json(body)

    async def answer(self, store: Store, query: _Query, parent_id: str, hashes: list[str]) -> Item:
        """One sync answer for a client holding `hashes`."""
        rows = await store.read(
            "SELECT id FROM collections WHERE kind = ? AND parent_id = ? AND dropped_at IS NULL",
            (query.kind, parent_id),
        )
        if not rows:
            raise GraphQLError(f"{query.parent_noun} not found", extensions={"code": "NOT_FOUND"})
        collection_id = int(rows[0][0])
        client = set(hashes)
        answer: Item = {}
        for _ in range(_CONSISTENT_READ_ATTEMPTS):
            # The index and the page's items are separate reads: a sync committing between
            # them would make the answer mix two states. Reading last_seq again tells.
            index = await self._index(store, collection_id)
            answer = await self._page(store, query, collection_id, index, hashes, client)
            if await _last_seq(store) == index.seq:
                break
        answer["failed"] = await _failures(store, collection_id)
        return answer

    async def _index(self, store: Store, collection_id: int) -> _Index:
        seq = await _last_seq(store)
        key = (id(store), collection_id)
        cached = self._indexes.pop(key, None)
        if cached is not None and cached.seq == seq:
            self._indexes[key] = cached  # most recently used last
            return cached
        rows = await store.read(
            "SELECT sentera_id, content_hash FROM items WHERE collection_id = ?", (collection_id,)
        )
        hashes = {sid: chash for sid, chash in rows}
        index = _Index(seq, hashes, {chash: sid for sid, chash in hashes.items()})
        self._indexes[key] = index
        while len(self._indexes) > _CACHED_COLLECTIONS:
            del self._indexes[next(iter(self._indexes))]
        return index

    async def _page(
        self,
        store: Store,
        query: _Query,
        collection_id: int,
        index: _Index,
        hashes: list[str],
        client: set[str],
    ) -> Item:
        limit = query.page_limit
        needed = [sid for sid, chash in index.hashes.items() if chash not in client]
        owners = index.owners
        # dict.fromkeys: the client's order, each hash once.
        stale = [h for h in dict.fromkeys(hashes) if h not in owners]
        page_ids = needed[:limit]
        page_stale = stale[: limit - len(page_ids)]
        upserted = await _items(store, collection_id, page_ids, query.item_type)
        deleted = await _deleted(store, query, collection_id, page_stale)
        return {
            "upserted": upserted,
            "deleted": deleted,
            "remaining_count": len(needed) + len(stale) - len(page_ids) - len(page_stale),
        }


async def _last_seq(store: Store) -> int:
    rows = await store.read("SELECT value FROM meta WHERE key = 'last_seq'")
    return int(rows[0][0])


async def _items(store: Store, collection_id: int, ids: list[str], item_type: str) -> list[Item]:
    """The stored items, in `ids` order (one query: the ids travel as one JSON array)."""
    if not ids:
        return []
    rows = await store.read(
        "SELECT i.sentera_id, i.data, f.state = 'done' FROM items i LEFT JOIN files f "
        "ON f.collection_id = i.collection_id AND f.sentera_id = i.sentera_id "
        "WHERE i.collection_id = ? AND i.sentera_id IN (SELECT value FROM json_each(?))",
        (collection_id, orjson.dumps(ids).decode()),
    )
    data = {sid: (text, local) for sid, text, local in rows}
    items = []
    for sid in ids:
        text, local = data.get(sid, (None, False))
        if text is None:
            continue  # gone meanwhile: the seq re-check in `answer` reads again
        try:
            item = orjson.loads(text)
        except orjson.JSONDecodeError:
            # Stored as upstream wrote it: a number past a double's range, which orjson refuses
            # (json reads it as infinity, and the GraphQL Float then says it cannot be sent).
            item = json.loads(text)
        if local:
            item[_LOCAL_FILE] = True
        # The engine's query asks for __typename, so it is stored; an item stored by any
        # other client still resolves to its collection's type.
        item.setdefault("__typename", item_type)
        items.append(item)
    return items


async def _deleted(store: Store, query: _Query, collection_id: int, stale: list[str]) -> list[Item]:
    if not stale:
        return []
    rows = await store.read(
        "SELECT content_hash, sentera_id FROM tombstones WHERE collection_id = ? "
        "AND content_hash IN (SELECT value FROM json_each(?))",
        (collection_id, orjson.dumps(stale).decode()),
    )
    known = {chash: sid for chash, sid in rows}
    # created_by is non-null in the schema: a client selecting it gets the empty user, as from
    # upstream's own hash-only entries.
    return [
        {
            "__typename": query.item_type,
            "sentera_id": known.get(chash, ""),
            "content_hash": chash,
            "created_by": {"sentera_id": ""},
        }
        for chash in stale
    ]


async def _failures(store: Store, collection_id: int) -> list[Item]:
    rows = await store.read(
        "SELECT key, message, code, reason, details FROM failed_items "
        "WHERE collection_id = ? ORDER BY key",
        (collection_id,),
    )
    return [
        {
            "key": key,
            "message": message,
            "code": code,
            "reason": reason,
            "details": None if details is None else orjson.loads(details),
        }
        for key, message, code, reason, details in rows
    ]
