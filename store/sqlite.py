"""The SQLite backend (aiosqlite, WAL): the embedded default for one box (`make run`)."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from datetime import datetime
from operator import attrgetter
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from store.group_commit import GroupCommit
from store.model import (
    MAX_LIMIT,
    Delivered,
    DeliveryClaim,
    EventQuery,
    Judgement,
    NewEvent,
    StatsCounts,
    StatsQuery,
    StoredEvent,
    ThrottleEvent,
    WebhookJob,
    implied_uid,
    now_rfc3339,
    rfc3339,
)
from store.sql import (
    COLUMN,
    COLUMNS,
    SEND_COLUMNS,
    SENT_HORIZON_SECONDS,
    THROTTLE_HORIZON_SECONDS,
    THROTTLE_READ_LIMIT,
    ThrottleCursor,
    delivered_rows,
    engagement_rows,
    filters,
    stats_counts,
    stats_sql,
)
from store.sqlite_dashboard import SqliteDashboardQueries
from store.sqlite_feedback import FEEDBACK_SCHEMA, SqliteFeedback
from store.writeback import start_writeback
from tracking.claims import TrackedSend

log = logging.getLogger("inflight.store")
T = TypeVar("T")

PURGE_BATCH = 5000  # rows per write transaction, so a large purge never holds the write lock for long


SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    project TEXT NOT NULL,
    contact TEXT NOT NULL,
    recipient TEXT NOT NULL,
    message_id TEXT NOT NULL,
    at TEXT NOT NULL,
    campaign TEXT,
    template TEXT,
    template_type TEXT,
    campaign_type TEXT,
    subject TEXT,
    sender TEXT,
    link TEXT,
    ip TEXT,
    user_agent TEXT,
    tracked INTEGER,
    reason TEXT,
    opens INTEGER,
    clicks INTEGER,
    first INTEGER,
    implied INTEGER,
    agent TEXT,
    agent_reason TEXT,
    uid TEXT
);
-- Recording is idempotent on the caller's uid (NULL on rows older than it, which UNIQUE allows).
CREATE UNIQUE INDEX IF NOT EXISTS events_uid ON events (uid);
CREATE INDEX IF NOT EXISTS events_project_at ON events (project, at);
CREATE INDEX IF NOT EXISTS events_project_contact ON events (project, contact, at);
CREATE INDEX IF NOT EXISTS events_message_contact ON events (project, message_id, contact, name);
CREATE INDEX IF NOT EXISTS events_project_campaign ON events (project, campaign, at);
CREATE INDEX IF NOT EXISTS events_project_template ON events (project, template, at);
-- Settings -> Tracking changed at runtime; a row here wins over the project's TOML `tracking`.
CREATE TABLE IF NOT EXISTS tracking_settings (
    project TEXT PRIMARY KEY,
    mode TEXT NOT NULL,
    updated_at TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS webhook_outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id INTEGER NOT NULL,
    project TEXT NOT NULL,
    key TEXT NOT NULL,
    created REAL NOT NULL,
    due REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS webhook_outbox_due ON webhook_outbox (due);
CREATE INDEX IF NOT EXISTS webhook_outbox_event ON webhook_outbox (event_id);
-- The idempotency ledger: which recipients of a message the upstream already accepted, so an
-- app retrying after a 4xx (or a lost connection) never makes a recipient receive it twice.
CREATE TABLE IF NOT EXISTS deliveries (
    project TEXT NOT NULL,
    message_id TEXT NOT NULL,
    recipient TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    state TEXT NOT NULL DEFAULT 'delivered',  -- 'sending': claimed by an attempt until expires_at
    owner INTEGER,  -- the claiming process (pid): its claims are free once it is gone
    PRIMARY KEY (project, message_id, recipient)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS deliveries_expires ON deliveries (expires_at);
-- Who each tracked copy went to, named by the random send id its opaque tokens carry: the URLs
-- stay short and say nothing, and the tracker reads this row when it records the copy's events.
CREATE TABLE IF NOT EXISTS sends (
    project TEXT NOT NULL,
    send_id BLOB NOT NULL,
    message_id TEXT NOT NULL,
    contact TEXT NOT NULL,
    recipient TEXT NOT NULL,
    sent_at INTEGER NOT NULL,
    campaign TEXT,
    template TEXT,
    template_type TEXT,
    campaign_type TEXT,
    PRIMARY KEY (project, send_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS sends_project_sent ON sends (project, sent_at);
-- Throttle events of every relay process on this file (relay/throttle.py applies them).
CREATE TABLE IF NOT EXISTS throttle_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    node INTEGER NOT NULL,
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    username TEXT NOT NULL DEFAULT '',
    per_minute INTEGER NOT NULL DEFAULT 0,
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS throttle_events_at ON throttle_events (at);
-- Dashboard accounts (`inflight users add`) and their sessions, kept by the hash of the cookie.
CREATE TABLE IF NOT EXISTS dashboard_users (
    email TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,
    project TEXT,
    admin INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS dashboard_sessions (
    token_hash TEXT PRIMARY KEY,
    email TEXT NOT NULL,
    csrf TEXT NOT NULL,
    expires REAL NOT NULL
);
""" + FEEDBACK_SCHEMA


_INSERT = (f"INSERT INTO events ({', '.join(COLUMNS)}) VALUES ({', '.join('?' for _ in COLUMNS)}) "
           "ON CONFLICT (uid) DO NOTHING")
_ENGAGEMENT_STATE = """SELECT
    (SELECT subject FROM events WHERE project = ? AND message_id = ? AND name = 'email.sent' LIMIT 1),
    (SELECT sender FROM events WHERE project = ? AND message_id = ? AND name = 'email.sent' LIMIT 1),
    (SELECT count(*) FROM events WHERE project = ? AND message_id = ? AND contact = ? AND name = 'email.open'),
    (SELECT count(*) FROM events WHERE project = ? AND message_id = ? AND contact = ? AND name = 'email.click')"""
_values = attrgetter(*COLUMNS)  # an event's values in COLUMNS order
# A checkpoint at most this often, after a commit: its writing to the database file then stays small
# enough not to hold up others' fsyncs for long (redirect p99 at half load, 5 s runs: 21-38 ms with a
# checkpoint every 100 commits, ~5 s, and no write-back; 7-15 ms with one a second). SQLite's own
# would wait for 1000 WAL pages, in the commit that fills them.
CHECKPOINT_SECONDS = 1.0
WRITEBACK_SECONDS = 0.05  # between checkpoints, the WAL's new pages are sent to disk at most this often
WRITE_BATCH = 1000  # queued writes per transaction: bounds one transaction's time under a flood
_PROJECT = COLUMN["project"]
_UID = COLUMN["uid"]
# One queued write, run in the connection's thread inside the writer's transaction:
# (ids stored, whether it queued a webhook).
_Write = Callable[[sqlite3.Connection], tuple[list[int], bool]]
# Opens and clicks of one message at or after a time: the history a verdict looks at. Implied
# opens are left out: no request made them, their click stands for them. `+at` keeps SQLite off
# events_project_at: that plan walked every recent hit of the whole project (a cost growing with
# traffic; bench/ tracker case); events_message_contact finds this message's few rows.
_MARK = "?".format  # SQLite's placeholder, whatever its place
_PAIR = "message_id || char(0) || contact"  # one message to one contact: the unit of "unique"
_RECENT_HITS = (
    "SELECT id, name, at, ip, user_agent, link, agent, agent_reason FROM events "
    "WHERE project = ? AND message_id = ? AND name IN ('email.open', 'email.click') AND +at >= ? "
    "AND implied IS NOT 1 ORDER BY +at, id"
)
# Set `agent` on events a later hit exposed; the new reason is appended to the old one. A
# re-labelled click takes its implied open along (same message, contact and time), so a
# scanner's click does not leave a human open behind in the stats.
_LABEL = "UPDATE events SET agent = ?, agent_reason = TRIM(COALESCE(agent_reason, '') || ' ' || ?) WHERE "
_IMPLIED_OF = ("implied = 1 AND (project, message_id, contact, at) = "
               "(SELECT project, message_id, contact, at FROM events WHERE id = ? AND name = 'email.click')")

async def add_missing_columns(db: aiosqlite.Connection) -> None:
    """Bring tables made by an older release up to SCHEMA by adding the columns they lack.

    `CREATE TABLE IF NOT EXISTS` leaves an existing table as it was, and SCHEMA's indexes on
    newer columns would then fail. SCHEMA stays the one description of the tables: the wanted
    columns are read from it, applied to an in-memory database. Only nullable or defaulted
    columns are ever added, which is the only kind SQLite can add and the only kind we add.
    """
    reference = sqlite3.connect(":memory:")
    try:
        reference.executescript(SCHEMA)
        tables = [row[0] for row in reference.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            if table.startswith("sqlite_"):
                continue
            existing = {row[1] for row in await db.execute_fetchall(f"PRAGMA table_info({table})")}
            if not existing:
                continue  # a new table: SCHEMA creates it whole
            for _, name, declared, _, default, _ in reference.execute(f"PRAGMA table_info({table})"):
                if name not in existing:
                    suffix = f" DEFAULT {default}" if default is not None else ""
                    await db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {declared}{suffix}")
    finally:
        reference.close()


def _log_checkpoint_failure(done: asyncio.Future[None]) -> None:
    if not done.cancelled() and done.exception() is not None:
        log.warning("store checkpoint failed (the WAL grows until one succeeds): %s", done.exception())


def _transact(db: sqlite3.Connection, write: Callable[[sqlite3.Connection], T]) -> T:
    db.execute("BEGIN IMMEDIATE")
    try:
        result = write(db)
    except BaseException:
        db.rollback()
        raise
    db.commit()
    return result


def _begin_and_write(db: sqlite3.Connection, writes: list[_Write]) -> list[tuple[list[int], bool]]:
    db.execute("BEGIN IMMEDIATE")
    return [write(db) for write in writes]


class SqliteEventStore(SqliteFeedback, SqliteDashboardQueries):
    """One connection, serialised by aiosqlite's worker thread; WAL lets other processes read.

    Every write is one `BEGIN IMMEDIATE` transaction: SQLite's write lock is taken before the
    first read, so counts read inside it are exact even when another process (a second
    tracker on the same file) records at the same moment.

    Events are group-committed: `record` calls and `record_engagements` hits that arrive while a
    transaction is being written queue up and go together, in arrival order, in the next one
    (a single writer task), so a burst of pixel hits costs a few transactions instead of one
    each. Every caller still returns only after the commit that holds its events, so the tracker
    answers a hit only once it is stored: answered hits equal stored events, across a crash of
    the process too (synchronous=NORMAL in WAL mode; an OS crash or power loss can lose the last
    transactions).

    The WAL is copied back into the database file (checkpointed) by a connection of its own in
    a thread of its own, every CHECKPOINT_SECONDS while there are writes, not by the commit that
    happens to fill it: that commit, and every hit waiting on it, paid for the whole copy
    (bench tracker: p99 about 11 -> 6 ms). Between checkpoints that thread starts writing the
    WAL's new pages back (store/writeback.py) every WRITEBACK_SECONDS, so a checkpoint finds little
    left to write.
    """

    PAIR = _PAIR  # for the dashboard queries

    def __init__(self, path: Path, *, webhook_projects: Collection[str] = ()) -> None:
        self.path = path
        self.webhook_projects = frozenset(webhook_projects)
        self.outbox_added = asyncio.Event()  # set when this process queued webhooks; wakes the worker
        self._db: aiosqlite.Connection | None = None
        self._write_lock = asyncio.Lock()
        # Locked, busy, disk full: the same for every write of a batch (see GroupCommit).
        self._writes = GroupCommit(self._commit, limit=WRITE_BATCH, whole=(sqlite3.OperationalError,))
        self._checkpointed = self._written_back = 0.0  # monotonic times the last checkpoint and write-back started
        self._checkpointer: ThreadPoolExecutor | None = None
        self._checkpoint_job: asyncio.Future[None] | None = None  # what the checkpointer runs: a checkpoint or a write-back
        self._checkpoint_db: sqlite3.Connection | None = None  # used in the checkpointer's thread only
        self._wal_fd: int | None = None  # the same
        self._reader: sqlite3.Connection | None = None  # point reads, on the event loop's thread (see point_read)
        self.node = int.from_bytes(os.urandom(7), "big")  # this store's name among the throttle events' writers
        self._throttles = ThrottleCursor(time.time())

    @classmethod
    def from_url(cls, url: str, *, webhook_projects: Collection[str] = ()) -> SqliteEventStore:
        return cls(sqlite_path(url), webhook_projects=webhook_projects)

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("store is not open: call await store.open() first")
        return self._db

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = await aiosqlite.connect(self.path)
        self._checkpointer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inflight-checkpoint")
        self._db.row_factory = aiosqlite.Row
        await self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL is durable across process crashes in WAL mode; only an OS crash can lose the
        # last transactions, which is the usual trade for an event log.
        await self._db.execute("PRAGMA synchronous=NORMAL")
        await self._db.execute("PRAGMA busy_timeout=5000")
        await self._db.execute("PRAGMA wal_autocheckpoint=0")  # see _committed
        await add_missing_columns(self._db)
        await self._db.executescript(SCHEMA)
        await self._db.commit()
        self._reader = sqlite3.connect(self.path, isolation_level=None)  # autocommit: each read sees the latest commit
        self._reader.row_factory = sqlite3.Row
        self._reader.execute("PRAGMA busy_timeout=0")  # never wait on the event loop: busy goes through the thread

    async def close(self) -> None:
        await self._writes.drained()  # events already handed to record() are committed before the connection goes
        if self._checkpoint_job is not None:
            await asyncio.wait([self._checkpoint_job])
        if self._checkpointer is not None:
            await asyncio.get_running_loop().run_in_executor(self._checkpointer, self._close_checkpoint_db)
            self._checkpointer.shutdown()
            self._checkpointer = None
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self._db is not None:
            await self._db.close()
            self._db = None

    async def point_read(self, sql: str, args: Sequence[Any]) -> list[sqlite3.Row]:
        """A read of a few rows by an index, made at once on the event loop's thread, on a connection of its own.

        Asked per relayed message (its project's mode, each recipient's suppression): through
        aiosqlite's thread each read cost two thread wake-ups and GIL hand-offs, ~70 µs against ~4 µs
        in place (idle; bench case tracking_mode). In WAL mode a reader does not wait for writers;
        should SQLite answer busy all the same (a recovery, a checkpoint resetting the WAL) the read
        goes through the thread, which may wait.
        """
        if self._reader is None:
            raise RuntimeError("store is not open: call await store.open() first")
        try:
            return self._reader.execute(sql, args).fetchall()
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                raise
        return list(await self.db.execute_fetchall(sql, args))

    async def ping(self) -> bool:
        try:
            async with self.db.execute("SELECT 1") as cursor:
                return (await cursor.fetchone()) is not None
        except (aiosqlite.Error, RuntimeError):
            return False

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        async with self._write_lock:
            await self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                await self.db.rollback()
                raise
            await self.db.commit()
            self._committed()

    def _committed(self) -> None:
        """After a write transaction, in the checkpointer's thread unless it is busy: a checkpoint every
        CHECKPOINT_SECONDS, and the write-back of the WAL's new pages at most every WRITEBACK_SECONDS."""
        if self._checkpoint_job is not None and not self._checkpoint_job.done():
            return
        now = time.monotonic()
        loop = asyncio.get_running_loop()
        if now - self._checkpointed >= CHECKPOINT_SECONDS:
            self._checkpointed = self._written_back = now
            self._checkpoint_job = loop.run_in_executor(self._checkpointer, self._run_checkpoint)
            self._checkpoint_job.add_done_callback(_log_checkpoint_failure)
        elif now - self._written_back >= WRITEBACK_SECONDS:
            self._written_back = now
            self._checkpoint_job = loop.run_in_executor(self._checkpointer, self._write_back_wal)

    def _write_back_wal(self) -> None:
        try:
            if self._wal_fd is None:
                self._wal_fd = os.open(f"{self.path}-wal", os.O_RDONLY | os.O_CLOEXEC)
            start_writeback(self._wal_fd)
        except OSError as exc:  # only an early start of what the checkpoint does anyway
            log.debug("store WAL write-back not started: %s", exc)

    def _run_checkpoint(self) -> None:
        # PASSIVE never waits for, nor blocks, the writer; the next write after a complete one
        # starts the WAL over from its beginning, so the file stays bounded.
        if self._checkpoint_db is None:
            self._checkpoint_db = sqlite3.connect(self.path, check_same_thread=False)
        self._checkpoint_db.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def _close_checkpoint_db(self) -> None:
        if self._checkpoint_db is not None:
            self._checkpoint_db.close()
            self._checkpoint_db = None
        if self._wal_fd is not None:
            os.close(self._wal_fd)
            self._wal_fd = None

    def _insert(self, db: sqlite3.Connection, row: Sequence[Any]) -> int:
        """Insert one event (its values in COLUMNS order) and, when its project has a webhook, its
        outbox row: both or neither. An event whose uid is stored already adds nothing: its id."""
        cursor = db.execute(_INSERT, row)
        if cursor.rowcount == 0:
            (event_id,), = db.execute("SELECT id FROM events WHERE uid = ?", (row[_UID],)).fetchall()
            return int(event_id)
        event_id = cursor.lastrowid or 0
        project = row[_PROJECT]
        if project in self.webhook_projects:
            now = time.time()
            # The idempotency key is random rather than the row id: ids restart with a new
            # database file, and a receiver must never drop a new event as a duplicate.
            db.execute("INSERT INTO webhook_outbox (event_id, project, key, created, due) VALUES (?, ?, ?, ?, ?)",
                       (event_id, project, f"evt_{uuid.uuid4().hex}", now, now))
        return event_id

    async def record(self, events: list[NewEvent]) -> list[int]:
        """Store `events` (in order); their ids once committed."""
        if not events:
            return []
        return await self._writes.submit(lambda db: self._record_in(db, events))

    async def record_engagements(self, batch: list[tuple[NewEvent, Judgement | None]]) -> list[list[int]]:
        """Record opens and clicks, in order, with their counters (and their verdicts, when judged); a click on
        a message never opened first records an implied open before it. Returns the ids each stored, once
        committed. The hits of a batch are queued together: one future each, no task each."""
        return await self._writes.submit_many([functools.partial(self._engagement_in, event=event, judgement=judgement)
                                               for event, judgement in batch])

    async def _commit(self, writes: list[_Write]) -> list[list[int]]:
        # The whole batch is one function run in aiosqlite's thread (its `_execute`, which every
        # aiosqlite call goes through): one trip there per batch instead of several per event,
        # which cost more than the writes themselves.
        async with self._write_lock:
            try:
                results = await self.db._execute(_begin_and_write, self.db._conn, writes)
            except BaseException:
                await self.db.rollback()
                raise
            await self.db.commit()
            self._committed()
        if any(queued for _, queued in results):
            self.outbox_added.set()
        return [ids for ids, _ in results]

    def _record_in(self, db: sqlite3.Connection, events: list[NewEvent]) -> tuple[list[int], bool]:
        return [self._insert(db, _values(event)) for event in events], any(e.project in self.webhook_projects for e in events)

    def _engagement_in(self, db: sqlite3.Connection, event: NewEvent, judgement: Judgement | None) -> tuple[list[int], bool]:
        # Rows are built as lists, not with dataclasses.replace: one hit took three copies of a
        # 24-field frozen dataclass, slower than its insert, while holding the GIL.
        uids = (event.uid, implied_uid(event.uid))
        stored = db.execute("SELECT id FROM events WHERE uid IN (?, ?) ORDER BY id", uids).fetchall()
        if stored:  # recorded before (a replay): counted once, its webhook queued once
            return [int(event_id) for event_id, in stored], False
        row = list(_values(event))
        changes: dict[int, tuple[str, str]] = {}
        if judgement is not None:
            history = db.execute(_RECENT_HITS, (event.project, event.message_id, judgement.since)).fetchall()
            row[COLUMN["agent"]], row[COLUMN["agent_reason"]], changes = judgement.decide(history)
        # Subject and From are not in the tokens (URLs stay short); the relay recorded them.
        key, pair = (event.project, event.message_id), (event.project, event.message_id, event.contact)
        (subject, sender, opens, clicks), = db.execute(_ENGAGEMENT_STATE, key * 2 + pair * 2).fetchall()
        if subject is not None or sender is not None:
            row[COLUMN["subject"]], row[COLUMN["sender"]] = subject, sender
        ids = [self._insert(db, values) for values in engagement_rows(row, event.name, opens, clicks, uids[1])]
        if changes:
            labels = [(agent, reason, event_id) for event_id, (agent, reason) in changes.items()]
            db.executemany(_LABEL + "id = ?", labels)
            db.executemany(_LABEL + _IMPLIED_OF, labels)
        return ids, event.project in self.webhook_projects

    async def events(self, query: EventQuery) -> list[StoredEvent]:
        where, args = filters(query, ("contact", "name", "campaign", "message_id", "agent"), _MARK)
        args.append(max(1, min(query.limit, MAX_LIMIT + 1)))  # +1: the API reads one more to know a next page exists
        sql = f"SELECT * FROM events WHERE {where} ORDER BY at DESC, id DESC LIMIT ?"
        async with self.db.execute(sql, args) as cursor:
            return [dict(row) for row in await cursor.fetchall()]

    async def tracking_mode(self, project: str) -> str | None:
        """The mode set at runtime, or None when the project still follows its TOML value.

        Read on every relayed message, so that a change made by another process (the tracker,
        `inflight settings`) applies to the next one: a primary-key lookup made in place (point_read).
        """
        rows = await self.point_read("SELECT mode FROM tracking_settings WHERE project = ?", (project,))
        return next((str(row[0]) for row in rows), None)

    async def set_tracking_mode(self, project: str, mode: str | None) -> None:
        """Store the mode set at runtime; None forgets it, so the project follows its TOML value again."""
        sql = ("INSERT INTO tracking_settings (project, mode, updated_at) VALUES (?, ?, ?) "
               "ON CONFLICT (project) DO UPDATE SET mode = excluded.mode, updated_at = excluded.updated_at")
        async with self._write_lock:
            if mode is None:
                await self.db.execute("DELETE FROM tracking_settings WHERE project = ?", (project,))
            else:
                await self.db.execute(sql, (project, mode, now_rfc3339()))
            await self.db.commit()

    async def stats(self, query: StatsQuery) -> StatsCounts:
        """Sends, opens and clicks of a campaign, a template or a whole project, in two indexed scans."""
        condition, args = filters(query, ("campaign", "template"), _MARK)
        totals_sql, links_sql = stats_sql(condition, _PAIR)
        totals = await self.db.execute_fetchall(totals_sql, args)
        links = await self.db.execute_fetchall(links_sql, args)
        return stats_counts(next(iter(totals)), list(links))

    # --- webhook outbox --------------------------------------------------------------

    async def claim_webhooks(self, *, now: float, lease: float, limit: int) -> list[WebhookJob]:
        """Take up to `limit` due rows, hiding them from other workers for `lease` seconds.

        A worker that dies mid-POST leaves its rows to reappear when the lease ends: that is
        the at-least-once half of the contract.
        """
        async with self._transaction() as db:
            async with db.execute(
                "SELECT o.id AS outbox_id, o.key AS outbox_key, o.attempts, o.created, e.* FROM webhook_outbox o "
                "LEFT JOIN events e ON e.id = o.event_id WHERE o.due <= ? ORDER BY o.due LIMIT ?",
                (now, limit),
            ) as cursor:
                rows = await cursor.fetchall()
            jobs, gone = [], []
            for row in rows:
                if row["id"] is None:  # the event was purged or forgotten since
                    gone.append(row["outbox_id"])
                    continue
                data = dict(row)
                jobs.append(WebhookJob(outbox_id=data.pop("outbox_id"), key=data.pop("outbox_key"),
                                       attempts=data.pop("attempts"), created=data.pop("created"), event=data))
            if gone:
                await db.execute(f"DELETE FROM webhook_outbox WHERE id IN ({', '.join('?' for _ in gone)})", gone)
            if jobs:
                await db.execute(
                    f"UPDATE webhook_outbox SET due = ? WHERE id IN ({', '.join('?' for _ in jobs)})",
                    [now + lease, *(job.outbox_id for job in jobs)],
                )
        return jobs

    async def finish_webhook(self, outbox_id: int) -> None:
        async with self._transaction() as db:
            await db.execute("DELETE FROM webhook_outbox WHERE id = ?", (outbox_id,))

    async def retry_webhook(self, outbox_id: int, *, due: float, error: str) -> None:
        async with self._transaction() as db:
            await db.execute("UPDATE webhook_outbox SET attempts = attempts + 1, due = ?, last_error = ? WHERE id = ?",
                             (due, error[:500], outbox_id))

    async def pending_webhooks(self) -> int:
        async with self.db.execute("SELECT count(*) FROM webhook_outbox") as cursor:
            row = await cursor.fetchone()
        return int(row[0]) if row else 0

    async def webhook_backlog(self) -> tuple[int, float | None]:
        """Deliveries waiting and when the oldest was recorded (epoch seconds): the /metrics gauges."""
        async with self.db.execute("SELECT count(*), min(created) FROM webhook_outbox") as cursor:
            row = await cursor.fetchone()
        return (int(row[0]), row[1]) if row else (0, None)

    # --- privacy ---------------------------------------------------------------------

    async def _delete_events(self, where: str, args: list[Any]) -> tuple[int, int]:
        """Delete matching events, their pending webhooks and dead letters, in batches; (events, webhooks) deleted."""
        events = webhooks = 0
        while True:
            async with self._transaction() as db:
                async with db.execute(f"SELECT id FROM events WHERE {where} LIMIT {PURGE_BATCH}", args) as cursor:
                    ids = [row[0] for row in await cursor.fetchall()]
                if ids:
                    marks = ", ".join("?" for _ in ids)
                    cursor = await db.execute(f"DELETE FROM webhook_outbox WHERE event_id IN ({marks})", ids)
                    webhooks += cursor.rowcount
                    await db.execute(f"DELETE FROM webhook_dead_letters WHERE event_id IN ({marks})", ids)
                    cursor = await db.execute(f"DELETE FROM events WHERE id IN ({marks})", ids)
                    events += cursor.rowcount
            if len(ids) < PURGE_BATCH:
                return events, webhooks

    async def purge(self, project: str, before: datetime) -> int:
        """Delete a project's events recorded before `before` (retention), the sends behind them and the
        webhook deliveries given up (dead letters) of events recorded before it."""
        events, _ = await self._delete_events("project = ? AND at < ?", [project, rfc3339(before)])
        async with self._transaction() as db:
            await db.execute("DELETE FROM sends WHERE project = ? AND sent_at < ?", [project, int(before.timestamp())])
            await db.execute("DELETE FROM webhook_dead_letters WHERE project = ? AND created < ?", [project, before.timestamp()])
        return events

    async def forget(self, address: str, *, project: str | None = None) -> tuple[int, int]:
        """Erase a contact: every event whose contact or recipient is `address`, and its pending webhooks.

        secure_delete overwrites the freed pages and the checkpoint empties the WAL, so the
        erased rows do not linger in the database file either.
        """
        where = "(contact = ? OR contact = lower(?) OR lower(recipient) = lower(?))"
        args: list[Any] = [address, address, address]
        if project is not None:
            where += " AND project = ?"
            args.append(project)
        await self.db.execute("PRAGMA secure_delete = ON")
        try:
            counts = await self._delete_events(where, args)
            async with self._transaction() as db:  # the idempotency ledger and the sends name recipients too
                scope = (" AND project = ?" if project is not None else "", [] if project is None else [project])
                await db.execute("DELETE FROM deliveries WHERE recipient = lower(?)" + scope[0], [address, *scope[1]])
                await db.execute(f"DELETE FROM sends WHERE {where}", args)
        finally:
            await self.db.execute("PRAGMA secure_delete = OFF")
        await self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return counts

    async def delivered_recipients(self, project: str, message_id: str, recipients: list[str]) -> set[str]:
        """The recipients (lower-cased) already accepted upstream for this message and not yet expired."""
        wanted = sorted({r.lower() for r in recipients})
        if not wanted:
            return set()
        sql = (f"SELECT recipient FROM deliveries WHERE project = ? AND message_id = ? AND expires_at > ? AND state = 'delivered' "
               f"AND recipient IN ({', '.join('?' for _ in wanted)})")
        async with self.db.execute(sql, [project, message_id, int(time.time()), *wanted]) as cursor:
            return {row[0] for row in await cursor.fetchall()}

    async def claim_deliveries(self, project: str, message_id: str, recipients: list[str], *, lease_seconds: int) -> DeliveryClaim:
        """Claim the recipients no attempt sent or is sending (BEGIN IMMEDIATE: one writer decides),
        in one trip to the connection's thread (made per relayed message).

        A claim of a process that is gone (a relay killed mid-send on this box) is free at once:
        SQLite is one box's store, so the owner's pid tells whether it still runs.
        """
        wanted = sorted({r.lower() for r in recipients})
        if not wanted:
            return DeliveryClaim(claimed=set(), delivered=set(), busy=set())
        now, me = int(time.time()), os.getpid()

        def claim(db: sqlite3.Connection) -> DeliveryClaim:
            rows = db.execute(f"SELECT recipient, state, expires_at, owner FROM deliveries WHERE project = ? "
                              f"AND message_id = ? AND recipient IN ({', '.join('?' for _ in wanted)})",
                              [project, message_id, *wanted]).fetchall()
            live = {recipient: state for recipient, state, expires_at, owner in rows
                    if expires_at > now and (state == "delivered" or owner == me or _running(owner))}
            taken = [r for r in wanted if r not in live]
            db.executemany("INSERT OR REPLACE INTO deliveries (project, message_id, recipient, expires_at, state, owner) "
                           "VALUES (?, ?, ?, ?, 'sending', ?)", [(project, message_id, r, now + lease_seconds, me) for r in taken])
            return DeliveryClaim(claimed=set(taken),
                                 delivered={r for r, state in live.items() if state == "delivered"},
                                 busy={r for r, state in live.items() if state != "delivered"})

        return await self._in_one_trip(claim)

    async def release_deliveries(self, project: str, message_id: str, recipients: list[str]) -> None:
        """Give back claims of recipients the upstream did not accept, so a retry may send them."""
        rows = [(project, message_id, r.lower()) for r in recipients]
        await self._in_one_trip(lambda db: db.executemany(
            "DELETE FROM deliveries WHERE project = ? AND message_id = ? AND recipient = ? AND state = 'sending'", rows))

    async def record_delivered(self, rows: list[Delivered]) -> None:
        values = delivered_rows(rows)
        if values:
            await self._in_one_trip(lambda db: db.executemany(
                "INSERT OR REPLACE INTO deliveries (project, message_id, recipient, expires_at, state) "
                "VALUES (?, ?, ?, ?, 'delivered')", values))

    async def _in_one_trip(self, write: Callable[[sqlite3.Connection], T]) -> T:
        """A write transaction run whole in aiosqlite's thread, as the group commit does: one trip
        there instead of one per statement (each trip costs more than these small writes)."""
        async with self._write_lock:
            result = await self.db._execute(_transact, self.db._conn, write)
            self._committed()
        return result

    async def record_sends(self, sends: list[tuple[bytes, TrackedSend]]) -> None:
        """Store each tracked copy under its send id, before the copy goes (its tokens name it)."""
        rows = [(send.project, send_id, *(getattr(send, c) for c in SEND_COLUMNS)) for send_id, send in sends]

        def write(db: sqlite3.Connection) -> tuple[list[int], bool]:
            db.executemany(f"INSERT OR IGNORE INTO sends (project, send_id, {', '.join(SEND_COLUMNS)}) "
                           f"VALUES ({', '.join('?' for _ in range(len(SEND_COLUMNS) + 2))})", rows)
            return [], False

        if rows:
            await self._writes.submit(write)

    async def tracked_sends(self, keys: list[tuple[str, bytes]]) -> dict[tuple[str, bytes], TrackedSend]:
        """The copies these (project, send id) name; one missing is absent (never stored, past retention, forgotten)."""
        if not keys:
            return {}
        # `(project, send_id) IN (VALUES ...)` searched the primary key by project alone: every hit read
        # every send of its project (~1 ms at 10 k sends). An equality and an IN list per project use both columns.
        by_project: dict[str, list[bytes]] = {}
        for project, send_id in keys:
            by_project.setdefault(project, []).append(send_id)
        select = f"SELECT project, send_id, {', '.join(SEND_COLUMNS)} FROM sends WHERE project = ? AND send_id IN "
        sql = " UNION ALL ".join(select + f"({', '.join('?' for _ in ids)})" for ids in by_project.values())
        args = [part for project, ids in by_project.items() for part in (project, *ids)]
        rows = await self.db.execute_fetchall(sql, args)  # one trip to the store's thread
        return {(row[0], bytes(row[1])): TrackedSend(row[0], *row[2:]) for row in rows}

    async def share_throttle_events(self, events: list[ThrottleEvent]) -> list[ThrottleEvent]:
        """Store this process's throttle events and answer the other processes' new ones."""
        now = time.time()
        async with self._transaction() as db:
            await db.executemany("INSERT INTO throttle_events (node, kind, key, username, per_minute, at) VALUES (?, ?, ?, ?, ?, ?)",
                                 [(self.node, e.kind, e.key, e.username, e.per_minute, e.at) for e in events])
            rows = await db.execute_fetchall(
                "SELECT id, kind, key, username, per_minute, at FROM throttle_events WHERE node <> ? AND at >= ? "
                "ORDER BY at DESC LIMIT ?", (self.node, self._throttles.read_from(), THROTTLE_READ_LIMIT))
            if self._throttles.purge_due(now):
                await db.execute("DELETE FROM throttle_events WHERE at < ? OR (kind = 'sent' AND at < ?)",
                                 (now - THROTTLE_HORIZON_SECONDS, now - SENT_HORIZON_SECONDS))
        return self._throttles.fresh([tuple(row) for row in reversed(list(rows))], now)

    async def purge_deliveries(self) -> int:
        """Drop expired ledger rows; lookups already ignore them, this only bounds the table."""
        async with self._transaction() as db:
            cursor = await db.execute("DELETE FROM deliveries WHERE expires_at <= ?", [int(time.time())])
        return cursor.rowcount


def _running(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process: alive
    return True


def sqlite_path(url: str) -> Path:
    """sqlite:///var/x.db → var/x.db (relative); sqlite:////srv/x.db → /srv/x.db (SQLAlchemy's convention)."""
    return Path(url.removeprefix("sqlite:///"))
