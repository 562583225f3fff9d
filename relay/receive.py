"""The SMTP session: aiosmtpd's, with a DATA reader that works on chunks instead of lines.

aiosmtpd reads a message body one line per await and un-stuffs dots line by line in Python: a
25 MB message is 330 000 lines, about 10 ms of event-loop time per 256 KB read and 60 ms more at
the final dot, so every other session on the relay waits behind it (bench/cases/isolation.py).
This reader takes whatever the socket delivered, checks line lengths and removes the
dot-stuffing with bytes operations, and answers exactly as aiosmtpd does: same limits, same
replies, same bytes handed to the handler.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from aiosmtpd.smtp import MISSING, SMTP

from relay.memory import MemoryBudget, declared_size
from relay.replies import INSUFFICIENT_STORAGE

TERMINATOR = b".\r\n"  # the final line is a lone dot; a line merely ending in one is checked and passed over
# A dot starting a line: the compiled pattern's literal scan finds it 3.6x quicker than bytes.replace,
# whose search for a needle starting with a byte on every line is slow (50 KB: 18 µs against 66 µs).
_LINE_START_DOT = re.compile(rb"\r\n\.")
# Bodies from this size up are joined in a thread.
JOIN_IN_THREAD_BYTES = 1 << 20


class ChunkedDataSMTP(SMTP):
    """With a MemoryBudget, a body is read only as far as its reservation reaches (relay/memory.py)."""

    def __init__(self, *args: Any, memory: MemoryBudget | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.memory = memory

    async def smtp_DATA(self, arg: str) -> None:
        if self._decode_data:
            await super().smtp_DATA(arg)  # text mode is aiosmtpd's own business; the relay uses bytes
            return
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        reservation = self.memory.reservation() if self.memory is not None else None
        try:
            if reservation is not None and not await reservation.cover(declared_size(self.envelope.mail_options)):
                await self.push(INSUFFICIENT_STORAGE)  # before 354: the client has sent nothing yet
                return
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            body = Body(size_limit=self.data_size_limit, line_limit=self.line_length_limit)
            while not body.complete:
                try:
                    piece = await self._reader.readuntil(TERMINATOR)
                except asyncio.LimitOverrunError as exc:
                    # No final dot within the stream's limit: take what is buffered, minus the bytes that
                    # could begin a terminator, so nothing after the final dot is ever consumed here.
                    piece = await self._reader.read(exc.consumed)
                body.feed(piece)
                if reservation is not None and body.error is None and not await reservation.cover(body.size):
                    body.refuse(INSUFFICIENT_STORAGE)  # read on to the final dot, holding nothing
            if body.error is not None:
                await self.push(self.data_refusal(body))
                self._set_post_data_state()
                return
            # A large body is joined in a thread: bytes.join lets go of the GIL for large results, so other
            # sessions run meanwhile (26 MB held the event loop ~25 ms: bench case isolation).
            self.envelope.content = self.envelope.original_content = (
                await asyncio.to_thread(body.content) if body.size >= JOIN_IN_THREAD_BYTES else body.content())
            status = await self._call_handler_hook("DATA") if "DATA" in self._handle_hooks else MISSING
            self._set_post_data_state()
            await self.push("250 OK" if status is MISSING else status)
        finally:
            if reservation is not None:
                await reservation.release()


    def data_refusal(self, body: Body) -> str:
        """The reply to a body refused while it was read; aiosmtpd's own wording here."""
        assert body.error is not None
        return body.error


class Body:
    """A DATA body fed in arbitrary pieces; pure, so it is tested byte for byte against aiosmtpd."""

    def __init__(self, *, size_limit: int | None, line_limit: int) -> None:
        self.size_limit = size_limit
        self.line_limit = line_limit
        self.size = 0
        self.complete = False
        self.error: str | None = None
        self.bare_lf = False  # the over-long line holds a bare LF: mail with LF-only line endings, not a long line
        self._parts: list[bytes] = []
        self._partial = b""  # the current line so far; it always starts at a line start

    def feed(self, piece: bytes) -> None:
        self.size += len(piece)
        lines = (self._partial + piece).split(b"\r\n")
        self._partial = lines.pop()
        if lines and lines[-1] == b"." and self._partial == b"":
            lines.pop()
            self.complete = True
            self.size -= len(TERMINATOR)
        if self.error is None:
            longest = max(map(len, lines), default=0)
            if longest + 2 > self.line_limit or len(self._partial) + 2 > self.line_limit:
                self.error = "500 Line too long (see RFC5321 4.5.3.1.6)"
                self.bare_lf = any(b"\n" in line for line in (*lines, self._partial) if len(line) + 2 > self.line_limit)
            elif self.size_limit and self.size > self.size_limit:
                self.error = "552 Error: Too much mail data"
        if self.error is not None:
            self.refuse(self.error)
            return
        if lines:
            text = b"\r\n".join(lines) + b"\r\n"
            if text.startswith(b"."):
                text = text[1:]
            self._parts.append(_LINE_START_DOT.sub(b"\r\n", text))  # RFC 5321 §4.5.2: one leading dot removed

    def refuse(self, reply: str) -> None:
        """Answer `reply` at the final dot; until then keep reading, but hold nothing."""
        self.error = reply
        self._parts.clear()
        self._partial = self._partial[: self.line_limit]

    def content(self) -> bytes:
        """The whole body, once: the pieces are let go, so the message is not held twice."""
        content = b"".join(self._parts)
        self._parts.clear()
        return content
