"""A thread with its own event loop, where the daemon runs its syncs and file downloads.

A sync turns each upstream answer (a thousand items) into a transaction: parsing the JSON,
deciding what changes, serialising each item, binding the rows. On the loop that serves HTTP,
that is tens of milliseconds at a time during which no request is answered. On a loop of its
own, the interpreter switches between the two threads every `sys.getswitchinterval()` seconds
at most, so a read waits for a few milliseconds of sync work, not for a whole page.

What crosses between the loops: coroutines handed over by `SyncWorker.run` (the scheduler and
the HTTP API stay on the main loop); the store, whose read and write connections serve any
loop and whose change announcements reach long-polls on the main loop thread-safely; plain
state objects (TargetState, SyncProgress, DownloadStatus) that the worker replaces or updates
field by field and the status views only read; prometheus-client counters (thread-safe) and
structlog (stdlib logging, which locks).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

STOP_TIMEOUT = 10.0  # seconds to wait for work on the worker loop to end when stopping


class SyncWorker:
    """`worker.start()`, then `await worker.run(coro)` from the main loop; `await worker.stop()`."""

    def __init__(self, name: str = "mirrord-sync") -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def start(self) -> None:
        self._thread.start()

    def _main(self) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())
            finally:
                loop.close()

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the worker loop and return its result (or raise its exception).

        Cancelling the caller cancels the coroutine on the worker loop, then waits until it
        has actually ended, so that what it was writing commits or rolls back whole before
        the caller goes on (to close the database, say)."""
        here = asyncio.get_running_loop()
        outcome: asyncio.Future[T] = here.create_future()
        started: list[asyncio.Task[T]] = []

        def settle(task: asyncio.Task[T]) -> None:
            if outcome.done():
                return
            if task.cancelled():
                outcome.cancel()
            elif (error := task.exception()) is not None:
                outcome.set_exception(error)
            else:
                outcome.set_result(task.result())

        def start() -> None:  # on the worker loop
            task = self._loop.create_task(coro)
            started.append(task)
            task.add_done_callback(lambda t: _call_soon_threadsafe(here, settle, t))

        def cancel() -> None:  # on the worker loop, always after start()
            for task in started:
                task.cancel()

        self._loop.call_soon_threadsafe(start)
        try:
            return await asyncio.shield(outcome)
        except asyncio.CancelledError:
            if not outcome.done():
                self._loop.call_soon_threadsafe(cancel)
                with contextlib.suppress(BaseException):
                    await asyncio.shield(outcome)
            raise

    async def stop(self) -> None:
        """Cancel whatever still runs on the worker loop, wait for it (up to STOP_TIMEOUT),
        then stop the loop and its thread."""
        if not self._thread.is_alive():
            return

        async def drain() -> None:
            current = asyncio.current_task()
            tasks = [t for t in asyncio.all_tasks() if t is not current]
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=STOP_TIMEOUT)

        with contextlib.suppress(Exception):
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(drain(), self._loop))
        self._loop.call_soon_threadsafe(self._loop.stop)
        await asyncio.to_thread(self._thread.join, STOP_TIMEOUT)


def _call_soon_threadsafe(loop: asyncio.AbstractEventLoop, callback: Any, *args: Any) -> None:
    with contextlib.suppress(RuntimeError):  # that loop has closed: nobody waits any more
        loop.call_soon_threadsafe(callback, *args)
