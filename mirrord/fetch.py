"""A lean HTTP/1.1 GET client for image files: a body goes from the socket to its sink in one
reused buffer per connection, without a bytes object per chunk.

aiohttp spent about twice curl's CPU per MB on file downloads (bench/files_bench.py): its
per-request machinery, a StreamReader, a new bytes object for every body buffer and a timeout
rescheduled per buffer. Here each connection is an asyncio BufferedProtocol: the transport
receives into the connection's buffer, and the sink (the downloader's write to the part file)
gets a memoryview of what arrived. httptools (llhttp, the parser of Node.js) parses the heads
of answers, and the bodies it must frame (chunked, or delimited by the close); a Content-Length
body, what file servers and CDNs send, streams straight from the buffer. The stall timeout is
one timer per `timeout` seconds, not one per buffer.

What it does, as aiohttp did for the downloader: keep-alive connections (at most `connections`
idle ones kept), a request retried once on a fresh connection when a kept-alive one turns out
closed before any answer, redirects followed, https with the default certificate checks, a
timeout on connecting and on a link that stops moving. No cookies, proxies or credentials:
signed file URLs carry their own authorization.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager

import httptools
import yarl

BUFFER = 256 * 1024  # bytes a connection receives at once
HEAD_READ = 16 * 1024  # bytes received at once while a head is awaited (see get_buffer)
MAX_REDIRECTS = 10
_REDIRECTS = frozenset({301, 302, 303, 307, 308})

Sink = Callable[[memoryview], None]  # takes a body's bytes as they come; may raise to stop
_Origin = tuple[str, str, int]  # scheme, host, port


class FetchError(Exception):
    """The link or the server failed the exchange. The sink's own exceptions pass unchanged."""


class Answer:
    """An answer's head (header names in lower case); `read_into` streams its body, once."""

    def __init__(self, status: int, headers: dict[str, str], connection: _Connection) -> None:
        self.status = status
        self.headers = headers
        self._connection = connection

    async def read_into(self, sink: Sink) -> None:
        """Hand the body to `sink` as it arrives; returns once it is complete."""
        await self._connection.read_body(sink)


class Client:
    """`async with client.get(url, headers) as answer: await answer.read_into(sink)`."""

    def __init__(self, *, timeout: float, connections: int, user_agent: str) -> None:
        self.timeout = timeout
        self.connections = connections
        self._headers = {"User-Agent": user_agent, "Accept": "*/*"}
        self._idle: dict[_Origin, list[_Connection]] = {}
        self._ssl: ssl.SSLContext | None = None

    async def close(self) -> None:
        for idle in self._idle.values():
            for connection in idle:
                connection.close()
        self._idle.clear()

    @asynccontextmanager
    async def get(self, url: str, headers: Mapping[str, str]) -> AsyncIterator[Answer]:
        """An answer to GET url, after redirects. Raises FetchError and TimeoutError."""
        for _ in range(MAX_REDIRECTS + 1):
            answer = await self._exchange(url, {**self._headers, **headers})
            location = answer.headers.get("location")
            if answer.status in _REDIRECTS and location:
                answer._connection.close()  # its body is of no interest
                url = str(yarl.URL(url).join(yarl.URL(location)))
                continue
            try:
                yield answer
            finally:
                self._release(answer._connection)
            return
        raise FetchError(f"more than {MAX_REDIRECTS} redirects")

    async def _exchange(self, url: str, headers: Mapping[str, str]) -> Answer:
        try:
            parsed = yarl.URL(url)  # as aiohttp sent it: path and query re-quoted where needed
        except ValueError as e:
            raise FetchError(f"not a valid URL: {e}") from None
        if parsed.scheme not in ("http", "https") or not parsed.raw_host or parsed.port is None:
            raise FetchError(f"not an http(s) URL: {parsed.scheme}://{parsed.host}")
        origin = (parsed.scheme, parsed.raw_host, parsed.port)
        host = parsed.host_port_subcomponent or parsed.raw_host
        request = _request(parsed.raw_path_qs, {"Host": host, **headers})
        for fresh in (False, True):
            connection = None if fresh else self._kept(origin)
            reused = connection is not None
            if connection is None:
                connection = await self._connect(origin)
            try:
                return await connection.request(request)
            except FetchError:
                connection.close()
                # A kept-alive connection the server closed meanwhile: once more, on a new one.
                if not reused or connection.answered:
                    raise
            except BaseException:
                connection.close()
                raise
        raise AssertionError("unreachable")

    def _kept(self, origin: _Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        while idle:
            connection = idle.pop()
            if connection.reusable:
                return connection
            connection.close()
        return None

    def _release(self, connection: _Connection) -> None:
        kept = sum(map(len, self._idle.values()))
        if connection.reusable and kept < self.connections:
            self._idle.setdefault(connection.origin, []).append(connection)
        else:
            connection.close()

    async def _connect(self, origin: _Origin) -> _Connection:
        scheme, host, port = origin
        context = None
        if scheme == "https":
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            context = self._ssl
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeout):
                _, connection = await loop.create_connection(
                    lambda: _Connection(origin, self.timeout), host, port, ssl=context
                )
        except TimeoutError:
            raise FetchError(f"cannot connect to {host}: no answer in {self.timeout:g} s") from None
        except OSError as e:  # refused, unreachable, name unknown, certificate refused
            raise FetchError(f"cannot connect to {host}: {e.strerror or e}") from None
        return connection


def _request(target: str, headers: Mapping[str, str]) -> bytes:
    parts = [target, *headers, *headers.values()]
    if any("\r" in part or "\n" in part or not part.isascii() for part in parts):
        raise FetchError("a line break or a non-ASCII character in a request header")
    lines = [f"GET {target} HTTP/1.1", *(f"{name}: {value}" for name, value in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


class _Connection(asyncio.BufferedProtocol):
    """One HTTP/1.1 connection, one exchange at a time: an answer's head, then its body.

    Body bytes that arrive before the caller hands over a sink (those that came with the
    head, mostly) are kept as copies; while a head is awaited the transport receives at most
    HEAD_READ bytes at once, so that copy is small.
    """

    def __init__(self, origin: _Origin, timeout: float) -> None:
        self.origin = origin
        self.timeout = timeout
        self.answered = False  # a byte of the running exchange's answer arrived
        self.reusable = False  # open, idle, the last answer read whole, keep-alive
        self._loop = asyncio.get_running_loop()
        self._array = bytearray(BUFFER)
        self._buffer = memoryview(self._array)
        self._transport: asyncio.Transport | None = None
        self._parser: httptools.HttpResponseParser | None = None  # None: no answer awaited
        self._fields: list[tuple[bytes, bytes]] = []
        self._answer: Answer | None = None  # the head, once complete
        self._left = -1  # bytes of a Content-Length body still to come; -1: the parser frames it
        self._until_close = False  # a body that ends when the connection does
        self._complete = False  # the parser saw the end of the body
        self._early: list[bytes] = []  # body bytes that came before the sink
        self._sink: Sink | None = None
        self._sink_error: Exception | None = None  # what the sink raised inside the parser
        self._keep_alive = False
        self._eof = False
        self._lost = False
        self._waiter: asyncio.Future[None] | None = None
        self._last_read = 0.0
        self._timer: asyncio.TimerHandle | None = None

    # ---- the exchange, from the caller's side -----------------------------------------------

    async def request(self, request: bytes) -> Answer:
        if self._lost or self._eof or self._transport is None:
            raise FetchError("the connection closed")
        self.answered = self.reusable = self._complete = self._until_close = False
        self._parser = httptools.HttpResponseParser(self)
        self._fields, self._answer, self._left, self._early = [], None, -1, []
        self._sink_error = None
        waiter = self._wait()
        self._transport.write(request)
        await waiter
        assert self._answer is not None
        return self._answer

    async def read_body(self, sink: Sink) -> None:
        waiter = self._wait()
        self._sink = sink
        try:
            direct, early, self._early = self._left >= 0, self._early, []
            for data in early:
                if waiter.done():  # bytes past the end of the answer
                    self.close()
                elif direct:
                    self._body(memoryview(data))
                else:
                    sink(memoryview(data))
            if waiter.done():
                pass
            elif self._left == 0 or self._complete:
                self._done()
            elif self._eof or self._lost:
                self._ended()
        except Exception as e:
            self._fail(e)
        await waiter

    def close(self) -> None:
        """Drop the connection, whatever it was doing (the caller stops waiting for it)."""
        self.reusable = False
        self._sink = self._parser = None
        self._left = -1
        if self._timer is not None:
            self._timer.cancel()
        if self._transport is not None:
            self._transport.abort()

    # ---- asyncio's side ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        # Awaiting a head: a small read, so that little body comes with it (it must be copied:
        # the buffer is reused before the caller hands over a sink).
        return self._buffer[:HEAD_READ] if self._answer is None else self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        self._last_read = self._loop.time()
        self.answered = True
        data = self._buffer[:nbytes]
        try:
            if self._left >= 0:
                if self._sink is not None:
                    self._body(data)
                else:
                    self._early.append(data.tobytes())
            elif self._parser is None:
                raise FetchError("the server sent bytes while nothing was asked")
            elif self._answer is None:
                self._receive_head(nbytes)
            else:
                self._parse(data)
        except Exception as e:
            self._fail(e)

    def eof_received(self) -> bool:
        self._eof = True
        self.reusable = False
        if self._answer is None or self._sink is not None:
            try:
                self._ended()
            except Exception as e:
                self._fail(e)
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self.reusable = False
        waiter = self._waiter
        streaming = self._answer is None or self._sink is not None
        if waiter is not None and not waiter.done() and streaming:
            reason = f": {exc}" if exc is not None else ""
            self._fail(FetchError(f"the connection closed before the end of the answer{reason}"))

    # ---- the answer ----------------------------------------------------------------------------

    def _receive_head(self, nbytes: int) -> None:
        """The parser gets the head, and no more when the body can stream directly."""
        start = 0
        while start < nbytes and self._answer is None:
            end = self._array.find(b"\r\n\r\n", start, nbytes)  # the end of a head, likely
            stop = nbytes if end < 0 else end + 4
            self._parse(self._buffer[start:stop])
            start = stop
        if start < nbytes:
            if self._left >= 0:
                self._early.append(self._buffer[start:nbytes].tobytes())
            else:
                self._parse(self._buffer[start:nbytes])

    def _parse(self, data: memoryview) -> None:
        assert self._parser is not None
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as e:
            if self._sink_error is not None:
                raise self._sink_error from None
            raise FetchError(f"not a valid HTTP answer: {e.__context__ or e}") from None
        except httptools.HttpParserError as e:
            raise FetchError(f"not a valid HTTP answer: {e}") from None

    # httptools' callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        self._fields.append((name, value))

    def on_headers_complete(self) -> None:
        assert self._parser is not None
        status = self._parser.get_status_code()
        if status < 200:  # 100 Continue and the like: the answer comes after it
            self._fields = []
            return
        headers: dict[str, str] = {}
        for name, value in self._fields:
            key = name.decode("latin-1").lower()
            text = value.decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        self._answer = Answer(status, headers, self)
        self._keep_alive = self._parser.should_keep_alive()
        length = headers.get("content-length")
        if "transfer-encoding" not in headers and length is not None:
            if 200 <= status < 300 and status != 204:
                self._left = int(length)  # the parser checked it: digits, one value
                self._parser = None  # the body streams straight to the sink
        else:
            self._until_close = "transfer-encoding" not in headers
        self._resolve()

    def on_body(self, body: bytes) -> None:
        if self._answer is None:
            return  # an informational answer's, if any
        if self._left >= 0 or self._sink is None:
            self._early.append(body)  # past a head split across reads, or before the sink
        else:
            try:
                self._sink(memoryview(body))
            except Exception as e:
                self._sink_error = e
                raise

    def on_message_complete(self) -> None:
        if self._answer is None or self._left >= 0:
            return  # an informational answer; or a head split across reads (we count)
        self._complete = True
        if self._sink is not None:
            self._done()

    def _body(self, data: memoryview) -> None:
        left = self._left
        if len(data) > left:  # more than the answer: no exchange of ours is that long
            self._keep_alive = False
            data = data[:left]
        self._left = left - len(data)
        assert self._sink is not None
        self._sink(data)
        if self._left == 0:
            self._done()

    def _ended(self) -> None:
        """The connection closed: the end of the body, if the body ends so; else an error."""
        if self._answer is not None and self._until_close and self._left < 0:
            self._done()
        elif self._waiter is not None and not self._waiter.done():
            raise FetchError("the connection closed before the end of the answer")

    def _done(self) -> None:
        self._sink = self._parser = None
        self._left = -1
        self.reusable = self._keep_alive and not self._eof and not self._lost
        if not self.reusable and self._transport is not None:
            self._transport.close()
        self._resolve()

    def _fail(self, exc: Exception) -> None:
        waiter = self._waiter
        self.close()
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    # ---- waiting, and the stall timeout -------------------------------------------------------

    def _wait(self) -> asyncio.Future[None]:
        self._waiter = self._loop.create_future()
        self._last_read = self._loop.time()
        self._timer = self._loop.call_at(self._last_read + self.timeout, self._watch)
        return self._waiter

    def _resolve(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _watch(self) -> None:
        """No byte for `timeout` seconds: the link stopped moving."""
        due = self._last_read + self.timeout
        if self._loop.time() < due:
            self._timer = self._loop.call_at(due, self._watch)
        else:
            self._fail(TimeoutError(f"no data for {self.timeout:g} s"))
