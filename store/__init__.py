"""The store both sides share: events, settings, the webhook outbox and the delivery ledger.

`open_store(url)` picks the backend from the URL's scheme; callers hold the protocol types of
store/model.py, never a backend class.
"""

from __future__ import annotations

from collections.abc import Collection

from store.sqlite import SqliteEventStore


def open_store(url: str, *, webhook_projects: Collection[str] = ()) -> SqliteEventStore:
    """The store named by `url`: `sqlite:///path` (the embedded default)."""
    if url.startswith("sqlite:///"):
        return SqliteEventStore.from_url(url, webhook_projects=webhook_projects)
    raise ValueError(f"store.url: unsupported scheme in {url.split(':', 1)[0]!r}; use sqlite:///path")
