"""The relay's open SMTP sessions, so that shutdown can let transactions in flight finish.

On Python 3.11 `asyncio.Server.close()` only stops listening and `wait_closed()` does not wait for
connections, and aiosmtpd keeps no list of its sessions: without this, SIGTERM would cut a message
between the upstream's acceptance and our 250, or before its last copies went.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from typing import cast

from aiosmtpd.smtp import SMTP

from relay import replies

log = logging.getLogger("inflight.relay")

POLL_SECONDS = 0.05


class Sessions:
    def __init__(self) -> None:
        self._open: weakref.WeakSet[SMTP] = weakref.WeakSet()

    def track(self, session: SMTP) -> SMTP:
        self._open.add(session)
        return session

    def live(self) -> list[SMTP]:
        return [s for s in list(self._open) if s.transport is not None]

    async def drain(self, timeout: float) -> int:
        """Close idle sessions with a 421, busy ones as their transaction ends; after `timeout`, cut the rest.

        A session is busy from MAIL until its DATA reply is written: aiosmtpd resets the envelope and
        writes the reply in one step, so an idle session never has a reply still to send. Returns the
        number of transactions cut (the app gets no 250 for them and retries; the ledger prevents a
        second copy of whatever already went upstream).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            busy = []
            for session in self.live():
                if session.envelope is not None and session.envelope.mail_from is not None:
                    busy.append(session)
                else:
                    _close(session, replies.SHUTTING_DOWN)
            if not busy:
                return 0
            if loop.time() >= deadline:
                log.warning("drain-timeout cut=%d after=%ss", len(busy), timeout)
                for session in busy:
                    _close(session, replies.SHUTTING_DOWN)
                return len(busy)
            await asyncio.sleep(POLL_SECONDS)


def _close(session: SMTP, reply: str) -> None:
    transport = session.transport
    if transport is None or transport.is_closing():
        return
    cast(asyncio.WriteTransport, transport).write(f"{reply}\r\n".encode("ascii"))  # uvloop's are not asyncio subclasses
    transport.close()  # flushes what is buffered (a 250 just written included), then closes
