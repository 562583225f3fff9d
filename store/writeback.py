"""Start writing a file's dirty pages to disk now: no waiting for them, and no flush of the drive's cache.

SQLite in WAL mode with `synchronous=NORMAL` never syncs the WAL at a commit, so the kernel keeps
every committed page dirty (up to 30 s, or a tenth of RAM) until the checkpoint's fsync writes them
all at once. At 4,700 hits/s that was 84 MB every 5 s: an 80 ms checkpoint whose writing held up the
tracker spool's fdatasync, and every answer waiting on it, for up to 50 ms (bench case `tracker`,
redirect p99 at half load). Starting the write-back every few commits spreads that writing out, as
PostgreSQL does for its own files (`checkpoint_flush_after`, `wal_writer_flush_after`, with the same
call). Durability is unchanged: it is still the checkpoint's fsync that makes the pages safe.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writing dirty pages not already being written; do not wait


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """Linux's sync_file_range(2) from the C library; None where there is none (the checkpoint then writes it all)."""
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    function.restype = ctypes.c_int
    return function  # type: ignore[no-any-return]


_SYNC_FILE_RANGE = _sync_file_range()
SUPPORTED = _SYNC_FILE_RANGE is not None


def start_writeback(fd: int) -> None:
    """Have the kernel start writing all of `fd`'s dirty pages; returns without waiting for them."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, 0, 0, SYNC_FILE_RANGE_WRITE)  # offset 0, length 0: to the end of the file
