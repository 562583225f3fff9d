"""Hits stored by a process of their own (`[tracker] store_process`, on by default).

Storing a hit (the copy's row, the message's recent hits, the verdict, the insert) costs about as
much CPU as answering it, and in the answering process it shares the event loop and the GIL with
the answers. Here the answering process journals the hit and answers; the spool hands batches of
journal records, as written, to this child, which stores them with its own store connection and
sends back what is left to do (`Recorded`).

Nothing is lost with the child: a record leaves the journal only once the child's answer came
back, so a child that fails, hangs up or is killed is a store failure to the spool (it retries; a
new child is started), and the event uids make a batch stored twice count once.

The child is `python -m tracker.recorder_process`, not a multiprocessing one: a spawned
multiprocessing child imports the parent's main module again (the whole CLI, relay included:
~0.4 s and ~60 MB), and its pool adds threads to the answering process. Parent and child speak
over the child's stdin and stdout: each message a 4-byte length and a pickle (both ends are this
program). The child runs at a lower priority (CHILD_NICENESS), ignores SIGINT and SIGTERM (a
terminal's Ctrl-C or systemd's stop reaches the whole process group; the parent stops it once the
spool is drained), and exits when its stdin closes: when its parent stops it, or dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import pickle
import signal
import struct
import sys
from typing import Any, BinaryIO

from config.settings import Settings
from monitoring.logs import configure_logging
from store import open_store
from tracker.recorder import HitRecorder, Recorded

log = logging.getLogger("inflight.tracker")

LENGTH = struct.Struct(">I")
START_SECONDS = 60.0  # a child that has not opened its store by then is not coming
CLOSE_SECONDS = 10.0  # the child gets this long to close its store and exit once told to stop
# Storing can wait (the spool holds the hits), answering cannot: where both want the one free core, the
# answers get about three quarters of it (CFS weights 1024 against 335).
CHILD_NICENESS = 5
# PostgreSQL connections of a recorder: it stores one batch at a time (the copies' lookup, then the hits'
# group commit, in at most two transactions), so a few do; every tracker worker has one (README: Capacity).
POOL_SIZE = 3


class RecordingFailed(Exception):
    """Storing a batch failed in the child, or the child is gone. Carries the cause as text: a
    driver's exception need not survive pickling."""


def _framed(message: object) -> bytes:
    """A message on the pipe either way: its pickle's length, then the pickle."""
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return LENGTH.pack(len(data)) + data


async def _send(writer: asyncio.StreamWriter, message: object) -> None:
    writer.write(_framed(message))
    await writer.drain()


async def _kill(child: asyncio.subprocess.Process) -> None:
    """Kill and reap `child`; one that exited already (asyncio may have reaped it: ProcessLookupError) is only waited for."""
    with contextlib.suppress(ProcessLookupError):
        child.kill()
    await child.wait()


async def _receive(reader: asyncio.StreamReader) -> Any:
    (length,) = LENGTH.unpack(await reader.readexactly(LENGTH.size))
    return pickle.loads(await reader.readexactly(length))


class RecorderProcess:
    """A Recording whose `record` runs in a child process (one per answering process)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._child: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()  # one batch at a time on the pipe

    @property
    def pid(self) -> int | None:
        return self._child.pid if self._child is not None else None

    async def start(self) -> None:
        """Start the child and wait until its store is open: a child that cannot start shows at start."""
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tracker.recorder_process", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        assert child.stdin is not None and child.stdout is not None
        try:
            await _send(child.stdin, self.settings)
            async with asyncio.timeout(START_SECONDS):
                reply = await _receive(child.stdout)
        except (OSError, EOFError, TimeoutError) as exc:
            await _kill(child)
            raise RecordingFailed(f"the recorder process did not start: {type(exc).__name__}: {exc}") from None
        if reply != "ready":
            await child.wait()
            raise RecordingFailed(f"the recorder process did not start: {reply}")
        self._child = child

    async def record(self, payloads: list[bytes]) -> Recorded:
        async with self._lock:
            if self._child is None:
                await self.start()
            child = self._child
            assert child is not None and child.stdin is not None and child.stdout is not None
            try:
                await _send(child.stdin, payloads)
                outcome, result = await _receive(child.stdout)
            # IncompleteReadError is an EOFError; a write to a pipe closed under it is an OSError with asyncio's
            # loop and a RuntimeError with uvloop's.
            except (OSError, EOFError, RuntimeError) as exc:
                log.error("recorder-process-lost pid=%d error=%s (a new one is started; the batch is retried from the spool)",
                          child.pid, type(exc).__name__)
                await self._discard(child)
                raise RecordingFailed(f"the recorder process was lost: {type(exc).__name__}") from None
            except asyncio.CancelledError:
                await self._discard(child)  # its reply to this batch would be read as the next one's
                raise
        if outcome != "recorded":
            raise RecordingFailed(result)
        assert isinstance(result, Recorded)
        return result

    async def _discard(self, child: asyncio.subprocess.Process) -> None:
        self._child = None
        await asyncio.shield(_kill(child))

    async def close(self) -> None:
        """Stop the child once the spool is closed: it closes its store as it exits."""
        async with self._lock:
            child, self._child = self._child, None
        if child is None:
            return
        assert child.stdin is not None
        child.stdin.close()
        try:
            async with asyncio.timeout(CLOSE_SECONDS):
                await child.wait()
        except TimeoutError:
            log.warning("recorder-process-slow-to-stop pid=%d (killed)", child.pid)
            await _kill(child)


# --- in the child ---------------------------------------------------------------------------


def _read(stream: BinaryIO) -> Any:
    """The next message from the parent; None at the end of the stream (the parent stopped us or died)."""
    head = stream.read(LENGTH.size)
    if len(head) < LENGTH.size:
        return None
    return pickle.loads(stream.read(LENGTH.unpack(head)[0]))


def _write(stream: BinaryIO, message: object) -> None:
    stream.write(_framed(message))
    stream.flush()


async def _serve(settings: Settings, requests: BinaryIO, replies: BinaryIO) -> None:
    store = open_store(settings.store.url, webhook_projects=settings.webhook_projects, pool_size=POOL_SIZE)
    try:
        await store.open()
    except Exception as exc:
        _write(replies, f"{type(exc).__name__}: {exc}")
        return
    try:
        recorder = HitRecorder(settings, store)
        _write(replies, "ready")
        gc.freeze()  # as the answering process does (Service.run_until_signalled): full collections scan less
        loop = asyncio.get_running_loop()
        while (payloads := await loop.run_in_executor(None, _read, requests)) is not None:
            try:
                recorded = await recorder.record(payloads)
            except Exception as exc:
                _write(replies, ("failed", f"{type(exc).__name__}: {exc}"))
                continue
            recorded.webhooks_queued = store.outbox_added.is_set()  # another process's webhook worker must be woken
            store.outbox_added.clear()
            _write(replies, ("recorded", recorded))
    finally:
        await store.close()


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    requests, replies = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing else may write to the replies' stream
    settings = _read(requests)
    if settings is None:
        return
    configure_logging(settings.log.format)
    os.nice(CHILD_NICENESS)
    asyncio.run(_serve(settings, requests, replies))


if __name__ == "__main__":
    main()
