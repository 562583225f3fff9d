"""store/writeback.py: the kernel starts writing a file's dirty pages when asked, not at the next fsync."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from store.writeback import SUPPORTED, start_writeback

MB = 1024 * 1024


def dirty_bytes() -> int:
    """The system's page-cache bytes waiting to be written (/proc/meminfo `Dirty`)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Dirty:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no Dirty line in /proc/meminfo")


@pytest.mark.skipif(not SUPPORTED or not Path("/proc/meminfo").exists(),
                    reason="sync_file_range(2) and /proc/meminfo are Linux's")
def test_dirty_pages_are_written_back_without_an_fsync(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "wal", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        before = dirty_bytes()
        os.write(fd, os.urandom(64 * MB))
        # Left alone, the kernel keeps them dirty for 30 s (vm.dirty_expire_centisecs) or until an fsync.
        assert dirty_bytes() - before > 32 * MB
        start_writeback(fd)
        deadline = time.monotonic() + 10
        while dirty_bytes() - before > 16 * MB and time.monotonic() < deadline:
            time.sleep(0.05)
        assert dirty_bytes() - before <= 16 * MB, "the file's pages were still dirty 10 s after the write-back started"
    finally:
        os.close(fd)
