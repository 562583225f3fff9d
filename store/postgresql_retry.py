"""Waiting out a PostgreSQL restart or failover: every pooled call of the PostgreSQL store goes through
`retrying`, the event store's, the feedback's and the dashboard's alike.

The same call succeeds once the database is back, and every store call can be repeated (events by
their uid, the ledger by its owner, the rest are reads, upserts or deletes by key).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

import asyncpg

log = logging.getLogger("inflight.store")
P = ParamSpec("P")
T = TypeVar("T")

TRANSIENT = (OSError, asyncpg.PostgresConnectionError, asyncpg.exceptions.OperatorInterventionError,
             asyncpg.exceptions.TooManyConnectionsError, asyncpg.InterfaceError, asyncpg.exceptions.InternalClientError)
RETRY_SECONDS = 20.0  # how long a call waits for the database to come back before it fails


def retrying(call: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """Repeat a store method while the database is away (a restart), then give up with its error.

    Between tries the store's pool (`self._pool`) drops its connections: the restart cut them all,
    and the pool opens new ones.
    """

    @functools.wraps(call)
    async def repeated(*args: P.args, **kwargs: P.kwargs) -> T:
        deadline = time.monotonic() + RETRY_SECONDS
        delay = 0.1
        while True:
            try:
                return await call(*args, **kwargs)
            except TRANSIENT as exc:
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("store-unavailable call=%s retry_in=%.1fs: %s", call.__name__, delay, type(exc).__name__)
                pool = getattr(args[0], "_pool", None)
                if pool is not None:
                    await pool.expire_connections()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    return repeated
