"""The store both sides share: events, settings, the webhook outbox, the delivery ledger, throttles.

`open_store(url)` picks the backend from the URL's scheme; callers hold the protocol types of
store/model.py, never a backend class.
"""

from __future__ import annotations

from collections.abc import Collection
from urllib.parse import urlsplit

from store.model import EventStore

POSTGRESQL_SCHEMES = ("postgresql", "postgres")


def open_store(url: str, *, webhook_projects: Collection[str] = (), pool_size: int | None = None) -> EventStore:
    """The store named by `url`: `sqlite:///path` (the embedded default) or `postgresql://…` (several nodes).

    Opening it (`await store.open()`) brings its schema up to date; the URL is never logged.
    `pool_size`: PostgreSQL connections at most (its default when None), for a process that needs few.
    """
    if url.startswith("sqlite:///"):
        from store.sqlite import SqliteEventStore

        return SqliteEventStore.from_url(url, webhook_projects=webhook_projects)
    if urlsplit(url).scheme in POSTGRESQL_SCHEMES:
        from store.postgresql import PostgresEventStore  # asyncpg is loaded only when used

        return PostgresEventStore(url, webhook_projects=webhook_projects, pool_size=pool_size)
    scheme = urlsplit(url).scheme
    raise ValueError(f"store.url: unsupported scheme {scheme or 'none'!r}; use sqlite:///path or postgresql://user@host/db")


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite:///")


async def migrate_store(url: str) -> list[str]:
    """Bring the store's schema up to date and say what was applied (`inflight migrate`).

    PostgreSQL: the numbered files of store/migrations/postgresql not applied yet, under the
    same advisory lock nodes take at start. SQLite: its schema is brought up to date on open
    (missing tables, indexes and columns added), so opening it is its migration.
    """
    if is_sqlite(url):
        store = open_store(url)
        await store.open()
        await store.close()
        return []
    import asyncpg

    from store.postgresql import migrate

    connection = await asyncpg.connect(url)
    try:
        return await migrate(connection)
    finally:
        await connection.close()
