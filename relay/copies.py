"""Tracked copies rendered for their recipients; in the CPU pool, into temporary files instead of memory.

A copy of a 20 MB message with 100 k links is about 30 MB. Joined in the pool process and pickled
back, it was held there three times (its pieces, the joined bytes, the pickle) and twice more in
the relay while it was unpickled (bench case memory). Rendered in the pool, its pieces are written
to a file as they are made, the pool answers with the file's name, and the relay reads the copy
once, as it sends it, and removes the file: on disk, a copy waiting to go costs page cache the
kernel can reclaim, not process memory (README "Memory"). Files live in the relay process's own
scratch directory under TMPDIR (keep it on disk, not tmpfs, or the copies are in RAM again), removed
when the process stops, and by the next relay to start when the process died (the files hold mail).

Never lose mail: a file that cannot be written (full disk) makes the copy render in memory as
before; a render that fails leaves no file and the message goes untouched, as always.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, replace
from pathlib import Path

from relay.dkim import DkimSigner
from relay.instrument import InstrumentationPlan, Instrumented, LinkMinter, plan_instrumentation
from relay.template import CopyTemplate, SplicingMinter, copy_template

log = logging.getLogger("inflight.relay")

FILE_PREFIX = "inflight-copy-"
SCRATCH_PREFIX = "inflight-scratch-"
OWNER_FILE = "owner.lock"  # flock'd by the live process that owns the directory
UNOWNED_GRACE_SECONDS = 60.0  # a directory without its owner file yet may be one another process is creating
SPLICED_FROM = 3  # recipients of a message from which its copies are spliced into one template


class ScratchDirectory:
    """This relay process's directory for messages and copies in flight.

    A relay killed with SIGKILL (or by the OOM killer, or a power cut) cannot remove its files, and
    they hold recipients' mail: each process owns a directory of its own, holds an flock on a file
    in it while it lives, and removes it when it stops; every relay that starts removes the
    directories whose lock nobody holds any more (a pid could have been reused; a lock cannot).
    """

    def __init__(self, parent: str | None = None) -> None:
        self.parent = parent or tempfile.gettempdir()
        self.path = tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-", dir=self.parent)
        self._owner = os.open(os.path.join(self.path, OWNER_FILE), os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._owner, fcntl.LOCK_EX)
        for abandoned in abandoned_scratch(self.parent):
            shutil.rmtree(abandoned, ignore_errors=True)
            log.warning("scratch-removed path=%s detail='left by a relay process that died'", abandoned)

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        os.close(self._owner)


def abandoned_scratch(parent: str) -> list[str]:
    """Scratch directories in `parent` whose owner is gone."""
    found = []
    with os.scandir(parent) as entries:
        candidates = [entry.path for entry in entries if entry.name.startswith(SCRATCH_PREFIX) and entry.is_dir()]
    for path in candidates:
        try:
            owner = os.open(os.path.join(path, OWNER_FILE), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            with contextlib.suppress(OSError):
                if time.time() - os.stat(path).st_mtime > UNOWNED_GRACE_SECONDS:
                    found.append(path)
            continue
        except OSError:
            continue  # another user's, or unreadable: not ours to judge
        try:
            fcntl.flock(owner, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # its process lives
        else:
            found.append(path)
        finally:
            os.close(owner)
    return found


@dataclass(frozen=True)
class Rendered:
    """One recipient's copy: its bytes in `result.data`, or, rendered into a file, in `path` (result.data empty)."""

    result: Instrumented
    path: str | None = None

    def read(self) -> bytes:
        """The copy's bytes; a file is read once and removed (blocking: large files belong in a thread)."""
        if self.path is None:
            return self.result.data
        try:
            with open(self.path, "rb") as file:
                return file.read()
        finally:
            self.discard()

    def discard(self) -> None:
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


class HeldMessage:
    """The message to send, as the relay holds it: in memory, or, while the CPU pool works on it, in a file alone.

    The relay must keep a message until it went (a copy that cannot be instrumented goes untouched),
    but need not keep it in memory while the pool reads, plans and renders it: spilled, the pool
    reads it from the file (no pickle through a pipe either) and the relay reads it back only for
    a copy sent untouched.
    """

    def __init__(self, data: bytes) -> None:
        self.size = len(data)
        self._data: bytes | None = data
        self._path: str | None = None

    @property
    def path(self) -> str | None:
        """The file holding the message once spilled."""
        return self._path

    async def spill(self, directory: str) -> None:
        """Move the message into a file in `directory` and let go of its bytes; they stay when it cannot be written."""
        if self._data is None:
            return
        path = await asyncio.to_thread(_write_file, directory, self._data)  # writing lets other sessions run
        if path is not None:
            self._path, self._data = path, None

    async def read(self) -> bytes:
        if self._data is not None:
            return self._data
        assert self._path is not None
        return await asyncio.to_thread(Path(self._path).read_bytes)

    def discard(self) -> None:
        if self._path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)


def discard(rendered: Iterable[Rendered]) -> None:
    """Remove the files of copies that will not be read (a failed batch, a send cut short)."""
    for copy in rendered:
        copy.discard()


def discard_when_done(job: Future[list[Rendered]]) -> None:
    """A pool job's files, once nobody waits for its copies (the send timed out while the pool rendered)."""
    if not job.cancelled() and job.exception() is None:
        discard(job.result())


class InlineCopies:
    """A message's copies rendered in this process, batch after batch: planned once, and its template made
    once (relay/template.py) when it has SPLICED_FROM recipients or more (the template costs about what two
    spliced copies save). For messages below the CPU pool's threshold: the plan and the template are held
    until the last batch, a copy's size or so."""

    def __init__(self, message: bytes, minters: Sequence[SplicingMinter], dkim: DkimSigner) -> None:
        self._plan = plan_instrumentation(message)
        self._template = copy_template(self._plan, minters[0]) if len(minters) >= SPLICED_FROM else None
        self._dkim = dkim

    def render(self, minters: Sequence[LinkMinter]) -> list[Rendered]:
        return [_render(self._plan, self._template, minter, self._dkim, None) for minter in minters]


def render_copies(message: bytes | str, minters: Sequence[LinkMinter], dkim: DkimSigner, *, directory: str) -> list[Rendered]:
    """Plan once, render and sign once per recipient, in a worker process of the CPU pool: the message as a
    file's name (HeldMessage.path) or its bytes, the copies as names of files in `directory` instead of pickled
    bytes. Never spliced: a 100 k-link template would be held beside each copy (smaller messages: InlineCopies)."""
    plan = plan_instrumentation(message if isinstance(message, bytes) else Path(message).read_bytes())
    rendered: list[Rendered] = []
    try:
        for minter in minters:
            rendered.append(_render(plan, None, minter, dkim, directory))
    except BaseException:
        discard(rendered)
        raise
    return rendered


def _render(plan: InstrumentationPlan, template: CopyTemplate | None, minter: LinkMinter, dkim: DkimSigner,
            directory: str | None) -> Rendered:
    if directory is not None and not dkim.configured:
        return _render_into_file(plan, minter, directory)
    result = (template.render(minter) if template is not None else None) or plan.render(minter)
    if result.outcome != "instrumented":
        return Rendered(result)
    signed = replace(result, data=dkim.sign(result.data))  # over the whole copy: signing needs all of it
    del result
    if directory is None:
        return Rendered(signed)
    path = _write_file(directory, signed.data)
    return Rendered(signed) if path is None else Rendered(replace(signed, data=b""), path)


def _render_into_file(plan: InstrumentationPlan, minter: LinkMinter, directory: str) -> Rendered:
    path = _new_file(directory)
    if path is None:
        return Rendered(plan.render(minter))
    try:
        with open(path, "wb") as file:
            result = plan.render(minter, file.writelines)
    except OSError:  # closing flushed into a full disk
        result = Instrumented(b"", "failed", "copy file not written", 0)
    if result.outcome == "instrumented":
        return Rendered(result, path)
    os.unlink(path)
    # A write that failed (full disk) fails the render: in memory it still goes tracked.
    return Rendered(plan.render(minter)) if result.outcome == "failed" else Rendered(result)


def _write_file(directory: str, data: bytes) -> str | None:
    path = _new_file(directory)
    if path is None:
        return None
    try:
        with open(path, "wb") as file:
            file.write(data)
    except OSError:
        os.unlink(path)
        return None
    return path


def _new_file(directory: str) -> str | None:
    try:
        handle, path = tempfile.mkstemp(prefix=FILE_PREFIX, dir=directory)
    except OSError:
        return None
    os.close(handle)
    return path
