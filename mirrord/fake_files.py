"""The fake upstream's file side: image bytes at the signed `url`s, with Range and file faults.

Real FieldAgent image URLs are pre-signed CDN URLs (S3/CloudFront style): the signature is the
only auth (no bearer token), it covers the image id and the expiry, and the CDN serves whatever
the image's file is *now*. So a URL signed before an update still works and serves the new
bytes; a client tells versions apart by `ETag` (the content_hash), not by the URL.

This module holds what does not need FakeData or the server's state: the deterministic bytes,
Range parsing, the file faults and the streaming. FakeUpstream wires it to `/files/{id}`.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import socket
import struct
import time
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from random import Random
from typing import Any

from aiohttp import web

__all__ = [
    "CHUNK",
    "FILE_FAULT_KINDS",
    "FileFault",
    "FileFaults",
    "FileRequest",
    "ServedFile",
    "file_chunks",
    "serve_file",
]

CHUNK = 64 * 1024  # generation and write unit; a cut or a throttle acts within it
_HEADER = 16  # each chunk starts with 8 bytes of the file's digest and its 8-byte index
_POOL_SIZE = 1 << 20
_POOL_STRIDE = 40_503  # not a divisor of anything nearby: consecutive chunks use far windows


# --------------------------------------------------------------------------------------------
# Deterministic bytes
# --------------------------------------------------------------------------------------------


@functools.cache
def _pool() -> memoryview:
    # Random.randbytes makes ~240 MB/s, too slow to serve a benchmark at ~1 GB/s; windows of
    # one random pool cost a memcpy. A memoryview so slicing it copies nothing.
    return memoryview(Random(0x5EED).randbytes(_POOL_SIZE))


def file_chunks(
    sentera_id: str, content_hash: str, size: int, start: int = 0, stop: int | None = None
) -> Iterator[bytes]:
    """Bytes [start, stop) of a file, in pieces that never cross a CHUNK boundary.

    Chunk i is the file's digest tag, i, then a window of the random pool that depends on
    (file, i): so every (sentera_id, content_hash) has its own bytes, an update changes them,
    and a download resumed at the wrong offset never matches (no two chunks are alike).
    """
    stop = size if stop is None else min(stop, size)
    digest = hashlib.blake2b(f"{sentera_id}\0{content_hash}".encode(), digest_size=16).digest()
    tag, base = digest[:8], int.from_bytes(digest[8:], "big")
    pool = _pool()
    index = start // CHUNK
    while start < stop:
        window = (base + index * _POOL_STRIDE) % (_POOL_SIZE - CHUNK)
        chunk = tag + index.to_bytes(8, "big") + pool[window : window + CHUNK - _HEADER]
        lo, hi = start - index * CHUNK, min(CHUNK, stop - index * CHUNK)
        yield chunk if (lo, hi) == (0, CHUNK) else chunk[lo:hi]
        index += 1
        start = index * CHUNK


# --------------------------------------------------------------------------------------------
# File faults
# --------------------------------------------------------------------------------------------

# kind -> {param: (default, smallest allowed)}
_FILE_FAULT_PARAMS: dict[str, dict[str, tuple[float | None, float]]] = {
    "cut": {"after": (None, 0)},  # None: half the body
    "status": {"code": (503, 400), "retry_after": (None, 0)},
    "slow": {"rate": (100_000, 1)},
    "hang": {"seconds": (60, 0)},
}
FILE_FAULT_KINDS: frozenset[str] = frozenset(_FILE_FAULT_PARAMS)


@dataclass(frozen=True)
class FileFault:
    """One file fault: `cut` (send `after` body bytes, then close the connection), `status`
    (answer `code`, default 503, with `retry_after` if given), `slow` (send at `rate`
    bytes/s), `hang` (send the headers, then nothing for `seconds`, then the body)."""

    kind: str
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        allowed = _FILE_FAULT_PARAMS.get(self.kind)
        if allowed is None:
            raise ValueError(f"unknown file fault {self.kind!r}; known: {sorted(FILE_FAULT_KINDS)}")
        unknown = set(self.params) - set(allowed)
        if unknown:
            raise ValueError(f"file fault {self.kind!r} takes no {sorted(unknown)}")
        for name, value in self.params.items():
            if not _is_number(value) or value < allowed[name][1]:
                raise ValueError(f"file fault {self.kind}.{name} must be >= {allowed[name][1]}")
        if self.kind == "status" and self.param("code") > 599:
            raise ValueError("file fault status.code must be 400-599")

    def param(self, name: str) -> Any:
        return self.params.get(name, _FILE_FAULT_PARAMS[self.kind][name][0])


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class FileFaults:
    """Failures of `/files/` downloads, apart from /graphql's `Faults` (a download takes none
    of those; only `Faults.offline`, the link itself being down, drops both).

    Queued faults are one-shot and strike, in order, the GETs that would send file bytes (200
    or 206): a HEAD or a refusal (403, 404, 416) takes none, so a fault hits the download it
    was meant for. Persistent switches: `ranges` False ignores Range and If-Range and always
    sends the whole file with 200 and no Accept-Ranges, like servers without range support;
    `rate` caps every file body at that many bytes/s (None: full speed); `chunked` sends
    bodies with chunked transfer coding and no Content-Length, like servers that stream what
    they generate.
    """

    def __init__(self) -> None:
        self.ranges = True
        self.rate: float | None = None
        self.chunked = False
        self._queue: deque[FileFault] = deque()

    def push(self, kind: str, times: int = 1, **params: Any) -> None:
        self._queue.extend([FileFault(kind, dict(params))] * times)

    def clear(self) -> None:
        self.ranges = True
        self.rate = None
        self.chunked = False
        self._queue.clear()

    @property
    def queued(self) -> int:
        return len(self._queue)

    def next(self) -> FileFault | None:
        return self._queue.popleft() if self._queue else None

    def state(self) -> dict[str, Any]:
        return {
            "queued": self.queued,
            "ranges": self.ranges,
            "rate": self.rate,
            "chunked": self.chunked,
        }

    def apply(self, body: Mapping[str, Any]) -> None:
        """A control-API change: {"clear", "push": [{"kind", "times", ...}], "ranges", "rate",
        "chunked"}."""
        if body.get("clear"):
            self.clear()
        if "ranges" in body:
            self.ranges = bool(body["ranges"])
        if "chunked" in body:
            self.chunked = bool(body["chunked"])
        if "rate" in body:
            rate = body["rate"]
            if rate is not None and (not _is_number(rate) or rate <= 0):
                raise ValueError("rate must be a positive number of bytes/s, or null")
            self.rate = rate
        for entry in body.get("push", []):
            params = dict(entry)
            self.push(str(params.pop("kind", "")), int(params.pop("times", 1)), **params)


@dataclass
class FileRequest:
    """One /files request as the fake saw it. status None: dropped unanswered (offline);
    bytes_sent counts body bytes handed to the socket, updated while the body streams;
    `client_port` tells the client's connections apart."""

    method: str
    sentera_id: str
    range_header: str | None
    status: int | None = None
    bytes_sent: int = 0
    fault: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    client_port: int | None = None


# --------------------------------------------------------------------------------------------
# Serving
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServedFile:
    """The current file of an image, as far as serving it goes."""

    sentera_id: str
    content_hash: str
    size: int
    filename: str

    @property
    def etag(self) -> str:
        return f'"{self.content_hash}"'

    @property
    def content_type(self) -> str:
        suffix = self.filename.rpartition(".")[2].lower() if "." in self.filename else ""
        return _CONTENT_TYPES.get(suffix, "application/octet-stream")


_CONTENT_TYPES = {
    "jpg": "image/jpeg",
    "jpeg": "image/jpeg",
    "tif": "image/tiff",
    "tiff": "image/tiff",
}


def s3_error(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    """A short error body in S3's shape, as a CDN in front of S3 answers."""
    body = f"<Error><Code>{code}</Code><Message>{message}</Message></Error>"
    return web.Response(status=status, text=body, content_type="application/xml", headers=headers)


async def serve_file(
    request: web.Request,
    file: ServedFile,
    faults: FileFaults,
    record: FileRequest,
    stopping: asyncio.Event,
) -> web.StreamResponse:
    """Answer a GET/HEAD whose signature and image have been checked: 200, 206 or 416."""
    span = _span(request, file, faults.ranges)
    if span is None:
        record.status = 416
        headers = {"Content-Range": f"bytes */{file.size}"}
        return s3_error(416, "InvalidRange", "The requested range is not satisfiable", headers)
    fault = faults.next() if request.method == "GET" else None
    record.fault = fault.kind if fault else None
    if fault is not None and fault.kind == "status":
        record.status = int(fault.param("code"))
        return _status_fault(fault)
    response = _file_response(file, span, faults.ranges, faults.chunked)
    record.status = response.status
    await response.prepare(request)
    if request.method == "HEAD":
        return response
    return await _send_body(request, response, file, span, fault, faults.rate, record, stopping)


def _span(request: web.BaseRequest, file: ServedFile, ranges: bool) -> tuple[int, int, bool] | None:
    """(start, stop, partial) of the body to send; None when the Range cannot be satisfied."""
    header = request.headers.get("Range")
    if_range = request.headers.get("If-Range")
    if not ranges or header is None or (if_range is not None and if_range != file.etag):
        # If-Range naming another version: the client's partial copy is stale, send it all.
        return 0, file.size, False
    return parse_range(header, file.size)


def parse_range(header: str, size: int) -> tuple[int, int, bool] | None:
    """One `bytes=a-b`, `bytes=a-` or `bytes=-n` range per RFC 9110 on a file of `size` bytes.

    Several ranges, other units and malformed headers are ignored (the whole file, which the
    RFC allows), a range starting past the end is unsatisfiable (None).
    """
    whole = (0, size, False)
    unit, _, spec = header.partition("=")
    first, dash, last = spec.strip().partition("-")
    if unit.strip().lower() != "bytes" or not dash or "," in spec:
        return whole
    first, last = first.strip(), last.strip()
    a, b = _digits(first), _digits(last)
    if (first and a is None) or (last and b is None):
        return whole  # malformed
    if a is None:  # suffix form: the last b bytes
        if b is None:
            return whole
        return (max(0, size - b), size, True) if b > 0 else None
    if b is not None and b < a:
        return whole  # an invalid range is ignored, not refused
    if a >= size:
        return None
    return a, size if b is None else min(b + 1, size), True


def _digits(text: str) -> int | None:
    # int() would also take "+5", " 5" and "5_0", which a Range header must not contain, and
    # raises on thousands of digits; any 19 digits are past the end of every file anyway.
    if not (text.isascii() and text.isdigit()):
        return None
    return int(text) if len(text) < 19 else 10**18


def _status_fault(fault: FileFault) -> web.Response:
    code = int(fault.param("code"))
    headers = {}
    if fault.param("retry_after") is not None:
        headers["Retry-After"] = str(int(fault.param("retry_after")))
    if code == 503:
        return s3_error(code, "SlowDown", "Please reduce your request rate.", headers)
    return s3_error(code, "InternalError", "We encountered an internal error.", headers)


def _file_response(
    file: ServedFile, span: tuple[int, int, bool], ranges: bool, chunked: bool
) -> web.StreamResponse:
    start, stop, partial = span
    response = web.StreamResponse(status=206 if partial else 200)
    response.content_type = file.content_type
    if chunked:
        response.enable_chunked_encoding()
    else:
        response.content_length = stop - start
    response.headers["ETag"] = file.etag
    if ranges:
        response.headers["Accept-Ranges"] = "bytes"
    if partial:
        response.headers["Content-Range"] = f"bytes {start}-{stop - 1}/{file.size}"
    return response


async def _send_body(
    request: web.BaseRequest,
    response: web.StreamResponse,
    file: ServedFile,
    span: tuple[int, int, bool],
    fault: FileFault | None,
    rate: float | None,
    record: FileRequest,
    stopping: asyncio.Event,
) -> web.StreamResponse:
    start, stop, _ = span
    kind = fault.kind if fault is not None else None
    if fault is not None and kind == "cut":
        stop = start + _cut_length(stop - start, fault.param("after"))
    if fault is not None and kind == "slow":
        rate = min(rate or float("inf"), float(fault.param("rate")))
    if fault is not None and kind == "hang" and await _sleep(stopping, fault.param("seconds")):
        _drop(request)  # shutting down: the link just dies
        return response
    throttle = _Throttle(rate, stopping)
    try:
        for chunk in file_chunks(file.sentera_id, file.content_hash, file.size, start, stop):
            for piece in throttle.pieces(chunk):
                if await throttle.wait(record.bytes_sent + len(piece)):
                    _drop(request)
                    return response
                await response.write(piece)
                record.bytes_sent += len(piece)
    except ConnectionError:
        return response  # the client went away; nothing more to send
    if kind == "cut":
        _drop(request, flush=True)
        return response  # aiohttp cannot finish it: the client sees a short body
    await response.write_eof()
    return response


def _cut_length(length: int, after: float | None) -> int:
    # Never the whole body: a cut must always leave the client with a truncated one.
    return min(length - 1, length // 2 if after is None else int(after))


class _Throttle:
    """Paces a body at `rate` bytes/s: pieces of ~0.1 s, each sent when its last byte is due
    (so the client's last byte arrives after size/rate seconds, not one piece earlier)."""

    def __init__(self, rate: float | None, stopping: asyncio.Event) -> None:
        self.rate = rate
        self.stopping = stopping
        self.started = time.monotonic()
        self.piece = CHUNK if rate is None else max(1, min(CHUNK, int(rate / 10)))

    def pieces(self, chunk: bytes) -> Iterator[bytes]:
        if len(chunk) <= self.piece:
            yield chunk
            return
        view = memoryview(chunk)
        for at in range(0, len(chunk), self.piece):
            yield bytes(view[at : at + self.piece])

    async def wait(self, sent: int) -> bool:
        """Sleep until `sent` bytes are due; True if the server started stopping meanwhile."""
        if self.rate is None:
            return False
        due = self.started + sent / self.rate - time.monotonic()
        return due > 0 and await _sleep(self.stopping, due)


async def _sleep(stopping: asyncio.Event, seconds: float) -> bool:
    """Sleep `seconds`; True if the server started stopping meanwhile."""
    try:
        await asyncio.wait_for(stopping.wait(), seconds)
    except TimeoutError:
        return False
    return True


def _drop(request: web.BaseRequest, *, flush: bool = False) -> None:
    """Kill the connection mid-answer: FIN after what was written (flush), else a reset."""
    transport = request.transport
    if transport is not None:
        sock = transport.get_extra_info("socket")
        if not flush and sock is not None:
            # Linger 0 makes close() send RST instead of FIN, and drops unsent bytes.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        else:
            transport.close()  # close() sends what is buffered first, unlike abort()
