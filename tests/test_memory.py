"""The memory budget for messages in flight: waits, then 452 4.3.1; never more than relay.max_inflight_bytes."""

from __future__ import annotations

import asyncio
import smtplib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from config.settings import MEMORY_PER_MESSAGE_BYTE
from relay import memory as memory_module
from relay.memory import MemoryBudget, declared_size, memory_share
from tests.conftest import PROJECT, PROJECT_SECRET, RunningService, make_settings
from tests.upstreams import FaultySink, faulty_sink

MESSAGE_LIMIT = 100_000


def test_a_reservation_waits_for_memory_another_message_gives_back() -> None:
    async def scenario() -> None:
        budget = MemoryBudget(300, wait_seconds=2)
        first, second = budget.reservation(), budget.reservation()
        assert await first.cover(90) and first.held == 90 * MEMORY_PER_MESSAGE_BYTE
        waiting = asyncio.create_task(second.cover(50))
        await asyncio.sleep(0.05)
        assert not waiting.done()  # 270 + 150 > 300
        await first.release()
        assert await waiting and budget.used == second.held == 150
        await second.release()
        assert budget.used == 0

    asyncio.run(scenario())


def test_a_reservation_that_never_fits_in_time_is_refused() -> None:
    async def scenario() -> None:
        budget = MemoryBudget(300, wait_seconds=0.1)
        holder = budget.reservation()
        assert await holder.cover(100)
        assert not await budget.reservation().cover(1)
        assert budget.used == 300

    asyncio.run(scenario())


def test_declared_size_reads_the_size_parameter() -> None:
    assert declared_size(["BODY=8BITMIME", "SIZE=1234"]) == 1234
    assert declared_size(["size=7"]) == 7 and declared_size([]) == 0 and declared_size(["SIZE=x"]) == 0


@pytest.fixture
def slow_upstream() -> Iterator[FaultySink]:
    with faulty_sink() as sink:
        sink.handler.data_delay = 3.0  # the first message holds its memory while the upstream takes its time
        yield sink


def message(size: int) -> bytes:
    return (b"From: app@example.com\r\nTo: a@example.com\r\nSubject: big\r\n\r\n"
            + b"".join(b"%077d\r\n" % n for n in range(size // 79)))


def raw_send(port: int, data: bytes) -> str:
    """MAIL without SIZE, then the whole body: the relay learns the size only while reading it."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock, sock.makefile("rwb") as stream:
        def command(line: bytes) -> str:
            stream.write(line + b"\r\n")
            stream.flush()
            reply = stream.readline()
            while reply[3:4] == b"-":
                reply = stream.readline()
            return reply.decode().strip()

        stream.readline()
        command(b"EHLO client.test")
        auth = __import__("base64").b64encode(f"\0{PROJECT}\0{PROJECT_SECRET}".encode())
        assert command(b"AUTH PLAIN " + auth).startswith("235")
        assert command(b"MAIL FROM:<app@example.com>").startswith("250")
        assert command(b"RCPT TO:<b@example.com>").startswith("250")
        assert command(b"DATA").startswith("354")
        return command(data + b".")


def test_beyond_the_ceiling_new_data_waits_then_gets_452(tmp_path: Path, slow_upstream: FaultySink,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory_module, "MEMORY_WAIT_SECONDS", 0.5)
    settings = make_settings(tmp_path, slow_upstream.url, relay={
        "max_message_bytes": MESSAGE_LIMIT, "max_inflight_bytes": MEMORY_PER_MESSAGE_BYTE * MESSAGE_LIMIT})
    data = message(90_000)
    with RunningService(settings) as service:
        first: list[object] = []
        holder = threading.Thread(target=lambda: first.append(raw_send(service.smtp_port, data)))
        holder.start()
        assert slow_upstream.handler.data_started.wait(10)  # the first message is with the upstream, memory held
        with smtplib.SMTP("127.0.0.1", service.smtp_port, timeout=30) as client:  # declares SIZE: refused at DATA
            client.login(PROJECT, PROJECT_SECRET)
            with pytest.raises(smtplib.SMTPDataError) as refused:
                client.sendmail("app@example.com", ["c@example.com"], data)
        assert refused.value.smtp_code == 452 and b"4.3.1" in refused.value.smtp_error
        assert raw_send(service.smtp_port, data).startswith("452 4.3.1")  # no SIZE: refused after reading the body
        holder.join(30)
        assert str(first[0]).startswith("250")
        slow_upstream.handler.data_delay = 0
        assert raw_send(service.smtp_port, data).startswith("250")  # memory given back: the retry goes
    assert [m.recipients for m in slow_upstream.handler.messages] == [["b@example.com"], ["b@example.com"]]


def test_each_worker_gets_an_equal_share_but_always_room_for_the_largest_message(caplog: pytest.LogCaptureFixture) -> None:
    assert memory_share(1_200, workers=4, max_message_bytes=100) == 300
    assert not caplog.records
    assert memory_share(1_200, workers=8, max_message_bytes=100) == 300  # 150 would refuse a 100-byte message for ever
    assert "memory-share-raised" in caplog.text and "lower relay.workers" in caplog.text
