"""The chunked DATA reader answers and delivers exactly what aiosmtpd's line reader does, over real sockets."""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from relay.receive import Body, ChunkedDataSMTP
from tests.conftest import free_port

LIMIT = 200_000


@dataclass
class Capture:
    contents: list[bytes] = field(default_factory=list)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.contents.append(envelope.original_content or b"")
        return "250 2.0.0 captured"


class RelayController(Controller):
    def factory(self) -> SMTP:
        return ChunkedDataSMTP(self.handler, data_size_limit=LIMIT, hostname="test")


class PlainController(Controller):
    def factory(self) -> SMTP:
        return SMTP(self.handler, data_size_limit=LIMIT, hostname="test")


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, tuple[Capture, int]]]:
    running = {}
    controllers = []
    for name, cls in (("aiosmtpd", PlainController), ("relay", RelayController)):
        capture = Capture()
        controller = cls(capture, hostname="127.0.0.1", port=free_port())
        controller.start()
        controllers.append(controller)
        running[name] = (capture, controller.port)
    yield running
    for controller in controllers:
        controller.stop()


def converse(port: int, body: bytes, chunk: int | None, after: bytes = b"") -> list[bytes]:
    """Send one transaction whose DATA section is `body` (terminator included), in writes of `chunk` bytes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        reader = sock.makefile("rb")

        def reply() -> bytes:
            line = reader.readline()
            while line[3:4] == b"-":
                line = reader.readline()
            return line.rstrip()

        replies = [reply()]
        for command in (b"EHLO t\r\n", b"MAIL FROM:<a@x.test>\r\n", b"RCPT TO:<b@y.test>\r\n", b"DATA\r\n"):
            sock.sendall(command)
            replies.append(reply())
        stream = body + after + b"QUIT\r\n"
        step = chunk or len(stream)
        if len(stream) // step > 200:
            step = len(stream) // 200 + 1  # bounded test time; still many pieces
        for start in range(0, len(stream), step):
            sock.sendall(stream[start:start + step])
            if chunk:
                time.sleep(0.001)  # let the pieces arrive as separate reads
        replies.append(reply())
        if after:
            replies.append(reply())
        replies.append(reply())  # QUIT
        return replies


CASES = {
    "plain": b"Subject: x\r\n\r\nhello\r\n.\r\n",
    "empty": b".\r\n",
    "dots": b"..\r\n.a\r\n...\r\nx.\r\nend.\r\n. \r\n.\r\n",
    "first-line-dot": b".hidden\r\nrest\r\n.\r\n",
    "bare-lf-and-cr": b"a\nb\rc\r\n\n.\n\r\n.\r\n",
    "longest-allowed-line": b"x" * 999 + b"\r\n.\r\n",
    "line-too-long": b"y" * 1000 + b"\r\nok\r\n.\r\n",
    "too-much-data": (b"z" * 998 + b"\r\n") * (LIMIT // 1000 + 5) + b".\r\n",
    "binary-ish": bytes(range(1, 256)).replace(b"\r", b"").replace(b"\n", b"") * 3 + b"\r\n.\r\n",
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("chunk", [None, 7, 1024])
def test_same_replies_and_bytes_as_aiosmtpd(servers: dict[str, tuple[Capture, int]], name: str, chunk: int | None) -> None:
    outcomes = {}
    for server, (capture, port) in servers.items():
        before = len(capture.contents)
        replies = converse(port, CASES[name], chunk)
        outcomes[server] = (replies, capture.contents[before:])
    assert outcomes["relay"] == outcomes["aiosmtpd"]


def test_a_large_message_in_random_pieces_with_a_pipelined_command(servers: dict[str, tuple[Capture, int]]) -> None:
    rng = random.Random(5)
    lines = [rng.randbytes(rng.randint(1, 300)).replace(b"\r", b"x").replace(b"\n", b"y") for _ in range(400)]
    lines = [b"dot" if line == b"." else line for line in lines]  # a lone dot would end the message early
    lines = [b"." + line if rng.random() < 0.2 else line for line in lines]
    body = b"\r\n".join(lines) + b"\r\n.\r\n"
    outcomes = {}
    for server, (capture, port) in servers.items():
        before = len(capture.contents)
        replies = converse(port, body, 4093, after=b"NOOP\r\n")
        outcomes[server] = (replies, capture.contents[before:])
    assert outcomes["relay"] == outcomes["aiosmtpd"]
    assert outcomes["relay"][0][-2] == b"250 OK", "the command pipelined after the final dot is answered"


def reader_pieces(data: bytes, cut: int) -> list[bytes]:
    """Pieces as the stream hands them over: each ends at a ".\r\n", plus one arbitrary cut outside of one."""
    ends = sorted({i + 3 for i in range(len(data)) if data.startswith(b".\r\n", i)}
                  | ({cut} if not any(data.startswith(b".\r\n", j) for j in range(cut - 2, cut)) else set()))
    return [data[a:b] for a, b in zip([0, *ends], ends, strict=False) if b > a]


def test_body_unstuffs_and_stops_at_the_lone_dot_however_the_stream_is_cut() -> None:
    data = b"..a\r\n.b\r\nc.\r\n\r\n...\r\n.\r\n"
    for cut in range(1, len(data)):
        body = Body(size_limit=None, line_limit=1001)
        for piece in reader_pieces(data, cut):
            assert not body.complete
            body.feed(piece)
        assert body.complete and body.error is None
        assert body.content() == b".a\r\nb\r\nc.\r\n\r\n..\r\n"
        assert body.size == len(data) - 3
