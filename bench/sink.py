"""A fast SMTP sink for the bench: accepts everything, keeps counters, stores nothing.

A raw asyncio protocol that finds the end of DATA with one bytes search per read, so the sink
costs far less than the relay it receives from and the floor row measures the client and the
network path, not the sink. `XSTATS` (not SMTP) answers the counters, so a case can check that
every message the relay accepted arrived, with the right number of copies. With a certificate
it offers STARTTLS (bench/cases/upstream.py).

    python -m bench.sink --port 2526 [--tls-cert PEM --tls-key PEM]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import ssl
from typing import cast

import uvloop

END_OF_DATA = b"\r\n.\r\n"
EHLO_REPLY = b"250-sink.bench.example\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 104857600\r\n"


class Counters:
    def __init__(self) -> None:
        self.messages = 0
        self.recipients = 0
        self.bytes = 0


class SinkProtocol(asyncio.Protocol):
    def __init__(self, counters: Counters, tls: ssl.SSLContext | None = None) -> None:
        self.counters = counters
        self.tls = tls  # offered until the session has switched to it
        self.buffer = bytearray()
        self.in_data = False
        self.searched = 0
        self.recipients = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        self.transport.write(b"220 sink.bench.example ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self.buffer:
            if self.in_data:
                # The terminator is CRLF.CRLF, or ".CRLF" right at the start (an empty message). The
                # buffer is searched in place: a CRLF-prefixed copy per read made a 25 MB body cost
                # O(n²) copying, and stalled every other session of the sink meanwhile.
                if self.searched == 0 and self.buffer.startswith(b".\r\n"):
                    size, consumed = 0, 3
                else:
                    end = self.buffer.find(END_OF_DATA, self.searched)
                    if end < 0:
                        if len(self.buffer) >= 3:  # 0 means "an empty message is still possible"
                            self.searched = max(1, len(self.buffer) - len(END_OF_DATA) + 1)
                        return
                    size, consumed = end + 2, end + len(END_OF_DATA)
                self.counters.messages += 1
                self.counters.recipients += self.recipients
                self.counters.bytes += size
                del self.buffer[:consumed]
                self.in_data = False
                self.recipients = 0
                self.reply(b"250 2.0.0 Ok: queued\r\n")
                continue
            end = self.buffer.find(b"\r\n")
            if end < 0:
                return
            line = bytes(self.buffer[:end])
            del self.buffer[: end + 2]
            self.command(line)

    def command(self, line: bytes) -> None:
        verb = line[:4].upper()
        if verb == b"EHLO":
            self.reply(EHLO_REPLY.replace(b"250-PIPELINING", b"250-STARTTLS\r\n250-PIPELINING") if self.tls else EHLO_REPLY)
        elif verb == b"STAR" and self.tls is not None and self.transport is not None:
            self.reply(b"220 2.0.0 Ready to start TLS\r\n")
            self.transport.pause_reading()  # the ClientHello is for the TLS layer, not for command parsing
            asyncio.get_running_loop().create_task(self.start_tls(self.tls))
        elif verb == b"RCPT":
            self.recipients += 1
            self.reply(b"250 2.1.5 Ok\r\n")
        elif verb == b"DATA":
            self.in_data = True
            self.searched = 0
            self.reply(b"354 End data with <CR><LF>.<CR><LF>\r\n")
        elif verb == b"QUIT":
            self.reply(b"221 2.0.0 Bye\r\n")
            if self.transport is not None:
                self.transport.close()
        elif line.upper() == b"XSTATS":
            c = self.counters
            self.reply(f"250 messages={c.messages} recipients={c.recipients} bytes={c.bytes}\r\n".encode())
        elif verb == b"RSET":
            self.recipients = 0
            self.reply(b"250 2.0.0 Ok\r\n")
        else:  # HELO, MAIL, NOOP and the rest
            self.reply(b"250 2.0.0 Ok\r\n")

    async def start_tls(self, context: ssl.SSLContext) -> None:
        assert self.transport is not None
        self.tls = None
        transport = await asyncio.get_running_loop().start_tls(self.transport, self, context, server_side=True)
        self.transport = cast(asyncio.Transport, transport)

    def reply(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)


def sink_stats(port: int) -> dict[str, int]:
    """The counters of the sink on `port` (messages, recipients, bytes), from its XSTATS command."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock, sock.makefile("rwb") as stream:
        stream.readline()
        stream.write(b"XSTATS\r\n")
        stream.flush()
        return {key: int(value) for key, value in (part.split("=") for part in stream.readline().decode().split()[1:])}


async def serve(port: int, tls: ssl.SSLContext | None = None) -> None:
    counters = Counters()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SinkProtocol(counters, tls), "127.0.0.1", port, backlog=1024)
    stopping = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tls-cert", help="PEM certificate: offer STARTTLS")
    parser.add_argument("--tls-key", help="PEM key of --tls-cert")
    args = parser.parse_args()
    tls = None
    if args.tls_cert:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(args.tls_cert, args.tls_key)
    uvloop.run(serve(args.port, tls))


if __name__ == "__main__":
    main()
