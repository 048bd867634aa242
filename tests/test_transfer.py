"""A download's body into its part file (mirrord/transfer.py), from a real server on loopback
through the real client, into real files: whole blocks direct, the rest through the page
cache, resumes at any offset, a slow link's bytes on disk within FLUSH_EVERY, a stop that
keeps what came before it, and a filesystem without O_DIRECT."""

from __future__ import annotations

import asyncio
import errno
import os
import random
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from mirrord import transfer
from mirrord.fetch import Client
from mirrord.transfer import BLOCK, PartFile, receive_body

pytestmark = pytest.mark.asyncio

BODY = random.Random(7).randbytes(3 * 1024 * 1024 + 1234)


@asynccontextmanager
async def serve(pieces: Callable[[int], list[tuple[bytes, float]]]) -> AsyncIterator[str]:
    """Answers `GET /<start>` with BODY[start:], written in the (bytes, pause) pieces that
    `pieces(start)` gives."""
    tasks: set[asyncio.Task[Any] | None] = set()

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tasks.add(asyncio.current_task())
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            start = int(head.split(b" ")[1].lstrip(b"/"))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (len(BODY) - start))
            for data, pause in pieces(start):
                writer.write(data)
                await writer.drain()
                await asyncio.sleep(pause)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(on_connection, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        for task in tasks:
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in tasks if t is not None), return_exceptions=True)
        await server.wait_closed()


def odd_pieces(start: int) -> list[tuple[bytes, float]]:
    """The body in pieces of uneven sizes, none a multiple of a block."""
    rest, sizes, out = BODY[start:], [1, 4095, 70_001, 333_333, 9], []
    while rest:
        size = sizes[len(out) % len(sizes)]
        out.append((rest[:size], 0.0))
        rest = rest[size:]
    return out


def download(url: str, part: Path, start: int, progress: transfer.Progress | None = None) -> int:
    client = Client(timeout=10, connections=1, user_agent="test")
    try:
        with client.get(f"{url}/{start}", {}) as answer:
            return receive_body(answer, part, start, progress or (lambda n, have: None))
    finally:
        client.close()


@pytest.mark.parametrize("start", [0, BLOCK, 5000, 1024 * 1024 + 7])
async def test_a_body_lands_whole_from_any_resume_point(tmp_path: Path, start: int) -> None:
    part = tmp_path / "a.part"
    part.write_bytes(BODY[:start] + b"stale bytes past the resume point")
    async with serve(odd_pieces) as url:
        length = await asyncio.to_thread(download, url, part, start)
    assert length == len(BODY) and part.read_bytes() == BODY


async def test_whole_blocks_go_direct_and_the_rest_through_the_page_cache(tmp_path: Path) -> None:
    writes: list[tuple[int, int, bool]] = []  # (offset, length, direct)
    part = PartFile(tmp_path / "b.part", 5000)
    real = part._write

    def spy(data: memoryview) -> int:
        writes.append((part.offset, len(data), part._direct_on))
        return real(data)

    part._write = spy  # type: ignore[method-assign]
    if not part._direct:
        pytest.skip(f"{tmp_path} takes no O_DIRECT")
    buffer = transfer._buffer()
    with part:
        buffer[: BLOCK - 5000 % BLOCK] = BODY[: BLOCK - 5000 % BLOCK]
        part.write_all(buffer[: BLOCK - 5000 % BLOCK])  # up to the first boundary
        buffer[: 3 * BLOCK + 10] = BODY[: 3 * BLOCK + 10]
        held = part.write_blocks(buffer, 3 * BLOCK + 10)  # three blocks, ten bytes left
        assert held == 10 and bytes(buffer[:10]) == BODY[3 * BLOCK : 3 * BLOCK + 10]
        part.write_all(buffer[:held])  # the tail
    assert writes == [(5000, 3192, False), (8192, 3 * BLOCK, True), (8192 + 3 * BLOCK, 10, False)]
    data = (tmp_path / "b.part").read_bytes()
    assert len(data) == 8192 + 3 * BLOCK + 10


async def test_a_slow_link_s_bytes_are_on_disk_before_the_buffer_fills(tmp_path: Path) -> None:
    def slowly(start: int) -> list[tuple[bytes, float]]:
        return [(BODY[:10_000], 3.0), (BODY[10_000:], 0.0)]  # then a long pause

    part = tmp_path / "c.part"
    async with serve(slowly) as url:
        running = asyncio.ensure_future(asyncio.to_thread(download, url, part, 0))
        deadline = asyncio.get_running_loop().time() + 2.5  # well before the pause ends
        while asyncio.get_running_loop().time() < deadline:
            if part.exists() and part.stat().st_size == 2 * BLOCK:
                break
            await asyncio.sleep(0.02)
        # The whole blocks of what came, within FLUSH_EVERY; the rest waits for more.
        assert part.stat().st_size == 2 * BLOCK and part.read_bytes() == BODY[: 2 * BLOCK]
        assert not running.done()
        assert await running == len(BODY)
    assert part.read_bytes() == BODY


async def test_a_stop_keeps_what_came_before_it(tmp_path: Path) -> None:
    part = tmp_path / "d.part"
    seen: list[int] = []

    def progress(n: int, have: int) -> None:
        if have > 500_000:
            raise OverflowError("too much")  # as the downloader's size check does
        seen.append(have)

    async with serve(odd_pieces) as url:
        with pytest.raises(OverflowError):
            await asyncio.to_thread(download, url, part, 0, progress)
    assert part.read_bytes() == BODY[: seen[-1]]  # every byte before the stop, none after


async def test_a_filesystem_without_o_direct_gets_every_byte_through_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Not a filesystem this machine has (FUSE, an old tmpfs): its answer to O_DIRECT is made.
    real_open, real_write = os.open, os.write
    direct_writes = []

    def no_direct_open(path: Any, flags: int, *args: Any) -> int:
        if flags & os.O_DIRECT and "e.part" in str(path):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    def no_direct_write(fd: int, data: Any) -> int:
        if threading.current_thread() is not threading.main_thread():
            import fcntl

            direct_writes.append(bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT))
        return real_write(fd, data)

    monkeypatch.setattr(os, "open", no_direct_open)
    monkeypatch.setattr(os, "write", no_direct_write)
    part = tmp_path / "e.part"
    async with serve(odd_pieces) as url:
        assert await asyncio.to_thread(download, url, part, 0) == len(BODY)
    assert part.read_bytes() == BODY
    assert direct_writes and not any(direct_writes)
