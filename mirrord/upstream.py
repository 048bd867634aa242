"""The upstream client: FieldAgent's sync queries over one aiohttp session.

Errors are classified into retryable ones (the link, the server having a bad moment) and fatal
ones (credentials, a query the server rejects, an answer that breaks the contract). Retryable
errors are retried here with exponential backoff and full jitter, a bounded number of times;
what is still failing after that is the scheduler's business. No message carries the token.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from functools import cache
from typing import Annotated, Any, Protocol
from urllib.parse import urlsplit

import aiohttp
import msgspec
import orjson

from mirrord import __version__
from mirrord.config import Secret
from mirrord.store import Failure, FileWant, Upsert


class UpstreamError(Exception):
    """Base of every upstream failure. `retryable` says whether trying again may help."""

    retryable = False


class UpstreamUnavailable(UpstreamError):
    """The link or the server is down: connection refused or reset, DNS, timeouts."""

    retryable = True


class UpstreamServerError(UpstreamError):
    """HTTP 5xx, or a GraphQL error the server reports as its own fault."""

    retryable = True


class RateLimited(UpstreamError):
    retryable = True

    def __init__(self, message: str, retry_after: float | None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class BadAnswer(UpstreamError):
    """A body cut off mid-way, not JSON, or an HTML page (captive portal, proxy)."""

    retryable = True


class ProtocolError(UpstreamError):
    """Well-formed JSON that breaks the sync contract (missing or wrongly typed fields)."""


class AuthError(UpstreamError):
    """401/403: the token is wrong, expired or lacks access."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class QueryRejected(UpstreamError):
    """The server refused the query itself: validation error, unknown survey or field."""


@dataclass(frozen=True)
class SyncQuery:
    """One of upstream's delta-sync queries; the engine is generic over these."""

    field: str  # the query field, e.g. "sync_images"
    parent_arg: str  # its parent argument, e.g. "survey_sentera_id"
    kind: str  # what the mirror calls the items: "images" / "surveys"
    page_limit: int  # most items per answer, as documented
    selection: str  # the fields requested for each upserted item

    @property
    def document(self) -> str:
        op = "".join(part.title() for part in self.field.split("_"))
        return (
            f"query {op}($parent: ID!, $hashes: [String!]!) {{\n"
            f"  {self.field}({self.parent_arg}: $parent, content_hashes: $hashes) {{\n"
            f"    remaining_count\n"
            f"    upserted {{ __typename sentera_id content_hash {self.selection} }}\n"
            f"    deleted {{ sentera_id content_hash }}\n"
            f"    failed {{ key message code details reason }}\n"
            f"  }}\n"
            f"}}\n"
        )

    @property
    def operation_name(self) -> str:
        return "".join(part.title() for part in self.field.split("_"))


_ITEM_COMMON = "created_at created_by { sentera_id } updated_at updated_by { sentera_id }"

SYNC_IMAGES = SyncQuery(
    field="sync_images",
    parent_arg="survey_sentera_id",
    kind="images",
    page_limit=1000,
    selection=_ITEM_COMMON
    + " ... on Image { filename download_filename latitude longitude altitude captured_at"
    " camera_make camera_model sensor_type size orientation pitch roll yaw"
    " gps_carrier_phase_status gps_horizontal_accuracy gps_vertical_accuracy url }",
)

SYNC_SURVEYS = SyncQuery(
    field="sync_surveys",
    parent_arg="field_sentera_id",
    kind="surveys",
    page_limit=2000,
    selection=_ITEM_COMMON + " ... on Survey { name }",
)


@dataclass
class SyncAnswer:
    upserted: list[Upsert]  # each item's id, hash and JSON text exactly as upstream sent it
    deleted: list[tuple[str, str]]  # (sentera_id, content_hash)
    failed: list[Failure]
    remaining_count: int
    files: list[FileWant] = field(default_factory=list)  # per upserted item, when asked for


_Payload = dict[str, Any] | SyncAnswer  # what a round trip gives: read already, or parsed


class TokenProvider(Protocol):
    """Where the client gets its bearer token: a static token, or OAuth2 (mirrord.auth)."""

    async def token(self) -> Secret:
        """A token to use now (an OAuth provider refreshes one that is about to expire)."""
        ...

    async def rejected(self, token: Secret) -> bool:
        """Upstream refused `token` (HTTP 401). True if a new token is worth one more try."""
        ...


class StaticToken:
    """A fixed bearer token (a legacy session token or a personal API token)."""

    def __init__(self, token: Secret) -> None:
        self._token = token

    async def token(self) -> Secret:
        return self._token

    async def rejected(self, token: Secret) -> bool:
        return False


class HashList:
    """The content hashes a run sends, kept JSON-encoded between pages.

    The whole held set goes out with every request: a first sync of 100,000 images sends it
    100 times as it grows. Most pages only add hashes, so each page's new ones are encoded once
    and appended to one growing buffer, which goes into the request body with a single copy
    (joining and bracketing it afresh each page cost ~1.5 µs per image, most of it the kernel
    handing out fresh pages for every ever-larger copy); a page that replaces or drops a hash
    has the set encoded afresh instead.
    """

    def __init__(self, hashes: Iterable[str] = ()) -> None:
        self._open = bytearray(b"[")  # the list without its closing bracket
        self.extend(hashes)

    def extend(self, hashes: Iterable[str]) -> None:
        chunk = orjson.dumps(list(hashes))
        if len(chunk) > 2:
            if len(self._open) > 1:
                self._open += b","
            self._open += memoryview(chunk)[1:-1]

    def parts(self) -> tuple[bytearray, bytes]:
        """The JSON text in two parts, to be joined where it is used: no copy made here."""
        return self._open, b"]"


class BodyParts(aiohttp.payload.Payload):
    """A request body sent as its parts, in order, with a Content-Length.

    The held hashes make up most of a request (2 MB at 100,000 images). Given as one bytes
    object, the body was copied twice before the socket took it: once to join it, once more
    by aiohttp to put the headers in front (Python 3.11's transports join what they are given
    as a list). Written part by part, the headers travel with the small first part and the
    hashes go from HashList's buffer straight to the socket.
    """

    _autoclose = True  # nothing to close: bytes in memory

    def __init__(self, parts: tuple[bytes | bytearray, ...]) -> None:
        super().__init__(parts, content_type="application/json")
        self._parts = parts
        self._size = sum(map(len, parts))

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return b"".join(self._parts).decode(encoding, errors)

    async def write(self, writer: aiohttp.abc.AbstractStreamWriter) -> None:
        for part in self._parts:
            await writer.write(part)

    async def write_with_length(
        self, writer: aiohttp.abc.AbstractStreamWriter, content_length: int | None
    ) -> None:
        # aiohttp passes the size this payload gave it: there is never less to write.
        await self.write(writer)


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 5
    base: float = 0.5  # seconds before the first retry, at most
    cap: float = 30.0  # no wait between attempts is longer than this


class UpstreamClient:
    """`async with UpstreamClient(url, token) as client: await client.sync_page(...)`.

    `token` is a fixed Secret or a TokenProvider; on a 401 the provider is told, and if it has a
    new token the request is tried once more with it."""

    def __init__(
        self,
        url: str,
        token: Secret | TokenProvider,
        *,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        on_request: Callable[[str], None] | None = None,
    ) -> None:
        self.url = url
        self._tokens: TokenProvider = StaticToken(token) if isinstance(token, Secret) else token
        # The total deadline is asyncio.timeout() around each request, not ClientTimeout's
        # `total`: aiohttp's own timer cancels the task, and a late firing was seen to cancel
        # the *next* await of a sync job. asyncio.timeout cannot leak past its block.
        self._total = timeout
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=min(timeout, 10.0), sock_read=timeout
        )
        self._retry = retry or RetryPolicy()
        self._session: aiohttp.ClientSession | None = None
        self._where = _safe_host(url)
        self.requests = 0  # round trips sent, for run summaries
        self._on_request = on_request  # told each round trip's outcome (metrics)

    async def __aenter__(self) -> UpstreamClient:
        self._session = aiohttp.ClientSession(
            timeout=self._timeout,
            headers={"User-Agent": f"mirrord/{__version__}", "Accept": "application/json"},
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def sync_page(
        self,
        query: SyncQuery,
        parent_id: str,
        hashes: Collection[str] | HashList,
        *,
        files: bool = False,
    ) -> SyncAnswer:
        """One answer of `query` for the given held hashes, retrying what may pass. `files`:
        also read each upserted image's file (size and signed URL) into `answer.files`."""
        encoded = hashes.parts() if isinstance(hashes, HashList) else (orjson.dumps(list(hashes)),)
        head = b"".join(
            (
                b'{"query":',
                orjson.dumps(query.document),
                b',"operationName":',
                orjson.dumps(query.operation_name),
                b',"variables":{"parent":',
                orjson.dumps(parent_id),
                b',"hashes":',
            )
        )
        body = BodyParts((head, *encoded, b"}}"))
        reader = _reader(query, files)
        payload = await self._post_with_retries(body, reader)
        if isinstance(payload, SyncAnswer):
            return payload
        return parse_answer(query, payload, files=files)

    async def _post_with_retries(self, body: BodyParts, reader: _AnswerReader) -> _Payload:
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self._post(body, reader)
            except UpstreamError as e:
                if not e.retryable or attempt >= self._retry.max_attempts:
                    raise
                delay = self._backoff(attempt, e)
                if delay is None:
                    raise
                await asyncio.sleep(delay)

    def _backoff(self, attempt: int, error: UpstreamError) -> float | None:
        """Full jitter; a Retry-After longer than the cap ends the run (the scheduler waits)."""
        jitter = random.uniform(0, min(self._retry.cap, self._retry.base * 2 ** (attempt - 1)))
        if isinstance(error, RateLimited) and error.retry_after is not None:
            if error.retry_after > self._retry.cap:
                return None
            return max(error.retry_after, jitter)
        return jitter

    async def _post(self, body: BodyParts, reader: _AnswerReader) -> _Payload:
        token = await self._tokens.token()
        try:
            return await self._post_once(body, token, reader)
        except AuthError as e:
            if e.status == 401 and await self._tokens.rejected(token):
                return await self._post_once(body, await self._tokens.token(), reader)
            raise

    async def _post_once(self, body: BodyParts, token: Secret, reader: _AnswerReader) -> _Payload:
        try:
            payload = await self._round_trip(body, token, reader)
        except UpstreamError as e:
            self._count(_OUTCOMES.get(type(e), "error"))
            raise
        self._count("ok")
        return payload

    def _count(self, outcome: str) -> None:
        if self._on_request is not None:
            self._on_request(outcome)

    async def _round_trip(self, body: BodyParts, token: Secret, reader: _AnswerReader) -> _Payload:
        if self._session is None:
            raise RuntimeError("UpstreamClient used outside `async with`")
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token.reveal()}"}
        self.requests += 1
        try:
            async with (
                asyncio.timeout(self._total),
                self._session.post(self.url, data=body, headers=headers) as resp,
            ):
                raw = await resp.read()
                # Off the event loop: reading a 1,000-item answer takes milliseconds of CPU,
                # and the loop serves the local API meanwhile (see run_daemon's switch interval).
                return await asyncio.to_thread(self._decode, resp, raw, reader)
        except TimeoutError:
            raise UpstreamUnavailable(
                f"upstream {self._where} did not answer within {self._total:g}s"
            ) from None
        except aiohttp.ClientPayloadError:
            raise BadAnswer(f"upstream {self._where} cut the answer off mid-way") from None
        except aiohttp.ClientConnectorError as e:
            raise UpstreamUnavailable(
                f"cannot reach upstream {self._where}: {e.os_error.strerror or e.os_error}"
            ) from None
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as e:
            raise UpstreamUnavailable(
                f"upstream {self._where} dropped the connection ({type(e).__name__})"
            ) from None
        except aiohttp.ClientError as e:
            raise UpstreamUnavailable(
                f"upstream {self._where} request failed ({type(e).__name__})"
            ) from None

    def _decode(self, resp: aiohttp.ClientResponse, raw: bytes, reader: _AnswerReader) -> _Payload:
        """The answer, or the reason it is none. A well-formed sync answer is read straight
        into a SyncAnswer; anything else is parsed whole and checked step by step."""
        status = resp.status
        where = self._where
        if status in (401, 403):
            raise AuthError(
                f"upstream {where} refused the token (HTTP {status}): check [upstream] token",
                status,
            )
        if status == 429:
            retry_after = _retry_after(resp.headers.get("Retry-After"))
            raise RateLimited(f"upstream {where} is rate limiting (HTTP 429)", retry_after)
        if status >= 500:
            raise UpstreamServerError(f"upstream {where} failed (HTTP {status})")
        if "html" in resp.headers.get("Content-Type", "").lower() or raw.lstrip()[:1] == b"<":
            raise BadAnswer(
                f"upstream {where} answered with an HTML page (HTTP {status}), not JSON: "
                "a captive portal or proxy in the way?"
            )
        if status < 400:
            answer = reader.read(raw)
            if answer is not None:
                return answer
        try:
            payload = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise BadAnswer(
                f"upstream {where} answered with invalid JSON (HTTP {status})"
            ) from None
        if not isinstance(payload, dict):
            raise ProtocolError(f"upstream {where} answered with JSON that is not an object")
        if status >= 400 and not payload.get("errors"):
            raise QueryRejected(f"upstream {where} rejected the request (HTTP {status})")
        errors = payload.get("errors")
        if errors:
            raise _graphql_error(where, errors)
        return payload


# How a failed round trip is counted (metrics): by what it says about the link and the server.
_OUTCOMES: dict[type[UpstreamError], str] = {
    UpstreamUnavailable: "unavailable",
    UpstreamServerError: "server_error",
    RateLimited: "rate_limited",
    BadAnswer: "bad_answer",
    ProtocolError: "bad_answer",
    AuthError: "auth",
    QueryRejected: "rejected",
}


def _graphql_error(where: str, errors: Any) -> UpstreamError:
    first = errors[0] if isinstance(errors, list) and errors else {}
    if not isinstance(first, dict):
        first = {}
    message = str(first.get("message", "unknown error"))[:300]
    extensions = first.get("extensions")
    code = str(extensions.get("code", "")) if isinstance(extensions, dict) else ""
    text = f"upstream {where} returned a GraphQL error{f' {code}' if code else ''}: {message}"
    if code in ("UNAUTHENTICATED", "FORBIDDEN"):
        return AuthError(text)
    if code in ("GRAPHQL_VALIDATION_FAILED", "GRAPHQL_PARSE_FAILED", "BAD_USER_INPUT", "NOT_FOUND"):
        return QueryRejected(text)
    return UpstreamServerError(text)


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: rare for APIs; fall back to our own backoff


def _safe_host(url: str) -> str:
    """The URL as shown in messages: scheme, host and path; never userinfo or query."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def parse_answer(query: SyncQuery, payload: dict[str, Any], *, files: bool = False) -> SyncAnswer:
    """Check a parsed answer against the contract; ProtocolError names the first thing wrong.

    The general path: `_AnswerReader` reads well-formed answers without building a dict per
    item, and hands anything it does not accept to this one, which says what is wrong."""
    data = payload.get("data")
    result = data.get(query.field) if isinstance(data, dict) else None
    if not isinstance(result, dict):
        raise ProtocolError(f"upstream answer has no data.{query.field} object")
    remaining = result.get("remaining_count")
    if not isinstance(remaining, int) or isinstance(remaining, bool) or remaining < 0:
        raise ProtocolError(f"upstream answer: {query.field}.remaining_count is not a count")
    items = _item_list(query, result, "upserted")
    deleted = [
        (i["sentera_id"], i["content_hash"])
        for i in _item_list(query, result, "deleted", allow_empty_id=True)
    ]
    upserted = [Upsert(i["sentera_id"], i["content_hash"], orjson.dumps(i).decode()) for i in items]
    wants = (
        [_file_want(i["sentera_id"], i["content_hash"], i.get("size"), i.get("url")) for i in items]
        if files
        else []
    )
    return SyncAnswer(upserted, deleted, _failures(query, result), remaining, wants)


def _file_want(sentera_id: str, content_hash: str, size: Any, url: Any) -> FileWant:
    """Where an upserted image's file comes from; a size or URL that is not one is unknown."""
    return FileWant(
        sentera_id,
        content_hash,
        size if type(size) is int and 0 <= size < 2**63 else None,  # SQLite's INTEGER range
        url if type(url) is str and url else None,
    )


# ---- reading answers without a dict per item ----------------------------------------------
#
# Parsing a 1,000-image answer into dicts and serialising each item again to store it was
# most of the client's CPU per image. The reader below decodes an answer in two msgspec passes
# over the bytes: one keeps each upserted item as a raw slice of the answer (the JSON text that
# is stored, exactly as upstream sent it), one decodes only what the engine needs from each
# item (sentera_id, content_hash; size and url when the image's file is wanted) into small
# structs. Everything else in the answer is small and goes through the checks of parse_answer.
# An answer the reader does not accept is not refused here: it is parsed whole and checked step
# by step, so whatever is wrong with it is refused with the same error as ever.
#
# One difference, on purpose: numbers inside an item are kept as upstream wrote them. orjson
# read an integer past 64 bits as a rounded float, and refused a literal past a double's range
# (1e400) as invalid JSON; such an item is now stored as sent (SQLite's JSON functions and
# Python's json read it as infinity; the local /graphql endpoint falls back to json for it).

_NULL = msgspec.Raw(b"null")
_NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]
# A count (larger ones, which no answer has, take the general path).
_Count = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]


class _Upserted(Upsert, gc=False):
    """An upserted item as the reader decodes it: its ids, checked; `data` is filled in with
    the item's raw JSON afterwards. No GraphQL response key holds a colon, so no field of
    upstream's is ever read into `data`."""

    sentera_id: _NonEmpty
    content_hash: _NonEmpty
    data: str = msgspec.field(default="", name="mirrord:data")


class _UpsertedImage(_Upserted, gc=False):
    """An upserted image whose file is wanted: also its size and signed URL (any JSON)."""

    size: Any = None
    url: Any = None


class _AnswerReader:
    """Reads one query's answers (see above): `read` gives a SyncAnswer, or None to say the
    answer needs the general path."""

    def __init__(self, query: SyncQuery, files: bool) -> None:
        self.query = query
        self.files = files
        field_name = query.field
        # Only the keys a GraphQL answer to the query can hold: every byte of an answer the
        # reader accepts is then checked by what reads it (see `read`).
        result = msgspec.defstruct(
            "Result",
            [
                ("remaining_count", _Count),
                ("upserted", list[msgspec.Raw]),
                ("deleted", msgspec.Raw),
                ("failed", msgspec.Raw, _NULL),
            ],
            forbid_unknown_fields=True,
        )
        data = msgspec.defstruct("Data", [(field_name, result)], forbid_unknown_fields=True)
        page = msgspec.defstruct(
            "Page",
            [("data", data), ("errors", msgspec.Raw, _NULL), ("extensions", msgspec.Raw, _NULL)],
            forbid_unknown_fields=True,
        )
        self._pages: msgspec.json.Decoder[Any] = msgspec.json.Decoder(page)
        item_list = list[_UpsertedImage] if files else list[_Upserted]
        item_result = msgspec.defstruct("ItemResult", [("upserted", item_list)])
        item_data = msgspec.defstruct("ItemData", [(field_name, item_result)])
        items = msgspec.defstruct("Items", [("data", item_data)])
        self._items: msgspec.json.Decoder[Any] = msgspec.json.Decoder(items)

    def read(self, raw: bytes) -> SyncAnswer | None:
        # msgspec checks the JSON syntax of the whole answer, not the UTF-8 or the range of
        # numbers in what it skips; orjson refuses both anywhere. So every part is also read
        # by something that checks them: each item's text is decoded from UTF-8 (its numbers
        # are kept as written), the rest is small and parsed again by orjson.
        field_name = self.query.field
        try:
            page = self._pages.decode(raw)
            items: list[Any] = getattr(self._items.decode(raw).data, field_name).upserted
            errors = orjson.loads(memoryview(page.errors))
            orjson.loads(memoryview(page.extensions))
            result = getattr(page.data, field_name)
            parts = {
                "deleted": orjson.loads(memoryview(result.deleted)),
                "failed": orjson.loads(memoryview(result.failed)),
            }
            deleted = _item_list(self.query, parts, "deleted", allow_empty_id=True)
            failed = _failures(self.query, parts)
            if errors:
                return None
            for item, text in zip(items, result.upserted, strict=True):
                item.data = str(text, "utf-8")
        except (msgspec.DecodeError, ProtocolError, ValueError):
            # ValueError: orjson's JSONDecodeError, UnicodeDecodeError, and zip(strict=True)
            # should the two passes ever disagree on the number of items.
            return None
        wants = (
            [_file_want(i.sentera_id, i.content_hash, i.size, i.url) for i in items]
            if self.files
            else []
        )
        return SyncAnswer(
            items,
            [(i["sentera_id"], i["content_hash"]) for i in deleted],
            failed,
            result.remaining_count,
            wants,
        )


@cache
def _reader(query: SyncQuery, files: bool) -> _AnswerReader:
    return _AnswerReader(query, files)


def _item_list(
    query: SyncQuery, result: dict[str, Any], name: str, allow_empty_id: bool = False
) -> list[dict[str, Any]]:
    items = result.get(name)
    if not isinstance(items, list):
        raise ProtocolError(f"upstream answer: {query.field}.{name} is not a list")
    for n, item in enumerate(items):
        # The common case in one cheap test; the detailed one only to word the error.
        if type(item) is dict:
            sid, chash = item.get("sentera_id"), item.get("content_hash")
            if type(sid) is str and type(chash) is str and chash and (sid or allow_empty_id):
                continue
        raise ProtocolError(_item_problem(f"{query.field}.{name}[{n}]", item, allow_empty_id))
    return items


def _item_problem(where: str, item: Any, allow_empty_id: bool) -> str:
    if not isinstance(item, dict):
        return f"upstream answer: {where} is not an object"
    sid = item.get("sentera_id")
    if not isinstance(sid, str) or not (sid or allow_empty_id):
        return f"upstream answer: {where} has no sentera_id"
    return f"upstream answer: {where} ({sid}) has no content_hash"


def _failures(query: SyncQuery, result: dict[str, Any]) -> list[Failure]:
    failed = result.get("failed") or []
    if not isinstance(failed, list):
        raise ProtocolError(f"upstream answer: {query.field}.failed is not a list")
    out = []
    for n, entry in enumerate(failed):
        if not isinstance(entry, dict) or not isinstance(entry.get("key"), str):
            raise ProtocolError(f"upstream answer: {query.field}.failed[{n}] has no key")
        out.append(
            Failure(
                key=entry["key"],
                message=str(entry.get("message") or ""),
                code=None if entry.get("code") is None else str(entry["code"]),
                reason=None if entry.get("reason") is None else str(entry["reason"]),
                details=entry.get("details"),
            )
        )
    return out
