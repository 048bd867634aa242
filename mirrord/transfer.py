"""One download's body, from the link into its part file, in the download's own thread.

The bytes gather in a page-aligned buffer of 1 MiB per thread and go to the part file in whole
4 KiB blocks with O_DIRECT: they skip the page cache, so the fsync before a part is published
(mirrord.files) has next to nothing left to write back, and a large download does not fill
the laptop's memory with pages it must write and evict later. The unaligned rest of a file
(its tail, and the head of a resume that starts mid-block) goes through the page cache. A
filesystem without O_DIRECT (some FUSE, older tmpfs) gets every byte through the page cache.

Measured with bench/files_bench.py (2,000 files of 1 MB; the README has the figures): a bare
loop of this kind took 0.5–0.9 ms of CPU per MB where the same loop through the page cache,
fsyncing each file, took 1.9, and curl (which leaves the writing back to the kernel, after
it has exited) 0.8–2.4; and unlike theirs, its speed does not sag run after run as the page
cache fills.

A slow link must not hold received bytes in memory for long: the buffer is written out at
least every FLUSH_EVERY seconds (its whole blocks; the rest, under 4 KiB, waits for more), so
a crash or a power cut loses at most that much, and progress shows on disk.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from mirrord import fetch

BUFFER = 1024 * 1024  # bytes gathered before a write; a multiple of BLOCK
BLOCK = 4096  # O_DIRECT's alignment of offsets, lengths and memory (covers 512-byte sectors)
FLUSH_EVERY = 0.25  # seconds received bytes may wait for a fuller buffer

Progress = Callable[[int, int], None]  # (bytes just received, the part's length with them)

_buffers = threading.local()


def _buffer() -> memoryview:
    """This thread's buffer: an anonymous mapping, so page-aligned, as O_DIRECT needs."""
    view: memoryview | None = getattr(_buffers, "view", None)
    if view is None:
        view = _buffers.view = memoryview(mmap.mmap(-1, BUFFER))
    return view


def receive_body(answer: fetch.Answer, part: Path, offset: int, progress: Progress) -> int:
    """Write `answer`'s body into `part` from byte `offset` (the part is cut there first);
    the part's length at the end. `progress` sees each read before its bytes are written and
    may raise to stop: what came before it is written, so a later try resumes after it. Raises
    fetch.FetchError and TimeoutError for the link, OSError for the disk."""
    buffer = _buffer()
    with PartFile(part, offset) as out:
        held = 0  # bytes in buffer, not yet written
        written_at = time.monotonic()
        try:
            while True:
                # Up to the next block boundary when the part does not end on one (a resume):
                # the buffer's start is aligned, so every later write can be direct.
                room = BUFFER if out.offset % BLOCK == 0 else BLOCK - out.offset % BLOCK
                if held and not answer.readable(written_at + FLUSH_EVERY - time.monotonic()):
                    held = out.write_blocks(buffer, held)  # the link paused: write what came
                    written_at = time.monotonic()
                n = answer.readinto(buffer[held:room])
                if n == 0:
                    break
                progress(n, out.offset + held + n)
                held += n
                now = time.monotonic()
                if held == room or now - written_at >= FLUSH_EVERY:
                    held = out.write_blocks(buffer, held)
                    written_at = now
        finally:
            out.write_all(buffer[:held])  # also on errors: a later try resumes after them
        return out.offset


class PartFile:
    """A part file open for writing at `offset`: whole blocks at aligned offsets go direct,
    anything else through the page cache."""

    def __init__(self, path: Path, offset: int) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC
        try:
            self._fd = os.open(path, flags | os.O_DIRECT, 0o644)
            self._direct = True
        except OSError as e:
            if e.errno != errno.EINVAL:  # EINVAL: this filesystem has no O_DIRECT
                raise
            self._fd = os.open(path, flags, 0o644)
            self._direct = False
        self._direct_on = self._direct
        self.offset = offset
        try:
            # Not O_TRUNC, nor a truncate of a new file: on ext4 either makes close() start
            # writing the file back (its guard for files replaced by truncation).
            if os.fstat(self._fd).st_size > offset:
                os.ftruncate(self._fd, offset)
            os.lseek(self._fd, offset, os.SEEK_SET)
        except BaseException:
            os.close(self._fd)
            raise

    def __enter__(self) -> PartFile:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        os.close(self._fd)

    def write_blocks(self, buffer: memoryview, held: int) -> int:
        """Write the bytes of buffer[:held] that end on a block boundary of the file; move the
        rest to the buffer's start. Returns how many bytes the buffer still holds."""
        whole = (self.offset + held) // BLOCK * BLOCK - self.offset
        if whole <= 0:
            return held
        self.write_all(buffer[:whole])
        rest = held - whole
        if rest:
            buffer[:rest] = buffer[whole:held]  # under one block
        return rest

    def write_all(self, data: memoryview) -> None:
        """Write data at the part's end. `data` starts at an aligned address, as the buffer's
        start does (or it is written through the page cache)."""
        start = 0
        if self._direct and self.offset % BLOCK == 0:
            start = len(data) // BLOCK * BLOCK
            if start:
                self._mode(direct=True)
                start = self._write(data[:start])
        if start < len(data):
            self._mode(direct=False)
            self._write(data[start:])

    def _write(self, data: memoryview) -> int:
        done = 0
        while done < len(data):  # short writes: rare on a regular file, but allowed
            try:
                n = os.write(self._fd, data[done:])
            except OSError as e:
                if e.errno != errno.EINVAL or not self._direct_on:
                    raise
                # The filesystem took O_DIRECT at open but not this write: no more of it.
                self._direct = False
                self._mode(direct=False)
                continue
            done += n
            self.offset += n
        return done

    def _mode(self, *, direct: bool) -> None:
        if direct != self._direct_on:
            flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
            flags = flags | os.O_DIRECT if direct else flags & ~os.O_DIRECT
            fcntl.fcntl(self._fd, fcntl.F_SETFL, flags)
            self._direct_on = direct
