"""Misbehaving upstream MTAs on real loopback sockets, for the delivery and fault-injection tests.

`FaultySink` is a real aiosmtpd server whose answers are set per test (per-recipient RCPT replies,
DATA replies, hangs, dropped connections) and which counts connections and commands.
`RawUpstream` is a few lines of asyncio for what aiosmtpd cannot play: a silent or 421 greeting,
and a connection dropped while the message body is still arriving.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from tests.conftest import Delivered, free_port


@dataclass
class FaultyHandler:
    messages: list[Delivered] = field(default_factory=list)
    rcpt_replies: dict[str, str] = field(default_factory=dict)  # recipient → reply instead of 250
    data_reply: str | None = None  # reply instead of storing the message
    data_delay: float = 0.0  # seconds before answering DATA (a hang when longer than the relay's timeout)
    drop_after_data: bool = False  # close the connection once the body arrived, without any reply
    stall_rcpt: str | None = None  # RCPT of this address hangs (once) until `release` is set
    stalled: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    data_started: threading.Event = field(default_factory=threading.Event)
    pipelining: bool = False  # advertise PIPELINING (RFC 2920): the relay then batches MAIL, RCPT and DATA
    ehlos: int = 0  # one per connection from aiosmtplib
    commands: list[str] = field(default_factory=list)
    sessions: list[SMTP] = field(default_factory=list)

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]) -> list[str]:
        self.ehlos += 1
        self.sessions.append(server)
        session.host_name = hostname
        if self.pipelining:  # aiosmtpd reads commands in order from its stream, so batched ones work as they are
            return [responses[0], "250-PIPELINING", *responses[1:]]
        return responses

    async def handle_NOOP(self, server: SMTP, session: Session, envelope: Envelope, arg: str) -> str:
        self.commands.append("NOOP")
        return "250 OK"

    async def handle_RSET(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.commands.append("RSET")
        return "250 OK"

    async def handle_QUIT(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.commands.append("QUIT")
        return "221 Bye"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]) -> str:
        if address == self.stall_rcpt and not self.stalled.is_set():
            self.stalled.set()
            while not self.release.is_set():
                await asyncio.sleep(0.02)
        reply = self.rcpt_replies.get(address)
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.data_started.set()
        if self.data_delay:
            await asyncio.sleep(self.data_delay)
        if self.drop_after_data:
            assert server.transport is not None
            server.transport.close()
            return "250 never seen"
        if self.data_reply is not None:
            return self.data_reply
        self.messages.append(Delivered(envelope.mail_from or "", list(envelope.rcpt_tos), envelope.original_content or b""))
        return "250 2.0.0 Ok: queued"

    def copies(self) -> dict[str, int]:
        """How many copies each recipient received."""
        counts: dict[str, int] = {}
        for message in self.messages:
            for recipient in message.recipients:
                counts[recipient] = counts.get(recipient, 0) + 1
        return counts


@dataclass
class FaultySink:
    handler: FaultyHandler
    port: int
    controller: Controller

    @property
    def url(self) -> str:
        return f"smtp+insecure://127.0.0.1:{self.port}"

    def drop_connections(self) -> None:
        """Close every session from the server side, as an upstream's idle timeout does."""
        for session in self.handler.sessions:
            if session.transport is not None:
                self.controller.loop.call_soon_threadsafe(session.transport.close)


@dataclass
class _Tls:
    cert: Path
    key: Path


def self_signed_cert(directory: Path) -> _Tls:
    """A throwaway certificate no client trusts (the openssl CLI, present wherever Python's ssl is)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True, timeout=30)
    return _Tls(cert, key)


@contextlib.contextmanager
def faulty_sink(tls: _Tls | None = None, port: int | None = None, *, pipelining: bool = False) -> Iterator[FaultySink]:
    """A FaultySink running for the block (offering STARTTLS when `tls`; on `port` when given)."""
    handler = FaultyHandler(pipelining=pipelining)
    context = None
    if tls is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(tls.cert, tls.key)
    controller = Controller(handler, hostname="127.0.0.1", port=port or free_port(), tls_context=context, ready_timeout=10)
    controller.start()
    try:
        yield FaultySink(handler, controller.port, controller)
    finally:
        handler.release.set()
        controller.stop()


class LoopbackServer:
    """An asyncio TCP server on its own event loop in a thread, for peers played below a protocol
    library; `_session` serves one connection. `port` 0 takes a free one, read back once started."""

    def __init__(self, port: int = 0) -> None:
        self.port = port
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        assert self._ready.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._session, "127.0.0.1", self.port))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()
            sessions = asyncio.all_tasks(self._loop)
            for task in sessions:
                task.cancel()
            self._loop.run_until_complete(asyncio.gather(*sessions, return_exceptions=True))
            self._loop.close()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError


class RawUpstream(LoopbackServer):
    """A hand-written upstream for faults below the SMTP dialogue.

    mode: "silent" (accepts TCP, never greets), "421" (greets with 421 and closes),
    "drop-mid-data" (a normal dialogue until DATA, then closes after the first body chunk).
    """

    def __init__(self, mode: str) -> None:
        super().__init__(free_port())
        self.mode = mode
        self.connections = 0
        self.bodies_started = 0

    @property
    def url(self) -> str:
        return f"smtp+insecure://127.0.0.1:{self.port}"

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            if self.mode == "silent":
                await reader.read()  # until the client gives up
                return
            if self.mode == "421":
                writer.write(b"421 4.3.2 too busy, come back later\r\n")
                await writer.drain()
                return
            writer.write(b"220 raw ESMTP\r\n")
            while line := await reader.readline():
                verb = line[:4].upper()
                if verb == b"EHLO":
                    writer.write(b"250-raw\r\n250 8BITMIME\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 go ahead\r\n")
                    await writer.drain()
                    await reader.read(1024)
                    self.bodies_started += 1
                    return  # mid-body: the connection closes
                elif verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    return
                else:
                    writer.write(b"250 ok\r\n")
                await writer.drain()
        finally:
            writer.close()
