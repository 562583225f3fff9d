"""relay/accept.py: workers sharing one listening socket, the least busy accepting first, TLS included."""

from __future__ import annotations

import asyncio
import socket
import ssl

import pytest

from relay.accept import SharedAcceptor
from tests.conftest import TlsFiles


class Greeter(asyncio.Protocol):
    """Says which acceptor took the connection."""

    def __init__(self, name: str, served: dict[str, int]) -> None:
        self.name, self.served = name, served

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.served[self.name] += 1
        transport.write(f"{self.name}\r\n".encode())  # type: ignore[attr-defined]


def test_the_busier_worker_lets_the_idle_one_accept_and_close_stops_accepting() -> None:
    async def scenario() -> None:
        listener = socket.create_server(("127.0.0.1", 0))
        listener.setblocking(False)
        port = listener.getsockname()[1]
        served = {"busy": 0, "idle": 0}
        # Two workers' descriptors of one socket, as forked workers hold it.
        busy = SharedAcceptor(listener, lambda: Greeter("busy", served), sessions=lambda: 5)
        idle = SharedAcceptor(listener.dup(), lambda: Greeter("idle", served), sessions=lambda: 0)
        for _ in range(10):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert await reader.readline() == b"idle\r\n"
            writer.close()
        assert served == {"busy": 0, "idle": 10}
        for acceptor in (busy, idle):
            acceptor.close()
            await acceptor.wait_closed()
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)

    asyncio.run(scenario())


def test_implicit_tls_connections_are_accepted_and_a_failed_handshake_harms_no_other(tls_files: TlsFiles) -> None:
    async def scenario() -> None:
        listener = socket.create_server(("127.0.0.1", 0))
        listener.setblocking(False)
        port = listener.getsockname()[1]
        served = {"tls": 0}
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(tls_files.cert, tls_files.key)
        acceptor = SharedAcceptor(listener, lambda: Greeter("tls", served), sessions=lambda: 0, tls=context,
                                  tls_handshake_timeout=5)
        _, plain = await asyncio.open_connection("127.0.0.1", port)
        plain.write(b"EHLO not-tls\r\n")  # not a TLS client hello: that connection fails alone
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls_files.client_context(),
                                                       server_hostname="localhost")
        assert await reader.readline() == b"tls\r\n"
        writer.close()
        plain.close()
        acceptor.close()
        await acceptor.wait_closed()
        assert served == {"tls": 1}

    asyncio.run(scenario())
