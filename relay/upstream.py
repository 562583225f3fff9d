"""Where accepted mail goes: SMTP upstreams (SES, Postmark, any MTA) over pooled connections, or a dev outbox.

Every upstream answer is reported per recipient and classified once, here, so the pipeline can
answer the app truthfully: 250 only for what went, 4xx for what may still go, 5xx for what never
will. An upstream that cannot be reached at all (refused connection, timeout, TLS or AUTH failure,
4xx greeting) is marked `unreachable`: nothing was sent, so a fallback may be tried.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.policy
import errno
import logging
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from pathlib import Path
from typing import Any, Protocol, cast
from urllib.parse import unquote, urlsplit

import aiosmtplib
from aiosmtplib.email import quote_address
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings

from config.settings import UpstreamSettings
from monitoring.metrics import POOL_CONNECTIONS, UPSTREAM_FAILURES, UPSTREAM_SECONDS, failure_cause, timed

log = logging.getLogger("inflight.upstream")

# Below this size the DATA block is prepared on the event loop (about 3 ms); above, in the CPU pool.
INLINE_BYTES = 256 * 1024
# A connection idle for longer than this gets a NOOP before it carries a message (a dead one is replaced).
HEALTH_CHECK_AFTER_SECONDS = 2.0
# An upstream found unreachable is tried after the others for this long, so a dead primary does not
# cost every message its connect timeout.
DOWN_FOR_SECONDS = 30.0


@dataclass(frozen=True)
class RecipientResult:
    """The upstream's answer for one recipient: its reply code and text."""

    code: int
    text: str
    unreachable: bool = False  # no connection could be made: nothing was sent

    @property
    def accepted(self) -> bool:
        return 200 <= self.code < 400

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500


Results = dict[str, RecipientResult]


class Upstream(Protocol):
    async def send(self, mail_from: str, recipients: list[str], data: bytes, *, ready: asyncio.Future[Any] | None = None,
                   crlf: bool = False) -> Results:
        """Deliver; one result per recipient. Delivery failures are results, never exceptions.

        `crlf`: the caller knows `data` is CRLF throughout (see DataBody.scan), so it need not be scanned.

        `ready` (a future: a fallback awaits it again) is awaited before the upstream can take the
        message (its final dot; the outbox file): what must be on disk first (the ledger rows of the
        copies before) is written while the envelope goes.
        """

    async def close(self) -> None: ...


def unreachable(recipients: list[str], detail: str) -> Results:
    return dict.fromkeys(recipients, RecipientResult(451, f"4.4.1 upstream unreachable: {detail}", unreachable=True))


class OutboxUpstream:
    """Writes each delivered message to DIR as one .eml file per recipient (development and demos).

    A file is named `<message-id>.<recipient>.eml` (characters outside [A-Za-z0-9@._+-] become `_`),
    so the copies of a tracked message, one per recipient with its own tokens, can be told apart and
    found from the events API's `message_id`. The envelope is kept in the file as a local delivery
    agent keeps it: `Return-Path:` (MAIL FROM) and `Delivered-To:` (the recipient) on top.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    async def send(self, mail_from: str, recipients: list[str], data: bytes, *, ready: asyncio.Future[Any] | None = None,
                   crlf: bool = False) -> Results:
        if ready is not None:
            await ready
        try:
            await asyncio.to_thread(self._write, mail_from, recipients, data)
        except OSError as exc:
            return dict.fromkeys(recipients, RecipientResult(451, f"4.3.0 outbox write failed: {exc.strerror}"))
        return dict.fromkeys(recipients, RecipientResult(250, "2.0.0 written to outbox"))

    def _write(self, mail_from: str, recipients: list[str], data: bytes) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        newline = b"\r\n" if b"\r\n" in data[: data.find(b"\n") + 1] else b"\n"
        message_id = _header_value(data, "message-id").strip().strip("<>") or uuid.uuid4().hex
        for recipient in recipients:
            envelope = b"Return-Path: <%s>%sDelivered-To: %s%s" % (
                mail_from.encode(), newline, recipient.encode(), newline)
            temporary = self.directory / f".{uuid.uuid4().hex}.tmp"
            temporary.write_bytes(envelope + data)
            try:
                self._publish(temporary, f"{_safe_name(message_id)}.{_safe_name(recipient)}")
            finally:
                temporary.unlink(missing_ok=True)

    def _publish(self, temporary: Path, stem: str) -> None:
        """Link the finished file under its name (readers never see half a file); a resend of the same
        message to the same recipient gets `.1`, `.2`... rather than replacing the earlier copy."""
        for attempt in range(1000):
            try:
                os.link(temporary, self.directory / (f"{stem}.eml" if attempt == 0 else f"{stem}.{attempt}.eml"))
                return
            except FileExistsError:
                continue
        raise FileExistsError(errno.EEXIST, "too many copies", stem)

    async def close(self) -> None:
        return None


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9@._+-]", "_", text).lstrip(".")[:120] or "_"


def _header_value(data: bytes, name: str) -> str:
    """One header of the message's header block (unfolded), or '' when absent."""
    end = min((i for i in (data.find(b"\r\n\r\n"), data.find(b"\n\n")) if i >= 0), default=len(data))
    headers = BytesHeaderParser(policy=email.policy.compat32).parsebytes(data[: end + 2])
    return str(headers.get(name, "") or "")


@dataclass(frozen=True)
class SmtpEndpoint:
    scheme: str  # smtp (STARTTLS required) | smtps (implicit TLS) | smtp+insecure (plain)
    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)  # never in a log line or traceback

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"  # never the credentials


@dataclass(frozen=True)
class Timeouts:
    connect: float  # TCP, greeting, EHLO, STARTTLS and AUTH together
    command: float  # each of MAIL, RCPT, RSET, NOOP and DATA's 354
    data: float  # the message body through the final reply


# A dot after a line feed: bytes.replace finds this two-byte needle slowly where lines are short (63 µs on a
# 50 KB QP body, once per copy), the regular expression's literal scan in 17 µs (bench case relay).
_LINE_START_DOT = re.compile(rb"\n\.")


def _double_line_dots(data: bytes) -> bytes:
    """Every dot that starts a line after the first doubled (RFC 5321 §4.5.2 transparency)."""
    return _LINE_START_DOT.sub(b"\n..", data)


def smtp_data_block(data: bytes) -> bytes:
    """The DATA payload as sent: CRLF line endings, leading dots doubled (RFC 5321 §4.5.2), closing dot.

    The same transformation aiosmtplib's `data()` does, but runnable in a worker: on 25 MB its two
    regular expressions hold the event loop for about 300 ms. Data that is CRLF throughout (every
    message the relay received over SMTP) takes a fast path of byte counts and one replace, about
    ten times quicker than the regular expressions, with the same result.
    """
    crlf = data.count(b"\r\n")
    if data.count(b"\n") != crlf or data.count(b"\r") != crlf:
        return PERIOD_REGEX.sub(b"..", normalize_message_line_endings(data)) + b".\r\n"
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    stuffed = _double_line_dots(data)  # after a CRLF-only check, every line start but the first
    return (b"." if stuffed.startswith(b".") else b"") + stuffed + b".\r\n"


# A body goes out in pieces of this size, each dot-stuffed as it is written: the event loop is held ~1 ms
# per piece, and no second whole-message copy (the stuffed block) is ever made.
PIECE_BYTES = 256 * 1024
# A body is checked for line endings in steps of this size, the event loop let run between them.
SCAN_BYTES = 1 << 20
END = b".\r\n"  # after the body's last CRLF: the upstream takes the message (RFC 5321 §4.1.1.4)


class DataBody:
    """A message as DATA sends it: dot-stuffed, CRLF throughout, ending in CRLF "." CRLF (RFC 5321 §4.5.2).

    Mail received over SMTP is CRLF throughout: it is stuffed piece by piece while it is written, so
    a 50 MB copy is never held twice. Other data (LF endings, from an outbox-style source) is made
    into a block at once, in the CPU pool when large (see smtp_data_block).
    """

    def __init__(self, data: bytes, *, stuffed: bool = False) -> None:
        self._data = data
        self._stuffed = stuffed
        # What MAIL declares as SIZE= (RFC 1870 §3): the message's octets, CRLF-ended, without the dots
        # doubled for transparency or the final dot; so no count of dots per copy (a two-byte count over
        # a 50 KB copy costs ~45 µs). A block already stuffed declares its whole length: a few octets over.
        self.size = len(data) if stuffed or data.endswith(b"\r\n") else len(data) + 2

    @staticmethod
    async def scan(data: bytes, step: int = SCAN_BYTES) -> bool:
        """Whether `data` is CRLF throughout (then it streams, dot-stuffed as it goes).

        Counted `step` bytes at a time with the event loop let run in between: at once, the counts
        held it ~100 ms for a 26 MB message (bench case isolation). A pair of bytes across a cut is
        counted in the step where it starts.
        """
        crlf = newlines = returns = 0
        for start in range(0, len(data), step):
            stop = start + step
            crlf += data.count(b"\r\n", start, stop + 1)
            newlines += data.count(b"\n", start, stop)
            returns += data.count(b"\r", start, stop)
            if stop < len(data):
                await asyncio.sleep(0)
        return newlines == crlf and returns == crlf

    def pieces(self, size: int = PIECE_BYTES) -> Iterator[bytes]:
        """The DATA payload in pieces, all but its closing dot (END): the caller writes that last."""
        data = self._data
        if self._stuffed:
            end = len(data) - len(END)  # a stuffed block ends with END
            for start in range(0, end, size):
                yield data[start:min(start + size, end)]
            return
        for start in range(0, len(data), size):
            piece = _double_line_dots(data[start:start + size])
            # A line starting right at the cut: its CRLF ended the previous piece (or it is the first line).
            yield b"." + piece if piece.startswith(b".") and (start == 0 or data[start - 1] == 0x0A) else piece
        if not data.endswith(b"\r\n"):
            yield b"\r\n"


class _StaleConnection(Exception):
    """A pooled connection was closed by the upstream while idle; nothing was sent on it."""


class _Unreachable(Exception):
    pass


class _ConnectionClosed(Exception):
    """The upstream closed the connection, or did not reply in time, during a pipelined transaction."""


# A dot-atom address of ASCII atext (RFC 5322 §3.2.3) at a dotted host name: what quote_address makes of it is
# the address in angle brackets, without its parser (email.utils.parseaddr: ~8 µs, twice per copy).
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_PLAIN_ADDRESS = re.compile(rf"{_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*")


def _command(verb: bytes, address: str, options: list[str] | None = None) -> bytes:
    """`MAIL FROM:<a> OPTS` or `RCPT TO:<a>` as aiosmtplib writes them; ValueError when not sendable in ASCII."""
    if _PLAIN_ADDRESS.fullmatch(address):
        quoted = b"<" + address.encode("ascii") + b">"
    elif any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in address):
        raise ValueError("control character in address")
    else:
        quoted = quote_address(address).encode("ascii")
    return b" ".join([verb + quoted, *(o.encode("ascii") for o in options or [])]) + b"\r\n"


@contextlib.contextmanager
def _lent(client: aiosmtplib.SMTP) -> Iterator[tuple[_Replies, asyncio.WriteTransport]]:
    """The connection's transport, lent to a `_Replies` reader for one exchange and handed back to aiosmtplib.

    On any failure the connection is closed: a reply may still arrive, and must never be read as
    the next command's. _ConnectionClosed when there is no open connection to lend.
    """
    protocol = client.protocol
    transport = protocol.transport if protocol is not None else None
    if protocol is None or transport is None or transport.is_closing():
        raise _ConnectionClosed("connection lost")
    replies = _Replies(protocol)
    transport.set_protocol(replies)
    try:
        yield replies, cast(asyncio.WriteTransport, transport)  # uvloop's transports are not asyncio subclasses
    except BaseException:
        client.close()
        raise
    finally:
        if not transport.is_closing():
            transport.set_protocol(protocol)


class _Replies(asyncio.Protocol):
    """The replies of one pipelined transaction, in order, parsed as aiosmtplib does (multi-line joined by \\n).

    Installed as the transport's protocol while the transaction runs; a lost connection is passed
    on to aiosmtplib's protocol too, so the client knows it is closed.
    """

    def __init__(self, owner: asyncio.BaseProtocol) -> None:
        self._owner = owner
        self._buffer = bytearray()
        self._arrived: asyncio.Event = asyncio.Event()
        self._lost: str | None = None
        self._writable = asyncio.Event()
        self._writable.set()
        self.replied = False  # at least one reply was read: the upstream saw this transaction

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        self._arrived.set()

    def eof_received(self) -> bool:
        self._lost = "connection closed by upstream"
        self._arrived.set()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = self._lost or f"connection lost: {exc or 'closed'}"
        self._arrived.set()
        self._writable.set()
        self._owner.connection_lost(exc)

    def pause_writing(self) -> None:  # the transport's buffer is full: the next piece waits
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    async def send_body(self, writer: asyncio.WriteTransport, body: DataBody, timeout: float,
                        ready: asyncio.Future[Any] | None = None) -> aiosmtplib.SMTPResponse:
        """Write the body piece by piece as the upstream takes it, then read the final reply; all within `timeout`.

        With `ready`, the final dot waits for it: until then the upstream holds an unfinished message,
        which it drops if the connection goes (a crash), so nothing is delivered before `ready`. The
        last piece (all of a message under 256 KB) waits with it and goes with the final dot in one
        write: one segment and one wake-up of the upstream less per copy, which on a busy host count
        for more than the body's head start.
        """
        try:
            async with asyncio.timeout(timeout):
                last: bytes | None = None
                for piece in body.pieces():
                    if last is not None:
                        await self._write(writer, last)
                    last = piece
                if ready is not None:
                    await ready
                if self._lost is not None:
                    raise _ConnectionClosed(self._lost)
                writer.writelines([END] if last is None else [last, END])
                return await self.read(timeout)
        except TimeoutError:
            raise _ConnectionClosed(f"no reply to the body within {timeout:g} s") from None

    async def _write(self, writer: asyncio.WriteTransport, piece: bytes) -> None:
        if self._lost is not None:
            raise _ConnectionClosed(self._lost)
        writer.write(piece)
        if self._writable.is_set():
            # A fast upstream never fills the buffer: without this, all of a 26 MB body was
            # stuffed and written in one go, ~100 ms of other sessions waiting (bench case isolation).
            await asyncio.sleep(0)
        await self._writable.wait()

    async def read(self, timeout: float) -> aiosmtplib.SMTPResponse:
        reply = self._parse()  # pipelined replies often arrive together: one already here needs no timer
        if reply is not None:
            self.replied = True
            return reply
        try:
            async with asyncio.timeout(timeout):
                while True:
                    reply = self._parse()
                    if reply is not None:
                        self.replied = True
                        return reply
                    if self._lost is not None:
                        raise _ConnectionClosed(self._lost)
                    self._arrived.clear()
                    await self._arrived.wait()
        except TimeoutError:
            raise _ConnectionClosed(f"no reply within {timeout:g} s") from None

    def _parse(self) -> aiosmtplib.SMTPResponse | None:
        lines: list[bytes] = []
        offset = 0
        while (end := self._buffer.find(b"\n", offset)) >= 0:
            line = bytes(self._buffer[offset:end + 1])
            offset = end + 1
            lines.append(line[4:].strip(b" \t\r\n"))
            if line[3:4] != b"-":
                if not line[:3].isdigit():
                    raise _ConnectionClosed(f"malformed reply {line[:80]!r}")
                del self._buffer[:offset]
                return aiosmtplib.SMTPResponse(int(line[:3]), b"\n".join(lines).decode("utf-8", "surrogateescape"))
        return None


@dataclass
class _Connection:
    client: aiosmtplib.SMTP
    idle_since: float
    reused: bool = False


class SmtpUpstream:
    """One SMTP upstream behind a small pool of persistent connections.

    aiosmtplib has no pool, and a TLS handshake plus EHLO and AUTH per message is the dominant
    cost against a remote upstream such as SES. At most `pool_size` connections are open; a
    connection carries one transaction at a time, goes back to the pool only in a clean state
    (RSET after a refused transaction), is checked with NOOP when it has been idle, and is closed
    with QUIT after `idle_seconds` without use.
    """

    def __init__(
        self,
        endpoint: SmtpEndpoint,
        *,
        timeouts: Timeouts,
        pool_size: int = 4,
        idle_seconds: float = 30.0,
        local_hostname: str = "localhost",
        executor: Executor | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.timeouts = timeouts
        self.idle_seconds = idle_seconds
        self.local_hostname = local_hostname
        self.executor = executor
        self._slots = asyncio.Semaphore(pool_size)
        self._idle: list[_Connection] = []
        self._reaper: asyncio.Task[None] | None = None
        # Labelled once: a child's lookup takes a lock and a dict, three times per transaction.
        self._seconds = UPSTREAM_SECONDS.labels(endpoint.host)
        self._busy = POOL_CONNECTIONS.labels(endpoint.host, "busy")
        self._idle_count = POOL_CONNECTIONS.labels(endpoint.host, "idle")

    async def send(self, mail_from: str, recipients: list[str], data: bytes, *, ready: asyncio.Future[Any] | None = None,
                   crlf: bool = False) -> Results:
        body = DataBody(data) if crlf or await DataBody.scan(data) else DataBody(await self._data_block(data), stuffed=True)
        with timed(self._seconds):
            return await self._send(mail_from, recipients, body, ready)

    async def _send(self, mail_from: str, recipients: list[str], body: DataBody, ready: asyncio.Future[Any] | None) -> Results:
        for _ in range(2):
            try:
                async with self._connection() as connection:
                    return await self._transaction(connection, mail_from, recipients, body, ready)
            except _StaleConnection:
                continue  # the second round always opens a fresh connection, which is never stale
            except _Unreachable as exc:
                return unreachable(recipients, str(exc))
        raise AssertionError("unreachable: a fresh connection never raises _StaleConnection")

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        idle, self._idle = self._idle, []
        self._count_idle()
        await asyncio.gather(*(self._quit(c.client) for c in idle))

    async def _data_block(self, data: bytes) -> bytes:
        if self.executor is None or len(data) < INLINE_BYTES:
            return smtp_data_block(data)
        return await asyncio.get_running_loop().run_in_executor(self.executor, smtp_data_block, data)

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[_Connection]:
        async with self._slots:
            connection = await self._take_idle() or await self._connect()
            busy = self._busy
            busy.inc()
            try:
                yield connection
            except BaseException:
                connection.client.close()  # state unknown (cancelled, timed out, stale): never reuse
                raise
            finally:
                busy.dec()
            if connection.client.is_connected:
                connection.idle_since = time.monotonic()
                self._idle.append(connection)
                if self._reaper is None or self._reaper.done():
                    self._reaper = asyncio.create_task(self._reap())
            self._count_idle()

    def _count_idle(self) -> None:
        self._idle_count.set(len(self._idle))

    async def _take_idle(self) -> _Connection | None:
        while self._idle:
            connection = self._idle.pop()  # most recently used first: the others age out
            idle = time.monotonic() - connection.idle_since
            if not connection.client.is_connected or idle > self.idle_seconds:
                connection.client.close()
                continue
            if idle > HEALTH_CHECK_AFTER_SECONDS:
                try:
                    await connection.client.noop(timeout=self.timeouts.command)
                except (aiosmtplib.SMTPException, OSError):
                    connection.client.close()
                    continue
            connection.reused = True
            return connection
        return None

    async def _connect(self) -> _Connection:
        e = self.endpoint
        client = aiosmtplib.SMTP(
            hostname=e.host,
            port=e.port,
            use_tls=e.scheme == "smtps",
            start_tls=e.scheme == "smtp",  # required on smtp://, never on smtp+insecure://
            username=e.username,
            password=e.password,
            local_hostname=self.local_hostname,
            timeout=self.timeouts.connect,
        )
        try:
            async with asyncio.timeout(self.timeouts.connect):
                await client.connect()
                if client.is_ehlo_or_helo_needed:
                    await client.ehlo()
        except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
            client.close()
            cause = failure_cause(exc)
            UPSTREAM_FAILURES.labels(e.host, cause).inc()
            detail = " ".join(f"{type(exc).__name__}: {exc}".split())[:160] if str(exc) else type(exc).__name__
            raise _Unreachable(f"{cause} at {e.host}:{e.port} ({detail})") from exc  # never the credentials
        client.timeout = self.timeouts.command
        return _Connection(client, time.monotonic())

    async def _transaction(self, connection: _Connection, mail_from: str, recipients: list[str], body: DataBody,
                           ready: asyncio.Future[Any] | None) -> Results:
        if connection.client.supports_extension("pipelining"):
            return await self._pipelined(connection, mail_from, recipients, body, ready)
        client = connection.client
        results: Results = {}
        try:
            options = [f"SIZE={body.size}"] if client.supports_extension("size") else []
            try:
                await client.mail(mail_from, options=options)
            except aiosmtplib.SMTPServerDisconnected as exc:
                if connection.reused:
                    raise _StaleConnection from exc
                raise
            accepted = []
            for recipient in recipients:
                try:
                    await client.rcpt(recipient)
                    accepted.append(recipient)
                except aiosmtplib.SMTPRecipientRefused as exc:
                    results[recipient] = RecipientResult(exc.code, exc.message)
                except ValueError:  # not encodable without SMTPUTF8
                    results[recipient] = RecipientResult(553, "5.6.7 address cannot be sent without SMTPUTF8")
            if accepted:
                reply = await self._data(client, body, ready)
                results.update(dict.fromkeys(accepted, RecipientResult(reply.code, reply.message)))
            if any(not r.accepted for r in results.values()):
                await self._reset(client)
        except aiosmtplib.SMTPResponseException as exc:  # MAIL refused, or a 421 anywhere
            for recipient in recipients:
                results.setdefault(recipient, RecipientResult(exc.code, exc.message))
            await self._reset(client)
        except ValueError:
            results = dict.fromkeys(recipients, RecipientResult(553, "5.6.7 sender cannot be sent without SMTPUTF8"))
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, OSError) as exc:
            # After RCPT the upstream may hold part of a transaction; after the body it may even have
            # taken the message without our seeing its 250 (RFC 1047). Either way: temporary.
            client.close()
            for recipient in recipients:
                results.setdefault(recipient, RecipientResult(451, f"4.4.2 upstream connection lost: {exc}"))
        return results

    async def _pipelined(self, connection: _Connection, mail_from: str, recipients: list[str], body: DataBody,
                         ready: asyncio.Future[Any] | None) -> Results:
        """MAIL, every RCPT and DATA in one write, their replies read in order (RFC 2920), then the body.

        Two round trips per transaction instead of 3 + recipients. aiosmtplib reads one reply per
        command it wrote (a reply arriving while the previous one waits to be picked up is dropped),
        so the replies of this transaction are read by a `_Replies` protocol that borrows the
        connection's transport and hands it back afterwards.
        """
        client = connection.client
        results: Results = {}
        try:
            envelope = [_command(b"MAIL FROM:", mail_from, [f"SIZE={body.size}"] if client.supports_extension("size") else [])]
        except ValueError:
            return dict.fromkeys(recipients, RecipientResult(553, "5.6.7 sender cannot be sent without SMTPUTF8"))
        listed = []
        for recipient in recipients:
            try:
                envelope.append(_command(b"RCPT TO:", recipient))
                listed.append(recipient)
            except ValueError:  # not encodable without SMTPUTF8
                results[recipient] = RecipientResult(553, "5.6.7 address cannot be sent without SMTPUTF8")
        if not listed:
            return results
        mail: aiosmtplib.SMTPResponse | None = None
        replies: _Replies | None = None
        try:
            with _lent(client) as (replies, writer):
                writer.write(b"".join(envelope) + b"DATA\r\n")
                mail = await replies.read(self.timeouts.command)
                accepted = []
                for recipient in listed:
                    reply = await replies.read(self.timeouts.command)
                    if mail.code != 250:
                        results[recipient] = RecipientResult(mail.code, mail.message)
                    elif reply.code in (250, 251):
                        accepted.append(recipient)
                    else:
                        results[recipient] = RecipientResult(reply.code, reply.message)
                start = await replies.read(self.timeouts.command)
                if start.code == 354:
                    # With no recipient accepted a conforming server refuses DATA; one that does not gets an empty message.
                    final = await replies.send_body(writer, body if accepted else DataBody(END, stuffed=True),
                                                    self.timeouts.data, ready if accepted else None)
                else:
                    final = start
                if accepted:
                    results.update(dict.fromkeys(accepted, RecipientResult(final.code, final.message)))
        except _ConnectionClosed as exc:
            client.close()
            if connection.reused and (replies is None or not replies.replied):
                raise _StaleConnection from exc  # closed while idle: nothing reached the upstream
            refused = mail is not None and mail.code != 250  # e.g. 421 to MAIL, then the upstream hung up
            lost = RecipientResult(mail.code, mail.message) if mail is not None and refused else \
                RecipientResult(451, f"4.4.2 upstream connection lost: {exc}")
            for recipient in listed:
                results.setdefault(recipient, lost)
            return results
        if any(not r.accepted for r in results.values()):
            await self._reset(client)
        return results

    async def _data(self, client: aiosmtplib.SMTP, body: DataBody, ready: asyncio.Future[Any] | None) -> aiosmtplib.SMTPResponse:
        """DATA, the body, and the final reply, whatever its code (the body's pieces are read by `_Replies`)."""
        start = await client.execute_command(b"DATA")
        if start.code != 354:
            return start
        try:
            with _lent(client) as (replies, writer):
                return await replies.send_body(writer, body, self.timeouts.data, ready)
        except _ConnectionClosed as exc:
            raise aiosmtplib.SMTPServerDisconnected(str(exc)) from exc

    async def _reset(self, client: aiosmtplib.SMTP) -> None:
        if not client.is_connected:
            return
        try:
            await client.rset()
        except (aiosmtplib.SMTPException, OSError):
            client.close()

    async def _reap(self) -> None:
        while self._idle:
            await asyncio.sleep(min(self.idle_seconds / 2, 5.0))
            now = time.monotonic()
            expired = [c for c in self._idle if now - c.idle_since > self.idle_seconds or not c.client.is_connected]
            self._idle = [c for c in self._idle if c not in expired]
            self._count_idle()
            await asyncio.gather(*(self._quit(c.client) for c in expired))

    async def _quit(self, client: aiosmtplib.SMTP) -> None:
        if client.is_connected:
            with contextlib.suppress(aiosmtplib.SMTPException, OSError):
                await client.quit(timeout=self.timeouts.command)
        client.close()


class FailoverUpstream:
    """The primary, then each fallback in order, moving on only when an upstream cannot be reached.

    A refusal (4xx or 5xx after connecting) is an answer about the message, not about the upstream,
    so it is never retried elsewhere: that could deliver twice or route around a policy.
    """

    def __init__(self, upstreams: list[tuple[str, Upstream]]) -> None:
        self.upstreams = upstreams
        self._down_until = [0.0] * len(upstreams)

    async def send(self, mail_from: str, recipients: list[str], data: bytes, *, ready: asyncio.Future[Any] | None = None,
                   crlf: bool = False) -> Results:
        now = time.monotonic()
        order = sorted(range(len(self.upstreams)), key=lambda i: self._down_until[i] > now)  # stable: up ones first
        results: Results = {}
        for index in order:
            name, upstream = self.upstreams[index]
            results = await upstream.send(mail_from, recipients, data, ready=ready, crlf=crlf)
            if not all(r.unreachable for r in results.values()):
                self._down_until[index] = 0.0
                if index:
                    log.info("delivered-via-fallback upstream=%s recipients=%d", name, len(recipients))
                return results
            self._down_until[index] = time.monotonic() + DOWN_FOR_SECONDS
            log.warning("upstream-unreachable upstream=%s detail=%r", name, next(iter(results.values())).text)
        return results

    async def close(self) -> None:
        await asyncio.gather(*(upstream.close() for _, upstream in self.upstreams))


def upstream_from_url(
    url: str, *, settings: UpstreamSettings | None = None, local_hostname: str = "localhost", executor: Executor | None = None
) -> Upstream:
    """outbox:///DIR, smtp://[user:pass@]host:port (STARTTLS), smtps:// (implicit TLS), smtp+insecure:// (plain)."""
    parts = urlsplit(url)
    if parts.scheme == "outbox":
        path = parts.path.removeprefix("/")  # outbox:///var/outbox → var/outbox; outbox:////abs → /abs
        return OutboxUpstream(Path(path))
    s = settings or UpstreamSettings()
    default_port = {"smtp": 587, "smtps": 465, "smtp+insecure": 25}[parts.scheme]
    endpoint = SmtpEndpoint(
        scheme=parts.scheme,
        host=parts.hostname or "localhost",
        port=parts.port or default_port,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
    )
    return SmtpUpstream(
        endpoint,
        timeouts=Timeouts(connect=s.connect_timeout_seconds, command=s.command_timeout_seconds, data=s.data_timeout_seconds),
        pool_size=s.pool_size,
        idle_seconds=s.pool_idle_seconds,
        local_hostname=local_hostname,
        executor=executor,
    )


def upstream_from_settings(settings: UpstreamSettings, *, local_hostname: str, executor: Executor | None) -> Upstream:
    """The configured upstream, wrapped with its fallbacks when there are any."""
    urls = [settings.url, *settings.fallback_urls]
    upstreams = [upstream_from_url(u, settings=settings, local_hostname=local_hostname, executor=executor) for u in urls]
    if len(upstreams) == 1:
        return upstreams[0]
    return FailoverUpstream([(_describe(u), upstream) for u, upstream in zip(urls, upstreams, strict=True)])


def _describe(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}{parts.path}"
