"""The upstream side over real sockets: pooled connections, per-recipient results, timeouts, fallbacks."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtplib.email import quote_address
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings
from hypothesis import given, settings
from hypothesis import strategies as st

from relay import upstream as upstream_module
from relay.upstream import (
    _PLAIN_ADDRESS,
    END,
    DataBody,
    FailoverUpstream,
    OutboxUpstream,
    SmtpEndpoint,
    SmtpUpstream,
    Timeouts,
    _command,
    smtp_data_block,
    upstream_from_url,
)
from tests.conftest import TlsFiles, free_port
from tests.upstreams import FaultySink, RawUpstream, _Tls, faulty_sink, self_signed_cert

MESSAGE = b"From: app@example.com\r\nTo: a@example.com\r\nSubject: hi\r\n\r\nbody\r\n.leading dot\r\n"
BIG_BODY = b"".join(b".%069d\r\n" % n for n in range(5_000))  # 360 KB in several pieces, every line dot-stuffed
FAST = Timeouts(connect=1.0, command=1.0, data=1.0)


@pytest.fixture(params=["sequential", "pipelined"])
def faulty(request: pytest.FixtureRequest) -> Iterator[FaultySink]:
    """The upstream, once answering command by command and once offering PIPELINING (RFC 2920)."""
    with faulty_sink(pipelining=request.param == "pipelined") as sink:
        yield sink


def smtp(port: int, *, scheme: str = "smtp+insecure", timeouts: Timeouts = FAST, pool_size: int = 2,
         idle_seconds: float = 30.0) -> SmtpUpstream:
    return SmtpUpstream(SmtpEndpoint(scheme, "127.0.0.1", port), timeouts=timeouts, pool_size=pool_size,
                        idle_seconds=idle_seconds, local_hostname="relay.test")


def codes(results: dict) -> dict[str, int]:
    return {recipient: result.code for recipient, result in results.items()}


def test_data_block_dot_stuffs_and_terminates() -> None:
    assert smtp_data_block(b"a\n.b\r\n..c") == b"a\r\n..b\r\n...c\r\n.\r\n"


@pytest.mark.parametrize("data", [
    b"", b".", b"\r\n", b".a\r\n.b\r\n", b"a\r\n.\r\n..\r\nb", b"a.\r\n.b.", b"\r\n.\r\n",
    b"a\rb\r\n.c", b"a\r\r\n.b", b"a\n\r.b", b".\n.\r.\r\n.", b"x\r", b"x\n",
])
def test_data_block_equals_aiosmtplib_transformation(data: bytes) -> None:
    # The CRLF-only fast path must give exactly what aiosmtplib's regular expressions give.
    expected = PERIOD_REGEX.sub(b"..", normalize_message_line_endings(data)) + b".\r\n"
    assert smtp_data_block(data) == expected


def test_connections_are_reused_across_messages(faulty: FaultySink) -> None:
    async def scenario() -> None:
        upstream = smtp(faulty.port)
        for n in range(5):
            assert codes(await upstream.send("app@example.com", [f"r{n}@example.com"], MESSAGE)) == {f"r{n}@example.com": 250}
        await upstream.close()

    asyncio.run(scenario())
    assert faulty.handler.ehlos == 1, "five messages, one connection"
    assert len(faulty.handler.messages) == 5
    assert faulty.handler.messages[0].data.endswith(b"body\r\n.leading dot\r\n")  # dot-stuffing undone by the server
    assert faulty.handler.commands[-1] == "QUIT"


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.one_of(st.from_regex(_PLAIN_ADDRESS, fullmatch=True), st.text(max_size=40)))
def test_commands_quote_addresses_as_aiosmtplib_does(address: str) -> None:
    """The fast path for plain addresses writes what aiosmtplib's quote_address (its address parser) gives,
    and what cannot be sent in ASCII is refused as before."""
    try:
        if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in address):
            raise ValueError("control character")
        expected = b"RCPT TO:" + quote_address(address).encode("ascii") + b"\r\n"
    except ValueError:
        with pytest.raises(ValueError):
            _command(b"RCPT TO:", address)
        return
    assert _command(b"RCPT TO:", address) == expected


def test_the_final_dot_waits_for_ready_while_the_envelope_goes(faulty: FaultySink) -> None:
    """What must be on disk before the upstream may take a copy (`ready`) holds back its last piece and final
    dot: until then the upstream has the envelope and the body's other pieces, and has delivered nothing."""
    rcpts: list[str] = []
    handle_rcpt = faulty.handler.handle_RCPT

    async def seen_rcpt(server: Any, session: Any, envelope: Any, address: str, options: list[str]) -> str:
        rcpts.append(address)
        return await handle_rcpt(server, session, envelope, address, options)

    faulty.handler.handle_RCPT = seen_rcpt  # type: ignore[method-assign]

    async def scenario() -> None:
        upstream = smtp(faulty.port)
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        sending = asyncio.create_task(upstream.send("app@example.com", ["a@example.com"], BIG_BODY, ready=ready))
        for _ in range(100):
            if rcpts:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)  # all but the body's last piece has gone by now
        assert rcpts == ["a@example.com"] and not sending.done() and faulty.handler.messages == []
        ready.set_result(None)
        assert codes(await sending) == {"a@example.com": 250}
        await upstream.close()

    asyncio.run(scenario())
    [delivered] = faulty.handler.messages
    assert delivered.data == BIG_BODY


def test_pool_is_bounded_and_shared_by_concurrent_sends(faulty: FaultySink) -> None:
    faulty.handler.data_delay = 0.1

    async def scenario() -> None:
        upstream = smtp(faulty.port, pool_size=2)
        sends = [upstream.send("app@example.com", [f"r{n}@example.com"], MESSAGE) for n in range(6)]
        results = await asyncio.gather(*sends)
        assert all(r.accepted for result in results for r in result.values())
        await upstream.close()

    asyncio.run(scenario())
    assert faulty.handler.ehlos == 2, "six concurrent messages through at most two connections"
    assert len(faulty.handler.messages) == 6


def test_connection_closed_by_upstream_while_idle_is_replaced_without_losing_the_message(faulty: FaultySink) -> None:
    async def scenario() -> None:
        upstream = smtp(faulty.port)
        await upstream.send("app@example.com", ["a@example.com"], MESSAGE)
        faulty.drop_connections()
        time.sleep(0.3)  # block our loop: the close has happened, but our side has not read the EOF yet
        assert upstream._idle[0].client.is_connected
        results = await upstream.send("app@example.com", ["b@example.com"], MESSAGE)
        assert codes(results) == {"b@example.com": 250}
        await upstream.close()

    asyncio.run(scenario())
    assert [m.recipients for m in faulty.handler.messages] == [["a@example.com"], ["b@example.com"]]
    assert faulty.handler.ehlos == 2


def test_idle_connections_get_noop_before_reuse_and_quit_after_idle_timeout(
    faulty: FaultySink, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(upstream_module, "HEALTH_CHECK_AFTER_SECONDS", 0.05)

    async def scenario() -> None:
        upstream = smtp(faulty.port, idle_seconds=0.3)
        await upstream.send("app@example.com", ["a@example.com"], MESSAGE)
        await asyncio.sleep(0.1)
        await upstream.send("app@example.com", ["b@example.com"], MESSAGE)
        assert faulty.handler.commands == ["NOOP"]
        await asyncio.sleep(0.8)  # the reaper closes it
        assert upstream._idle == []
        await upstream.close()

    asyncio.run(scenario())
    assert faulty.handler.commands == ["NOOP", "QUIT"]
    assert faulty.handler.ehlos == 1


def test_partial_rcpt_refusals_are_reported_per_recipient_and_the_connection_is_reset(faulty: FaultySink) -> None:
    faulty.handler.rcpt_replies = {"gone@example.com": "550 5.1.1 no such user", "full@example.com": "452 4.2.2 mailbox full"}

    async def scenario() -> None:
        upstream = smtp(faulty.port)
        results = await upstream.send("app@example.com", ["a@example.com", "gone@example.com", "full@example.com"], MESSAGE)
        assert codes(results) == {"a@example.com": 250, "gone@example.com": 550, "full@example.com": 452}
        assert results["gone@example.com"].text == "5.1.1 no such user"
        assert not results["gone@example.com"].temporary and results["full@example.com"].temporary
        everyone_refused = await upstream.send("app@example.com", ["gone@example.com"], MESSAGE)
        assert codes(everyone_refused) == {"gone@example.com": 550}
        await upstream.close()

    asyncio.run(scenario())
    assert [m.recipients for m in faulty.handler.messages] == [["a@example.com"]]
    assert faulty.handler.commands.count("RSET") == 2
    assert faulty.handler.ehlos == 1


@pytest.mark.parametrize(("reply", "code", "temporary"), [("451 4.3.0 try later", 451, True), ("550 5.7.1 spam", 550, False)])
def test_data_refusals_apply_to_every_recipient_of_the_transaction(faulty: FaultySink, reply: str, code: int,
                                                                    temporary: bool) -> None:
    faulty.handler.data_reply = reply

    async def scenario() -> None:
        upstream = smtp(faulty.port)
        results = await upstream.send("app@example.com", ["a@example.com", "b@example.com"], MESSAGE)
        assert codes(results) == {"a@example.com": code, "b@example.com": code}
        assert all(r.temporary is temporary and not r.unreachable for r in results.values())
        await upstream.close()

    asyncio.run(scenario())


def test_refused_connection_is_unreachable() -> None:
    async def scenario() -> None:
        results = await smtp(free_port()).send("app@example.com", ["a@example.com"], MESSAGE)
        [result] = results.values()
        assert result.unreachable and result.code == 451 and "127.0.0.1" in result.text

    asyncio.run(scenario())


@pytest.mark.parametrize("mode", ["silent", "421"])
def test_silent_or_421_greeting_is_unreachable_within_the_connect_timeout(mode: str) -> None:
    async def scenario(port: int) -> float:
        started = time.monotonic()
        results = await smtp(port, timeouts=Timeouts(connect=0.5, command=1, data=1)).send("a@x.test", ["b@y.test"], MESSAGE)
        assert all(r.unreachable for r in results.values())
        return time.monotonic() - started

    with RawUpstream(mode) as raw:
        elapsed = asyncio.run(scenario(raw.port))
    assert elapsed < 1.5


def test_drop_mid_body_is_a_temporary_failure_not_unreachable() -> None:
    async def scenario(port: int) -> None:
        big = MESSAGE + b"x" * 500_000 + b"\r\n"
        results = await smtp(port).send("app@example.com", ["a@example.com"], big)
        [result] = results.values()
        assert result.code == 451 and not result.unreachable and "connection lost" in result.text

    with RawUpstream("drop-mid-data") as raw:
        asyncio.run(scenario(raw.port))
        assert raw.bodies_started == 1


def test_hung_data_reply_times_out(faulty: FaultySink) -> None:
    faulty.handler.data_delay = 5

    async def scenario() -> float:
        upstream = smtp(faulty.port, timeouts=Timeouts(connect=1, command=1, data=0.4))
        started = time.monotonic()
        results = await upstream.send("app@example.com", ["a@example.com"], MESSAGE)
        assert codes(results) == {"a@example.com": 451} and not results["a@example.com"].unreachable
        assert upstream._idle == [], "a connection whose reply is outstanding is never reused"
        await upstream.close()
        return time.monotonic() - started

    assert asyncio.run(scenario()) < 1.5


def test_bad_certificate_on_starttls_is_unreachable(tmp_path: Path) -> None:
    with faulty_sink(self_signed_cert(tmp_path)) as sink:
        async def scenario(port: int = sink.port) -> None:
            results = await smtp(port, scheme="smtp").send("app@example.com", ["a@example.com"], MESSAGE)
            [result] = results.values()
            assert result.unreachable and "CERTIFICATE_VERIFY_FAILED" in result.text

        asyncio.run(scenario())
        assert sink.handler.messages == []


def test_failover_uses_fallbacks_in_order_only_when_unreachable(faulty: FaultySink, tmp_path: Path) -> None:
    dead = free_port()

    async def scenario() -> None:
        outbox = OutboxUpstream(tmp_path / "outbox")
        failover = FailoverUpstream([("dead", smtp(dead)), ("sink", smtp(faulty.port)), ("outbox", outbox)])
        assert codes(await failover.send("app@example.com", ["a@example.com"], MESSAGE)) == {"a@example.com": 250}
        # A refusal is an answer: the next upstream is not tried.
        faulty.handler.data_reply = "550 5.7.1 no"
        assert codes(await failover.send("app@example.com", ["b@example.com"], MESSAGE)) == {"b@example.com": 550}
        await failover.close()

    asyncio.run(scenario())
    assert [m.recipients for m in faulty.handler.messages] == [["a@example.com"]]
    assert not (tmp_path / "outbox").exists()


def test_an_unreachable_primary_is_tried_last_for_a_while(faulty: FaultySink) -> None:
    async def scenario(raw: RawUpstream) -> None:
        failover = FailoverUpstream([("silent", smtp(raw.port, timeouts=Timeouts(0.3, 1, 1))), ("sink", smtp(faulty.port))])
        for n in range(3):
            await failover.send("app@example.com", [f"r{n}@example.com"], MESSAGE)
        await failover.close()

    with RawUpstream("silent") as raw:
        asyncio.run(scenario(raw))
        assert raw.connections == 1, "after one timeout the silent primary waits its turn"
    assert len(faulty.handler.messages) == 3


def test_upstream_from_url_parses_schemes_and_keeps_credentials_out_of_its_name() -> None:
    upstream = upstream_from_url("smtp://user:p%40ss@mx.example.com:2587")
    assert isinstance(upstream, SmtpUpstream)
    assert upstream.endpoint.password == "p@ss" and upstream.endpoint.username == "user"
    assert "p@ss" not in str(upstream.endpoint) and "p@ss" not in repr(upstream.endpoint)
    assert isinstance(upstream_from_url("outbox:///var/outbox"), OutboxUpstream)


def test_pipelining_sends_the_envelope_in_one_write_and_reads_every_reply() -> None:
    """RFC 2920: MAIL, each RCPT and DATA go together; replies in order, a refused RCPT among them."""
    batches: list[bytes] = []

    async def upstream_session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 pipe ESMTP\r\n")
        assert (await reader.readline()).startswith(b"EHLO")
        writer.write(b"250-pipe\r\n250-PIPELINING\r\n250 SIZE 1000000\r\n")
        envelope = await reader.readuntil(b"DATA\r\n")
        batches.append(envelope)
        rcpts = envelope.count(b"RCPT TO:")
        writer.write(b"250 2.1.0 sender ok\r\n" + b"250 2.1.5 ok\r\n" * (rcpts - 1)
                     + b"550-5.1.1 no such\r\n550 5.1.1 user\r\n" + b"354 go on\r\n")
        await reader.readuntil(b"\r\n.\r\n")
        writer.write(b"250 2.0.0 queued\r\n")
        while line := await reader.readline():  # RSET (a recipient was refused), then QUIT
            writer.write(b"221 bye\r\n" if line.startswith(b"QUIT") else b"250 reset\r\n")
        writer.close()

    async def scenario() -> None:
        server = await asyncio.start_server(upstream_session, "127.0.0.1", 0)
        upstream = smtp(server.sockets[0].getsockname()[1])
        results = await upstream.send("app@example.com", ["a@example.com", "b@example.com", "gone@example.com"], MESSAGE)
        assert codes(results) == {"a@example.com": 250, "b@example.com": 250, "gone@example.com": 550}
        assert results["gone@example.com"].text == "5.1.1 no such\n5.1.1 user"
        assert results["a@example.com"].text == "2.0.0 queued"
        await upstream.close()
        server.close()

    asyncio.run(scenario())
    [batch] = batches
    assert batch.startswith(b"MAIL FROM:<app@example.com> SIZE=") and batch.count(b"RCPT TO:") == 3


@pytest.mark.parametrize("data", [
    b"", b".", b"\r\n", b".a\r\n.b\r\n", b"a\r\n.\r\n..\r\nb", b"a.\r\n.b.", b"\r\n.\r\n", b"ab\r\n.c\r\n.d\r\n",
])
@pytest.mark.parametrize("piece", [1, 2, 3, 5, 1024])
def test_a_body_streamed_in_pieces_equals_the_whole_block(data: bytes, piece: int) -> None:
    """Dot-stuffing piece by piece, with cuts anywhere (even between CRLF and a dot), gives smtp_data_block;
    SIZE= is the message as RFC 1870 counts it: CRLF-ended, neither the doubled dots nor the final one."""
    body = DataBody(data)
    streamed = b"".join(body.pieces(piece)) + END
    assert streamed == smtp_data_block(data)
    ended = data if data.endswith(b"\r\n") else data + b"\r\n"
    doubled = ended.count(b"\r\n.") + ended.startswith(b".")
    assert body.size == len(ended) == len(streamed) - doubled - len(b".\r\n")


@pytest.mark.parametrize("data", [b"", b"\r\n", b"a\r\n.b\r\n..\r\n", b"a\nb\r\n", b"a\rb\r\n", b"\r\n.\r", b"x" * 9 + b"\r\n."])
@pytest.mark.parametrize("step", [1, 2, 3, 1024])
def test_a_body_scanned_in_steps_counts_as_a_whole(data: bytes, step: int) -> None:
    """Line endings counted in steps (pairs cut anywhere) give what whole-body counts give."""
    crlf = data.count(b"\r\n")
    assert asyncio.run(DataBody.scan(data, step)) == (data.count(b"\n") == crlf and data.count(b"\r") == crlf)


def test_pipelined_transactions_against_postfix_smtp_sink(tmp_path: Path) -> None:
    """Postfix's own sink (it offers PIPELINING): envelopes batched, several recipients, the pool reused."""
    sink = shutil.which("smtp-sink") or ("/usr/sbin/smtp-sink" if Path("/usr/sbin/smtp-sink").exists() else None)
    if sink is None:
        pytest.skip("Postfix's smtp-sink not installed (Debian package postfix)")
    port = free_port()
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    process = subprocess.Popen([sink, *user, f"127.0.0.1:{port}", "16"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and process.poll() is None, "smtp-sink did not listen"
                time.sleep(0.05)

        async def scenario() -> None:
            upstream = smtp(port)
            for n in range(3):
                recipients = [f"a{n}@example.com", f"b{n}@example.com"]
                results = await upstream.send("app@example.com", recipients, MESSAGE + BIG_BODY)
                assert codes(results) == dict.fromkeys(recipients, 250), results
            [connection] = upstream._idle
            assert connection.client.supports_extension("pipelining")
            await upstream.close()

        asyncio.run(scenario())
    finally:
        process.terminate()
        process.wait(5)


@pytest.mark.parametrize("pipelining", [False, True])
def test_a_message_over_starttls_with_the_transport_lent_to_the_reply_reader(
    tls_files: TlsFiles, monkeypatch: pytest.MonkeyPatch, pipelining: bool
) -> None:
    """The body and its replies go through the TLS transport handed to `_Replies` and back (asyncio's SSL transport)."""
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_files.cert))  # the upstream's certificate is trusted, and checked

    async def scenario(port: int) -> None:
        upstream = smtp(port, scheme="smtp")
        for n in range(2):
            results = await upstream.send("app@example.com", [f"r{n}@example.com"], MESSAGE + BIG_BODY)
            assert codes(results) == {f"r{n}@example.com": 250}
        await upstream.close()

    with faulty_sink(_Tls(tls_files.cert, tls_files.key), pipelining=pipelining) as sink:
        asyncio.run(scenario(sink.port))
        assert [m.recipients for m in sink.handler.messages] == [["r0@example.com"], ["r1@example.com"]]
        assert sink.handler.messages[0].data.endswith(BIG_BODY) and sink.handler.ehlos == 2  # before and after STARTTLS
