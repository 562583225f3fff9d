"""The memory budget for messages in flight: waits, then 452 4.3.1; never more than relay.max_inflight_bytes.
And what keeps a message's own cost down: copies rendered into files in the CPU pool."""

from __future__ import annotations

import asyncio
import base64
import os
import quopri
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import pytest

from config.settings import MEMORY_PER_MESSAGE_BYTE
from relay import memory as memory_module
from relay.copies import (
    FILE_PREFIX,
    SCRATCH_PREFIX,
    HeldMessage,
    InlineCopies,
    Rendered,
    ScratchDirectory,
    abandoned_scratch,
    discard_when_done,
    render_copies,
)
from relay.dkim import DkimSigner
from relay.memory import MemoryBudget, declared_size, memory_share
from relay.upstream import INLINE_BYTES
from tests.conftest import PROJECT, PROJECT_SECRET, DeterministicMinter, RunningService, make_settings
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


# --- copies rendered into files in the CPU pool (relay/copies.py) ---------------------------------------------

def newsletter(links: int) -> bytes:
    html = "".join(f'<p><a href="https://shop.example/p/{n}">item {n}</a> {"text " * 40}</p>\r\n' for n in range(links))
    return (b"From: app@example.com\r\nTo: a@example.com\r\nSubject: news\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/html; charset=utf-8\r\n"
            b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
            + quopri.encodestring(f"<html><body>{html}</body></html>".encode()).replace(b"\n", b"\r\n")
            + b"\r\n--b\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            + base64.encodebytes(bytes(range(256)) * 40).replace(b"\n", b"\r\n") + b"--b--\r\n")


def copy_files(directory: Path) -> list[Path]:
    return sorted(directory.rglob(f"{FILE_PREFIX}*"))  # in the relay's scratch directory too


def test_a_copy_rendered_into_a_file_is_the_copy_rendered_in_memory(tmp_path: Path, make_minter: type[DeterministicMinter]) -> None:
    data = newsletter(300)
    minters = [make_minter(recipient="a"), make_minter(recipient="b")]
    in_memory = InlineCopies(data, minters, DkimSigner()).render(minters)
    in_files = render_copies(data, [make_minter(recipient="a"), make_minter(recipient="b")], DkimSigner(), directory=str(tmp_path))
    assert [r.path for r in in_memory] == [None, None] and all(r.path for r in in_files)
    assert len(copy_files(tmp_path)) == 2 and all(r.result.data == b"" for r in in_files)
    assert [r.read() for r in in_files] == [r.read() for r in in_memory]
    assert in_memory[0].result.outcome == "instrumented" and in_memory[0].result.links == 300
    assert copy_files(tmp_path) == []  # read once, then removed


def test_a_copy_whose_file_cannot_be_written_is_rendered_in_memory(tmp_path: Path, make_minter: type[DeterministicMinter]) -> None:
    data = newsletter(50)
    missing = tmp_path / "gone"  # no such directory: as good as a full disk for mkstemp
    [copy] = render_copies(data, [make_minter()], DkimSigner(), directory=str(missing))
    assert copy.path is None and copy.result.outcome == "instrumented"
    minters = [make_minter()]
    assert copy.read() == InlineCopies(data, minters, DkimSigner()).render(minters)[0].read()


def test_mail_with_nothing_to_track_leaves_no_file(tmp_path: Path, make_minter: type[DeterministicMinter]) -> None:
    plain = b"From: app@example.com\r\nTo: a@example.com\r\nSubject: plain\r\n\r\nno html\r\n"
    [copy] = render_copies(plain, [make_minter()], DkimSigner(), directory=str(tmp_path))
    assert copy.result.outcome == "untouched" and copy.read() == plain and copy_files(tmp_path) == []


def test_files_of_a_job_nobody_waits_for_are_removed(tmp_path: Path, make_minter: type[DeterministicMinter]) -> None:
    job: Future[list[Rendered]] = Future()
    job.set_result(render_copies(newsletter(20), [make_minter(), make_minter()], DkimSigner(), directory=str(tmp_path)))
    assert len(copy_files(tmp_path)) == 2
    discard_when_done(job)
    assert copy_files(tmp_path) == []
    failed: Future[list[Rendered]] = Future()
    failed.set_exception(OSError("pool died"))
    discard_when_done(failed)  # nothing to remove, and no exception


def test_a_large_tracked_message_goes_through_copy_files_and_leaves_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    copies = tmp_path / "tmp"
    copies.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(copies))  # the relay names the directory; the pool writes there
    data = newsletter(2_000)
    assert len(data) > INLINE_BYTES
    with faulty_sink() as sink, RunningService(make_settings(tmp_path, sink.url)) as service:
        assert service.service._workers is not None, "a CPU pool renders large messages"
        with smtplib.SMTP("127.0.0.1", service.smtp_port, timeout=60) as client:
            client.login(PROJECT, PROJECT_SECRET)
            assert not client.sendmail("app@example.com", ["a@example.com", "b@example.com"], data)
        assert copy_files(copies) == []
    delivered = [m.data for m in sink.handler.messages]
    assert len(delivered) == 2 and delivered[0] != delivered[1]  # each recipient its own tokens
    for copy in delivered:
        assert copy.count(b"/c/") >= 2_000 and copy.endswith(b"--b--\r\n")


def test_a_held_message_spills_into_a_file_and_reads_back(tmp_path: Path) -> None:
    async def scenario() -> None:
        held = HeldMessage(b"x" * 1000)
        await held.spill(str(tmp_path))
        assert held.path is not None and copy_files(tmp_path) == [Path(held.path)] and held.size == 1000
        assert await held.read() == b"x" * 1000 and await held.read() == b"x" * 1000  # read back as often as needed
        held.discard()
        assert copy_files(tmp_path) == []
        stays = HeldMessage(b"y" * 10)
        await stays.spill(str(tmp_path / "gone"))  # cannot be written: the bytes stay in memory
        assert stays.path is None and await stays.read() == b"y" * 10

    asyncio.run(scenario())


def test_a_large_message_with_nothing_to_track_goes_untouched_from_its_spilled_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copies = tmp_path / "tmp"
    copies.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(copies))
    data = message(INLINE_BYTES + 100_000)  # plain text: the pool's plan says "untouched"
    with faulty_sink() as sink, RunningService(make_settings(tmp_path, sink.url)) as service:
        with smtplib.SMTP("127.0.0.1", service.smtp_port, timeout=60) as client:
            client.login(PROJECT, PROJECT_SECRET)
            assert not client.sendmail("app@example.com", ["a@example.com", "b@example.com"], data)
        assert copy_files(copies) == []
    [delivered] = sink.handler.messages  # one transaction for both, as sent
    assert sorted(delivered.recipients) == ["a@example.com", "b@example.com"]
    assert delivered.data.endswith(data.split(b"\r\n\r\n", 1)[1])


def _scratch_of_a_killed_process(parent: Path) -> Path:
    """A relay process's scratch directory with a copy in it, its process then killed with SIGKILL."""
    code = ("import os, sys, signal; from relay.copies import ScratchDirectory; s = ScratchDirectory(sys.argv[1]); "
            "open(os.path.join(s.path, 'inflight-copy-x'), 'wb').write(b'mail'); print(s.path, flush=True); "
            "os.kill(os.getpid(), signal.SIGKILL)")
    done = subprocess.run([sys.executable, "-c", code, str(parent)], capture_output=True, text=True, timeout=30)
    assert done.returncode == -signal.SIGKILL, done.stderr
    return Path(done.stdout.strip())


def test_scratch_left_by_a_killed_relay_is_removed_by_the_next_and_a_live_ones_is_kept(tmp_path: Path) -> None:
    dead = _scratch_of_a_killed_process(tmp_path)
    assert copy_files(dead), "the killed process left its copy behind"
    live = ScratchDirectory(str(tmp_path))
    try:
        assert not dead.exists()
        other = ScratchDirectory(str(tmp_path))  # a sibling worker starting: the first one's lock is held
        assert Path(live.path).is_dir() and Path(other.path).is_dir()
        other.close()
        assert not Path(other.path).exists()
    finally:
        live.close()


def test_scratch_without_its_owner_file_is_removed_only_once_old(tmp_path: Path) -> None:
    young, old = tmp_path / f"{SCRATCH_PREFIX}1-young", tmp_path / f"{SCRATCH_PREFIX}2-old"
    young.mkdir()
    old.mkdir()
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    (tmp_path / "unrelated").mkdir()
    assert abandoned_scratch(str(tmp_path)) == [str(old)]
