"""The PostgreSQL backend (asyncpg, pooled): one store for several relay and tracker nodes.

What SQLite gets from its single writer, this backend states in SQL, so it holds on N nodes:
- counters and `first` are exact: the transaction recording a hit first takes a transaction-level
  advisory lock on its message, so hits of one message are counted one after another, whichever
  node records them, while other messages go on in parallel;
- recording is idempotent on the event's uid (a unique index, and a look-up under the same lock);
- the delivery ledger is claimed by rows (INSERT … ON CONFLICT), so two attempts of one message on
  two nodes never both send a recipient;
- webhook rows are claimed with FOR UPDATE SKIP LOCKED under a lease, and a NOTIFY on commit wakes
  every node's worker (LISTEN), polling being the fallback when the listening connection is away.

Events are partitioned by month (on `at`): partitions are made ahead at start and for any unseen
month on insert, and retention drops a month's partition whole when nothing else lives in it.
The schema comes from store/migrations/postgresql (see `migrate`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Collection, Coroutine, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import asyncpg

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
from store.postgresql_dashboard import PostgresDashboardQueries
from store.postgresql_feedback import PostgresFeedback
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
from tracking.claims import TrackedSend

log = logging.getLogger("inflight.store")
P = ParamSpec("P")
T = TypeVar("T")

MIGRATIONS = Path(__file__).parent / "migrations" / "postgresql"
# Advisory lock keys (64-bit space): the message locks use the two-key form, a separate space.
MIGRATION_LOCK = 0x1F11_6A7E_0001
PARTITION_LOCK = 0x1F11_6A7E_0002
OUTBOX_CHANNEL = "inflight_outbox"
POOL_SIZE = 8  # connections per process: writes are short; several nodes share max_connections
PARTITIONS_AHEAD = 2  # months made at start beyond the current one
PURGE_BATCH = 5000
LISTEN_RETRY_SECONDS = 2.0

_MONTH = re.compile(r"\d{4}-(0[1-9]|1[0-2])")
_TYPES = {"tracked": "boolean", "first": "boolean", "implied": "boolean", "opens": "integer", "clicks": "integer"}
_UNNEST = ", ".join(f"${i}::{_TYPES.get(c, 'text')}[]" for i, c in enumerate(COLUMNS, 1))
_AT = COLUMN["at"]
_WEBHOOK_PROJECTS = len(COLUMNS) + 1  # the placeholder of the webhook projects in _INSERT
# Insert events given as one array per column, in order, with their outbox rows when their project
# has a webhook; an already stored uid inserts nothing. Answers (uid, id) of the rows inserted.
# Written into the month's partition itself: routing through the parent and its ON CONFLICT
# planning over every partition cost about twice the insert (a hit ~3.4 -> ~1.7 ms).
_INSERT = f"""
    WITH e AS (
        INSERT INTO {{partition}} ({', '.join(COLUMNS)})
        SELECT {', '.join(COLUMNS)} FROM unnest({_UNNEST}) WITH ORDINALITY AS u({', '.join(COLUMNS)}, ord) ORDER BY ord
        ON CONFLICT (uid, at) DO NOTHING
        RETURNING id, project, uid
    ), o AS (
        INSERT INTO webhook_outbox (event_id, project, key, created, due)
        SELECT id, project, 'evt_' || replace(gen_random_uuid()::text, '-', ''), ${_WEBHOOK_PROJECTS + 1}, ${_WEBHOOK_PROJECTS + 1}
        FROM e WHERE project = ANY(${_WEBHOOK_PROJECTS}::text[])
    )
    SELECT uid, id FROM e"""
# Read after the message's lock is held, so in a snapshot that holds every hit recorded before.
_ENGAGEMENT_STATE = """SELECT
    (SELECT array_agg(id ORDER BY id) FROM events WHERE uid = ANY($4::text[])) AS stored,
    (SELECT subject FROM events WHERE project = $1 AND message_id = $2 AND name = 'email.sent' LIMIT 1) AS subject,
    (SELECT sender FROM events WHERE project = $1 AND message_id = $2 AND name = 'email.sent' LIMIT 1) AS sender,
    (SELECT count(*) FROM events WHERE project = $1 AND message_id = $2 AND contact = $3 AND name = 'email.open') AS opens,
    (SELECT count(*) FROM events WHERE project = $1 AND message_id = $2 AND contact = $3 AND name = 'email.click') AS clicks,
    (SELECT json_agg(h ORDER BY h.at, h.id) FROM (
        SELECT id, name, at, ip, user_agent, link, agent, agent_reason FROM events
        WHERE $5::text IS NOT NULL AND project = $1 AND message_id = $2 AND name IN ('email.open', 'email.click')
        AND at >= $5 AND implied IS NOT TRUE) h) AS history"""
# `history`: the opens and clicks a verdict reads (Judgement.since on), in the same round trip.
_LABEL = "UPDATE events SET agent = $1, agent_reason = btrim(COALESCE(agent_reason, '') || ' ' || $2) WHERE "
_IMPLIED_OF = ("implied AND (project, message_id, contact, at) = "
               "(SELECT project, message_id, contact, at FROM events WHERE id = $3 AND name = 'email.click')")
_PAIR = "(message_id, contact)"  # one message to one contact: the unit of "unique" (text cannot hold a NUL)


def _mark(index: int) -> str:
    return f"${index}"


def migrations() -> list[tuple[int, str]]:
    """The migration files, (version, file name) in order; two files with one number are refused.

    To change the schema, add `NNNN_what_it_does.sql` here with the next number: plain SQL, run
    once in a transaction of its own, forward only (never edit an applied file; correct it with a
    new one). Two branches that took the same number: renumber yours on rebase.
    """
    found: dict[int, str] = {}
    for path in sorted(MIGRATIONS.glob("*.sql")):
        version = int(path.name.split("_", 1)[0])
        if version in found:
            raise RuntimeError(f"two migrations numbered {version}: {found[version]} and {path.name}")
        found[version] = path.name
    return sorted(found.items())


async def migrate(connection: asyncpg.Connection) -> list[str]:
    """Apply the migrations not applied yet, each in its own transaction; the names applied.

    Under a session advisory lock: N nodes starting together apply each migration once, the
    others wait for it and then find nothing left to do.
    """
    applied: list[str] = []
    await connection.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
    try:
        await connection.execute("CREATE TABLE IF NOT EXISTS schema_migrations ("
                                 "version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())")
        done = {row[0] for row in await connection.fetch("SELECT version FROM schema_migrations")}
        for version, name in migrations():
            if version in done:
                continue
            async with connection.transaction():
                await connection.execute((MIGRATIONS / name).read_text(encoding="utf-8"))
                await connection.execute("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name)
            log.info("store-migrated version=%d name=%s", version, name)
            applied.append(name)
    finally:
        await connection.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
    return applied


def month_of(at: str) -> str:
    """'2026-12-04T…' → '2026-12': the partition an event goes to."""
    month = at[:7]
    if not _MONTH.fullmatch(month):
        raise ValueError(f"event time {at!r} is not RFC 3339 (YYYY-MM-DDThh:mm:ss…Z)")
    return month


def next_month(month: str) -> str:
    year, number = int(month[:4]), int(month[5:7])
    return f"{year + number // 12:04d}-{number % 12 + 1:02d}"


def partition_name(month: str) -> str:
    return f"events_p{month.replace('-', '_')}"


# The database restarting or failing over: the same call succeeds once it is back. Every store call
# can be repeated (events by their uid, the ledger by its owner, the rest are reads or upserts).
_TRANSIENT = (OSError, asyncpg.PostgresConnectionError, asyncpg.exceptions.OperatorInterventionError,
              asyncpg.exceptions.TooManyConnectionsError, asyncpg.InterfaceError, asyncpg.exceptions.InternalClientError)
RETRY_SECONDS = 20.0  # how long a call waits for the database to come back before it fails


def _retrying(call: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """Repeat a store call while the database is away (a restart), then give up with its error."""

    @functools.wraps(call)
    async def repeated(*args: P.args, **kwargs: P.kwargs) -> T:
        deadline = time.monotonic() + RETRY_SECONDS
        delay = 0.1
        while True:
            try:
                return await call(*args, **kwargs)
            except _TRANSIENT as exc:
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("store-unavailable call=%s retry_in=%.1fs: %s", call.__name__, delay, type(exc).__name__)
                pool = getattr(args[0], "_pool", None)
                if pool is not None:  # its other connections were cut too: the pool opens new ones
                    await pool.expire_connections()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    return repeated


def _message_lock(project: str, message_id: str) -> tuple[int, int]:
    """Two signed 32-bit keys naming one message, the same on every node."""
    digest = hashlib.blake2b(f"{project}\n{message_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest[:4], "big", signed=True), int.from_bytes(digest[4:], "big", signed=True)


async def _reset(connection: asyncpg.Connection) -> None:
    """What a connection needs before it goes back to the pool: nothing, unless a transaction was left
    open. asyncpg's default reset costs a round trip on every release; nothing here sets session state."""
    if connection.is_in_transaction():
        await connection.execute("ROLLBACK")


def _columns(events: Sequence[Sequence[Any]]) -> list[list[Any]]:
    """Insert rows (values in COLUMNS order) as one list per column, for unnest."""
    return [list(column) for column in zip(*events, strict=True)] if events else [[] for _ in COLUMNS]


class PostgresEventStore(PostgresFeedback, PostgresDashboardQueries):
    """A connection pool per process; every contract of store/model.py holds across processes."""

    PAIR = _PAIR  # for the dashboard queries

    def __init__(self, url: str, *, webhook_projects: Collection[str] = (), pool_size: int = POOL_SIZE) -> None:
        self.url = url
        self.webhook_projects = sorted(set(webhook_projects))
        self.pool_size = pool_size
        self.outbox_added = asyncio.Event()  # set on NOTIFY from any node, and when this process queued rows
        self._pool: asyncpg.Pool | None = None
        self._months: set[str] = set()  # partitions known to exist
        self._listener: asyncio.Task[None] | None = None
        # This process's identity in the ledger: its session connection holds an advisory lock on
        # it, which PostgreSQL drops when the process dies, so its claims are free at once.
        self.owner = int.from_bytes(os.urandom(8), "big") >> 1
        self._session: asyncpg.Connection | None = None
        self._throttles = ThrottleCursor(time.time())

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("store is not open: call await store.open() first")
        return self._pool

    async def open(self) -> None:
        self._pool = await asyncpg.create_pool(self.url, min_size=1, max_size=self.pool_size, reset=_reset)
        async with self._pool.acquire() as connection:
            await migrate(connection)
            rows = await connection.fetch("SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                                          "WHERE i.inhparent = 'events'::regclass")
        self._months = {row[0].removeprefix("events_p").replace("_", "-") for row in rows}
        month = month_of(now_rfc3339())
        ahead = [month]
        for _ in range(PARTITIONS_AHEAD):
            ahead.append(next_month(ahead[-1]))
        await self._ensure_months(ahead)
        lost = await self._open_session()
        self._listener = asyncio.create_task(self._keep_session(lost))

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
            self._listener = None
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def ping(self) -> bool:
        try:
            async with asyncio.timeout(5):
                return await self.pool.fetchval("SELECT 1") == 1
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError, RuntimeError):
            return False

    async def _open_session(self) -> asyncio.Event:
        """The process's own connection: it LISTENs for outbox rows queued on any node and holds the
        owner lock of this process's ledger claims. Set: the event it gives, when the connection is lost."""
        connection = await asyncpg.connect(self.url)
        lost = asyncio.Event()
        connection.add_termination_listener(lambda _connection: lost.set())
        await connection.execute("SELECT pg_advisory_lock($1)", self.owner)
        await connection.add_listener(OUTBOX_CHANNEL, lambda *_: self.outbox_added.set())
        self._session = connection
        self.outbox_added.set()  # rows may have been queued while nobody listened
        return lost

    async def _keep_session(self, lost: asyncio.Event) -> None:
        """Reconnect the session when it drops; meanwhile webhooks fall back to polling, and this
        process's in-flight ledger claims look dead to other nodes (only while it cannot reach the store)."""
        try:
            while True:
                await lost.wait()
                log.warning("store-session-lost: webhooks fall back to polling until it is back")
                while True:
                    await asyncio.sleep(LISTEN_RETRY_SECONDS)
                    try:
                        lost = await self._open_session()
                        break
                    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                        log.warning("store-session-reconnect-failed: %s", type(exc).__name__)
        finally:
            if self._session is not None:
                await self._session.close(timeout=1)
                self._session = None

    # --- partitions ------------------------------------------------------------------

    async def _ensure_months(self, months: Collection[str]) -> None:
        """Make the partitions of `months` that do not exist yet (any node may race us: a lock decides)."""
        missing = sorted(set(months) - self._months)
        if not missing:
            return
        async with self.pool.acquire() as connection:
            for month in missing:
                name = partition_name(month)
                async with connection.transaction():
                    await connection.execute("SELECT pg_advisory_xact_lock($1)", PARTITION_LOCK)
                    if await connection.fetchval("SELECT to_regclass($1)", name) is None:
                        # month and name are validated digits: safe to write into DDL
                        await connection.execute(f"CREATE TABLE {name} PARTITION OF events "
                                                 f"FOR VALUES FROM ('{month}') TO ('{next_month(month)}')")
                        log.info("store-partition-created name=%s", name)
                self._months.add(month)

    # --- events ----------------------------------------------------------------------

    async def _insert(self, connection: asyncpg.Connection, rows: Sequence[Sequence[Any]]) -> dict[str, int]:
        months: dict[str, list[Sequence[Any]]] = {}
        for row in rows:
            months.setdefault(month_of(row[_AT]), []).append(row)
        inserted: dict[str, int] = {}
        for month, batch in months.items():  # one month but at a month's turn
            sql = _INSERT.replace("{partition}", partition_name(month))  # a validated name
            found = await connection.fetch(sql, *_columns(batch), self.webhook_projects, time.time())
            inserted.update((row["uid"], row["id"]) for row in found)
        return inserted

    @_retrying
    async def record(self, events: list[NewEvent]) -> list[int]:
        """Store `events` (in order); their ids once committed. Known uids store nothing: their ids."""
        if not events:
            return []
        await self._ensure_months({month_of(event.at) for event in events})
        uids = [event.uid for event in events]
        async with self.pool.acquire() as connection, connection.transaction():
            ids: dict[str, int] = dict(await connection.fetch("SELECT uid, id FROM events WHERE uid = ANY($1::text[])", uids))
            new, seen, inserted = [], set(ids), {}
            for event in events:
                if event.uid not in seen:
                    seen.add(event.uid)
                    new.append([getattr(event, column) for column in COLUMNS])
            if new:
                inserted = await self._insert(connection, new)
                ids.update(inserted)
                raced = [uid for uid in uids if uid not in ids]  # stored by another node meanwhile
                if raced:
                    ids.update(await connection.fetch("SELECT uid, id FROM events WHERE uid = ANY($1::text[])", raced))
                queued = bool(inserted) and any(event.project in self.webhook_projects for event in events)
                if queued:
                    await connection.execute(f"NOTIFY {OUTBOX_CHANNEL}")
        if new and queued:
            self.outbox_added.set()
        return [ids[uid] for uid in uids]

    @_retrying
    async def record_engagement(self, event: NewEvent, judgement: Judgement | None = None) -> list[int]:
        """Record an open or a click with its counters (and its verdict, when judged), under the
        message's lock: exact on any number of nodes. Returns the ids stored, in order."""
        await self._ensure_months({month_of(event.at)})
        uids = [event.uid, implied_uid(event.uid)]
        async with self.pool.acquire() as connection:
            # BEGIN and the lock in one round trip (the keys are integers made here, safe to inline);
            # the state is read by the next statement, so in a snapshot taken once the lock is held.
            await connection.execute("BEGIN; SELECT pg_advisory_xact_lock({}, {})".format(*_message_lock(event.project, event.message_id)))
            try:
                ids, queued = await self._engagement_in(connection, event, judgement, uids)
            except BaseException:
                with contextlib.suppress(*_TRANSIENT, asyncpg.PostgresError):  # a lost connection rolled back by itself
                    await connection.execute("ROLLBACK")
                raise
            await connection.execute(f"NOTIFY {OUTBOX_CHANNEL}; COMMIT" if queued else "COMMIT")
        if queued:
            self.outbox_added.set()
        return ids

    async def _engagement_in(self, connection: asyncpg.Connection, event: NewEvent, judgement: Judgement | None,
                             uids: list[str]) -> tuple[list[int], bool]:
        """The hit's rows, inside the transaction holding its message's lock; (ids, whether a webhook was queued)."""
        since = judgement.since if judgement is not None else None
        state = await connection.fetchrow(_ENGAGEMENT_STATE, event.project, event.message_id, event.contact, uids, since)
        if state["stored"]:  # recorded before (a replay): counted once, its webhook queued once
            return list(state["stored"]), False
        row = [getattr(event, column) for column in COLUMNS]
        changes: dict[int, tuple[str, str]] = {}
        if judgement is not None:
            history = json.loads(state["history"]) if state["history"] is not None else []
            row[COLUMN["agent"]], row[COLUMN["agent_reason"]], changes = judgement.decide(history)
        if state["subject"] is not None or state["sender"] is not None:
            row[COLUMN["subject"]], row[COLUMN["sender"]] = state["subject"], state["sender"]
        rows = engagement_rows(row, event.name, state["opens"], state["clicks"], uids[1])
        inserted = await self._insert(connection, rows)
        if changes:
            labels = [(agent, reason, event_id) for event_id, (agent, reason) in changes.items()]
            await connection.executemany(_LABEL + "id = $3", labels)
            await connection.executemany(_LABEL + _IMPLIED_OF, labels)
        return [inserted[r[COLUMN["uid"]]] for r in rows], event.project in self.webhook_projects

    @_retrying
    async def events(self, query: EventQuery) -> list[StoredEvent]:
        where, args = filters(query, ("contact", "name", "campaign", "message_id", "agent"), _mark)
        args.append(max(1, min(query.limit, MAX_LIMIT + 1)))  # +1: the API reads one more to know a next page exists
        rows = await self.pool.fetch(f"SELECT * FROM events WHERE {where} ORDER BY at DESC, id DESC LIMIT ${len(args)}", *args)
        return [dict(row) for row in rows]

    @_retrying
    async def stats(self, query: StatsQuery) -> StatsCounts:
        condition, args = filters(query, ("campaign", "template"), _mark)
        totals_sql, links_sql = stats_sql(condition, _PAIR)
        async with self.pool.acquire() as connection:
            totals = await connection.fetchrow(totals_sql, *args)
            links = await connection.fetch(links_sql, *args)
        return stats_counts(totals, links)

    # --- settings --------------------------------------------------------------------

    @_retrying
    async def tracking_mode(self, project: str) -> str | None:
        """Read per relayed message: a primary-key look-up on a pooled connection, prepared once
        per connection, so a change made on any node applies to the next message on every node."""
        mode = await self.pool.fetchval("SELECT mode FROM tracking_settings WHERE project = $1", project)
        return None if mode is None else str(mode)

    @_retrying
    async def set_tracking_mode(self, project: str, mode: str | None) -> None:
        """Store the mode set at runtime; None forgets it, so the project follows its TOML value again."""
        if mode is None:
            await self.pool.execute("DELETE FROM tracking_settings WHERE project = $1", project)
            return
        await self.pool.execute(
            "INSERT INTO tracking_settings (project, mode, updated_at) VALUES ($1, $2, $3) "
            "ON CONFLICT (project) DO UPDATE SET mode = excluded.mode, updated_at = excluded.updated_at",
            project, mode, now_rfc3339())

    # --- webhook outbox --------------------------------------------------------------

    @_retrying
    async def claim_webhooks(self, *, now: float, lease: float, limit: int) -> list[WebhookJob]:
        """Take up to `limit` due rows for `lease` seconds; rows another node holds are skipped, not waited for."""
        async with self.pool.acquire() as connection, connection.transaction():
            claimed = await connection.fetch(
                "WITH c AS (SELECT id FROM webhook_outbox WHERE due <= $1 ORDER BY due, id LIMIT $2 FOR UPDATE SKIP LOCKED) "
                "UPDATE webhook_outbox o SET due = $1 + $3 FROM c WHERE o.id = c.id "
                "RETURNING o.id, o.key, o.attempts, o.created, o.event_id", now, limit, lease)
            if not claimed:
                return []
            events = {row["id"]: dict(row) for row in await connection.fetch(
                "SELECT * FROM events WHERE id = ANY($1::bigint[])", [row["event_id"] for row in claimed])}
            gone = [row["id"] for row in claimed if row["event_id"] not in events]  # purged or forgotten since
            if gone:
                await connection.execute("DELETE FROM webhook_outbox WHERE id = ANY($1::bigint[])", gone)
        return [WebhookJob(outbox_id=row["id"], key=row["key"], attempts=row["attempts"], created=row["created"],
                           event=events[row["event_id"]])
                for row in sorted(claimed, key=lambda r: r["id"]) if row["event_id"] in events]

    @_retrying
    async def finish_webhook(self, outbox_id: int) -> None:
        await self.pool.execute("DELETE FROM webhook_outbox WHERE id = $1", outbox_id)

    @_retrying
    async def retry_webhook(self, outbox_id: int, *, due: float, error: str) -> None:
        await self.pool.execute("UPDATE webhook_outbox SET attempts = attempts + 1, due = $1, last_error = $2 WHERE id = $3",
                                due, error[:500], outbox_id)

    @_retrying
    async def pending_webhooks(self) -> int:
        return int(await self.pool.fetchval("SELECT count(*) FROM webhook_outbox"))

    @_retrying
    async def webhook_backlog(self) -> tuple[int, float | None]:
        """Deliveries waiting and when the oldest was recorded (epoch seconds): the /metrics gauges."""
        row = await self.pool.fetchrow("SELECT count(*) AS n, min(created) AS oldest FROM webhook_outbox")
        return (int(row["n"]), row["oldest"]) if row else (0, None)

    # --- delivery ledger -------------------------------------------------------------

    @_retrying
    async def delivered_recipients(self, project: str, message_id: str, recipients: list[str]) -> set[str]:
        """The recipients (lower-cased) already accepted upstream for this message and not yet expired."""
        rows = await self.pool.fetch(
            "SELECT recipient FROM deliveries WHERE project = $1 AND message_id = $2 AND expires_at > $3 "
            "AND state = 'delivered' AND recipient = ANY($4::text[])",
            project, message_id, int(time.time()), sorted({r.lower() for r in recipients}))
        return {row[0] for row in rows}

    @_retrying
    async def claim_deliveries(self, project: str, message_id: str, recipients: list[str], *, lease_seconds: int) -> DeliveryClaim:
        """Claim the recipients no attempt sent or is sending; one row per recipient decides, so of two
        attempts on two nodes exactly one sends each recipient."""
        wanted = sorted({r.lower() for r in recipients})
        now = int(time.time())
        async with self.pool.acquire() as connection, connection.transaction():
            # A live row stops the claim unless it expired, or it is a claim whose owner died (its
            # session lock is free: the xact lock is taken only for the test, and released at commit).
            claimed = await connection.fetch(
                "INSERT INTO deliveries (project, message_id, recipient, expires_at, state, owner) "
                "SELECT $1, $2, r, $4, 'sending', $6 FROM unnest($3::text[]) r "
                "ON CONFLICT (project, message_id, recipient) DO UPDATE "
                "SET expires_at = excluded.expires_at, state = 'sending', owner = excluded.owner "
                "WHERE deliveries.expires_at <= $5 OR (deliveries.state = 'sending' AND (deliveries.owner = $6 "
                "OR pg_try_advisory_xact_lock(deliveries.owner))) RETURNING recipient",
                project, message_id, wanted, now + lease_seconds, now, self.owner)
            taken = {row[0] for row in claimed}
            others = await connection.fetch(
                "SELECT recipient, state FROM deliveries WHERE project = $1 AND message_id = $2 AND recipient = ANY($3::text[])",
                project, message_id, [r for r in wanted if r not in taken])
        return DeliveryClaim(claimed=taken,
                             delivered={r for r, state in others if state == "delivered"},
                             busy={r for r, state in others if state != "delivered"})

    @_retrying
    async def release_deliveries(self, project: str, message_id: str, recipients: list[str]) -> None:
        """Give back claims of recipients the upstream did not accept, so a retry may send them."""
        await self.pool.execute("DELETE FROM deliveries WHERE project = $1 AND message_id = $2 AND state = 'sending' "
                                "AND recipient = ANY($3::text[])", project, message_id, [r.lower() for r in recipients])

    @_retrying
    async def record_delivered(self, rows: list[Delivered]) -> None:
        values = delivered_rows(rows)
        if not values:
            return
        await self.pool.execute(
            "INSERT INTO deliveries (project, message_id, recipient, expires_at, state) "
            "SELECT p, m, r, e, 'delivered' FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[]) AS t(p, m, r, e) "
            "ON CONFLICT (project, message_id, recipient) DO UPDATE SET expires_at = excluded.expires_at, state = 'delivered'",
            *(list(column) for column in zip(*values, strict=True)))

    @_retrying
    async def purge_deliveries(self) -> int:
        result = await self.pool.execute("DELETE FROM deliveries WHERE expires_at <= $1", int(time.time()))
        return int(result.split()[-1])

    # --- sends (who an opaque token's copy went to) ----------------------------------

    @_retrying
    async def record_sends(self, sends: list[tuple[bytes, TrackedSend]]) -> None:
        if not sends:
            return
        await self.pool.executemany(
            f"INSERT INTO sends (project, send_id, {', '.join(SEND_COLUMNS)}) "
            f"VALUES ({', '.join(f'${n}' for n in range(1, len(SEND_COLUMNS) + 3))}) "
            f"ON CONFLICT (project, send_id) DO NOTHING",
            [(send.project, send_id, *(getattr(send, c) for c in SEND_COLUMNS)) for send_id, send in sends])

    @_retrying
    async def tracked_sends(self, keys: list[tuple[str, bytes]]) -> dict[tuple[str, bytes], TrackedSend]:
        if not keys:
            return {}
        rows = await self.pool.fetch(
            f"SELECT project, send_id, {', '.join(SEND_COLUMNS)} FROM sends "
            "WHERE (project, send_id) IN (SELECT * FROM unnest($1::text[], $2::bytea[]))",
            [project for project, _ in keys], [send_id for _, send_id in keys])
        return {(row[0], bytes(row[1])): TrackedSend(row[0], *list(row)[2:]) for row in rows}

    # --- throttles -------------------------------------------------------------------

    @_retrying
    async def share_throttle_events(self, events: list[ThrottleEvent]) -> list[ThrottleEvent]:
        """Store this node's throttle events and answer the other nodes' new ones, in one transaction."""
        now = time.time()
        async with self.pool.acquire() as connection, connection.transaction():
            if events:
                await connection.execute(
                    "INSERT INTO throttle_events (node, kind, key, username, per_minute, at) "
                    "SELECT $1, * FROM unnest($2::text[], $3::text[], $4::text[], $5::integer[], $6::double precision[])",
                    self.owner, *(list(column) for column in zip(*((e.kind, e.key, e.username, e.per_minute, e.at)
                                                                   for e in events), strict=True)))
            rows = await connection.fetch(
                "SELECT id, kind, key, username, per_minute, at FROM throttle_events WHERE node <> $1 AND at >= $2 "
                "ORDER BY at DESC LIMIT $3", self.owner, self._throttles.read_from(), THROTTLE_READ_LIMIT)
            if self._throttles.purge_due(now):
                await connection.execute("DELETE FROM throttle_events WHERE at < $1 OR (kind = 'sent' AND at < $2)",
                                         now - THROTTLE_HORIZON_SECONDS, now - SENT_HORIZON_SECONDS)
        return self._throttles.fresh([tuple(row) for row in reversed(rows)], now)

    # --- retention and erasure -------------------------------------------------------

    async def _delete_events(self, where: str, args: list[Any]) -> tuple[int, int]:
        """Delete matching events and their pending webhooks, in batches; (events, webhooks) deleted."""
        events = webhooks = 0
        while True:
            async with self.pool.acquire() as connection, connection.transaction():
                ids = [row[0] for row in await connection.fetch(
                    f"DELETE FROM events WHERE (id, at) IN (SELECT id, at FROM events WHERE {where} LIMIT {PURGE_BATCH}) "
                    "RETURNING id", *args)]
                if ids:
                    result = await connection.execute("DELETE FROM webhook_outbox WHERE event_id = ANY($1::bigint[])", ids)
                    webhooks += int(result.split()[-1])
            events += len(ids)
            if len(ids) < PURGE_BATCH:
                return events, webhooks

    async def _sole_project(self, connection: asyncpg.Connection, partition: str, project: str) -> bool:
        """Whether `partition` holds rows of no other project: two index probes, not a scan."""
        other = await connection.fetchval(
            f"SELECT EXISTS (SELECT 1 FROM {partition} WHERE project < $1) OR EXISTS (SELECT 1 FROM {partition} WHERE project > $1)",
            project)
        return not other

    @_retrying
    async def purge(self, project: str, before: datetime) -> int:
        """Delete a project's events recorded before `before` (retention). A month wholly before it
        that holds only this project's events is dropped as a partition (no row-by-row delete, no
        bloat); what remains is deleted by rows."""
        cutoff = rfc3339(before)
        deleted = 0
        for month in sorted(self._months | await self._partition_months()):
            if next_month(month) > cutoff[:7]:
                break
            name = partition_name(month)
            async with self.pool.acquire() as connection, connection.transaction():
                await connection.execute("SELECT pg_advisory_xact_lock($1)", PARTITION_LOCK)
                if await connection.fetchval("SELECT to_regclass($1)", name) is None:
                    self._months.discard(month)
                    continue
                if not await self._sole_project(connection, name, project):
                    continue
                deleted += await connection.fetchval(f"SELECT count(*) FROM {name}")
                await connection.execute(f"DELETE FROM webhook_outbox WHERE event_id IN (SELECT id FROM {name})")
                await connection.execute(f"DROP TABLE {name}")
                log.info("store-partition-dropped name=%s project=%s", name, project)
            self._months.discard(month)
        events, _ = await self._delete_events("project = $1 AND at < $2", [project, cutoff])
        await self.pool.execute("DELETE FROM sends WHERE project = $1 AND sent_at < $2", project, int(before.timestamp()))
        return deleted + events

    async def _partition_months(self) -> set[str]:
        rows = await self.pool.fetch("SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                                     "WHERE i.inhparent = 'events'::regclass")
        return {row[0].removeprefix("events_p").replace("_", "-") for row in rows}

    @_retrying
    async def forget(self, address: str, *, project: str | None = None) -> tuple[int, int]:
        """Erase a contact: every event whose contact or recipient is `address`, its pending webhooks and ledger rows.

        Deleted rows stay in the table's pages until VACUUM reuses them (autovacuum does, soon after).
        """
        where = "(contact = $1 OR contact = lower($1) OR lower(recipient) = lower($1))"
        args: list[Any] = [address]
        if project is not None:
            where += " AND project = $2"
            args.append(project)
        counts = await self._delete_events(where, args)
        await self.pool.execute("DELETE FROM deliveries WHERE recipient = lower($1)" + (" AND project = $2" if project is not None else ""),
                                *args)
        await self.pool.execute(f"DELETE FROM sends WHERE {where}", *args)
        return counts

