"""The PostgreSQL backend (asyncpg, pooled): one store for several relay and tracker nodes.

What SQLite gets from its single writer, this backend states in SQL, so it holds on N nodes:
- counters and `first` are exact: the transaction recording a batch of hits first takes a
  transaction-level advisory lock on each of their messages, so hits of one message are counted one
  after another, whichever node records them, while other messages go on in parallel; a batch costs
  four round trips however many hits it holds (store/postgresql_hits.py);
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
import logging
import os
import re
import time
from collections.abc import Collection
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg

from store import postgresql_hits as hits
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
    now_rfc3339,
    rfc3339,
)
from store.postgresql_dashboard import PostgresDashboardQueries
from store.postgresql_feedback import PostgresFeedback
from store.postgresql_hits import OUTBOX_CHANNEL
from store.postgresql_retry import TRANSIENT, retrying
from store.sql import (
    COLUMN,
    COLUMNS,
    SEND_COLUMNS,
    SENT_HORIZON_SECONDS,
    THROTTLE_HORIZON_SECONDS,
    THROTTLE_READ_LIMIT,
    ThrottleCursor,
    delivered_rows,
    filters,
    stats_counts,
    stats_sql,
)
from tracking.claims import TrackedSend

log = logging.getLogger("inflight.store")

MIGRATIONS = Path(__file__).parent / "migrations" / "postgresql"
# Advisory lock keys (64-bit space): the message locks use the two-key form, a separate space.
MIGRATION_LOCK = 0x1F11_6A7E_0001
PARTITION_LOCK = 0x1F11_6A7E_0002
POOL_SIZE = 8  # connections per process: writes are short; several nodes share max_connections
PARTITIONS_AHEAD = 2  # months made at start beyond the current one
PURGE_BATCH = 5000
LISTEN_RETRY_SECONDS = 2.0

_MONTH = re.compile(r"\d{4}-(0[1-9]|1[0-2])")
_AT = COLUMN["at"]
_PAIR = "(message_id, contact)"  # one message to one contact: the unit of "unique" (text cannot hold a NUL)
HIT_BATCH = 256  # hits per transaction: each holds an advisory lock per message, from a shared table of
# max_locks_per_transaction × max_connections (6,400 by default) that every node's batches share


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


async def _reset(connection: asyncpg.Connection) -> None:
    """What a connection needs before it goes back to the pool: nothing, unless a transaction was left
    open. asyncpg's default reset costs a round trip on every release; nothing here sets session state."""
    if connection.is_in_transaction():
        await connection.execute("ROLLBACK")


class PostgresEventStore(PostgresFeedback, PostgresDashboardQueries):
    """A connection pool per process; every contract of store/model.py holds across processes."""

    PAIR = _PAIR  # for the dashboard queries

    def __init__(self, url: str, *, webhook_projects: Collection[str] = (), pool_size: int | None = None) -> None:
        self.url = url
        self.webhook_projects = sorted(set(webhook_projects))
        self.pool_size = pool_size or POOL_SIZE  # None: a relay's or tracker's own
        self.outbox_added = asyncio.Event()  # set on NOTIFY from any node, and when this process queued rows
        self._pool: asyncpg.Pool | None = None
        self._months: set[str] = set()  # partitions known to exist
        self._listener: asyncio.Task[None] | None = None
        # This process's identity in the ledger: its session connection holds an advisory lock on
        # it, which PostgreSQL drops when the process dies, so its claims are free at once.
        self.owner = int.from_bytes(os.urandom(8), "big") >> 1
        self._session: asyncpg.Connection | None = None
        self._throttles = ThrottleCursor(time.time())
        # The database away: the same for every hit of a batch (see GroupCommit).
        self._hits = GroupCommit(self._engage, limit=HIT_BATCH, whole=TRANSIENT)

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
        await self._hits.drained()  # hits already handed to record_engagements are committed before the pool goes
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

    @retrying
    async def record(self, events: list[NewEvent]) -> list[int]:
        """Store `events` (in order); their ids once committed. Known uids store nothing: their ids.
        One statement per month the events fall in, in one transaction."""
        if not events:
            return []
        await self._ensure_months({month_of(event.at) for event in events})
        months: dict[str, dict[str, list[Any]]] = {}
        for event in events:  # a uid twice in one call is stored once
            months.setdefault(month_of(event.at), {}).setdefault(event.uid, [getattr(event, c) for c in COLUMNS])
        ids: dict[str, int] = {}
        queued = False
        async with self.pool.acquire() as connection:
            async with hits.transaction(connection):
                for month, rows in months.items():  # one month but at a month's turn
                    sql = hits.RECORD.replace("{partition}", partition_name(month))  # a validated name
                    for uid, event_id in await connection.fetch(sql, *hits.columns(list(rows.values())),
                                                                self.webhook_projects, time.time()):
                        if uid is None:
                            queued = True
                        else:
                            ids[uid] = event_id
            uids = [event.uid for event in events]
            raced = [uid for uid in uids if uid not in ids]  # being stored by another node: its commit decided
            if raced:
                ids.update(await connection.fetch("SELECT uid, id FROM events WHERE uid = ANY($1::text[])", raced))
        if queued:
            self.outbox_added.set()
        return [ids[uid] for uid in uids]

    async def record_engagements(self, batch: list[tuple[NewEvent, Judgement | None]]) -> list[list[int]]:
        """Record opens and clicks, in order, with their counters (and their verdicts, when judged): exact on
        any number of nodes. Returns the ids each stored, once committed.

        Group-committed: hits that arrive while a batch is being written go in the next one
        (store/postgresql_hits.py), so a burst of hits costs a few transactions, not one each."""
        return await self._hits.submit_many([hits.Hit(event, judgement) for event, judgement in batch])

    @retrying
    async def _engage(self, batch: list[hits.Hit]) -> list[list[int]]:
        """Store a batch of hits in one transaction of four round trips; the ids each stored, in order."""
        await self._ensure_months({month_of(hit.event.at) for hit in batch})
        queued = False
        async with self.pool.acquire() as connection, hits.transaction(connection, hits.lock_sql([hit.event for hit in batch])):
            state = await connection.fetchrow(hits.STATE, *hits.state_args(batch))
            plan = hits.play(batch, state)
            if plan.rows:
                months = {month_of(row[_AT]) for row in plan.rows}
                table = partition_name(months.pop()) if len(months) == 1 else "events"  # a validated name
                written = await connection.fetchrow(hits.WRITE.replace("{partition}", table),
                                                    *plan.write_args(self.webhook_projects, time.time()))
                queued = bool(written["notified"])
        if queued:
            self.outbox_added.set()
        return [hit.ids for hit in batch]

    @retrying
    async def events(self, query: EventQuery) -> list[StoredEvent]:
        where, args = filters(query, ("contact", "name", "campaign", "message_id", "agent"), _mark)
        args.append(max(1, min(query.limit, MAX_LIMIT + 1)))  # +1: the API reads one more to know a next page exists
        rows = await self.pool.fetch(f"SELECT * FROM events WHERE {where} ORDER BY at DESC, id DESC LIMIT ${len(args)}", *args)
        return [dict(row) for row in rows]

    @retrying
    async def stats(self, query: StatsQuery) -> StatsCounts:
        condition, args = filters(query, ("campaign", "template"), _mark)
        totals_sql, links_sql = stats_sql(condition, _PAIR)
        async with self.pool.acquire() as connection:
            totals = await connection.fetchrow(totals_sql, *args)
            links = await connection.fetch(links_sql, *args)
        return stats_counts(totals, links)

    # --- settings --------------------------------------------------------------------

    @retrying
    async def tracking_mode(self, project: str) -> str | None:
        """Read per relayed message: a primary-key look-up on a pooled connection, prepared once
        per connection, so a change made on any node applies to the next message on every node."""
        mode = await self.pool.fetchval("SELECT mode FROM tracking_settings WHERE project = $1", project)
        return None if mode is None else str(mode)

    @retrying
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

    @retrying
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

    @retrying
    async def finish_webhook(self, outbox_id: int) -> None:
        await self.pool.execute("DELETE FROM webhook_outbox WHERE id = $1", outbox_id)

    @retrying
    async def retry_webhook(self, outbox_id: int, *, due: float, error: str) -> None:
        await self.pool.execute("UPDATE webhook_outbox SET attempts = attempts + 1, due = $1, last_error = $2 WHERE id = $3",
                                due, error[:500], outbox_id)

    @retrying
    async def pending_webhooks(self) -> int:
        return int(await self.pool.fetchval("SELECT count(*) FROM webhook_outbox"))

    @retrying
    async def webhook_backlog(self) -> tuple[int, float | None]:
        """Deliveries waiting and when the oldest was recorded (epoch seconds): the /metrics gauges."""
        row = await self.pool.fetchrow("SELECT count(*) AS n, min(created) AS oldest FROM webhook_outbox")
        return (int(row["n"]), row["oldest"]) if row else (0, None)

    # --- delivery ledger -------------------------------------------------------------

    @retrying
    async def delivered_recipients(self, project: str, message_id: str, recipients: list[str]) -> set[str]:
        """The recipients (lower-cased) already accepted upstream for this message and not yet expired."""
        rows = await self.pool.fetch(
            "SELECT recipient FROM deliveries WHERE project = $1 AND message_id = $2 AND expires_at > $3 "
            "AND state = 'delivered' AND recipient = ANY($4::text[])",
            project, message_id, int(time.time()), sorted({r.lower() for r in recipients}))
        return {row[0] for row in rows}

    @retrying
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

    @retrying
    async def release_deliveries(self, project: str, message_id: str, recipients: list[str]) -> None:
        """Give back claims of recipients the upstream did not accept, so a retry may send them."""
        await self.pool.execute("DELETE FROM deliveries WHERE project = $1 AND message_id = $2 AND state = 'sending' "
                                "AND recipient = ANY($3::text[])", project, message_id, [r.lower() for r in recipients])

    @retrying
    async def record_delivered(self, rows: list[Delivered]) -> None:
        values = delivered_rows(rows)
        if not values:
            return
        await self.pool.execute(
            "INSERT INTO deliveries (project, message_id, recipient, expires_at, state) "
            "SELECT p, m, r, e, 'delivered' FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[]) AS t(p, m, r, e) "
            "ON CONFLICT (project, message_id, recipient) DO UPDATE SET expires_at = excluded.expires_at, state = 'delivered'",
            *(list(column) for column in zip(*values, strict=True)))

    @retrying
    async def purge_deliveries(self) -> int:
        result = await self.pool.execute("DELETE FROM deliveries WHERE expires_at <= $1", int(time.time()))
        return int(result.split()[-1])

    # --- sends (who an opaque token's copy went to) ----------------------------------

    @retrying
    async def record_sends(self, sends: list[tuple[bytes, TrackedSend]]) -> None:
        if not sends:
            return
        await self.pool.executemany(
            f"INSERT INTO sends (project, send_id, {', '.join(SEND_COLUMNS)}) "
            f"VALUES ({', '.join(f'${n}' for n in range(1, len(SEND_COLUMNS) + 3))}) "
            f"ON CONFLICT (project, send_id) DO NOTHING",
            [(send.project, send_id, *(getattr(send, c) for c in SEND_COLUMNS)) for send_id, send in sends])

    @retrying
    async def tracked_sends(self, keys: list[tuple[str, bytes]]) -> dict[tuple[str, bytes], TrackedSend]:
        if not keys:
            return {}
        rows = await self.pool.fetch(
            f"SELECT project, send_id, {', '.join(SEND_COLUMNS)} FROM sends "
            "WHERE (project, send_id) IN (SELECT * FROM unnest($1::text[], $2::bytea[]))",
            [project for project, _ in keys], [send_id for _, send_id in keys])
        return {(row[0], bytes(row[1])): TrackedSend(row[0], *list(row)[2:]) for row in rows}

    # --- throttles -------------------------------------------------------------------

    @retrying
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
        """Delete matching events, their pending webhooks and dead letters, in batches; (events, webhooks) deleted."""
        events = webhooks = 0
        while True:
            async with self.pool.acquire() as connection, connection.transaction():
                ids = [row[0] for row in await connection.fetch(
                    f"DELETE FROM events WHERE (id, at) IN (SELECT id, at FROM events WHERE {where} LIMIT {PURGE_BATCH}) "
                    "RETURNING id", *args)]
                if ids:
                    result = await connection.execute("DELETE FROM webhook_outbox WHERE event_id = ANY($1::bigint[])", ids)
                    webhooks += int(result.split()[-1])
                    await connection.execute("DELETE FROM webhook_dead_letters WHERE event_id = ANY($1::bigint[])", ids)
            events += len(ids)
            if len(ids) < PURGE_BATCH:
                return events, webhooks

    async def _sole_project(self, connection: asyncpg.Connection, partition: str, project: str) -> bool:
        """Whether `partition` holds rows of no other project: two index probes, not a scan."""
        other = await connection.fetchval(
            f"SELECT EXISTS (SELECT 1 FROM {partition} WHERE project < $1) OR EXISTS (SELECT 1 FROM {partition} WHERE project > $1)",
            project)
        return not other

    @retrying
    async def purge(self, project: str, before: datetime) -> int:
        """Delete a project's events recorded before `before` (retention), with the sends behind them and
        the webhook deliveries given up (dead letters) of events recorded before it. A month wholly
        before it that holds only this project's events is dropped as a partition (no row-by-row
        delete, no bloat); what remains is deleted by rows."""
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
                await connection.execute(f"DELETE FROM webhook_dead_letters WHERE event_id IN (SELECT id FROM {name})")
                await connection.execute(f"DROP TABLE {name}")
                log.info("store-partition-dropped name=%s project=%s", name, project)
            self._months.discard(month)
        events, _ = await self._delete_events("project = $1 AND at < $2", [project, cutoff])
        await self.pool.execute("DELETE FROM sends WHERE project = $1 AND sent_at < $2", project, int(before.timestamp()))
        await self.pool.execute("DELETE FROM webhook_dead_letters WHERE project = $1 AND created < $2", project, before.timestamp())
        return deleted + events

    async def _partition_months(self) -> set[str]:
        rows = await self.pool.fetch("SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                                     "WHERE i.inhparent = 'events'::regclass")
        return {row[0].removeprefix("events_p").replace("_", "-") for row in rows}

    @retrying
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

