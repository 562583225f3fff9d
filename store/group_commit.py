"""Group commit, as both backends do it for events: writes that arrive while a batch is being written wait
together for the next one, so a burst of hits costs a few transactions instead of one each.

One writer task drains the queue, `limit` writes a batch, in arrival order. Every caller still returns
only after the commit that holds its write, with its own result.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

W = TypeVar("W")
R = TypeVar("R")


class GroupCommit(Generic[W, R]):
    """`commit(writes)` stores a batch in one transaction and answers one result per write, in order.

    When it fails with one of `whole` (the database locked, busy or away: the same for every write),
    every caller of the batch gets that error: retrying the writes one by one would wait it out once per
    write, and the spool retries them later instead. Any other error is one write's own: the batch is
    written again one write at a time, so only that write's caller gets it.
    """

    def __init__(self, commit: Callable[[list[W]], Awaitable[list[R]]], *, limit: int,
                 whole: tuple[type[BaseException], ...]) -> None:
        self._commit = commit
        self.limit = limit
        self.whole = whole
        self._pending: list[tuple[W, asyncio.Future[R]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def submit(self, write: W) -> R:
        """One write's result, once the transaction that holds it is committed."""
        (result,) = await self.submit_many([write])
        return result

    async def submit_many(self, writes: list[W]) -> list[R]:
        """Several writes queued at once, their results in order once committed: one future each, but no task
        or coroutine each (a recorder's batch of hits: bench case `tracker`). When any fails, the first error
        is raised once all are done; the others are committed, or failed with their own errors."""
        loop = asyncio.get_running_loop()
        pending = [(write, loop.create_future()) for write in writes]
        self._pending += pending
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_pending())
        results: list[R] = []
        error: BaseException | None = None
        for _, done in pending:  # a done future is awaited without a trip through the loop
            try:
                results.append(await done)
            except Exception as exc:
                error = error or exc
        if error is not None:
            raise error
        return results

    async def drained(self) -> None:
        """Once every write already submitted is committed (or failed)."""
        if self._writer is not None:
            await self._writer

    async def _write_pending(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending[:self.limit], self._pending[self.limit:]
                await self._write(batch)
        finally:
            self._writer = None

    async def _write(self, batch: list[tuple[W, asyncio.Future[R]]]) -> None:
        try:
            results = await self._commit([write for write, _ in batch])
        except self.whole as exc:
            for _, done in batch:
                if not done.done():
                    done.set_exception(exc)
            return
        except Exception as exc:
            if len(batch) > 1:
                for item in batch:
                    await self._write([item])
                return
            if not batch[0][1].done():
                batch[0][1].set_exception(exc)
            return
        for (_, done), result in zip(batch, results, strict=True):
            if not done.done():  # a cancelled caller's write is stored all the same
                done.set_result(result)
