"""The downloader's HTTP client (mirrord/fetch.py) against small real servers on loopback, for
what the fake upstream does not do: redirects, informational answers, bodies that end with the
connection, heads split across reads, kept-alive connections the server closed, answers longer
than they say, https with the default certificate checks, and stopping an exchange from
another thread. The client blocks: it runs in a thread here, as in the downloader."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from aiohttp import web

from mirrord.fetch import Abort, Client, FetchError

pytestmark = pytest.mark.asyncio

Handler = Callable[[asyncio.StreamWriter, bytes, int], Awaitable[None]]


@asynccontextmanager
async def serve(handler: Handler) -> AsyncIterator[tuple[str, list[list[bytes]]]]:
    """A raw HTTP server: `handler(writer, head, n)` answers the n-th request of a connection,
    whose head it is. Yields its base URL and, per connection, the request heads it read."""
    connections: list[list[bytes]] = []
    tasks: set[asyncio.Task[None] | None] = set()

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tasks.add(asyncio.current_task())
        heads: list[bytes] = []
        connections.append(heads)
        try:
            while True:
                heads.append(await reader.readuntil(b"\r\n\r\n"))
                await handler(writer, heads[-1], len(heads))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass  # the client went away, or the test is over
        finally:
            writer.close()

    server = await asyncio.start_server(on_connection, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", connections
    finally:
        server.close()
        for task in tasks:
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in tasks if t is not None))
        await server.wait_closed()


def read_all(
    client: Client, url: str, headers: dict[str, str], abort: Abort | None = None
) -> tuple[int, bytes]:
    """GET url in this (blocking) thread: the status and the whole body, read 7,000 bytes at
    a time, so that reads end anywhere in the server's writes."""
    body = bytearray()
    buffer = memoryview(bytearray(7000))
    with client.get(url, headers, abort) as answer:
        while n := answer.readinto(buffer):
            body += buffer[:n]
    return answer.status, bytes(body)


async def fetch(client: Client, url: str, headers: dict[str, str] | None = None) -> bytes:
    status, body = await asyncio.to_thread(read_all, client, url, headers or {})
    assert status == 200
    return body


def new_client(timeout: float = 5.0) -> Client:
    return Client(timeout=timeout, connections=2, user_agent="test")


async def test_a_body_that_ends_with_the_connection() -> None:
    async def handler(writer: asyncio.StreamWriter, head: bytes, n: int) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b"x" * 100_000)
        await writer.drain()
        writer.close()

    async with serve(handler) as (url, connections):
        client = new_client()
        assert await fetch(client, f"{url}/a") == b"x" * 100_000
        assert await fetch(client, f"{url}/b") == b"x" * 100_000
        client.close()
    assert len(connections) == 2  # not kept: it ended with the body


async def test_redirects_are_followed_with_the_same_headers() -> None:
    async def handler(writer: asyncio.StreamWriter, head: bytes, n: int) -> None:
        if head.startswith(b"GET /here "):
            writer.write(b"HTTP/1.1 302 Found\r\nLocation: /there\r\nContent-Length: 0\r\n\r\n")
        else:
            writer.write(b"HTTP/1.1 206 Partial Content\r\nContent-Length: 3\r\n\r\nabc")

    async with serve(handler) as (url, connections):
        client = new_client()
        status, body = await asyncio.to_thread(
            read_all, client, f"{url}/here", {"Range": "bytes=7-"}
        )
        client.close()
    assert status == 206 and body == b"abc"
    heads = [head for heads in connections for head in heads]
    assert heads[0].startswith(b"GET /here ") and heads[1].startswith(b"GET /there ")
    assert all(b"\r\nRange: bytes=7-\r\n" in head for head in heads)


async def test_an_informational_answer_then_a_head_split_across_reads() -> None:
    async def handler(writer: asyncio.StreamWriter, head: bytes, n: int) -> None:
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)  # the blank line that ends the head comes in the next read
        writer.write(b"\r\nabc")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"def")

    async with serve(handler) as (url, connections):
        client = new_client()
        assert await fetch(client, url) == b"abcdef"
        assert await fetch(client, url) == b"abcdef"
        client.close()
    assert len(connections) == 1  # kept alive


async def test_a_kept_connection_the_server_closed_is_replaced_once() -> None:
    async def handler(writer: asyncio.StreamWriter, head: bytes, n: int) -> None:
        if n > 1:  # the second request on a connection: closed without an answer
            writer.transport.abort()
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    async with serve(handler) as (url, connections):
        client = new_client()
        assert await fetch(client, url) == b"ok"
        assert await fetch(client, url) == b"ok"  # on the kept one, refused, then a new one
        client.close()
    assert [len(heads) for heads in connections] == [2, 1]


async def test_bytes_past_the_length_are_dropped_with_the_connection() -> None:
    async def handler(writer: asyncio.StreamWriter, head: bytes, n: int) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n" + b"12345" + b"67890")

    async with serve(handler) as (url, connections):
        client = new_client()
        assert await fetch(client, url) == b"12345"
        assert await fetch(client, url) == b"12345"
        client.close()
    assert len(connections) == 2


async def test_a_cut_answer_is_an_error_and_an_unread_one_is_not_kept() -> None:
    async def handler(writer: asyncio.StreamWriter, head: bytes, n: int) -> None:
        if head.startswith(b"GET /small"):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123456789")
            return
        chunked = head.startswith(b"GET /chunked")
        head = "Transfer-Encoding: chunked" if chunked else "Content-Length: 100000"
        writer.write(f"HTTP/1.1 200 OK\r\n{head}\r\n\r\n".encode())
        writer.write(b"186a0\r\n" if chunked else b"")
        writer.write(b"y" * 50_000)
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.transport.abort()  # cut off half-way

    def stop_early(client: Client, url: str) -> None:
        with pytest.raises(OSError, match="No space"), client.get(url, {}) as answer:
            answer.readinto(memoryview(bytearray(4)))
            raise OSError(28, "No space left on device")  # the caller's disk, say

    async with serve(handler) as (url, connections):
        client = new_client()
        for path in ("/length", "/chunked"):
            with pytest.raises(FetchError, match="closed before the end"):
                await fetch(client, url + path)
        # A body the caller left unread costs its connection: the next answer comes on a new one.
        await asyncio.to_thread(stop_early, client, url + "/small")
        assert await fetch(client, url + "/small") == b"0123456789"
        client.close()
    assert [len(heads) for heads in connections] == [1, 1, 1, 1]


async def test_another_thread_stops_an_exchange_at_once() -> None:
    answering = asyncio.Event()

    async def handler(writer: asyncio.StreamWriter, head: bytes, n: int) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\nabc")
        await writer.drain()
        answering.set()
        await asyncio.sleep(30)  # then nothing: the reader blocks

    async with serve(handler) as (url, connections):
        client = new_client(timeout=20)
        abort = Abort()
        reading = asyncio.ensure_future(asyncio.to_thread(read_all, client, url, {}, abort))
        await asyncio.wait_for(answering.wait(), 5)
        await asyncio.sleep(0.1)  # time for the thread to block in its read (the likely case)
        started = time.monotonic()
        abort.abort()
        with pytest.raises(FetchError):
            await asyncio.wait_for(reading, 5)
        assert time.monotonic() - started < 2  # not the 20 s timeout
        # Once stopped, it starts no new exchange.
        with pytest.raises(FetchError, match="stopped"):
            await asyncio.to_thread(read_all, client, url, {}, abort)
        client.close()
    assert len(connections) == 1


async def test_urls_it_cannot_fetch_are_fetch_errors() -> None:
    client = new_client()
    for url in ("ftp://example.com/a.jpg", "http://[::1/a.jpg", "/just/a/path"):
        with pytest.raises(FetchError, match="URL"):
            await fetch(client, url)
    with pytest.raises(FetchError, match="cannot connect"):
        await fetch(client, "http://127.0.0.1:1/a.jpg")  # nothing listens on port 1
    client.close()


async def test_a_link_that_stops_moving_times_out() -> None:
    async def handler(writer: asyncio.StreamWriter, head: bytes, n: int) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await writer.drain()
        await asyncio.sleep(30)

    async with serve(handler) as (url, _):
        client = new_client(timeout=0.3)
        with pytest.raises(TimeoutError):
            await fetch(client, url)
        client.close()


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


async def test_https_with_the_default_certificate_checks(
    certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    body = bytes(range(256)) * 4000

    async def handle(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="image/jpeg")

    app = web.Application()
    app.router.add_get("/file.jpg", handle)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certificate)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    url = f"https://127.0.0.1:{runner.addresses[0][1]}/file.jpg"
    try:
        # Unknown to the system's trust store: refused.
        untrusting = new_client()
        with pytest.raises(FetchError, match="CERTIFICATE_VERIFY_FAILED"):
            await fetch(untrusting, url)
        untrusting.close()
        # Trusted the way an operator would (OpenSSL's SSL_CERT_FILE): verified, and fetched.
        monkeypatch.setenv("SSL_CERT_FILE", str(certificate[0]))
        trusting = new_client()
        assert await fetch(trusting, url) == body
        assert await fetch(trusting, url) == body
        trusting.close()
    finally:
        await runner.cleanup()
