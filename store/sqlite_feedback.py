"""The SQLite side of delivery feedback: suppressions, the upstream's ids, erased contacts, dead letters.

A mixin of SqliteEventStore (same connection, same write lock): these tables are written by
the relay (provider ids), the tracker (feedback, suppressions, dead letters) and the CLI.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol, TypeVar

import aiosqlite

from store.model import (
    PROVIDER_ID_TTL_SECONDS,
    DeadLetter,
    ProviderCopy,
    Suppression,
    address_key,
    forgotten_key,
    now_rfc3339,
)

T = TypeVar("T")

FEEDBACK_SCHEMA = """
CREATE TABLE IF NOT EXISTS suppressions (
    project TEXT NOT NULL,
    address TEXT NOT NULL,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL,
    at TEXT NOT NULL,
    PRIMARY KEY (project, address)
) WITHOUT ROWID;
-- The upstream's own id of each accepted copy (SES: `250 Ok <id>`), per recipient of the copy.
CREATE TABLE IF NOT EXISTS provider_ids (
    provider_id TEXT NOT NULL,
    recipient TEXT NOT NULL,
    project TEXT NOT NULL,
    message_id TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (provider_id, recipient)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS provider_ids_expires ON provider_ids (expires_at);
CREATE INDEX IF NOT EXISTS provider_ids_recipient ON provider_ids (recipient);
-- Erased contacts, hashed (store.model.forgotten_key); project '' = every project.
CREATE TABLE IF NOT EXISTS forgotten_contacts (
    key TEXT NOT NULL,
    project TEXT NOT NULL,
    at TEXT NOT NULL,
    PRIMARY KEY (key, project)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS webhook_dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id INTEGER NOT NULL,
    project TEXT NOT NULL,
    key TEXT NOT NULL,
    created REAL NOT NULL,
    attempts INTEGER NOT NULL,
    last_error TEXT NOT NULL,
    buried REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS webhook_dead_letters_project ON webhook_dead_letters (project, id);
CREATE INDEX IF NOT EXISTS webhook_dead_letters_event ON webhook_dead_letters (event_id);
"""


class _Store(Protocol):
    """What the mixin uses of SqliteEventStore."""

    @property
    def db(self) -> aiosqlite.Connection: ...
    def _transaction(self) -> AbstractAsyncContextManager[aiosqlite.Connection]: ...
    async def point_read(self, sql: str, args: Sequence[Any]) -> list[sqlite3.Row]: ...
    async def _in_one_trip(self, write: Callable[[sqlite3.Connection], T]) -> T: ...


class SqliteFeedback:
    """Suppressions, ProviderIds, ForgottenContacts and DeadLetters (store.model) over SQLite."""

    # --- suppressions -----------------------------------------------------------------

    async def suppress(self: _Store, project: str, address: str, *, reason: str, detail: str) -> bool:
        """Add `address`; False when it was suppressed already (the first reason is kept)."""
        async with self._transaction() as db:
            cursor = await db.execute(
                "INSERT INTO suppressions VALUES (?, ?, ?, ?, ?) ON CONFLICT (project, address) DO NOTHING",
                (project, address_key(address), reason, detail[:500], now_rfc3339()),
            )
        return cursor.rowcount == 1

    async def unsuppress(self: _Store, project: str, address: str) -> bool:
        async with self._transaction() as db:
            cursor = await db.execute("DELETE FROM suppressions WHERE project = ? AND address = ?", (project, address_key(address)))
        return cursor.rowcount == 1

    async def suppressions(self: _Store, project: str) -> list[Suppression]:
        async with self.db.execute("SELECT * FROM suppressions WHERE project = ? ORDER BY address", (project,)) as cursor:
            return [Suppression(**dict(row)) for row in await cursor.fetchall()]

    async def suppressed(self: _Store, project: str, addresses: list[str]) -> dict[str, Suppression]:
        """The suppressed ones among `addresses`, by address_key."""
        keys = sorted({address_key(a) for a in addresses})
        if not keys:
            return {}
        sql = f"SELECT * FROM suppressions WHERE project = ? AND address IN ({', '.join('?' for _ in keys)})"
        return {row["address"]: Suppression(**dict(row)) for row in await self.point_read(sql, [project, *keys])}

    # --- the upstream's ids ---------------------------------------------------------------

    async def record_provider_ids(self: _Store, copies: list[tuple[str, ProviderCopy]]) -> None:
        """One transaction in one trip to the store's thread for a whole spool delivery: a transaction per
        copy (every copy sent through SES has an id) took four trips each and the write lock as often."""
        if not copies:
            return
        now = int(time.time())
        rows = [(provider_id, address_key(copy.recipient), copy.project, copy.message_id, now + PROVIDER_ID_TTL_SECONDS)
                for provider_id, copy in copies]

        def write(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM provider_ids WHERE expires_at <= ?", (now,))  # bounded by the index
            db.executemany("INSERT OR REPLACE INTO provider_ids VALUES (?, ?, ?, ?, ?)", rows)

        await self._in_one_trip(write)

    async def provider_copies(self: _Store, provider_id: str) -> list[ProviderCopy]:
        sql = "SELECT project, message_id, recipient FROM provider_ids WHERE provider_id = ? AND expires_at > ?"
        async with self.db.execute(sql, (provider_id, int(time.time()))) as cursor:
            return [ProviderCopy(row["project"], row["message_id"], row["recipient"]) for row in await cursor.fetchall()]

    # --- erased contacts ------------------------------------------------------------------

    async def remember_forgotten(self: _Store, address: str, *, project: str | None) -> None:
        """Keep the erased address's hash, and drop the upstream ids that name it."""
        async with self._transaction() as db:
            await db.execute("INSERT OR IGNORE INTO forgotten_contacts VALUES (?, ?, ?)",
                             (forgotten_key(address), project or "", now_rfc3339()))
            sql = "DELETE FROM provider_ids WHERE recipient = ?" + (" AND project = ?" if project is not None else "")
            await db.execute(sql, [address_key(address)] + ([project] if project is not None else []))

    async def forgotten_keys(self: _Store) -> set[tuple[str, str]]:
        """(key, project) pairs; project '' = erased from every project."""
        async with self.db.execute("SELECT key, project FROM forgotten_contacts") as cursor:
            return {(row["key"], row["project"]) for row in await cursor.fetchall()}

    # --- webhook dead letters ---------------------------------------------------------------

    async def bury_webhook(self: _Store, outbox_id: int, *, error: str, now: float) -> None:
        """Move a given-up outbox row to the dead letters, in one transaction."""
        async with self._transaction() as db:
            await db.execute(
                "INSERT INTO webhook_dead_letters (event_id, project, key, created, attempts, last_error, buried) "
                "SELECT event_id, project, key, created, attempts + 1, ?, ? FROM webhook_outbox WHERE id = ?",
                (error[:500], now, outbox_id),
            )
            await db.execute("DELETE FROM webhook_outbox WHERE id = ?", (outbox_id,))

    async def dead_letters(self: _Store, project: str, *, limit: int) -> list[DeadLetter]:
        sql = "SELECT * FROM webhook_dead_letters WHERE project = ? ORDER BY id DESC LIMIT ?"
        async with self.db.execute(sql, (project, limit)) as cursor:
            return [DeadLetter(**dict(row)) for row in await cursor.fetchall()]

    async def replay_dead_letter(self: _Store, project: str, dead_letter_id: int, *, now: float) -> bool:
        """Back into the outbox, due now, with a fresh retry window and the same idempotency key."""
        async with self._transaction() as db:
            cursor = await db.execute(
                "INSERT INTO webhook_outbox (event_id, project, key, created, due, attempts) "
                "SELECT event_id, project, key, ?, ?, 0 FROM webhook_dead_letters WHERE id = ? AND project = ?",
                (now, now, dead_letter_id, project),
            )
            if cursor.rowcount != 1:
                return False
            await db.execute("DELETE FROM webhook_dead_letters WHERE id = ?", (dead_letter_id,))
        return True
