"""Worker processes for every core: `[relay] workers` and `[tracker] workers` processes on shared sockets.

One Python process runs on one core (the GIL), while Postfix runs a process per stage. The
supervisor binds every listener first (a busy address ends the command before anything else
happens), prepares the store once in a short-lived child (schema and migrations never race),
then forks the workers: each inherits the listening sockets, so the kernel hands every new
connection to one of them, and each runs its own event loop, store connection, upstream pool
and CPU pool. No SO_REUSEPORT: it would let a second instance bind the same port and take part
of the traffic. The supervisor itself stays single-threaded and never opens the store, so a
fork never copies a held lock.

Worker i runs the relay when i < relay workers and the tracker when i < tracker workers, so
`serve` with 2 and 2 runs two processes serving both. SIGTERM (or SIGINT) is passed on to
every worker, which drains as one process does; a worker that dies otherwise is restarted
(after a pause when it keeps dying at start); a worker exiting with 2 (a configuration
problem) stops them all. A worker whose supervisor is gone, even by SIGKILL, drains and exits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

from config.settings import Settings
from inflight.service import Listeners
from relay.workers import when_gone

log = logging.getLogger("inflight")

POLL_SECONDS = 0.1
# A worker that dies within this long of its start is crash-looping: restarts back off, doubling up to the cap.
STABLE_AFTER_SECONDS = 5.0
RESTART_PAUSE_CAP_SECONDS = 30.0
# After SIGTERM, workers get the drain timeout plus this long before they are killed.
STOP_GRACE_SECONDS = 10.0
CONFIG_ERROR_EXIT = 2


@dataclass(frozen=True)
class Slot:
    """One worker process's share: which of the roles it serves."""

    index: int
    relay: bool
    tracker: bool

    def describe(self) -> str:
        return "+".join(role for role, on in (("relay", self.relay), ("tracker", self.tracker)) if on)


def plan_slots(settings: Settings, *, relay: bool, tracker: bool) -> list[Slot]:
    relays = settings.relay.workers if relay else 0
    trackers = settings.tracker.workers if tracker else 0
    return [Slot(i, i < relays, i < trackers) for i in range(max(relays, trackers))]


# A worker's body: runs the service for a slot on the inherited listeners and returns an exit code.
WorkerMain = Callable[[Slot, Listeners], int]


@dataclass
class _Worker:
    slot: Slot
    pid: int
    started: float
    pause: float = 0.0  # the restart pause this slot has earned by dying young


class Supervisor:
    def __init__(self, settings: Settings, listeners: Listeners, slots: list[Slot], *, worker: WorkerMain,
                 prepare: Callable[[], int]) -> None:
        self.settings = settings
        self.listeners = listeners
        self.slots = slots
        self.worker = worker
        self.prepare = prepare
        self._workers: dict[int, _Worker] = {}
        self._stopping = False
        self._restarts: list[tuple[float, Slot, float]] = []  # (not before, slot, pause)
        self._exit_code = 0

    def run(self) -> int:
        """Prepare, start every worker, supervise until signalled; the exit code of the command."""
        code = self._wait_for(self._fork(self.prepare))
        if code != 0:
            return code
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_stop_signal)
        for slot in self.slots:
            self._start(slot, pause=0.0)
        deadline: float | None = None
        while self._workers or (self._restarts and not self._stopping):
            if self._stopping and deadline is None:
                deadline = time.monotonic() + self.settings.relay.drain_timeout_seconds + STOP_GRACE_SECONDS
            if deadline is not None and time.monotonic() > deadline:
                for worker in self._workers.values():
                    log.warning("worker-killed slot=%d pid=%d detail='did not drain in time'", worker.slot.index, worker.pid)
                    _signal(worker.pid, signal.SIGKILL)
                deadline = float("inf")
            self._reap()
            self._restart_due()
            time.sleep(POLL_SECONDS)
        self.listeners.close()
        return self._exit_code

    def _on_stop_signal(self, signum: int, frame: object) -> None:
        if not self._stopping:
            log.info("shutting down workers=%d", len(self._workers))
        self._stopping = True
        self._restarts.clear()
        for worker in self._workers.values():
            _signal(worker.pid, signal.SIGTERM)

    def _start(self, slot: Slot, *, pause: float) -> None:
        if self._stopping:
            return
        pid = self._fork(lambda: self._work(slot))
        self._workers[pid] = _Worker(slot, pid, time.monotonic(), pause)
        log.info("worker-started slot=%d pid=%d serves=%s", slot.index, pid, slot.describe())

    def _work(self, slot: Slot) -> int:
        # libuv accepts every pending connection at once by default; one at a time spreads them over the workers.
        os.environ.setdefault("UV_TCP_SINGLE_ACCEPT", "1")
        return self.worker(slot, self.listeners)

    def _fork(self, body: Callable[[], int]) -> int:
        """A child running `body` with default signal handling; it drains and exits when the supervisor is gone."""
        supervisor = os.getpid()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid:
            return pid
        code = 1
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, signal.SIG_DFL)
            when_gone(supervisor, lambda: os.kill(os.getpid(), signal.SIGTERM))
            code = body()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        raise AssertionError("unreachable")

    @staticmethod
    def _wait_for(pid: int) -> int:
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status)

    def _reap(self) -> None:
        while self._workers:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self._workers.pop(pid, None)
            if worker is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            if self._stopping:
                log.info("worker-stopped slot=%d pid=%d code=%d", worker.slot.index, pid, code)
                continue
            if code == CONFIG_ERROR_EXIT:
                log.error("worker-config-error slot=%d pid=%d: stopping every worker", worker.slot.index, pid)
                self._exit_code = CONFIG_ERROR_EXIT
                self._on_stop_signal(signal.SIGTERM, None)
                continue
            lived = time.monotonic() - worker.started
            pause = 0.0 if lived > STABLE_AFTER_SECONDS else min(max(worker.pause * 2, 0.5), RESTART_PAUSE_CAP_SECONDS)
            log.warning("worker-exited slot=%d pid=%d code=%d lived=%.1fs restart_in=%.1fs",
                        worker.slot.index, pid, code, lived, pause)
            self._restarts.append((time.monotonic() + pause, worker.slot, pause))

    def _restart_due(self) -> None:
        now = time.monotonic()
        due = [entry for entry in self._restarts if entry[0] <= now]
        self._restarts = [entry for entry in self._restarts if entry[0] > now]
        for _, slot, pause in due:
            self._start(slot, pause=pause)


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
