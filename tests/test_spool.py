"""The spool (store/spool.py) on real files and real processes: group commit, takeover of a dead
process's journal under a lock, torn tails, outages, compaction."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from store.spool import END, UNDELIVERABLE, Handler, Spool, decode_record, encode_record, frame, read_frames, store_key
from tests.processes import ROOT

STORE = "sqlite:///somewhere/inflight.db"


class Sink:
    """A store stand-in for the spool's handler: what was delivered, and an outage on demand."""

    def __init__(self) -> None:
        self.delivered: list[Any] = []
        self.calls = 0
        self.failing = False

    async def deliver(self, items: list[Any]) -> None:
        self.calls += 1
        if self.failing:
            raise ConnectionRefusedError("store away")
        self.delivered.extend(items)


def decode(body: Any) -> Any:
    if body == "poison":
        raise ValueError("not a record of ours")
    return body


@asynccontextmanager
async def opened(directory: Path, sink: Sink, **options: Any) -> AsyncIterator[Spool]:
    spool = Spool(directory, store_url=STORE, retry_seconds=(0.01, 0.05), **options)
    spool.register("n", Handler(decode=decode, deliver=sink.deliver, key=lambda body: f"k{body % 3}" if isinstance(body, int) else None))
    await spool.open()
    try:
        yield spool
    finally:
        await spool.close(timeout=2)


async def until(condition: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def journals(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.journal"))


def test_frames_round_trip_and_a_torn_tail_is_dropped() -> None:
    data = frame(b"one") + frame(b"two") + frame(b"three")
    assert read_frames(data) == ([b"one", b"two", b"three"], len(data))
    whole = len(frame(b"one") + frame(b"two"))
    assert read_frames(data[:-1]) == ([b"one", b"two"], whole)  # cut in the payload
    assert read_frames(data[:whole + 3]) == ([b"one", b"two"], whole)  # cut in the header
    flipped = bytearray(data)
    flipped[-1] ^= 1
    assert read_frames(bytes(flipped)) == ([b"one", b"two"], whole)  # checksum
    # Records end at an END header; what follows it (records stored before the file started again) is not read.
    assert read_frames(frame(b"one") + END + frame(b"old")) == ([b"one"], len(frame(b"one")))


def test_concurrent_appends_share_fsyncs_and_reach_the_store_in_order(tmp_path: Path) -> None:
    async def scenario() -> None:
        sink = Sink()
        async with opened(tmp_path, sink) as spool:
            await asyncio.gather(*(spool.append("n", i) for i in range(1000, 1300)))
            assert spool.fsyncs < 300 / 4, f"{spool.fsyncs} fsyncs for 300 concurrent appends: not grouped"
            assert await spool.settled(10)
            assert sink.delivered == list(range(1000, 1300))
            assert spool.depth() == 0 and spool.oldest_age() == 0.0
            # Everything is stored: the live journal starts again from its beginning, not left to grow.
            await until(lambda: all(read_frames(p.read_bytes())[0] == [] for p in journals(tmp_path)))
            (journal,) = journals(tmp_path)
            size = journal.stat().st_size
            await asyncio.gather(*(spool.append("n", i) for i in range(2000, 2300)))  # as many bytes again
            assert await spool.settled(10)
            await until(lambda: read_frames(journal.read_bytes())[0] == [])
            assert journal.stat().st_size == size, "the second round was written over the first, not after it"
        assert journals(tmp_path) == []  # closed with nothing pending: no file left behind

    asyncio.run(scenario())


def test_while_the_store_is_away_records_wait_and_are_delivered_once_when_it_is_back(tmp_path: Path) -> None:
    async def scenario() -> None:
        sink = Sink()
        sink.failing = True
        async with opened(tmp_path, sink) as spool:
            await asyncio.gather(*(spool.append("n", i) for i in range(50)))
            await until(lambda: spool.store_failing_since is not None)
            await asyncio.sleep(0.2)
            assert spool.depth() == 50 and spool.oldest_age() >= 0.2
            assert sorted(spool.pending("k1")) == [i for i in range(50) if i % 3 == 1]
            assert not await spool.settled(0.1)
            sink.failing = False
            assert await spool.settled(10)
            assert sink.delivered == list(range(50)) and spool.store_failing_since is None
            assert list(spool.pending("k1")) == []

    asyncio.run(scenario())


def test_a_record_orjson_refuses_is_written_and_read_as_json_wrote_it(tmp_path: Path) -> None:
    """A lone surrogate (a byte an upstream's reply kept with surrogateescape) and a key that is no string go
    through json, as every record did before orjson: delivered as sent, and readable from a journal."""
    body = {"reason": "550 caf\udce9", "codes": {1: "x"}}
    expected = json.loads(json.dumps(body))  # the int key comes back a string, as json always wrote it

    async def scenario() -> None:
        sink = Sink()
        async with opened(tmp_path, sink) as spool:
            await spool.append("n", body)
            assert await spool.settled(10)
        assert sink.delivered == [expected]

    asyncio.run(scenario())
    assert decode_record(encode_record("n", body)) == ["n", expected]
    assert encode_record("n", {"a": "é"}) == '["n",{"a":"é"}]'.encode()  # orjson's bytes otherwise


def test_a_record_no_handler_can_read_is_set_aside_and_the_rest_go_on(tmp_path: Path) -> None:
    async def scenario() -> None:
        sink = Sink()
        async with opened(tmp_path, sink) as spool:
            for body in (1, "poison", 2):
                await spool.append("n", body)
            assert await spool.settled(10)
            assert sink.delivered == [1, 2]
        assert (tmp_path / UNDELIVERABLE).read_text().splitlines() == ['["n","poison"]']

    asyncio.run(scenario())


def test_files_are_rotated_and_once_all_their_records_are_stored_one_is_kept_as_the_next_the_rest_deleted(
        tmp_path: Path) -> None:
    async def scenario() -> None:
        sink = Sink()
        sink.failing = True
        async with opened(tmp_path, sink, segment_bytes=50) as spool:
            for i in range(40):
                await spool.append("n", i)  # one write per append: a new file every few records
            assert len(journals(tmp_path)) > 5
            sink.failing = False
            assert await spool.settled(10)
            await until(lambda: len(journals(tmp_path)) == 2)  # the live file and the spare stay
            assert sink.delivered == list(range(40))
            assert all(read_frames(path.read_bytes())[0] == [] for path in journals(tmp_path))
            kept = set(journals(tmp_path))
            for first in (40, 45, 50):  # each round past segment_bytes once: the two files take turns, none is created
                sink.failing = True
                for i in range(first, first + 5):
                    await spool.append("n", i)
                assert set(journals(tmp_path)) == kept
                sink.failing = False
                assert await spool.settled(10)
                await until(lambda: all(read_frames(path.read_bytes())[0] == [] for path in journals(tmp_path)))
            assert sink.delivered == list(range(55))

    asyncio.run(scenario())


WRITER = """
import asyncio, sys
from pathlib import Path
from store.spool import Handler, Spool

async def main():
    spool = Spool(Path(sys.argv[1]), store_url=sys.argv[2])
    async def away(items):
        raise ConnectionRefusedError("store away")
    spool.register("n", Handler(decode=lambda body: body, deliver=away))
    await spool.open()
    await asyncio.gather(*(spool.append("n", i) for i in range(int(sys.argv[3]))))
    print("durable", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def start_writer(directory: Path, count: int, store: str = STORE) -> subprocess.Popen[str]:
    """A process that journals `count` records while its store is away, then waits to be killed."""
    process = subprocess.Popen([sys.executable, "-c", WRITER, str(directory), store, str(count)], cwd=ROOT,
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdout.readline().strip() == "durable"
    return process


def kill(process: subprocess.Popen[str]) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(10)


def test_a_killed_process_journal_is_taken_over_once_it_is_dead_never_while_it_lives(tmp_path: Path) -> None:
    writer = start_writer(tmp_path, 200)
    try:
        async def while_alive() -> None:
            sink = Sink()
            async with opened(tmp_path, sink) as spool:
                await asyncio.sleep(0.2)
                assert sink.delivered == [] and spool.depth() == 0  # its lock says it is alive

        asyncio.run(while_alive())
    finally:
        kill(writer)
    [journal] = journals(tmp_path)
    records, end = read_frames(journal.read_bytes())
    assert len(records) == 200 and journal.read_bytes()[end:end + 8] == END
    with journal.open("r+b") as torn:  # the crash cut the next write, over the END, short: never acknowledged
        torn.seek(end)
        torn.write(frame(json.dumps(["n", 999]).encode())[:-2])

    async def after_death() -> list[Any]:
        sink = Sink()
        async with opened(tmp_path, sink) as spool:
            await until(lambda: len(sink.delivered) >= 200 and spool.depth() == 0)
            await until(lambda: not journal.exists())  # delivered, then deleted
            return sink.delivered

    assert asyncio.run(after_death()) == list(range(200))


def test_two_live_processes_never_take_over_the_same_file(tmp_path: Path) -> None:
    """A dead process's file, two processes starting at once: the lock lets exactly one read it."""
    kill(start_writer(tmp_path, 100))
    taker = """
import asyncio, json, sys
from pathlib import Path
from store.spool import Handler, Spool

async def main():
    got = []
    async def deliver(items):
        got.extend(items)
    spool = Spool(Path(sys.argv[1]), store_url=sys.argv[2], takeover_seconds=0.05)
    spool.register("n", Handler(decode=lambda body: body, deliver=deliver))
    await spool.open()
    await asyncio.sleep(1.0)
    await spool.close()
    print(json.dumps(got))

asyncio.run(main())
"""
    takers = [subprocess.Popen([sys.executable, "-c", taker, str(tmp_path), STORE], cwd=ROOT, stdout=subprocess.PIPE, text=True)
              for _ in range(3)]
    results = [json.loads(p.communicate(timeout=30)[0]) for p in takers]
    assert sorted(n for got in results for n in got) == list(range(100))
    assert sum(1 for got in results if got) == 1


def test_a_journal_of_another_store_is_never_delivered_here(tmp_path: Path) -> None:
    kill(start_writer(tmp_path, 5, store="sqlite:///elsewhere.db"))
    [foreign] = journals(tmp_path)
    assert foreign.name.startswith(store_key("sqlite:///elsewhere.db"))

    async def scenario() -> list[Any]:
        sink = Sink()
        async with opened(tmp_path, sink):
            await asyncio.sleep(0.2)
            return sink.delivered

    assert asyncio.run(scenario()) == []
    assert foreign.exists()


def test_the_live_file_is_locked_from_the_moment_it_has_its_name(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with opened(tmp_path, Sink()) as spool:
            await spool.append("n", 1)
            [journal] = journals(tmp_path)
            fd = os.open(journal, os.O_RDONLY)
            try:
                with pytest.raises(BlockingIOError):
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            finally:
                os.close(fd)

    asyncio.run(scenario())


def test_hits_are_gathered_into_batches_and_other_kinds_or_a_reader_do_not_wait(tmp_path: Path) -> None:
    """Kinds registered with `gather` wait for more after a delivery (here up to 30 s, so the waiting is
    certain); a record of another kind, or a reader waiting for its writes, sends what waits at once."""

    async def main() -> None:
        sink, urgent = Sink(), Sink()
        spool = Spool(tmp_path, store_url=STORE, gather_seconds=30)
        spool.register("n", Handler(decode=decode, deliver=sink.deliver, gather=True))
        spool.register("u", Handler(decode=decode, deliver=urgent.deliver))
        await spool.open()
        try:
            await spool.append("n", 1)  # after a quiet spell: at once
            await until(lambda: sink.delivered == [1])
            await spool.append("n", 2)
            await spool.append("n", 3)
            await asyncio.sleep(0.3)
            assert sink.delivered == [1] and spool.depth() == 2  # gathering
            await spool.append("u", 4)  # not gathered: goes at once, with what was gathered
            await until(lambda: urgent.delivered == [4] and sink.delivered == [1, 2, 3], timeout=20)
            await spool.append("n", 5)
            assert await spool.settled(20)  # read your writes: the reader does not wait the gathering out
            assert sink.delivered == [1, 2, 3, 5]
        finally:
            await spool.close(timeout=2)

    asyncio.run(main())


def test_a_handler_without_decode_gets_the_records_as_written_and_sets_aside_what_it_cannot_read(tmp_path: Path) -> None:
    """The tracker's hits: their journal bytes go to a recorder (another process) that reads them itself."""
    async def scenario() -> None:
        payloads: list[bytes] = []
        spool = Spool(tmp_path, store_url=STORE, retry_seconds=(0.01, 0.05))

        async def deliver(items: list[bytes]) -> None:
            for item in items:
                if json.loads(item)[1] == "poison":
                    spool.set_aside(item, "raw", "ValueError: not a record of ours")
                else:
                    payloads.append(item)

        spool.register("raw", Handler(deliver=deliver))
        await spool.open()
        try:
            await asyncio.gather(*(spool.append("raw", body) for body in ({"n": 1}, "poison", {"n": 2})))
            assert await spool.settled(10)
        finally:
            await spool.close(timeout=2)
        assert payloads == [b'["raw",{"n":1}]', b'["raw",{"n":2}]']
        assert (tmp_path / UNDELIVERABLE).read_bytes() == b'["raw","poison"]\n'

    asyncio.run(scenario())
