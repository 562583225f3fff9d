"""The dashboard's reads and accounts on PostgreSQL: the same contract as store/sqlite_dashboard.py.

A mixin of PostgresEventStore (its pool); off the hot paths, so plain pooled queries, each waiting out
a restart of the database as the event store's do (store/postgresql_retry.py).
"""

from __future__ import annotations

from typing import Any

import asyncpg

from store.model import DailyCounts, DashboardSession, DashboardUser, StatsQuery
from store.postgresql_retry import retrying
from store.sql import agent_counts, agents_sql, daily_counts, daily_sql, filters


def _mark(index: int) -> str:
    return f"${index}"


class PostgresDashboardQueries:
    PAIR: str  # PostgresEventStore's: one message to one contact as one value

    @property
    def pool(self) -> asyncpg.Pool:
        raise NotImplementedError  # PostgresEventStore's

    @retrying
    async def daily(self, query: StatsQuery) -> list[DailyCounts]:
        condition, args = filters(query, ("campaign", "template"), _mark)
        return daily_counts(await self.pool.fetch(daily_sql(condition, self.PAIR), *args))

    @retrying
    async def agent_counts(self, query: StatsQuery) -> dict[str, dict[str, int]]:
        condition, args = filters(query, ("campaign", "template"), _mark)
        return agent_counts(await self.pool.fetch(agents_sql(condition), *args))

    @retrying
    async def webhook_rows(self, project: str, limit: int) -> list[dict[str, Any]]:
        rows = await self.pool.fetch(
            "SELECT o.id, o.key, o.created, o.due, o.attempts, o.last_error, e.name, e.contact FROM webhook_outbox o "
            "LEFT JOIN events e ON e.id = o.event_id WHERE o.project = $1 ORDER BY o.due LIMIT $2", project, limit)
        return [dict(row) for row in rows]

    @retrying
    async def retry_webhook_now(self, project: str, outbox_id: int, *, now: float) -> bool:
        status = await self.pool.execute("UPDATE webhook_outbox SET due = $1 WHERE id = $2 AND project = $3",
                                         now, outbox_id, project)
        return str(status).endswith(" 1")

    @retrying
    async def save_user(self, user: DashboardUser) -> None:
        await self.pool.execute(
            "INSERT INTO dashboard_users (email, password_hash, project, admin) VALUES ($1, $2, $3, $4) "
            "ON CONFLICT (email) DO UPDATE SET password_hash = excluded.password_hash, project = excluded.project, "
            "admin = excluded.admin", user.email, user.password_hash, user.project, user.admin)

    @retrying
    async def user(self, email: str) -> DashboardUser | None:
        row = await self.pool.fetchrow("SELECT * FROM dashboard_users WHERE email = $1", email)
        return None if row is None else DashboardUser(row["email"], row["password_hash"], row["project"], bool(row["admin"]))

    @retrying
    async def create_session(self, token_hash: str, session: DashboardSession, *, expires: float) -> None:
        async with self.pool.acquire() as connection, connection.transaction():
            await connection.execute("DELETE FROM dashboard_sessions WHERE expires < $1", expires - 86400 * 30)
            await connection.execute("INSERT INTO dashboard_sessions VALUES ($1, $2, $3, $4)",
                                     token_hash, session.email, session.csrf, expires)

    @retrying
    async def session(self, token_hash: str, *, now: float) -> DashboardSession | None:
        row = await self.pool.fetchrow("SELECT email, csrf FROM dashboard_sessions WHERE token_hash = $1 AND expires > $2",
                                       token_hash, now)
        return None if row is None else DashboardSession(row["email"], row["csrf"])

    @retrying
    async def delete_session(self, token_hash: str) -> None:
        await self.pool.execute("DELETE FROM dashboard_sessions WHERE token_hash = $1", token_hash)
