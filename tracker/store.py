"""The event store: one narrow async interface, SQLite (aiosqlite, WAL) as the embedded default.

The interface is what the relay and the tracker need and no more, so that a PostgreSQL
implementation can follow for deployments with several relay/tracker nodes.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import aiosqlite

from config.settings import sqlite_path

EVENT_NAMES = ("email.sent", "email.open", "email.click")
MAX_LIMIT = 1000


def rfc3339(moment: datetime) -> str:
    """UTC with microseconds and a Z: sorts lexicographically in the same order as time."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def now_rfc3339() -> str:
    return rfc3339(datetime.now(UTC))


@dataclass(frozen=True)
class NewEvent:
    name: str
    project: str
    contact: str
    recipient: str
    message_id: str
    at: str
    campaign: str | None = None
    template: str | None = None
    template_type: str | None = None
    campaign_type: str | None = None
    subject: str | None = None
    sender: str | None = None  # the From header; `from` in the API
    link: str | None = None
    ip: str | None = None
    user_agent: str | None = None
    tracked: bool | None = None
    reason: str | None = None
    agent: str | None = None  # opens and clicks: human | apple_mpp | image_proxy | scanner | prefetch
    agent_reason: str | None = None  # the signals behind `agent` (tracker/agents.py)


@dataclass(frozen=True)
class EventQuery:
    project: str
    contact: str | None = None
    name: str | None = None
    campaign: str | None = None
    message_id: str | None = None
    since: str | None = None
    limit: int = 100


class EventStore(Protocol):
    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def ping(self) -> bool: ...
    async def record(self, events: list[NewEvent]) -> list[int]: ...
    async def events(self, query: EventQuery) -> list[dict[str, Any]]: ...
    async def tracking_mode(self, project: str) -> str | None: ...
    async def set_tracking_mode(self, project: str, mode: str) -> None: ...
    async def recent_hits(self, project: str, message_id: str, since: str) -> list[dict[str, Any]]: ...
    async def relabel(self, changes: dict[int, tuple[str, str]]) -> None: ...


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
    agent TEXT,
    agent_reason TEXT
);
CREATE INDEX IF NOT EXISTS events_project_at ON events (project, at);
CREATE INDEX IF NOT EXISTS events_project_contact ON events (project, contact, at);
CREATE INDEX IF NOT EXISTS events_project_message ON events (project, message_id);
CREATE INDEX IF NOT EXISTS events_project_campaign ON events (project, campaign, at);
-- Settings -> Tracking changed at runtime; a row here wins over the project's TOML `tracking`.
CREATE TABLE IF NOT EXISTS tracking_settings (
    project TEXT PRIMARY KEY,
    mode TEXT NOT NULL,
    updated_at TEXT NOT NULL
) WITHOUT ROWID;
"""

COLUMNS = tuple(NewEvent.__dataclass_fields__)


def event_json(row: aiosqlite.Row) -> dict[str, Any]:
    """A stored row in the public shape shared by the events API and webhooks."""
    event = dict(row)
    event["from"] = event.pop("sender")
    if event["tracked"] is not None:
        event["tracked"] = bool(event["tracked"])
    return event


class SqliteEventStore:
    """One connection, serialised by aiosqlite's worker thread; WAL lets other processes read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: aiosqlite.Connection | None = None
        self._write_lock = asyncio.Lock()

    @classmethod
    def from_url(cls, url: str) -> SqliteEventStore:
        return cls(sqlite_path(url))

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("store is not open: call await store.open() first")
        return self._db

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = await aiosqlite.connect(self.path)
        self._db.row_factory = aiosqlite.Row
        await self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL is durable across process crashes in WAL mode; only an OS crash can lose the
        # last transactions, which is the usual trade for an event log.
        await self._db.execute("PRAGMA synchronous=NORMAL")
        await self._db.execute("PRAGMA busy_timeout=5000")
        await self._db.executescript(SCHEMA)
        await self._db.commit()

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None

    async def ping(self) -> bool:
        try:
            async with self.db.execute("SELECT 1") as cursor:
                return (await cursor.fetchone()) is not None
        except (aiosqlite.Error, RuntimeError):
            return False

    async def record(self, events: list[NewEvent]) -> list[int]:
        placeholders = ", ".join("?" for _ in COLUMNS)
        sql = f"INSERT INTO events ({', '.join(COLUMNS)}) VALUES ({placeholders})"
        ids = []
        async with self._write_lock:
            for event in events:
                values = asdict(event)
                cursor = await self.db.execute(sql, [values[c] for c in COLUMNS])
                ids.append(cursor.lastrowid or 0)
            await self.db.commit()
        return ids

    async def events(self, query: EventQuery) -> list[dict[str, Any]]:
        where = ["project = ?"]
        args: list[Any] = [query.project]
        for column in ("contact", "name", "campaign", "message_id"):
            value = getattr(query, column)
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if query.since is not None:
            where.append("at >= ?")
            args.append(query.since)
        args.append(max(1, min(query.limit, MAX_LIMIT)))
        sql = f"SELECT * FROM events WHERE {' AND '.join(where)} ORDER BY at DESC, id DESC LIMIT ?"
        async with self.db.execute(sql, args) as cursor:
            return [event_json(row) for row in await cursor.fetchall()]

    async def tracking_mode(self, project: str) -> str | None:
        """The mode set at runtime, or None when the project still follows its TOML value.

        Read on every relayed message, so that a change made by another process (the tracker,
        `inflight settings`) applies to the next one: a primary-key lookup in one trip to the
        worker thread, not three (execute, fetch, close) — about 35 µs (bench/cases/tracking_mode.py).
        """
        rows = await self.db.execute_fetchall("SELECT mode FROM tracking_settings WHERE project = ?", (project,))
        return next((str(row[0]) for row in rows), None)

    async def set_tracking_mode(self, project: str, mode: str) -> None:
        sql = ("INSERT INTO tracking_settings (project, mode, updated_at) VALUES (?, ?, ?) "
               "ON CONFLICT (project) DO UPDATE SET mode = excluded.mode, updated_at = excluded.updated_at")
        async with self._write_lock:
            await self.db.execute(sql, (project, mode, now_rfc3339()))
            await self.db.commit()

    async def recent_hits(self, project: str, message_id: str, since: str) -> list[dict[str, Any]]:
        """Opens and clicks of one message at or after `since`: the history a verdict looks at."""
        sql = (
            "SELECT id, name, at, ip, user_agent, link, agent, agent_reason FROM events "
            "WHERE project = ? AND message_id = ? AND name IN ('email.open', 'email.click') AND at >= ? ORDER BY at, id"
        )
        async with self.db.execute(sql, (project, message_id, since)) as cursor:
            return [dict(row) for row in await cursor.fetchall()]

    async def relabel(self, changes: dict[int, tuple[str, str]]) -> None:
        """Set `agent` on events a later hit exposed; the new reason is appended to the old one."""
        if not changes:
            return
        sql = "UPDATE events SET agent = ?, agent_reason = TRIM(COALESCE(agent_reason, '') || ' ' || ?) WHERE id = ?"
        async with self._write_lock:
            await self.db.executemany(sql, [(agent, reason, event_id) for event_id, (agent, reason) in changes.items()])
            await self.db.commit()
