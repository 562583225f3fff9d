"""Store: the shared state on each backend, for the capacity figures in README.md (Capacity).

Per backend (SQLite, the embedded default; PostgreSQL, the store for several nodes):
- bytes per event on disk, tables and indexes, after a bulk fill of plausible events (bench/cases/stats.py's mix);
- `GET /v1/stats` latency over that many events (1 M by default), answered by `inflight tracker`;
- events recorded per second through the store's interface by concurrent callers (bench/store_load.py, own
  process) into that full store, and their p99; afterwards the store must hold every event recorded.
On PostgreSQL also the tracker's pixel with one worker process against two (`[tracker] workers`) on the same
database (bench/httpload.py, 16 connections): what another process buys while one primary takes every write.

PostgreSQL comes from INFLIGHT_BENCH_PG_URL, else INFLIGHT_TEST_PG_URL, else the local default; each run
works in a database of its own, dropped afterwards. Rows say why they are skipped when there is none.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from bench.cases.stats import PROJECT, START, fill_store, time_queries
from bench.cases.tracker import mint_paths
from bench.harness import Child, Mode, free_port, python, row, run_json, skipped, write_config
from store import open_store
from store.postgresql import next_month, partition_name

CASE = "store"
DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
CONNECTIONS = 16
# The stats case's generated mix (half sends, a third opens, the rest clicks), in PostgreSQL's words.
PG_FILL = f"""
INSERT INTO events (uid, name, project, contact, recipient, message_id, at, campaign, template_type,
                    subject, sender, link, ip, user_agent, tracked)
SELECT md5(i::text),
       CASE WHEN i % 6 < 3 THEN 'email.sent' WHEN i % 6 < 5 THEN 'email.open' ELSE 'email.click' END,
       '{PROJECT}',
       'c' || (i / 6 % 20000) || '@example.net',
       'c' || (i / 6 % 20000) || '@example.net',
       (i / 6) || '.bench@relay.bench.example',
       to_char(to_timestamp({START} + i * 2) AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS') || '.000000Z',
       'campaign-' || (i / 6 % 10),
       'MARKETING',
       'Spring sale', 'Shop <news@shop.example.com>',
       CASE WHEN i % 6 = 5 THEN 'https://shop.example.com/p/' || (i % 50) END,
       CASE WHEN i % 6 >= 3 THEN '198.51.100.' || (i % 250) END,
       CASE WHEN i % 6 >= 3 THEN 'Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7)' END,
       true
FROM generate_series(0, $1 - 1) AS i
"""


class Backend(Protocol):
    name: str

    @property
    def url(self) -> str: ...

    def fill(self, count: int) -> None: ...
    def bytes_used(self) -> int: ...
    def events(self, name: str | None = None) -> int: ...


@dataclass
class SqliteBackend:
    path: Path
    name: str = "sqlite"

    @property
    def url(self) -> str:
        return f"sqlite:///{self.path}"

    def fill(self, count: int) -> None:
        fill_store(self.path, count)

    def bytes_used(self) -> int:
        with sqlite3.connect(self.path) as db:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return sum(p.stat().st_size for p in self.path.parent.glob(self.path.name + "*"))

    def events(self, name: str | None = None) -> int:
        with sqlite3.connect(self.path) as db:
            return int(db.execute("SELECT count(*) FROM events WHERE ?1 IS NULL OR name = ?1", (name,)).fetchone()[0])


@dataclass
class PostgresBackend:
    url: str
    name: str = "postgresql"
    empty_bytes: int = 0

    def _run(self, sql: str, *args: Any) -> Any:
        import asyncpg  # only where PostgreSQL is benched

        async def query() -> Any:
            connection = await asyncpg.connect(self.url)
            try:
                return await connection.fetchval(sql, *args, timeout=3600)
            finally:
                await connection.close()

        return asyncio.run(query())

    def fill(self, count: int) -> None:
        async def migrate() -> None:  # the product creates its own schema, partitions included
            store = open_store(self.url)
            await store.open()
            await store.close()

        asyncio.run(migrate())
        first, last = (time.strftime("%Y-%m", time.gmtime(START + seconds)) for seconds in (0, 2 * count))
        month = first
        while month <= last:  # the generated months' partitions, as the store makes them on insert
            self._run(f"CREATE TABLE IF NOT EXISTS {partition_name(month)} PARTITION OF events "
                      f"FOR VALUES FROM ('{month}') TO ('{next_month(month)}')")
            month = next_month(month)
        self._run("ANALYZE")
        self.empty_bytes = int(self._run("SELECT pg_database_size(current_database())"))
        self._run(PG_FILL, count)
        self._run("ANALYZE")

    def bytes_used(self) -> int:
        self._run("CHECKPOINT")
        return int(self._run("SELECT pg_database_size(current_database())")) - self.empty_bytes

    def events(self, name: str | None = None) -> int:
        return int(self._run("SELECT count(*) FROM events WHERE $1::text IS NULL OR name = $1", name))


@contextlib.contextmanager
def postgres() -> Iterator[PostgresBackend | str]:
    """A fresh database on the configured server, or the reason there is none."""
    admin = os.environ.get("INFLIGHT_BENCH_PG_URL") or os.environ.get("INFLIGHT_TEST_PG_URL") or DEFAULT_PG_URL
    try:
        import asyncpg
    except ImportError:
        yield "asyncpg is not installed"
        return
    try:
        open_store(admin)
    except ValueError as exc:
        yield f"the store has no PostgreSQL backend ({exc})"
        return
    database = f"inflight_bench_{uuid.uuid4().hex[:12]}"

    async def execute(sql: str) -> None:
        connection = await asyncpg.connect(admin, timeout=5)
        try:
            await connection.execute(sql)
        finally:
            await connection.close()

    try:
        asyncio.run(execute(f'CREATE DATABASE "{database}"'))
    except (OSError, asyncpg.PostgresError) as exc:
        yield f"no PostgreSQL at {urlsplit(admin).hostname}:{urlsplit(admin).port or 5432} ({type(exc).__name__})"
        return
    try:
        yield PostgresBackend(urlunsplit(urlsplit(admin)._replace(path=f"/{database}")))
    finally:
        asyncio.run(execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))


def label(count: int) -> str:
    return f"{count // 1_000_000} M events" if count >= 1_000_000 else f"{count // 1000} k events"


def backend_rows(backend: Backend, mode: Mode, work: Path) -> list[dict[str, Any]]:
    count = mode.pick(full=1_000_000, quick=100_000, smoke=2_000)
    repeats = mode.pick(full=5, quick=3, smoke=1)
    seconds = mode.pick(full=3.0, quick=1.0, smoke=1.0)
    rounds = mode.pick(full=3, quick=2, smoke=1)
    started = time.monotonic()
    backend.fill(count)
    fill_seconds = time.monotonic() - started
    per_event = backend.bytes_used() / count
    rows = [row(CASE, f"{backend.name}: disk per event", "bytes", [per_event],
                note=f"{label(count)} bulk-filled in {fill_seconds:.0f} s, tables and indexes")]
    port = free_port()
    config = write_config(work / f"{backend.name}.toml", relay_port=free_port(), tracker_port=port, store=backend.url,
                          upstream=f"outbox:///{work}/outbox", projects={PROJECT: "ENABLED"})
    with Child("tracker", python("inflight.cli", "tracker", "--config", config), port, work):
        for name, timings in time_queries(port, repeats, label(count)).items():
            rows.append(row(CASE, f"{backend.name}: /v1/stats {name}, {label(count)}", "ms", timings))
    results = [run_json(python("bench.store_load", "--url", backend.url, "--seconds", seconds, "--warmup", 0.3,
                               "--writers", 32), timeout=seconds + 120) for _ in range(rounds)]
    if any(r["p99_ms"] is None for r in results):
        raise AssertionError(f"{backend.name}: no event recorded within the {seconds:g} s window: {results}")
    recorded = sum(r["recorded"] for r in results)
    stored = backend.events()
    if stored != count + recorded:
        raise AssertionError(f"{backend.name}: {stored} events stored, expected {count} filled + {recorded} recorded")
    note = f"32 concurrent callers into {label(count)}; {recorded} recorded = stored"
    rows.append(row(CASE, f"{backend.name}: opens recorded", "ev/s", [r["rate"] for r in results], note=note))
    rows.append(row(CASE, f"{backend.name}: opens recorded p99", "ms", [r["p99_ms"] for r in results]))
    return rows


SMOKE_PIXELS_PER_SECOND = 2000


def tracker_rows(backend: PostgresBackend, mode: Mode, work: Path) -> list[dict[str, Any]]:
    """The pixel on a tracker with one worker process, then on one with two ([tracker] workers), on one
    PostgreSQL database; both run throughout and are loaded in turn, 16 connections each time."""
    seconds = mode.pick(full=3.0, quick=1.0, smoke=1.0)
    rounds = mode.pick(full=3, quick=2, smoke=1)
    ports = {1: free_port(), 2: free_port()}
    configs = {workers: write_config(work / f"tracker-{workers}.toml", relay_port=free_port(), tracker_port=port,
                                     store=backend.url, upstream=f"outbox:///{work}/outbox", projects={"bench": "ENABLED"},
                                     workers=workers)
               for workers, port in ports.items()}
    pixels, _ = mint_paths(f"http://127.0.0.1:{ports[1]}", mode.pick(full=20_000, quick=10_000, smoke=50), backend.url)
    (work / "pixel.txt").write_text("\n".join(pixels))
    before = backend.events("email.open")
    results: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
    with contextlib.ExitStack() as stack:
        for workers, port in ports.items():
            stack.enter_context(Child(f"tracker-{workers}", python("inflight.cli", "tracker", "--config", configs[workers]),
                                      port, work))
        for port in ports.values():  # each worker's first hits open its connection pool: not measured
            urllib.request.urlopen(f"http://127.0.0.1:{port}{pixels[0]}", timeout=60).read()
        for _ in range(rounds):
            for workers, port in ports.items():
                # Smoke (CI): a bounded rate, so the store need not drain tens of thousands of hits on a loaded box.
                rate = ["--rate", SMOKE_PIXELS_PER_SECOND] if mode.smoke else []
                result = run_json(python("bench.httpload", "--port", port, "--paths", work / "pixel.txt", "--connections",
                                         CONNECTIONS, "--seconds", seconds, "--warmup", 0.3, *rate), timeout=seconds + 60)
                if set(result["status"]) != {"200"} or result["p99_ms"] is None:
                    raise AssertionError(f"pixel on {workers} worker(s): answers {result['status']} in {seconds:g} s")
                results[workers].append(result)
        answered = len(ports) + sum(r["status"]["200"] for rs in results.values() for r in rs)
        # Hits answered before they are stored (a spool) get there within it: the recorders store ~1 k a second
        # at worst (a loaded CI box, two of them on one PostgreSQL), so the wait grows with what was answered.
        deadline = time.monotonic() + 30 + answered / 1000
        while (stored := backend.events("email.open") - before) < answered and time.monotonic() < deadline:
            time.sleep(0.2)
    if stored != answered:
        raise AssertionError(f"{stored} opens stored on PostgreSQL, the trackers answered {answered}")
    one = f"{backend.name}: pixel, tracker with 1 worker"
    rates = {workers: [r["rate"] for r in rs] for workers, rs in results.items()}
    return [
        row(CASE, one, "req/s", rates[1], note=f"{answered} opens stored = answers"),
        row(CASE, f"{backend.name}: pixel, tracker with 2 workers", "req/s", rates[2], baseline=(one, rates[1])),
        row(CASE, f"{one} p99", "ms", [r["p99_ms"] for r in results[1]]),
        row(CASE, f"{backend.name}: pixel, tracker with 2 workers p99", "ms", [r["p99_ms"] for r in results[2]]),
    ]


def run(quick: bool, smoke: bool = False) -> list[dict[str, Any]]:
    mode = Mode(quick, smoke)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        work = Path(tmp)
        rows += backend_rows(SqliteBackend(work / "events.db"), mode, work)
        with postgres() as pg:
            if isinstance(pg, str):
                return [*rows, skipped(CASE, "postgresql", pg)]
            rows += backend_rows(pg, mode, work)
            rows += tracker_rows(pg, mode, work)
    return rows
