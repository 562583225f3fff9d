"""The dashboard's reads and accounts on SQLite: counts per day and agent, the webhook queue, users, sessions.

A mixin of SqliteEventStore (its connection and write transaction), kept apart because none of it
is on a hot path: the dashboard reads a few times a minute, the pixel thousands of times a second.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Any

import aiosqlite

from store.model import DailyCounts, DashboardSession, DashboardUser, StatsQuery
from store.sql import agent_counts, agents_sql, daily_counts, daily_sql, filters


class SqliteDashboardQueries:
    PAIR: str  # SqliteEventStore's: one message to one contact as one value
    @property
    def db(self) -> aiosqlite.Connection:
        raise NotImplementedError  # SqliteEventStore's

    def _transaction(self) -> AbstractAsyncContextManager[aiosqlite.Connection]:
        raise NotImplementedError  # SqliteEventStore's

    async def daily(self, query: StatsQuery) -> list[DailyCounts]:
        """Per UTC day: delivered copies, opens and clicks (unique per message and contact that day, and total)."""
        condition, args = filters(query, ("campaign", "template"), "?".format)
        async with self.db.execute(daily_sql(condition, self.PAIR), args) as cursor:
            return daily_counts(await cursor.fetchall())

    async def agent_counts(self, query: StatsQuery) -> dict[str, dict[str, int]]:
        condition, args = filters(query, ("campaign", "template"), "?".format)
        async with self.db.execute(agents_sql(condition), args) as cursor:
            return agent_counts(await cursor.fetchall())

    async def webhook_rows(self, project: str, limit: int) -> list[dict[str, Any]]:
        sql = ("SELECT o.id, o.key, o.created, o.due, o.attempts, o.last_error, e.name, e.contact FROM webhook_outbox o "
               "LEFT JOIN events e ON e.id = o.event_id WHERE o.project = ? ORDER BY o.due LIMIT ?")
        async with self.db.execute(sql, (project, limit)) as cursor:
            return [dict(row) for row in await cursor.fetchall()]

    async def retry_webhook_now(self, project: str, outbox_id: int, *, now: float) -> bool:
        async with self._transaction() as db:
            cursor = await db.execute("UPDATE webhook_outbox SET due = ? WHERE id = ? AND project = ?", (now, outbox_id, project))
        return cursor.rowcount == 1

    async def save_user(self, user: DashboardUser) -> None:
        async with self._transaction() as db:
            await db.execute("INSERT INTO dashboard_users (email, password_hash, project, admin) VALUES (?, ?, ?, ?) "
                             "ON CONFLICT (email) DO UPDATE SET password_hash = excluded.password_hash, "
                             "project = excluded.project, admin = excluded.admin",
                             (user.email, user.password_hash, user.project, int(user.admin)))

    async def user(self, email: str) -> DashboardUser | None:
        async with self.db.execute("SELECT * FROM dashboard_users WHERE email = ?", (email,)) as cursor:
            row = await cursor.fetchone()
        return None if row is None else DashboardUser(row["email"], row["password_hash"], row["project"], bool(row["admin"]))

    async def create_session(self, token_hash: str, session: DashboardSession, *, expires: float) -> None:
        async with self._transaction() as db:
            await db.execute("DELETE FROM dashboard_sessions WHERE expires < ?", (expires - 86400 * 30,))
            await db.execute("INSERT INTO dashboard_sessions VALUES (?, ?, ?, ?)", (token_hash, session.email, session.csrf, expires))

    async def session(self, token_hash: str, *, now: float) -> DashboardSession | None:
        async with self.db.execute("SELECT email, csrf FROM dashboard_sessions WHERE token_hash = ? AND expires > ?",
                                   (token_hash, now)) as cursor:
            row = await cursor.fetchone()
        return None if row is None else DashboardSession(row["email"], row["csrf"])

    async def delete_session(self, token_hash: str) -> None:
        async with self._transaction() as db:
            await db.execute("DELETE FROM dashboard_sessions WHERE token_hash = ?", (token_hash,))

