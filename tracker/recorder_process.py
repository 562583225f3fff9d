"""Hits stored by a process of their own (`[tracker] store_process`, on by default).

Storing a hit (the copy's row, the message's recent hits, the verdict, the insert) costs more CPU
than answering it, and in the answering process it shares the event loop and the GIL with the
answers: at half the load a process answers, a redirect's p99 was 17–20 ms with storing there and
about 2 ms without (bench case `tracker`, the store locked). Here the answering process journals
the hit and answers; the spool hands batches of journal records, as bytes, to this child, which
stores them with its own store connection and gives back what is left to do (`Recorded`).

Nothing is lost with the child: a record leaves the journal only once the child's answer came
back, so a child that fails, hangs up or is killed is a store failure to the spool (it retries; a
new child is started), and the event uids make a batch stored twice count once.

The child is spawned (a fresh interpreter: forking a process with threads is unsafe), runs at a
lower priority (CHILD_NICENESS), ignores SIGINT and SIGTERM (a terminal's Ctrl-C or systemd's stop
reaches the whole process group; the parent stops it once the spool is drained), and exits when
its parent is gone.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.util
import os
import signal
import threading
from collections.abc import Coroutine
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import replace
from typing import Any, TypeVar

from config.settings import Settings
from monitoring.logs import configure_logging
from store import open_store
from store.model import EventStore
from tracker.recorder import HitRecorder, Recorded

log = logging.getLogger("inflight.tracker")

T = TypeVar("T")
CLOSE_SECONDS = 10.0  # the child's store gets this long to close when the child is stopped
# Storing can wait (the spool holds the hits), answering cannot: where both want the one free core, the
# answers get about three quarters of it (CFS weights 1024 against 335).
CHILD_NICENESS = 5


class RecordingFailed(Exception):
    """Storing a batch failed in the child. Carries the cause as text: a driver's exception may not
    survive being pickled back, and a result that cannot be unpickled would break the pool."""


class RecorderProcess:
    """A Recording whose `record` runs in a child process (one per answering process)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._pool: ProcessPoolExecutor | None = None

    async def start(self) -> None:
        """Start the child and wait until its store is open: a child that cannot start shows at start."""
        self._pool = self._new_pool()
        await asyncio.get_running_loop().run_in_executor(self._pool, _ready)

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_start_child, initargs=(self.settings,))

    async def record(self, payloads: list[bytes]) -> Recorded:
        if self._pool is None:
            raise RuntimeError("the recorder process is not started")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, _record, payloads)
        except BrokenProcessPool:
            log.error("recorder-process-lost (a new one is started; the batch is retried from the spool)")
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = self._new_pool()
            raise

    async def close(self) -> None:
        """Stop the child once the spool is closed: it closes its store as it exits."""
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await asyncio.to_thread(pool.shutdown, True)


# --- in the child ---------------------------------------------------------------------------


class _Child:
    """The child's store and recorder, on an event loop of its own thread (the pool calls in from its main thread)."""

    def __init__(self, settings: Settings) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="inflight-recorder", daemon=True).start()
        self.store: EventStore = open_store(settings.store.url,
                                            webhook_projects=[p.id for p in settings.projects if p.webhook_url])
        self.run(self.store.open())
        self.recorder = HitRecorder(settings, self.store)

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    async def record(self, payloads: list[bytes]) -> Recorded:
        recorded = await self.recorder.record(payloads)
        queued = self.store.outbox_added.is_set()  # set by this store only: another process's worker must be woken
        self.store.outbox_added.clear()
        return replace(recorded, webhooks_queued=queued)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.store.close(), self.loop).result(CLOSE_SECONDS)
        self.loop.call_soon_threadsafe(self.loop.stop)


_child: _Child | None = None


def _start_child(settings: Settings) -> None:
    global _child
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    configure_logging(settings.log.format)
    os.nice(CHILD_NICENESS)
    _child = _Child(settings)
    multiprocessing.util.Finalize(_child, _child.close, exitpriority=10)
    threading.Thread(target=_exit_with_parent, name="inflight-recorder-parent", daemon=True).start()
    gc.freeze()  # as the answering process does (Service.run_until_signalled): full collections scan less


def _exit_with_parent() -> None:
    """The pool's pipes do not close when the parent dies (the child holds both ends): watch the
    parent's sentinel instead, so a SIGKILLed tracker leaves no recorder behind."""
    parent = multiprocessing.parent_process()
    assert parent is not None
    multiprocessing.connection.wait([parent.sentinel])
    log.warning("recorder-parent-gone pid=%d (exiting)", os.getpid())
    os._exit(0)


def _ready() -> None:
    assert _child is not None


def _record(payloads: list[bytes]) -> Recorded:
    assert _child is not None
    try:
        return _child.run(_child.record(payloads))
    except Exception as exc:
        raise RecordingFailed(f"{type(exc).__name__}: {exc}") from None
