"""A durable local journal in front of the store: what a process answered survives a dead store and its own crash.

The tracker answers a hit, and the relay a delivered message, once its record is written to this
journal and fsync'd — not once the store has it — so a store that is slow, locked or down costs
neither a redirect nor a 451. A background task moves records to the store in batches, and retries
while the store is away. Replaying is safe because every record is idempotent in the store (events
by their uid, ledger rows by their key): a record stored just before a crash and replayed after it
is stored once.

Group commit: appends that arrive while a write and fsync run wait together for the next one, so N
concurrent hits cost one write and one fsync, not N (bench case `spool`).

Files: `<dir>/<store key>-<pid>-<nonce>.<n>.journal`. The process writing a file holds an flock on
it for as long as it has records the store has not confirmed. A file nobody holds was left by a
process that died (or stopped while the store was away); a process of the same store takes it
over — lock, read, deliver, delete — at start and every TAKEOVER_SECONDS. The lock is what keeps
two live processes (workers) from replaying one file; the store key (a hash of the store URL) keeps
a journal from ever being delivered to another store.

Record: 4-byte big-endian payload length, 4-byte CRC-32 of the payload, then the payload (JSON
`[kind, body]`). A record cut by a crash in the middle of a write fails its length or its checksum;
it and whatever follows were never acknowledged (their fsync had not returned), so they are dropped.

A file is written in place, not appended to: each group is written at the end of what the file
holds followed by an END header (length 0), which the next group overwrites, and once everything in
the live file is stored the file starts again from its beginning (an END written at offset 0)
instead of being truncated. Truncating a file and growing it again are changes to the file system's
metadata: each made the next fdatasync wait for a journal commit, which waits for every other
file's pending data on that file system (the store's), and a truncate held up the group commits
behind it for up to 15 ms (bench case `tracker`, redirect p99 at half load). Overwriting blocks the
file already has needs neither. Bytes past an END are records stored before: never read again.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import secrets
import struct
import time
import zlib
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson

from store.io_thread import IoThread
from store.model import NewEvent

log = logging.getLogger("inflight.spool")

HEADER = struct.Struct(">II")  # payload length, CRC-32 of the payload
END = HEADER.pack(0, 0)  # where the records of a file end (a record is never empty)
MAX_RECORD_BYTES = 16 * 1024 * 1024  # a length beyond this is a torn or foreign header, not a record
SEGMENT_BYTES = 4 * 1024 * 1024  # a journal file is sealed past this size; deleted once all its records are stored
BATCH = 500  # records per delivery to the store
# Under load, deliveries of the kinds registered with `gather` (the tracker's hits, the relay's ledger
# rows, events and send rows) start at most this often, so each carries what came meanwhile: a hit
# stored in a batch of 100 costs a quarter of one stored alone (bench case `tracker`). A record after a
# quiet spell, a full batch, a reader waiting for its writes and any record of another kind go at once.
GATHER_SECONDS = 0.05
TAKEOVER_SECONDS = 30.0  # how often files left by dead processes are looked for
REPORT_SECONDS = 10.0  # how often a non-empty spool logs its depth and age
RETRY_SECONDS = (0.2, 5.0)  # first and longest wait between attempts while the store is away
UNDELIVERABLE = "undeliverable.jsonl"  # records whose body no handler can read: kept for the operator, not retried


def store_key(store_url: str) -> str:
    """A short name for the store: a hash of its URL without the credentials, so a rotated password
    still finds the journals written before, and no password can be read back from a file name."""
    url = urlsplit(store_url)
    where = f"{url.scheme}://{url.hostname or ''}:{url.port or ''}{url.path}"
    return hashlib.sha256(where.encode()).hexdigest()[:12]


def frame(payload: bytes) -> bytes:
    return HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def read_frames(data: bytes) -> tuple[list[bytes], int]:
    """The payloads of the whole records at the start of `data`, and how many bytes they take."""
    payloads, offset = [], 0
    while offset + HEADER.size <= len(data):
        length, checksum = HEADER.unpack_from(data, offset)
        end = offset + HEADER.size + length
        if length == 0 or length > MAX_RECORD_BYTES or end > len(data):
            break
        payload = data[offset + HEADER.size:end]
        if zlib.crc32(payload) != checksum:
            break
        payloads.append(payload)
        offset = end
    return payloads, offset


def encode_record(kind: str, body: Any) -> bytes:
    """A record's payload, JSON `[kind, body]`, in orjson's bytes (json's took ~14x longer: a tenth of what
    answering a hit cost the tracker). What orjson refuses and json writes goes through json, as before: a
    lone surrogate (a byte a decoder kept with surrogateescape, as in an upstream's reply that is no UTF-8)
    or a key that is not a string."""
    try:
        return orjson.dumps([kind, body])
    except TypeError:
        return json.dumps([kind, body], separators=(",", ":")).encode()


def decode_record(payload: bytes) -> Any:
    """A record's `[kind, body]`; the escape of a lone surrogate, which orjson refuses, is read by json."""
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        return json.loads(payload)


def event_body(event: NewEvent) -> dict[str, Any]:
    """An event as spooled: its set fields (its uid among them, so a replay is recognised)."""
    return {name: value for name, value in vars(event).items() if value is not None}


def event_from_body(body: dict[str, Any]) -> NewEvent:
    return NewEvent(**body)


@dataclass(frozen=True)
class Handler:
    """How one kind of record reaches the store.

    `decode` turns a journal body back into what `deliver` takes; it runs before any store call, so
    an error there is the record's (it goes to UNDELIVERABLE), while an error from `deliver` is the
    store's (the batch is tried again later). Without `decode`, `deliver` takes the records' payloads
    as written (JSON `[kind, body]`) and reads them itself — in another process, say — handing those
    it cannot read to `set_aside`. `key` (with `decode` only) indexes pending records for `pending()`.
    `gather`: records of this kind may wait up to GATHER_SECONDS to go in a bigger batch.
    """

    deliver: Callable[[list[Any]], Awaitable[None]]
    decode: Callable[[Any], Any] | None = None
    key: Callable[[Any], str | None] | None = None
    gather: bool = False


class _Segment:
    """One journal file: its records are either this process's own or taken over from a dead one."""

    __slots__ = ("confirmed", "fd", "path", "records", "size", "writing")

    def __init__(self, path: Path, fd: int, *, records: int = 0, size: int = 0) -> None:
        self.path, self.fd = path, fd
        self.records = records  # written (own) or read (taken over)
        self.confirmed = 0  # of those, stored
        self.size = size
        self.writing = False


class _Entry:
    __slots__ = ("at", "data", "key", "kind", "segment", "urgent")

    def __init__(self, data: bytes, kind: str, key: str | None, at: float, urgent: bool = True) -> None:
        self.data, self.kind, self.key, self.at, self.urgent = data, kind, key, at, urgent
        self.segment: _Segment | None = None


def _write_at(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _write_and_sync(fd: int, data: bytes, offset: int) -> None:
    _write_at(fd, data + END, offset)
    os.fdatasync(fd)  # the data (and the size, when the file grew); not the mtime fsync would also flush (~30% less)


def _sync_directory(directory: Path) -> None:
    """A new file's name is durable only once its directory is synced."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """The process's journal: `append` returns once the record is durable; a background task stores it.

    Handlers are registered per kind by whoever writes that kind (the tracker: hits; the relay:
    ledger rows and events) before `open`, which takes over the files of dead processes whose kinds
    this process can deliver.
    """

    def __init__(self, directory: Path, *, store_url: str, batch: int = BATCH, segment_bytes: int = SEGMENT_BYTES,
                 retry_seconds: tuple[float, float] = RETRY_SECONDS, report_seconds: float = REPORT_SECONDS,
                 takeover_seconds: float = TAKEOVER_SECONDS, gather_seconds: float = GATHER_SECONDS) -> None:
        self.directory = directory
        self.prefix = store_key(store_url)
        self.batch = batch
        self.segment_bytes = segment_bytes
        self.retry_seconds = retry_seconds
        self.report_seconds = report_seconds
        self.takeover_seconds = takeover_seconds
        self.gather_seconds = gather_seconds
        self.handlers: dict[str, Handler] = {}
        self.fsyncs = 0  # group commits done: appends / fsyncs is the group size (bench case spool)
        self.store_failing_since: float | None = None  # monotonic time of the first failed delivery, while failing
        self._name = ""  # set by open(): in the process that writes (a worker forked after construction has its own)
        self._io: IoThread | None = None  # one thread: writes, truncations and deletions stay in order
        self._unwritten: list[tuple[_Entry, asyncio.Future[None]]] = []
        self._own: collections.deque[_Entry] = collections.deque()  # durable, not yet stored, in append order
        self._taken: collections.deque[_Entry] = collections.deque()  # read from dead processes' files
        self._taken_paths: set[Path] = set()
        self._finished: set[_Segment] = set()  # sealed own files and taken-over ones: deleted once all stored
        self._skipped: set[Path] = set()  # files with kinds this process has no handler for
        self._by_key: dict[str, list[_Entry]] = {}
        self._segment: _Segment | None = None
        # A sealed own file whose records are all stored, started again: the next live file. Two files take
        # turns under steady load, so rotating creates, syncs and deletes nothing (all metadata: see above).
        self._spare: _Segment | None = None
        self._segments = 0
        self._appended = 0  # own records handed to append
        self._stored = 0  # own records confirmed by the store (in append order)
        self._settle_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._wake = asyncio.Event()
        self._hurry = asyncio.Event()  # a reader waits for its writes, or the spool closes: deliver now
        self._last_delivery = 0.0  # monotonic time the last delivery started
        self._urgent = 0  # own records of kinds without `gather`, written and not yet stored
        self._writer: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False

    def register(self, kind: str, handler: Handler) -> None:
        self.handlers[kind] = handler

    # --- the hot path ------------------------------------------------------------------

    def append(self, kind: str, body: Any) -> asyncio.Future[None]:
        """Journal a record; the future resolves once it is on disk (fsync'd), with OSError when the
        disk refused it — the record then still goes to the store from memory. Cancelling the
        future (a caller's time budget) does not withdraw the record."""
        if self._closing or self._io is None:
            raise RuntimeError("spool is not open")
        handler = self.handlers[kind]
        entry = _Entry(encode_record(kind, body), kind,
                       handler.key(body) if handler.key else None, time.time(), not handler.gather)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._unwritten.append((entry, done))
        self._appended += 1
        if entry.key is not None:
            self._by_key.setdefault(entry.key, []).append(entry)
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_groups())
        return done

    async def _write_groups(self) -> None:
        """The single writer: everything appended while the previous fsync ran goes in one write and one fsync."""
        io = self._io
        assert io is not None  # append() checked it: the spool is open
        try:
            while self._unwritten:
                group, self._unwritten = self._unwritten, []
                segment = await self._current_segment()
                data = b"".join(frame(entry.data) for entry, _ in group)
                segment.writing = True
                try:
                    await io.run(_write_and_sync, segment.fd, data, segment.size)
                    error: OSError | None = None
                except OSError as exc:
                    error = exc
                    log.error("spool-write-failed path=%s records=%d error=%s (kept in memory until stored)",
                              segment.path, len(group), exc)
                    with contextlib.suppress(OSError):  # drop a partial write: the file ends where it did
                        await io.run(_write_at, segment.fd, END, segment.size)
                finally:
                    segment.writing = False
                self.fsyncs += 1
                if error is None:
                    segment.size += len(data)
                    segment.records += len(group)
                for entry, done in group:
                    entry.segment = segment if error is None else None
                    self._own.append(entry)
                    if entry.urgent:
                        self._urgent += 1
                        self._hurry.set()
                    if not done.done():
                        if error is None:
                            done.set_result(None)
                        else:
                            done.set_exception(error)
                self._wake.set()
        finally:
            self._writer = None

    async def _current_segment(self) -> _Segment:
        segment = self._segment
        if segment is not None and segment.size < self.segment_bytes:
            return segment
        if segment is not None:
            self._finished.add(segment)  # sealed: no more writes
        if self._spare is not None:
            self._segment, self._spare = self._spare, None
            return self._segment
        self._segments += 1
        path = self.directory / f"{self._name}.{self._segments}.journal"
        assert self._io is not None  # open
        fd = await self._io.run(self._create, path)
        self._segment = _Segment(path, fd)
        return self._segment

    def _create(self, path: Path) -> int:
        """Create, lock, then name a journal file: under its final name it is never unlocked, so no
        other process can take over a live file."""
        temporary = path.with_suffix(".new")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(temporary, path)
        _sync_directory(self.directory)
        return fd

    # --- what others read ----------------------------------------------------------------

    def depth(self) -> int:
        """Records not yet confirmed by the store (this process's and those taken over)."""
        return len(self._unwritten) + len(self._own) + len(self._taken)

    def oldest_age(self) -> float:
        """Seconds since the oldest record not yet in the store was appended (0 when empty)."""
        oldest = min((queue[0].at for queue in (self._taken, self._own) if queue), default=None)
        if oldest is None and self._unwritten:
            oldest = self._unwritten[0][0].at
        return 0.0 if oldest is None else max(0.0, time.time() - oldest)

    def pending(self, key: str) -> Iterator[Any]:
        """The decoded bodies of records with this key that the store has not confirmed yet."""
        for entry in self._by_key.get(key, ()):
            decode = self.handlers[entry.kind].decode
            assert decode is not None, "records are keyed only for handlers that decode them"
            yield decode(decode_record(entry.data)[1])

    async def settled(self, timeout: float) -> bool:
        """Wait until every record this process appended before the call is in the store (read your
        writes: the events API answers after the hits it follows); False when `timeout` passed first."""
        target = self._appended
        if self._stored >= target:
            return True
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._settle_waiters.append((target, waiter))
        self._hurry.set()
        try:
            await asyncio.wait_for(waiter, timeout)
            return True
        except TimeoutError:
            return False

    # --- moving records to the store -----------------------------------------------------

    async def open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._name = f"{self.prefix}-{os.getpid()}-{secrets.token_hex(4)}"
        self._io = IoThread("inflight-spool")
        self._io.start()
        self._closing = False
        await self._take_over()
        self._tasks = [asyncio.create_task(self._drain()), asyncio.create_task(self._report()),
                       asyncio.create_task(self._take_over_periodically())]

    async def close(self, timeout: float = 5.0) -> None:
        """Write what was appended, give the store `timeout` seconds to take the rest, then let go of
        the files: what is still in them is taken over by the next process of this store."""
        if self._io is None:
            return
        self._closing = True
        self._hurry.set()
        if self._writer is not None:
            await self._writer
        if self.depth():
            settled = await self.settled(timeout)
            if not settled:
                log.warning("spool-closed-with-records depth=%d oldest_age=%.1fs dir=%s (delivered at next start)",
                            self.depth(), self.oldest_age(), self.directory)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for segment in self._finished | {s for s in (self._segment, self._spare) if s is not None}:
            if segment.confirmed >= segment.records:
                await self._io.run(self._delete, segment)
            else:
                await self._io.run(os.close, segment.fd)  # unlocked: the next process takes it over
        self._finished.clear()
        self._segment = self._spare = None
        await self._io.stop()
        self._io = None

    def _next_batch(self) -> tuple[collections.deque[_Entry], list[_Entry]]:
        queue = self._taken or self._own
        size = 1 if self.store_failing_since is not None else self.batch  # probe a store that was away with one
        return queue, [queue[index] for index in range(min(size, len(queue)))]

    async def _drain(self) -> None:
        retry = self.retry_seconds[0]
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._taken or self._own:
                await self._gather()
                self._last_delivery = time.monotonic()
                queue, batch = self._next_batch()
                try:
                    await self._deliver(batch)
                except Exception as exc:
                    if self.store_failing_since is None:
                        self.store_failing_since = time.monotonic()
                        log.warning("spool-store-unavailable depth=%d error=%s: %s (answers go on; retrying)",
                                    self.depth(), type(exc).__name__, exc)
                    await asyncio.sleep(retry)
                    retry = min(retry * 2, self.retry_seconds[1])
                    continue
                if self.store_failing_since is not None:
                    log.info("spool-store-back after=%.1fs depth=%d", time.monotonic() - self.store_failing_since, self.depth())
                    self.store_failing_since = None
                retry = self.retry_seconds[0]
                for _ in batch:
                    self._confirm(queue.popleft(), own=queue is self._own)
                await self._compact()

    async def _gather(self) -> None:
        """Wait until GATHER_SECONDS after the last delivery started, unless a batch is full or someone hurries it."""
        wait = self._last_delivery + self.gather_seconds - time.monotonic()
        if wait <= 0 or self._hurry.is_set() or self._taken or self._urgent or len(self._own) >= self.batch:
            self._hurry.clear()
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._hurry.wait(), wait)
        self._hurry.clear()

    async def _deliver(self, batch: list[_Entry]) -> None:
        by_kind: dict[str, list[Any]] = {}
        for entry in batch:
            decode = self.handlers[entry.kind].decode
            if decode is None:
                by_kind.setdefault(entry.kind, []).append(entry.data)
                continue
            try:
                by_kind.setdefault(entry.kind, []).append(decode(decode_record(entry.data)[1]))
            except (TypeError, KeyError, ValueError) as exc:
                self.set_aside(entry.data, entry.kind, f"{type(exc).__name__}: {exc}")
        for kind, items in by_kind.items():
            await self.handlers[kind].deliver(items)

    def set_aside(self, payload: bytes, kind: str, reason: str) -> None:
        """A record no handler can read (a format from another version) would block the spool forever:
        keep it in UNDELIVERABLE for the operator and go on."""
        log.error("spool-record-undeliverable kind=%s error=%s (kept in %s)", kind, reason, self.directory / UNDELIVERABLE)
        with (self.directory / UNDELIVERABLE).open("ab") as rejected:
            rejected.write(payload + b"\n")

    def _confirm(self, entry: _Entry, *, own: bool) -> None:
        if entry.segment is not None:
            entry.segment.confirmed += 1
        if entry.key is not None:
            entries = self._by_key[entry.key]
            entries.remove(entry)
            if not entries:
                del self._by_key[entry.key]
        if own:
            self._stored += 1
            self._urgent -= entry.urgent
            if self._settle_waiters and self._settle_waiters[0][0] <= self._stored:
                ready = [w for w in self._settle_waiters if w[0] <= self._stored]
                self._settle_waiters = [w for w in self._settle_waiters if w[0] > self._stored]
                for _, waiter in ready:
                    if not waiter.done():
                        waiter.set_result(None)

    async def _compact(self) -> None:
        """Start the live file again once all it holds is stored; keep one sealed own file so stored as
        the spare; delete the other sealed and taken-over files then."""
        assert self._io is not None  # open
        segment = self._segment
        if segment is not None and segment.size and segment.confirmed == segment.records and not segment.writing:
            await self._start_again(segment)
        for finished in [s for s in self._finished if s.confirmed >= s.records]:
            self._finished.discard(finished)
            if self._spare is None and finished.path not in self._taken_paths:
                self._spare = finished  # a write to it can only come after the END: one thread writes, in order
                await self._start_again(finished)
            else:
                await self._io.run(self._delete, finished)

    async def _start_again(self, segment: _Segment) -> None:
        """Empty a file all of whose records are stored: an END at its start (no fsync: a crash before it
        reaches the disk replays stored records, which the store keeps once)."""
        segment.size = segment.records = segment.confirmed = 0
        assert self._io is not None  # open
        await self._io.run(_write_at, segment.fd, END, 0)

    def _delete(self, segment: _Segment) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(segment.path)
        os.close(segment.fd)

    # --- files left by dead processes ----------------------------------------------------

    async def _take_over_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.takeover_seconds)
            try:
                await self._take_over()
            except OSError:
                log.exception("spool-takeover-failed dir=%s", self.directory)

    async def _take_over(self) -> None:
        assert self._io is not None  # open
        for path in await self._io.run(self._orphans):
            taken = await self._io.run(self._read_orphan, path)
            if taken is None:
                continue
            segment, entries = taken
            self._taken_paths.add(path)
            if not entries:
                await self._io.run(self._delete, segment)
                continue
            log.info("spool-takeover path=%s records=%d", path.name, len(entries))
            self._finished.add(segment)
            for entry in entries:
                self._taken.append(entry)
                if entry.key is not None:
                    self._by_key.setdefault(entry.key, []).append(entry)
            self._wake.set()

    def _orphans(self) -> list[Path]:
        own = f"{self._name}."
        candidates = [p for p in self.directory.glob(f"{self.prefix}-*.journal")
                      if not p.name.startswith(own) and p not in self._taken_paths and p not in self._skipped]
        with_times = []
        for path in candidates:
            with contextlib.suppress(FileNotFoundError):
                with_times.append((path.stat().st_mtime, path.name, path))
        return [path for _, _, path in sorted(with_times)]

    def _read_orphan(self, path: Path) -> tuple[_Segment, list[_Entry]] | None:
        """Lock and read a file nobody holds; None when a live process holds it, it is gone, or this
        process cannot deliver what it holds."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.stat(path).st_ino != os.fstat(fd).st_ino:
                raise FileNotFoundError(path)  # deleted by the process that took it over just before us
            data = b""
            while chunk := os.read(fd, 1 << 20):
                data += chunk
        except (BlockingIOError, FileNotFoundError):
            os.close(fd)
            return None
        payloads, used = read_frames(data)
        if used < len(data) and data[used:used + HEADER.size] != END:
            log.warning("spool-torn-tail path=%s offset=%d (a write cut by a crash; never acknowledged)", path.name, used)
        at = os.fstat(fd).st_mtime
        entries = []
        for payload in payloads:
            try:
                kind, body = decode_record(payload)
            except ValueError as exc:
                self.set_aside(payload, "?", f"{type(exc).__name__}: {exc}")
                continue
            handler = self.handlers.get(kind)
            if handler is None:
                log.warning("spool-takeover-skipped path=%s kind=%s (no handler in this process; left for one that has it)",
                            path.name, kind)
                self._skipped.add(path)
                os.close(fd)
                return None
            entries.append(_Entry(payload, kind, handler.key(body) if handler.key else None, at))
        segment = _Segment(path, fd, records=len(entries), size=used)
        for entry in entries:
            entry.segment = segment
        return segment, entries

    async def _report(self) -> None:
        while True:
            await asyncio.sleep(self.report_seconds)
            if self.depth():
                log.info("spool depth=%d oldest_age=%.1fs store=%s", self.depth(), self.oldest_age(),
                         "unavailable" if self.store_failing_since is not None else "ok")
