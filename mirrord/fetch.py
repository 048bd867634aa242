"""A lean, blocking HTTP/1.1 GET client for image files, run in the downloader's threads: a
body goes from the socket straight into the caller's buffer (`Answer.readinto`), like a file.

Why blocking, in threads: the downloader (mirrord.files) fills one page-aligned buffer per
download and writes it to the part file with O_DIRECT, so the fsync before publishing has
next to nothing left to write back. On the event loop those writes would block every other
download and the HTTP API; handing each buffer from the loop to a thread cost more CPU in GIL
hand-offs than O_DIRECT saved (measured; bench/files_bench.py). A thread that owns its
download end to end reads and writes with the GIL released, in a few Python steps per MiB.

httptools (llhttp, the parser of Node.js) parses the heads of answers, and the bodies it must
frame (chunked, or delimited by the close); a Content-Length body, what file servers and CDNs
send, is received straight into the caller's buffer.

What it does: keep-alive connections (at most `connections` idle ones kept, shared by the
threads), a request retried once on a fresh connection when a kept-alive one turns out closed
before any answer, redirects followed, https with the default certificate checks, a timeout on
connecting and on a link that stops moving (per read: no total timeout, a large file on a slow
link takes as long as it takes), and `Abort`: another thread (the event loop) stops a running
exchange at once. No cookies, proxies or credentials: signed file URLs carry their own
authorization.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import httptools
import yarl

HEAD_READ = 16 * 1024  # bytes received at once while a head is awaited; also framed bodies'
MAX_REDIRECTS = 10
_REDIRECTS = frozenset({301, 302, 303, 307, 308})

_Origin = tuple[str, str, int]  # scheme, host, port


class FetchError(Exception):
    """The link or the server failed the exchange, or it was stopped (`Abort`)."""


class Abort:
    """Stops an exchange from another thread: the socket it uses is shut down, so a blocked
    connect, handshake, read or write returns at once, and it makes no new connection."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._socket: socket.socket | None = None
        self.aborted = False

    def abort(self) -> None:
        with self._lock:
            self.aborted = True
            if self._socket is not None:
                _shut(self._socket)

    def _unwatch(self) -> None:
        """Before the exchange closes its socket: an abort then can no longer reach a
        descriptor that the number was given to again."""
        with self._lock:
            self._socket = None

    def _watch(self, sock: socket.socket) -> None:
        """The socket the exchange now waits on. Raises once aborted."""
        with self._lock:
            self._socket = sock
            if self.aborted:
                _shut(sock)
                raise FetchError("stopped")


class Answer:
    """An answer's head (header names in lower case); `readinto` reads its body."""

    def __init__(
        self,
        connection: _Connection,
        status: int,
        headers: dict[str, str],
        body: _Counted | _Framed,
    ) -> None:
        self.status = status
        self.headers = headers
        self._connection = connection
        self._body = body

    def readinto(self, buffer: memoryview) -> int:
        """Fill `buffer` with the body's next bytes (at most len(buffer)); 0 at its end.
        Raises FetchError and TimeoutError."""
        return self._body.readinto(buffer)

    def readable(self, timeout: float) -> bool:
        """Whether readinto would return at once, waiting at most `timeout` seconds to know."""
        return self._body.readable(timeout)


class Client:
    """`with client.get(url, headers) as answer:` then `answer.readinto(buffer)` until 0.
    Safe to use from several threads at once."""

    def __init__(self, *, timeout: float, connections: int, user_agent: str) -> None:
        self.timeout = timeout
        self.connections = connections
        self._headers = {"User-Agent": user_agent, "Accept": "*/*"}
        self._idle: dict[_Origin, list[_Connection]] = {}
        self._lock = threading.Lock()
        self._ssl: ssl.SSLContext | None = None

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection in connections:
                connection.close()

    @contextmanager
    def get(
        self, url: str, headers: Mapping[str, str], abort: Abort | None = None
    ) -> Iterator[Answer]:
        """An answer to GET url, after redirects. Raises FetchError and TimeoutError."""
        abort = abort or Abort()
        for _ in range(MAX_REDIRECTS + 1):
            answer = self._exchange(url, {**self._headers, **headers}, abort)
            location = answer.headers.get("location")
            if answer.status in _REDIRECTS and location:
                abort._unwatch()
                answer._connection.close()  # its body is of no interest
                url = str(yarl.URL(url).join(yarl.URL(location)))
                continue
            try:
                yield answer
            finally:
                abort._unwatch()
                self._release(answer._connection, abort)
            return
        raise FetchError(f"more than {MAX_REDIRECTS} redirects")

    def _exchange(self, url: str, headers: Mapping[str, str], abort: Abort) -> Answer:
        try:
            parsed = yarl.URL(url)  # path and query re-quoted where needed, as aiohttp does
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
                connection = self._connect(origin, abort)
            try:
                abort._watch(connection.socket)
                return connection.request(request, self.timeout)
            except FetchError:
                abort._unwatch()
                connection.close()
                # A kept-alive connection the server closed meanwhile: once more, on a new one.
                if not reused or connection.answered or abort.aborted:
                    raise
            except BaseException:
                abort._unwatch()
                connection.close()
                raise
        raise AssertionError("unreachable")

    def _kept(self, origin: _Origin) -> _Connection | None:
        with self._lock:
            idle = self._idle.get(origin)
            return idle.pop() if idle else None

    def _release(self, connection: _Connection, abort: Abort) -> None:
        if connection.reusable and not abort.aborted:
            with self._lock:
                if sum(map(len, self._idle.values())) < self.connections:
                    self._idle.setdefault(connection.origin, []).append(connection)
                    return
        connection.close()

    def _connect(self, origin: _Origin, abort: Abort) -> _Connection:
        scheme, host, port = origin
        try:
            addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as e:  # the name is unknown, or no resolver answers
            raise FetchError(f"cannot connect to {host}: {e.strerror or e}") from None
        reason = "no address"
        for family, kind, protocol, _, address in addresses:
            sock = socket.socket(family, kind, protocol)
            try:
                abort._watch(sock)
                sock.settimeout(self.timeout)
                sock.connect(address)
                if scheme == "https":
                    sock = self._handshake(sock, host, abort)
                return _Connection(origin, sock)
            except FetchError:
                abort._unwatch()
                sock.close()
                raise
            except TimeoutError:
                abort._unwatch()
                sock.close()
                reason = f"no answer in {self.timeout:g} s"
            except OSError as e:  # refused, unreachable, certificate refused
                abort._unwatch()
                sock.close()
                reason = str(e) if isinstance(e, ssl.SSLError) else e.strerror or str(e)
            if abort.aborted:
                raise FetchError("stopped")
        raise FetchError(f"cannot connect to {host}: {reason}")

    def _handshake(self, sock: socket.socket, host: str, abort: Abort) -> socket.socket:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        wrapped = self._ssl.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False)
        abort._watch(wrapped)  # the same descriptor; `sock` no longer holds it
        try:
            wrapped.do_handshake()
        except BaseException:
            abort._unwatch()
            wrapped.close()
            raise
        return wrapped


def _request(target: str, headers: Mapping[str, str]) -> bytes:
    parts = [target, *headers, *headers.values()]
    if any("\r" in part or "\n" in part or not part.isascii() for part in parts):
        raise FetchError("a line break or a non-ASCII character in a request header")
    lines = [f"GET {target} HTTP/1.1", *(f"{name}: {value}" for name, value in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def _shut(sock: socket.socket) -> None:
    # The plain socket's shutdown, also for an SSLSocket: its own would touch the TLS state
    # that the reading thread is using.
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


class _Connection:
    """One HTTP/1.1 connection, one exchange at a time: an answer's head, then its body."""

    def __init__(self, origin: _Origin, sock: socket.socket) -> None:
        self.origin = origin
        self.socket = sock
        self.answered = False  # a byte of the running exchange's answer arrived
        self.reusable = False  # the last answer read whole, keep-alive, open
        self._array = bytearray(HEAD_READ)
        self.buffer = memoryview(self._array)
        self.timeout = 0.0

    def close(self) -> None:
        self.reusable = False
        with contextlib.suppress(OSError):
            self.socket.close()

    def request(self, request: bytes, timeout: float) -> Answer:
        self.answered = self.reusable = False
        self.timeout = timeout
        try:
            self.socket.sendall(request)
        except TimeoutError:
            raise TimeoutError(f"no progress for {timeout:g} s") from None
        except OSError as e:
            raise FetchError(f"the connection failed: {e.strerror or e}") from None
        return self._head()

    def receive(self, buffer: memoryview) -> int:
        """Bytes received into buffer; 0 when the server closed the connection."""
        try:
            return self.socket.recv_into(buffer)
        except TimeoutError:
            raise TimeoutError(f"no data for {self.timeout:g} s") from None
        except OSError as e:
            raise FetchError(f"the connection failed: {e.strerror or e}") from None

    def readable(self, timeout: float) -> bool:
        if isinstance(self.socket, ssl.SSLSocket) and self.socket.pending():
            return True  # already decrypted, in the TLS layer's buffer
        poll = select.poll()
        try:
            poll.register(self.socket, select.POLLIN)
            return bool(poll.poll(max(0, int(timeout * 1000))))
        except (OSError, ValueError):
            return True  # closed or failing: readinto says how

    def _head(self) -> Answer:
        """Read up to the end of an answer's head (past informational ones). The parser gets
        the head, and no more when a Content-Length body can be received directly."""
        parse = _Parse()
        parser = httptools.HttpResponseParser(parse)
        parse.parser = parser
        while parse.head is None:
            n = self.receive(self.buffer)
            if n == 0:
                raise FetchError("the connection closed before the end of the answer")
            self.answered = True
            start = 0
            while start < n and parse.head is None:
                end = self._array.find(b"\r\n\r\n", start, n)  # the end of a head, likely
                stop = n if end < 0 else end + 4
                parse.feed(self.buffer[start:stop])
                start = stop
        status, headers = parse.head
        rest = bytes(self.buffer[start:n])
        length = headers.get("content-length")
        body: _Counted | _Framed
        if "transfer-encoding" not in headers and length is not None and 200 <= status < 300:
            early = b"".join(parse.body) + rest  # the parser counted the length: digits, one
            body = _Counted(self, int(length), early, parse.keep_alive)
        else:
            until_close = "transfer-encoding" not in headers and length is None
            body = _Framed(self, parse, until_close)
            if rest:
                parse.feed(memoryview(rest))
        return Answer(self, status, headers, body)


class _Parse:
    """httptools' callbacks: the head of the answer (past informational ones), then the
    pieces of a body it frames."""

    def __init__(self) -> None:
        self.parser: httptools.HttpResponseParser | None = None
        self.fields: list[tuple[bytes, bytes]] = []
        self.head: tuple[int, dict[str, str]] | None = None
        self.keep_alive = False
        self.body: list[bytes] = []
        self.complete = False

    def feed(self, data: memoryview) -> None:
        assert self.parser is not None
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            raise FetchError(f"not a valid HTTP answer: {e.__context__ or e}") from None

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields.append((name, value))

    def on_headers_complete(self) -> None:
        assert self.parser is not None
        status = self.parser.get_status_code()
        if status < 200:  # 100 Continue and the like: the answer comes after it
            self.fields = []
            return
        headers: dict[str, str] = {}
        for name, value in self.fields:
            key = name.decode("latin-1").lower()
            text = value.decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        self.head = (status, headers)
        self.keep_alive = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        if self.head is not None:  # not an informational answer's
            self.body.append(body)

    def on_message_complete(self) -> None:
        if self.head is not None:
            self.complete = True


class _Body:
    """What the two kinds of body share: their connection, and how it ends."""

    def __init__(self, connection: _Connection) -> None:
        self._connection = connection

    def _end(self, keep_alive: bool) -> int:
        self._connection.reusable = keep_alive
        return 0


class _Counted(_Body):
    """A Content-Length body: received straight into the caller's buffer, never past its end
    (bytes past it in the first read cost the connection)."""

    def __init__(self, connection: _Connection, length: int, early: bytes, keep: bool) -> None:
        super().__init__(connection)
        if len(early) > length:  # more than the answer: no exchange of ours is that long
            early, keep = early[:length], False
        self._left = length
        self._early = memoryview(early)
        self._keep_alive = keep

    def readinto(self, buffer: memoryview) -> int:
        if self._left == 0:
            return self._end(self._keep_alive)
        if self._early:
            n = min(len(buffer), len(self._early))
            buffer[:n] = self._early[:n]
            self._early = self._early[n:]
        else:
            n = self._connection.receive(buffer[: min(len(buffer), self._left)])
            if n == 0:
                raise FetchError("the connection closed before the end of the answer")
        self._left -= n
        if self._left == 0:
            self._connection.reusable = self._keep_alive
        return n

    def readable(self, timeout: float) -> bool:
        return bool(self._early) or self._left == 0 or self._connection.readable(timeout)


class _Framed(_Body):
    """A body the parser frames (chunked), or that ends with the connection."""

    def __init__(self, connection: _Connection, parse: _Parse, until_close: bool) -> None:
        super().__init__(connection)
        self._parse = parse
        self._until_close = until_close
        self._pending = memoryview(b"")

    def readinto(self, buffer: memoryview) -> int:
        while not self._pending:
            if self._parse.body:
                self._pending = memoryview(b"".join(self._parse.body))
                self._parse.body.clear()
            elif self._parse.complete:
                return self._end(self._parse.keep_alive and not self._until_close)
            else:
                self._receive()
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def readable(self, timeout: float) -> bool:
        parse = self._parse
        ready = self._pending or parse.body or parse.complete
        return bool(ready) or self._connection.readable(timeout)

    def _receive(self) -> None:
        connection = self._connection
        n = connection.receive(connection.buffer)
        if n == 0:
            if not self._until_close:
                raise FetchError("the connection closed before the end of the answer")
            self._parse.complete = True
        else:
            self._parse.feed(connection.buffer[:n])
