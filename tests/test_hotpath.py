"""The hot path answers from the token: `inflight tracker` / `inflight serve` as real processes,
killed with SIGKILL, or with their store away for 20 s (SQLite locked by another connection;
PostgreSQL behind a TCP proxy that is killed), and nothing lost or stored twice."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import smtplib
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from email.message import EmailMessage
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import httpx
import pytest

from store import open_store
from store.spool import read_frames
from tests.conftest import PROJECT, PROJECT_SECRET, Sink, free_port
from tests.processes import Inflight, wait_for, write_config
from tracking.claims import TrackedSend
from tracking.tokens import TokenKeys, new_send_id

SECRET = "test-secret-1"
BUDGET_MS = 50


class InflightProcess(Inflight):
    """`inflight <verb>` on free loopback ports, its store SQLite in `tmp_path` unless `store_url` says
    otherwise (then `direct_url` is where the test reads it, around any proxy)."""

    def __init__(self, tmp_path: Path, verb: str, upstream_url: str, store_url: str = "", direct_url: str = "",
                 workers: int = 1, store_process: bool = True) -> None:
        super().__init__(verb, tmp_path / f"{verb}.toml", tmp_path / f"{verb}.log")
        self.tmp_path = tmp_path
        self.smtp_port, self.http_port = free_port(), free_port()
        self.db = tmp_path / "inflight.db"
        self.store_url = store_url or f"sqlite:///{self.db}"
        self.direct_url = direct_url or self.store_url
        write_config(self.config, upstream_url, relay={"listen": f"127.0.0.1:{self.smtp_port}", "workers": workers},
                     tracker={"listen": f"127.0.0.1:{self.http_port}", "public_url": self.http_base, "secrets": [SECRET],
                              "workers": workers, "answer_budget_ms": BUDGET_MS,
                              "store_process": store_process},
                     store={"url": self.store_url, "spool_dir": f"{tmp_path}/spool"})

    def journal_records(self) -> int:
        return sum(len(read_frames(path.read_bytes())[0]) for path in (self.tmp_path / "spool").glob("*.journal"))

    def query(self, sql: str) -> list[tuple[object, ...]]:
        if self.direct_url.startswith("sqlite:"):
            with contextlib.closing(sqlite3.connect(self.db, timeout=30)) as db:
                return db.execute(sql).fetchall()

        async def on_postgresql() -> list[tuple[object, ...]]:
            connection = await asyncpg.connect(self.direct_url, timeout=10)
            try:
                return [tuple(row) for row in await connection.fetch(sql)]
            finally:
                await connection.close()

        return asyncio.run(on_postgresql())

    def clicks_by_link(self) -> Counter[str]:
        return Counter({str(link): int(n) for link, n in
                        self.query("SELECT link, count(*) FROM events WHERE name = 'email.click' GROUP BY link")})


@contextlib.contextmanager
def running(tmp_path: Path, verb: str, upstream_url: str = "outbox:///dev/null", *, store_url: str = "",
            direct_url: str = "", workers: int = 1, store_process: bool = True) -> Iterator[InflightProcess]:
    process = InflightProcess(tmp_path, verb, upstream_url, store_url, direct_url, workers, store_process).start()
    try:
        yield process
    finally:
        process.kill()


def click_paths(count: int, store_url: str) -> list[str]:
    """One click per copy, each on its own link, so every stored click names the request it came from.
    The copies are stored first, as the relay stores them before they go (their tokens name them)."""
    tokens, sends = TokenKeys([SECRET], [PROJECT]).project(PROJECT), []
    for index in range(count):
        sends.append((new_send_id(), TrackedSend(project=PROJECT, message_id=f"m{index}@hotpath.test",
                                                 contact=f"c{index}@example.com", recipient=f"c{index}@example.com", sent_at=1)))

    async def store_sends() -> None:
        store = open_store(store_url)
        await store.open()
        try:
            await store.record_sends(sends)
        finally:
            await store.close()

    asyncio.run(store_sends())
    return [f"/c/{tokens.click(send_id, f'https://example.com/p/{index}')}" for index, (send_id, _) in enumerate(sends)]


def click_all(base: str, paths: list[str], *, concurrency: int, answered_so_far: Callable[[int], None]) -> list[tuple[int, float]]:
    """(status, seconds) per click, sent by `concurrency` keep-alive clients; `answered_so_far` is
    told the count the moment each answer arrived, in the thread that got it."""
    answered = 0
    counting = threading.Lock()

    def one_client(part: list[str]) -> list[tuple[int, float]]:
        nonlocal answered
        answers = []
        with httpx.Client(base_url=base, timeout=30) as client:
            for path in part:
                started = time.perf_counter()
                status = client.get(path).status_code
                answers.append((status, time.perf_counter() - started))
                with counting:
                    answered += 1
                    answered_so_far(answered)
        return answers

    with ThreadPoolExecutor(concurrency) as pool:
        return [a for part in pool.map(one_client, [paths[i::concurrency] for i in range(concurrency)]) for a in part]


@pytest.mark.parametrize("workers", [1, 2])
def test_sigkill_right_after_1000_clicks_answered_loses_none_and_stores_none_twice(tmp_path: Path, workers: int) -> None:
    """With 2 workers, two journals are left by the kill, each taken over after the restart."""
    with running(tmp_path, "tracker", workers=workers) as tracker:
        paths = click_paths(1000, tracker.direct_url)
        locker = sqlite3.connect(tracker.db, isolation_level=None, check_same_thread=False)

        def answered_so_far(count: int) -> None:
            if count == 700:  # the store stops taking writes: the last clicks can only be in the spool
                locker.execute("BEGIN EXCLUSIVE")
            if count == 1000:
                tracker.kill()  # SIGKILL, the moment the last answer arrived

        answers = click_all(tracker.http_base, paths, concurrency=25, answered_so_far=answered_so_far)
        locker.execute("ROLLBACK")
        locker.close()
        assert [status for status, _ in answers] == [302] * 1000
        in_journal, stored = tracker.journal_records(), sum(tracker.clicks_by_link().values())
    # What the kill interrupted: records in the journal (those since its last truncation, stored
    # ones among them, which the replay must not store twice) and clicks the store did not have.
    assert in_journal > 0 and stored < 1000, (in_journal, stored)
    with running(tmp_path, "tracker") as restarted:
        wait_for(lambda: sum(restarted.clicks_by_link().values()) >= 1000, seconds=60, what="1000 clicks stored", every=0.1)
        time.sleep(0.5)  # anything else the replay had would have arrived by now
        clicks = restarted.clicks_by_link()
        assert clicks == Counter({f"https://example.com/p/{i}": 1 for i in range(1000)})
        wait_for(lambda: restarted.journal_records() == 0, seconds=60, what="journal emptied", every=0.1)
    print(f"SIGKILL ({workers} worker(s)) after 1000 answered clicks: {stored} stored and {in_journal} journal records at the kill, "
          f"1000 stored once each after restart")


def recorder_pids(pid: int) -> list[int]:
    """The recorder processes (tracker/recorder_process.py) among `pid`'s children, zombies left out."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(child) for child in children if b"tracker.recorder_process" in Path(f"/proc/{child}/cmdline").read_bytes()
            and Path(f"/proc/{child}/stat").read_text().split()[2] != "Z"]


def test_the_recorder_process_sigkilled_mid_run_loses_no_hit_and_stores_none_twice(tmp_path: Path) -> None:
    """The tracker's hits are stored by a child process (`store_process`, on by default): killed while
    clicks come in, the answers go on, the batch it had is retried from the spool by a new child."""
    with running(tmp_path, "tracker") as tracker:
        assert tracker.process is not None
        (first,) = recorder_pids(tracker.process.pid)
        paths = click_paths(600, tracker.direct_url)

        def answered_so_far(count: int) -> None:
            if count == 300:
                os.kill(first, signal.SIGKILL)

        answers = click_all(tracker.http_base, paths, concurrency=10, answered_so_far=answered_so_far)
        assert [status for status, _ in answers] == [302] * 600
        wait_for(lambda: sum(tracker.clicks_by_link().values()) >= 600, seconds=60, what="600 clicks stored", every=0.1)
        time.sleep(0.5)  # a batch stored twice would have arrived by now
        assert tracker.clicks_by_link() == Counter({f"https://example.com/p/{i}": 1 for i in range(600)})
        (second,) = recorder_pids(tracker.process.pid)
        assert second != first
        assert "recorder-process-lost" in tracker.output()
        os.kill(tracker.process.pid, signal.SIGKILL)  # the tracker alone, not its process group
        wait_for(lambda: not Path(f"/proc/{second}").exists() or Path(f"/proc/{second}/stat").read_text().split()[2] == "Z",
                 what="the recorder of a killed tracker exits")


@pytest.mark.parametrize("workers", [1, 2])
def test_with_store_process_false_the_answering_processes_store_the_hits(tmp_path: Path, workers: int) -> None:
    with running(tmp_path, "tracker", workers=workers, store_process=False) as tracker:
        assert tracker.process is not None
        processes = [tracker.process.pid, *map(int, Path(f"/proc/{tracker.process.pid}/task/{tracker.process.pid}/children")
                                               .read_text().split())]
        assert not [pid for pid in processes if recorder_pids(pid)]
        paths = click_paths(50, tracker.direct_url)
        answers = click_all(tracker.http_base, paths, concurrency=5, answered_so_far=lambda count: None)
        assert [status for status, _ in answers] == [302] * 50
        wait_for(lambda: tracker.clicks_by_link() == Counter({f"https://example.com/p/{i}": 1 for i in range(50)}),
                 what="50 clicks stored once each")


def send_message(port: int, index: int, recipients: list[str], *, message_id: str | None = None) -> tuple[int, bytes]:
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = "app@example.com", ", ".join(recipients), f"hot path {index}"
    message["Message-ID"] = message_id or f"<hot{index}@app.example.com>"
    message.set_content(f'<p><a href="https://example.com/m/{index}">go</a></p>', subtype="html")
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        client.login(PROJECT, PROJECT_SECRET)
        client.mail("app@example.com")
        for recipient in recipients:
            client.rcpt(recipient)
        return client.data(message.as_bytes())


PROXY = """
import asyncio, sys

async def pipe(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()

async def main():
    async def serve(reader, writer):
        upstream_reader, upstream_writer = await asyncio.open_connection(sys.argv[2], int(sys.argv[3]))
        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer), return_exceptions=True)
    server = await asyncio.start_server(serve, "127.0.0.1", int(sys.argv[1]))
    print("listening", flush=True)
    await server.serve_forever()

asyncio.run(main())
"""


class StoreOutage:
    """The store away, the way each backend goes away: SQLite's write lock held by another
    connection; PostgreSQL's network gone (the TCP proxy the service connects through is killed,
    then started again on the same port)."""

    def __init__(self, backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
        self.backend = backend
        self.store_url = self.direct_url = ""
        self._locker: sqlite3.Connection | None = None
        self._proxy: subprocess.Popen[str] | None = None
        if backend == "postgresql":
            self.direct_url = str(request.getfixturevalue("pg_url"))
            self.proxy_port = free_port()
            self.store_url = urlsplit(self.direct_url)._replace(netloc=f"postgres@127.0.0.1:{self.proxy_port}").geturl()
            self._start_proxy()

    def _start_proxy(self) -> None:
        target = urlsplit(self.direct_url)
        self._proxy = subprocess.Popen([sys.executable, "-c", PROXY, str(self.proxy_port), str(target.hostname), str(target.port)],
                                       stdout=subprocess.PIPE, text=True)
        assert self._proxy.stdout is not None and self._proxy.stdout.readline().strip() == "listening"

    def begin(self, db: Path) -> None:
        if self.backend == "sqlite":
            self._locker = sqlite3.connect(db, isolation_level=None)
            self._locker.execute("BEGIN EXCLUSIVE")
        else:
            assert self._proxy is not None
            self._proxy.kill()  # every connection to the store drops; new ones are refused
            self._proxy.wait(10)

    def end(self) -> None:
        if self._locker is not None:
            self._locker.execute("ROLLBACK")
            self._locker.close()
            self._locker = None
        if self.backend == "postgresql":
            self._start_proxy()

    def close(self) -> None:
        if self._proxy is not None and self._proxy.poll() is None:
            self._proxy.kill()
            self._proxy.wait(10)


@pytest.fixture(params=["sqlite", "postgresql"])
def outage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreOutage]:
    planned = StoreOutage(request.param, tmp_path, request)
    try:
        yield planned
    finally:
        planned.close()


def test_store_away_for_20_s_clicks_answer_within_budget_and_mail_gets_250_then_all_is_stored_once(
    tmp_path: Path, sink: Sink, outage: StoreOutage
) -> None:
    recipients = ["a@example.com", "b@example.com"]
    with running(tmp_path, "serve", sink.url, store_url=outage.store_url, direct_url=outage.direct_url) as serve:
        paths = click_paths(100, serve.direct_url)
        assert send_message(serve.smtp_port, 0, recipients)[0] == 250  # before the outage: the mode is known
        wait_for(lambda: serve.query("SELECT count(*) FROM events")[0][0] == 2, seconds=60, what="the first message's events stored",
                 every=0.1)
        outage.begin(serve.db)
        began = time.monotonic()
        replies: list[tuple[int, bytes]] = []

        def relay_during_outage() -> None:
            for index in range(1, 21):
                replies.append(send_message(serve.smtp_port, index, recipients))
            # The app retries message 1 (its reply was lost, say): the ledger rows are still in the
            # spool, not in the store, and the retry must not deliver a second copy.
            replies.append(send_message(serve.smtp_port, 1, recipients))

        mail = threading.Thread(target=relay_during_outage)
        mail.start()
        answers = []
        with httpx.Client(base_url=serve.http_base, timeout=30) as client:
            for path in paths:  # spread over the outage, one at a time: each answer timed alone
                started = time.perf_counter()
                answers.append((client.get(path).status_code, time.perf_counter() - started))
                time.sleep(0.1)
        mail.join(max(0.0, 19 - (time.monotonic() - began)))
        finished = time.monotonic() - began
        stored_during = serve.query("SELECT count(*) FROM events WHERE name IN ('email.click', 'email.sent')")[0][0]
        time.sleep(max(0.0, 20 - (time.monotonic() - began)))
        outage.end()
        assert not mail.is_alive(), f"20 messages not relayed within the outage: {replies}"
        assert stored_during == 2, "nothing but the message sent before the outage reached the store during it"
        assert [status for status, _ in answers] == [302] * 100
        # Timed from the client on a shared, loaded machine (2 cores, 4-8x oversubscribed while the
        # suites of others run): the tracker bounds its own wait by the budget, the machine adds its
        # scheduling, so 90 % must be within the budget and none near a wait on the store (SQLite's
        # busy timeout is 5 s; without the spool this was a 500 after 9.5 s).
        timings = sorted(round(seconds * 1000, 1) for _, seconds in answers)
        slowest = timings[-1]
        assert timings[89] < BUDGET_MS and slowest < 1000, f"redirect ms, budget {BUDGET_MS}: {timings}"
        assert [code for code, _ in replies] == [250] * 21, replies
        wait_for(lambda: serve.query("SELECT count(*) FROM events WHERE name = 'email.click'")[0][0] >= 100
                 and serve.query("SELECT count(*) FROM events WHERE name = 'email.sent'")[0][0] >= 42,
                 seconds=60, what="every event stored", every=0.1)
        time.sleep(0.5)
        assert serve.clicks_by_link() == Counter({f"https://example.com/p/{i}": 1 for i in range(100)})
        sent = Counter(serve.query("SELECT message_id, recipient FROM events WHERE name = 'email.sent'"))
        assert sent == Counter({(f"hot{i}@app.example.com", r): 1 for i in range(21) for r in recipients})
        ledger = Counter(serve.query("SELECT message_id, recipient FROM deliveries WHERE state = 'delivered'"))
        assert serve.query("SELECT count(*) FROM deliveries")[0][0] == 42
        assert set(ledger) == {(f"hot{i}@app.example.com", r) for i in range(21) for r in recipients}
        delivered = Counter((m.data.split(b"Subject: ")[1].split(b"\r\n")[0], tuple(m.recipients)) for m in sink.messages)
        assert all(n == 1 for n in delivered.values()) and len(delivered) == 42, delivered
    print(f"{outage.backend} store away 20 s, all answered within {finished:.1f} s: 100 redirects "
          f"(median {statistics.median(timings):.1f} ms, p90 {timings[89]:.1f} ms, slowest {slowest:.1f} ms), "
          f"21 x 250, all stored once afterwards")


def test_a_hit_whose_copy_reaches_the_store_after_it_is_recorded_once_it_does(tmp_path: Path) -> None:
    """Relay and tracker as separate processes after an outage: the tracker's spool may deliver a hit
    before the relay's spool delivered the copy's send row. The hit waits for it, then is stored."""
    with running(tmp_path, "tracker") as tracker:
        send_id = new_send_id()
        token = TokenKeys([SECRET], [PROJECT]).project(PROJECT).click(send_id, "https://example.com/late")
        assert httpx.get(f"{tracker.http_base}/c/{token}", timeout=10).status_code == 302
        time.sleep(2)  # the tracker's spool has looked for the copy and found nothing yet
        assert tracker.clicks_by_link() == Counter()

        async def relay_spool_delivers() -> None:
            store = open_store(tracker.store_url)
            await store.open()
            try:
                await store.record_sends([(send_id, TrackedSend(project=PROJECT, message_id="late@hotpath.test",
                                                                contact="late@example.com", recipient="late@example.com",
                                                                sent_at=1))])
            finally:
                await store.close()

        asyncio.run(relay_spool_delivers())
        wait_for(lambda: tracker.clicks_by_link() == Counter({"https://example.com/late": 1}), seconds=20,
                 what="the waiting click stored", every=0.1)
