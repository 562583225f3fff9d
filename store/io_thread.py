"""One thread that runs a spool's file work in order, handed work more cheaply than a ThreadPoolExecutor.

Every group commit of the spool (a write and an `fdatasync`) goes to a thread, so that a slow disk holds
the records waiting for it, never the event loop. Through `loop.run_in_executor` one round trip cost ~55 µs
of CPU on the bench machine (a concurrent future, its chaining to an asyncio one, the executor's locks and
semaphore); a queue and one `call_soon_threadsafe` cost ~25 µs. At a few hits per group commit that was a
good part of what spooling a hit costs the tracker's answering process (bench case `tracker`, CPU per hit).
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
_Work = tuple[Callable[..., Any], tuple[Any, ...], "asyncio.Future[Any]"]


class IoThread:
    """Runs functions one at a time, in the order given, in a thread of its own; `run` returns their future."""

    def __init__(self, name: str) -> None:
        self._queue: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the thread; its results come back to the running event loop."""
        self._loop = asyncio.get_running_loop()
        # A daemon: a process that dies without closing its spool must still exit. Work cut short that way is
        # a crash to the journal (a torn record fails its CRC and is dropped), never a record said to be durable.
        self._thread = threading.Thread(target=self._serve, name=self._name, daemon=True)
        self._thread.start()

    def run(self, function: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """`function(*args)` in the thread, after everything handed over before it. Cancelling the future
        does not withdraw the work (as with run_in_executor)."""
        assert self._loop is not None, "IoThread.start() first"
        future: asyncio.Future[T] = self._loop.create_future()
        self._queue.put((function, args, future))
        return future

    async def stop(self) -> None:
        """Let the work handed over finish, then end the thread."""
        if self._thread is None:
            return
        self._queue.put(None)
        await asyncio.to_thread(self._thread.join)
        self._thread = None

    def _serve(self) -> None:
        assert self._loop is not None
        settle = self._loop.call_soon_threadsafe
        while (work := self._queue.get()) is not None:
            function, args, future = work
            try:
                result = function(*args)
            except BaseException as exc:  # the caller's to handle, as run_in_executor hands it over
                settle(_failed, future, exc)
            else:
                settle(_done, future, result)


def _done(future: asyncio.Future[Any], result: Any) -> None:
    if not future.cancelled():
        future.set_result(result)


def _failed(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.cancelled():
        future.set_exception(exc)
