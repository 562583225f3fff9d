"""The memory messages in flight may hold, so a burst of large sends waits instead of getting the relay OOM-killed.

A message costs up to MEMORY_PER_MESSAGE_BYTE times its size while the relay holds it (received
bytes, the prepared copy, what the CPU pool works on: README "Memory"). Each message reserves
that much of `relay.max_inflight_bytes` as its bytes arrive: from the SIZE its client declared,
or in steps while it is read. When the budget is spent, reading stops (TCP pushes back on the
client) until other messages finish; after MEMORY_WAIT_SECONDS the message is refused with
`452 4.3.1`, a temporary failure the client retries later. Worker processes each get an equal
share of the ceiling: a share needs no lock between processes, and a restarted worker starts
from zero, as its memory does.
"""

from __future__ import annotations

import asyncio
import logging

from config.settings import MEMORY_PER_MESSAGE_BYTE

log = logging.getLogger("inflight.relay")

# How long a message waits for memory before it is refused (well under a client's DATA timeout of minutes).
MEMORY_WAIT_SECONDS = 30.0
# Reservations grow by at least this many message bytes, so a large body is not re-reserved per read.
STEP_BYTES = 1 << 20


class MemoryBudget:
    """The bytes of this process's share of `relay.max_inflight_bytes`, and who waits for them."""

    def __init__(self, limit: int, *, wait_seconds: float | None = None) -> None:
        self.limit = limit
        self.wait_seconds = MEMORY_WAIT_SECONDS if wait_seconds is None else wait_seconds
        self.used = 0
        self._freed = asyncio.Condition()

    def reservation(self) -> Reservation:
        return Reservation(self)

    async def take(self, amount: int) -> bool:
        """Reserve `amount` bytes, waiting up to wait_seconds for others to release; False when it never fits."""
        if self.used + amount <= self.limit:
            self.used += amount
            return True
        if amount > self.limit:
            return False
        try:
            async with self._freed, asyncio.timeout(self.wait_seconds):
                await self._freed.wait_for(lambda: self.used + amount <= self.limit)
        except TimeoutError:
            return False
        self.used += amount
        return True

    async def give_back(self, amount: int) -> None:
        self.used -= amount
        async with self._freed:
            self._freed.notify_all()


class Reservation:
    """One message's share of the budget, grown as its size becomes known and returned when it is done."""

    def __init__(self, budget: MemoryBudget) -> None:
        self.budget = budget
        self.held = 0

    async def cover(self, message_bytes: int) -> bool:
        """Hold enough for a message of `message_bytes`; False when the budget stays spent for wait_seconds."""
        needed = MEMORY_PER_MESSAGE_BYTE * message_bytes
        if needed <= self.held:
            return True
        amount = needed - self.held
        step = min(MEMORY_PER_MESSAGE_BYTE * STEP_BYTES, self.budget.limit // 16)  # small budgets: small steps
        if self.budget.used + max(amount, step) <= self.budget.limit:
            amount = max(amount, step)  # room for more now: fewer reservations later
        if not await self.budget.take(amount):
            return False
        self.held += amount
        return True

    async def release(self) -> None:
        held, self.held = self.held, 0
        if held:
            await self.budget.give_back(held)


def memory_share(ceiling: int, workers: int, max_message_bytes: int) -> int:
    """This worker's part of `relay.max_inflight_bytes`: an equal share, but always room for the largest message.

    On a small machine with many cores the shares of the default ceiling (RAM / 4) could be too
    small for one message of max_message_bytes, which would then be refused for ever; the share is
    raised to fit it, and the overshoot logged so the operator can lower `workers`.
    """
    share = ceiling // max(workers, 1)
    least = MEMORY_PER_MESSAGE_BYTE * max_message_bytes
    if share < least:
        log.warning("memory-share-raised share=%d to=%d detail='relay.max_inflight_bytes / relay.workers is below "
                    "3 x max_message_bytes: all workers together may hold up to %d; lower relay.workers'",
                    share, least, least * workers)
        return least
    return share


def declared_size(mail_options: list[str]) -> int:
    """The SIZE=n a client declared at MAIL (RFC 1870), or 0."""
    for option in mail_options:
        name, _, value = option.partition("=")
        if name.upper() == "SIZE" and value.isdigit():
            return int(value)
    return 0
