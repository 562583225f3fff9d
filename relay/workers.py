"""The CPU pool: processes that parse, rewrite and dot-stuff large messages off the event loop.

Processes, not threads: that work holds the GIL (pure-Python parsing, and C regular expressions
that never release it), and a thread doing it starves the event loop — measured in
bench/cases/isolation.py. `forkserver`, because forking a process that runs threads (aiosqlite,
the tracker) can copy a held lock into the child; and the workers never inherit the listening
socket, so a restarted relay can always bind its port.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import select
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor

# glibc's mallopt parameter: allocations from this size up are mapped on their own and unmapped when freed.
M_MMAP_THRESHOLD = -3
LARGE_ALLOCATION_BYTES = 256 * 1024


def cpu_pool(workers: int) -> ProcessPoolExecutor:
    """Worker processes that exit with the relay, even when it is killed with SIGKILL."""
    return ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("forkserver"), initializer=_pool_worker, initargs=(os.getpid(),)
    )


def _pool_worker(relay: int) -> None:
    exit_with(relay)
    give_back_large_buffers()


def give_back_large_buffers() -> None:
    """Have glibc return a freed message-sized buffer to the system at once.

    By default glibc raises its mmap threshold to the size of the largest block freed (up to
    32 MB), so after one large message the next ones are carved from the heap and their memory
    stays with the process: a relay idle after a burst kept hundreds of MB (bench case memory).
    A fixed threshold keeps every buffer of 256 KB or more in a mapping of its own. No-op
    where the C library is not glibc.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, LARGE_ALLOCATION_BYTES)


def exit_with(pid: int) -> None:
    """End this process at once when `pid` is gone.

    A pool worker waits on a pipe whose other end it holds itself, so it would outlive a relay
    killed hard; it would then hold the terminal and waste memory until the host reboots.
    """
    when_gone(pid, lambda: os._exit(0))


def when_gone(pid: int, action: Callable[[], object]) -> None:
    """Call `action` from a daemon thread once process `pid` has exited."""
    threading.Thread(target=_watch, args=(pid, action), daemon=True, name=f"watch-{pid}").start()


def _watch(pid: int, action: Callable[[], object]) -> None:
    if hasattr(os, "pidfd_open"):  # Linux ≥ 5.3: the kernel wakes us when the process exits
        with contextlib.suppress(ProcessLookupError):  # gone before this worker finished starting
            select.select([os.pidfd_open(pid)], [], [])
    else:
        while _alive(pid):
            time.sleep(1.0)
    action()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, under another user
        return True
    return True
