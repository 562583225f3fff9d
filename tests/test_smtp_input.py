"""Bad SMTP input over real sockets: every case gets a proper reply code, the server stays up, and
nothing is lost or duplicated: each transaction answered 250 reaches the upstream exactly once per
recipient, and each refused one not at all. The tally is printed at the end of the run."""

from __future__ import annotations

import base64
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller

from tests.conftest import INPUT_TALLY, PROJECT, PROJECT_SECRET, RunningService, SinkHandler, free_port, make_settings

AUTH = b"AUTH PLAIN " + base64.b64encode(f"\0{PROJECT}\0{PROJECT_SECRET}".encode()) + b"\r\n"
MAX_BYTES = 200_000
RECIPIENTS = ["a@example.com", "b@example.com"]


class Raw:
    """A byte-level SMTP client: sends exactly what it is given, reads replies one by one."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buffer = b""
        assert self.reply()[0] == 220

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> tuple[int, bytes]:
        """One (possibly multi-line) reply; (0, b"") when the server closed the connection."""
        lines = []
        while True:
            while b"\r\n" not in self.buffer:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return 0, b"\n".join(lines)
                self.buffer += chunk
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            lines.append(line)
            if line[3:4] != b"-":
                return int(line[:3]), b"\n".join(lines)

    def replies(self, count: int) -> list[int]:
        return [self.reply()[0] for _ in range(count)]

    def close(self) -> None:
        self.sock.close()


@dataclass
class Transaction:
    """One attempted message: its id, recipients, and the reply to its end of data (None: never sent)."""

    message_id: str
    recipients: list[str]
    code: int | None = None


@dataclass
class Case:
    transactions: list[Transaction] = field(default_factory=list)

    def message(self, body: bytes = b"plain body\r\n", headers: bytes = b"", recipients: list[str] | None = None) -> bytes:
        """MAIL, RCPT, DATA and a message carrying a Message-ID of its own, as one pipelined chunk."""
        transaction = Transaction(f"case-{time.monotonic_ns()}-{len(self.transactions)}@input.test",
                                  recipients or RECIPIENTS)
        self.transactions.append(transaction)
        rcpts = b"".join(f"RCPT TO:<{r}>\r\n".encode() for r in transaction.recipients)
        return (b"MAIL FROM:<app@example.com>\r\n" + rcpts + b"DATA\r\n"
                + f"From: app@example.com\r\nTo: a@example.com\r\nSubject: input\r\nMessage-ID: <{transaction.message_id}>\r\n"
                  .encode() + headers + b"\r\n" + body + b".\r\n")

    def transaction_replies(self, raw: Raw, index: int = -1) -> list[int]:
        """Read MAIL, each RCPT, DATA and end-of-data replies; record the last one on the transaction."""
        transaction = self.transactions[index]
        codes = raw.replies(2 + len(transaction.recipients))
        codes.append(raw.reply()[0] if codes[-1] == 354 else codes[-1])
        transaction.code = codes[-1]
        return codes


def nested_multipart(depth: int) -> tuple[bytes, bytes]:
    body = b'Content-Type: text/html; charset=utf-8\r\n\r\n<p><a href="https://example.com/deep">deep</a></p>\r\n'
    for level in range(depth):
        boundary = f"b{level}".encode()
        body = (b'Content-Type: multipart/mixed; boundary="' + boundary + b'"\r\n\r\n--' + boundary + b"\r\n"
                + body + b"--" + boundary + b"--\r\n")
    headers, _, content = body.partition(b"\r\n\r\n")
    return b"MIME-Version: 1.0\r\n" + headers + b"\r\n", content


# -- the cases: each sends bad input and asserts the reply codes it must get --------------------------

def pipelined_whole_session(raw: Raw, case: Case) -> None:
    raw.send(b"EHLO app.test\r\n" + AUTH + case.message() + b"QUIT\r\n")
    assert raw.replies(2) == [250, 235]
    assert case.transaction_replies(raw) == [250, 250, 250, 354, 250]
    assert raw.replies(1) == [221]


def two_transactions_in_one_write(raw: Raw, case: Case) -> None:
    raw.send(b"EHLO app.test\r\n" + AUTH + case.message() + b"RSET\r\n" + case.message())
    assert raw.replies(2) == [250, 235]
    assert case.transaction_replies(raw, 0)[-1] == 250
    assert raw.replies(1) == [250]
    assert case.transaction_replies(raw, 1)[-1] == 250


def noop_flood(raw: Raw, case: Case) -> None:
    raw.send(b"EHLO app.test\r\n" + b"NOOP\r\n" * 150 + AUTH + case.message())
    codes = raw.replies(102)
    assert codes[:101] == [250] * 101 and codes[101] == 421  # the 101st NOOP: budget spent, connection closed
    assert raw.reply()[0] == 0


def bogus_command_flood(raw: Raw, case: Case) -> None:
    raw.send(b"EHLO app.test\r\n" + b"\xff\xfe GARBAGE\r\n" + b"XYZZY\r\n" * 10)
    codes = raw.replies(7)
    assert codes[:6] == [250, 500, 500, 500, 500, 500] and codes[6] == 502
    assert raw.reply()[0] == 0


def data_pipelined_after_refused_rcpt(raw: Raw, case: Case) -> None:
    # The client pipelines its body although RCPT fails: the body must never become a message.
    raw.send(b"EHLO app.test\r\n" + AUTH + case.message(recipients=["bad\x01@example.com"]))
    assert raw.replies(2) == [250, 235]
    assert raw.replies(3) == [250, 553, 503]  # MAIL ok, RCPT refused, DATA without recipients
    case.transactions[-1].code = 503


def overlong_command_line(raw: Raw, case: Case) -> None:
    raw.send(b"EHLO app.test\r\n" + AUTH + b"MAIL FROM:<" + b"a" * 20_000 + b"@example.com>\r\n" + case.message())
    assert raw.replies(3) == [250, 235, 500]
    assert case.transaction_replies(raw)[-1] == 250  # the session goes on


def overlong_data_line(raw: Raw, case: Case) -> None:
    raw.send(b"EHLO app.test\r\n" + AUTH + case.message(body=b"x" * 2000 + b"\r\n") + case.message())
    assert raw.replies(2) == [250, 235]
    assert case.transaction_replies(raw, 0)[-1] == 500
    assert case.transaction_replies(raw, 1)[-1] == 250


def unterminated_megabyte_line(raw: Raw, case: Case) -> None:
    raw.send(b"EHLO app.test\r\n" + AUTH + case.message(body=b"y" * 1_000_000 + b"\r\n"))
    assert raw.replies(2) == [250, 235]
    assert case.transaction_replies(raw)[-1] in (500, 552)


def message_over_size_limit(raw: Raw, case: Case) -> None:
    raw.send(b"EHLO app.test\r\n" + AUTH + case.message(body=(b"z" * 998 + b"\r\n") * (MAX_BYTES // 1000 + 10)))
    assert raw.replies(2) == [250, 235]
    assert case.transaction_replies(raw)[-1] == 552


def eight_bit_headers_without_smtputf8(raw: Raw, case: Case) -> None:
    raw.send(b"EHLO app.test\r\n" + AUTH + case.message(headers="X-Note: héllo wörld\r\n".encode()))
    assert raw.replies(2) == [250, 235]
    assert case.transaction_replies(raw)[-1] == 250  # relayed byte for byte; the upstream decides


def eight_bit_envelope_without_smtputf8(raw: Raw, case: Case) -> None:
    raw.send(b"EHLO app.test\r\n" + AUTH + "MAIL FROM:<jöe@example.com>\r\n".encode()
             + b"MAIL FROM:<joe@example.com> SMTPUTF8\r\n")
    assert raw.replies(4) == [250, 235, 500, 501]


def invalid_base64_in_html_part(raw: Raw, case: Case) -> None:
    headers = b"MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n"
    raw.send(b"EHLO app.test\r\n" + AUTH + case.message(headers=headers, body=b"PGEgaHJlZj0i!!not*base64***\r\n"))
    assert raw.replies(2) == [250, 235]
    assert case.transaction_replies(raw)[-1] == 250


def nul_bytes(raw: Raw, case: Case) -> None:
    raw.send(b"EHLO app.test\r\n" + AUTH + case.message(body=b"before\x00after\r\n")
             + case.message(headers=b"X-Note: a\x00b\r\n") + b"MAIL FROM:<a\x00b@example.com>\r\n")
    assert raw.replies(2) == [250, 235]
    assert case.transaction_replies(raw, 0)[-1] == 550
    assert case.transaction_replies(raw, 1)[-1] == 550
    assert raw.replies(1) == [553]


def nested_multipart_100_levels(raw: Raw, case: Case) -> None:
    headers, body = nested_multipart(100)
    raw.send(b"EHLO app.test\r\n" + AUTH + case.message(headers=headers, body=body))
    assert raw.replies(2) == [250, 235]
    assert case.transaction_replies(raw)[-1] == 250


def smtp_smuggling_line_endings(raw: Raw, case: Case) -> None:
    # End-of-data look-alikes (bare LF / CR) followed by a second transaction: one message, never two.
    smuggled = (b"hello\n.\nMAIL FROM:<app@example.com>\nRCPT TO:<victim@example.com>\nDATA\nsmuggled\n.\n"
                b"\r\n.\nx\r\n\r.\r\n")
    raw.send(b"EHLO app.test\r\n" + AUTH + case.message(body=smuggled))
    assert raw.replies(2) == [250, 235]
    assert case.transaction_replies(raw)[-1] == 250


def commands_out_of_order(raw: Raw, case: Case) -> None:
    raw.send(b"EHLO app.test\r\n" + AUTH + b"DATA\r\nRCPT TO:<a@example.com>\r\nMAIL FROM:<a@example.com>\r\n"
             b"MAIL FROM:<b@example.com>\r\nAUTH PLAIN !!!notbase64\r\nSTARTTLS\r\n")
    assert raw.replies(8) == [250, 235, 503, 503, 250, 503, 503, 454]  # no TLS configured: 454


def malformed_auth(raw: Raw, case: Case) -> None:
    raw.send(b"EHLO app.test\r\nAUTH PLAIN !!!notbase64\r\nAUTH PLAIN " + base64.b64encode(b"no-nul-separators")
             + b"\r\nAUTH CRAM-MD5\r\nMAIL FROM:<a@example.com>\r\n")
    assert raw.replies(5) == [250, 501, 501, 504, 530]


def disconnect_in_the_middle_of_data(raw: Raw, case: Case) -> None:
    whole = case.message()
    raw.send(b"EHLO app.test\r\n" + AUTH + whole[: len(whole) - 20])
    assert raw.replies(2 + 2 + len(RECIPIENTS)) == [250, 235, 250, 250, 250, 354]
    raw.close()


CASES: list[Callable[[Raw, Case], None]] = [
    pipelined_whole_session, two_transactions_in_one_write, noop_flood, bogus_command_flood,
    data_pipelined_after_refused_rcpt, overlong_command_line, overlong_data_line, unterminated_megabyte_line,
    message_over_size_limit, eight_bit_headers_without_smtputf8, eight_bit_envelope_without_smtputf8,
    invalid_base64_in_html_part, nul_bytes, nested_multipart_100_levels, smtp_smuggling_line_endings,
    commands_out_of_order, malformed_auth, disconnect_in_the_middle_of_data,
]


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningService, SinkHandler]]:
    handler = SinkHandler()
    upstream = Controller(handler, hostname="127.0.0.1", port=free_port())
    upstream.start()
    tmp_path: Path = tmp_path_factory.mktemp("input")
    settings = make_settings(tmp_path, f"smtp+insecure://127.0.0.1:{upstream.port}", relay={"max_message_bytes": MAX_BYTES})
    try:
        with RunningService(settings) as service:
            yield service, handler
    finally:
        upstream.stop()


def copies_of(handler: SinkHandler, message_id: str, recipient: str) -> int:
    marker = f"Message-ID: <{message_id}>".encode()
    return sum(m.recipients.count(recipient) for m in handler.messages if marker in m.data)


@pytest.mark.parametrize("scenario", CASES, ids=[c.__name__ for c in CASES])
def test_bad_input_gets_a_proper_code_and_nothing_is_lost_or_doubled(
    relay: tuple[RunningService, SinkHandler], scenario: Callable[[Raw, Case], None]
) -> None:
    service, handler = relay
    before = len(handler.messages)
    raw = Raw(service.smtp_port)
    case = Case()
    try:
        scenario(raw, case)
    finally:
        raw.close()
    time.sleep(0.05)  # a refused or cut transaction must not turn up late either
    lost = duplicates = leaked = 0
    for transaction in case.transactions:
        for recipient in transaction.recipients:
            copies = copies_of(handler, transaction.message_id, recipient)
            if transaction.code == 250:
                lost += copies == 0
                duplicates += max(0, copies - 1)
            else:
                leaked += copies
    accepted_copies = sum(len(t.recipients) for t in case.transactions if t.code == 250)
    assert len(handler.messages) - before <= accepted_copies  # nothing smuggled in beside them
    INPUT_TALLY.update(cases=1, transactions=len(case.transactions),
                       accepted=sum(t.code == 250 for t in case.transactions), lost=lost, duplicates=duplicates,
                       delivered_after_refusal=leaked)
    assert (lost, duplicates, leaked) == (0, 0, 0)
    # The server is still up and still relays.
    check = Raw(service.smtp_port)
    probe = Case()
    check.send(b"EHLO app.test\r\n" + AUTH + probe.message(recipients=["probe@example.com"]) + b"QUIT\r\n")
    assert check.replies(2) == [250, 235] and probe.transaction_replies(check)[-1] == 250
    check.close()
    assert copies_of(handler, probe.transactions[0].message_id, "probe@example.com") == 1

