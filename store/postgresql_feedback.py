"""The PostgreSQL side of delivery feedback: suppressions, the upstream's ids, erased contacts, dead letters.

A mixin of PostgresEventStore (same pool); the tables come from migration 0004_feedback.sql.
Every write is one statement or one transaction, so any node may run it at any time, and every call
waits out a restart of the database as the event store's do (store/postgresql_retry.py).
"""

from __future__ import annotations

import time
from typing import Protocol

import asyncpg

from store.model import (
    PROVIDER_ID_TTL_SECONDS,
    DeadLetter,
    ProviderCopy,
    Suppression,
    address_key,
    forgotten_key,
    now_rfc3339,
)
from store.postgresql_retry import retrying


class _Store(Protocol):
    """What the mixin uses of PostgresEventStore."""

    @property
    def pool(self) -> asyncpg.Pool: ...


class PostgresFeedback:
    """Suppressions, ProviderIds, ForgottenContacts and DeadLetters (store.model) over PostgreSQL."""

    @retrying
    async def suppress(self: _Store, project: str, address: str, *, reason: str, detail: str) -> bool:
        status = await self.pool.execute(
            "INSERT INTO suppressions VALUES ($1, $2, $3, $4, $5) ON CONFLICT (project, address) DO NOTHING",
            project, address_key(address), reason, detail[:500], now_rfc3339())
        return bool(status.endswith(" 1"))

    @retrying
    async def unsuppress(self: _Store, project: str, address: str) -> bool:
        status = await self.pool.execute("DELETE FROM suppressions WHERE project = $1 AND address = $2",
                                         project, address_key(address))
        return bool(status == "DELETE 1")

    @retrying
    async def suppressions(self: _Store, project: str) -> list[Suppression]:
        rows = await self.pool.fetch("SELECT * FROM suppressions WHERE project = $1 ORDER BY address", project)
        return [Suppression(**dict(row)) for row in rows]

    @retrying
    async def suppressed(self: _Store, project: str, addresses: list[str]) -> dict[str, Suppression]:
        keys = sorted({address_key(a) for a in addresses})
        if not keys:
            return {}
        rows = await self.pool.fetch("SELECT * FROM suppressions WHERE project = $1 AND address = ANY($2::text[])",
                                     project, keys)
        return {row["address"]: Suppression(**dict(row)) for row in rows}

    @retrying
    async def record_provider_ids(self: _Store, copies: list[tuple[str, ProviderCopy]]) -> None:
        if not copies:
            return
        now = int(time.time())
        async with self.pool.acquire() as connection, connection.transaction():
            await connection.execute("DELETE FROM provider_ids WHERE expires_at <= $1", now)
            await connection.executemany(
                "INSERT INTO provider_ids VALUES ($1, $2, $3, $4, $5) ON CONFLICT (provider_id, recipient) "
                "DO UPDATE SET project = EXCLUDED.project, message_id = EXCLUDED.message_id, expires_at = EXCLUDED.expires_at",
                [(provider_id, address_key(copy.recipient), copy.project, copy.message_id, now + PROVIDER_ID_TTL_SECONDS)
                 for provider_id, copy in copies],
            )

    @retrying
    async def provider_copies(self: _Store, provider_id: str) -> list[ProviderCopy]:
        rows = await self.pool.fetch("SELECT project, message_id, recipient FROM provider_ids "
                                     "WHERE provider_id = $1 AND expires_at > $2", provider_id, int(time.time()))
        return [ProviderCopy(row["project"], row["message_id"], row["recipient"]) for row in rows]

    @retrying
    async def remember_forgotten(self: _Store, address: str, *, project: str | None) -> None:
        async with self.pool.acquire() as connection, connection.transaction():
            await connection.execute("INSERT INTO forgotten_contacts VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                                     forgotten_key(address), project or "", now_rfc3339())
            if project is None:
                await connection.execute("DELETE FROM provider_ids WHERE recipient = $1", address_key(address))
            else:
                await connection.execute("DELETE FROM provider_ids WHERE recipient = $1 AND project = $2",
                                         address_key(address), project)

    @retrying
    async def forgotten_keys(self: _Store) -> set[tuple[str, str]]:
        return {(row["key"], row["project"]) for row in await self.pool.fetch("SELECT key, project FROM forgotten_contacts")}

    @retrying
    async def bury_webhook(self: _Store, outbox_id: int, *, error: str, now: float) -> None:
        await self.pool.execute(
            "WITH gone AS (DELETE FROM webhook_outbox WHERE id = $1 RETURNING *) "
            "INSERT INTO webhook_dead_letters (event_id, project, key, created, attempts, last_error, buried) "
            "SELECT event_id, project, key, created, attempts + 1, $2, $3 FROM gone",
            outbox_id, error[:500], now)

    @retrying
    async def dead_letters(self: _Store, project: str, *, limit: int) -> list[DeadLetter]:
        rows = await self.pool.fetch("SELECT * FROM webhook_dead_letters WHERE project = $1 ORDER BY id DESC LIMIT $2",
                                     project, limit)
        return [DeadLetter(**dict(row)) for row in rows]

    @retrying
    async def replay_dead_letter(self: _Store, project: str, dead_letter_id: int, *, now: float) -> bool:
        status = await self.pool.execute(
            "WITH back AS (DELETE FROM webhook_dead_letters WHERE id = $1 AND project = $2 RETURNING *) "
            "INSERT INTO webhook_outbox (event_id, project, key, created, due, attempts) "
            "SELECT event_id, project, key, $3, $3, 0 FROM back",
            dead_letter_id, project, now)
        return bool(status == "INSERT 0 1")  # every node's worker finds it due at its next poll
