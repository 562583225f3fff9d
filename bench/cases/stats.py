"""Stats query: latency of `GET /v1/stats` over a store holding 100 k events (1 M: bench/cases/store.py).

The store is created by the product (so it has every table and index of the current schema),
then filled by one bulk INSERT … SELECT over a recursive sequence: a million plausible events
(half sent, a third opens, the rest clicks over 50 links, 10 campaigns, 20 k contacts) in seconds.
`inflight tracker` (own process) then answers the queries. Skipped, with the reason, while
/v1/stats does not exist.
"""

from __future__ import annotations

import asyncio
import http.client
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.harness import SHOP, Child, Mode, free_port, project_secret, python, row, skipped, write_config
from store.sqlite import SqliteEventStore

CASE = "stats"
PROJECT = "bench"
START = 1_780_000_000  # epoch seconds of the first generated event; one event every 2 s after it
FILL = f"""
WITH RECURSIVE seq(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM seq WHERE i + 1 < :count)
INSERT INTO events (name, project, contact, recipient, message_id, at, campaign, template_type,
                    subject, sender, link, ip, user_agent, tracked)
SELECT CASE WHEN i % 6 < 3 THEN 'email.sent' WHEN i % 6 < 5 THEN 'email.open' ELSE 'email.click' END,
       '{PROJECT}',
       'c' || (i / 6 % 20000) || '@example.net',
       'c' || (i / 6 % 20000) || '@example.net',
       (i / 6) || '.bench@relay.bench.example',
       strftime('%Y-%m-%dT%H:%M:%S', {START} + i * 2, 'unixepoch') || '.000000Z',
       'campaign-' || (i / 6 % 10),
       'MARKETING',
       'Spring sale', 'Shop <news@shop.example.com>',
       CASE WHEN i % 6 = 5 THEN '{SHOP}/p/' || (i % 50) END,
       CASE WHEN i % 6 >= 3 THEN '198.51.100.' || (i % 250) END,
       CASE WHEN i % 6 >= 3 THEN 'Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7)' END,
       1
FROM seq
"""


def fill_store(path: Path, count: int) -> float:
    """Create the product's schema at `path` and add `count` events; returns the seconds it took."""
    started = time.monotonic()

    async def create() -> None:
        store = SqliteEventStore(path)
        await store.open()
        await store.close()

    asyncio.run(create())
    with sqlite3.connect(path) as db:
        db.execute(FILL, {"count": count})
    return time.monotonic() - started


def get(port: int, target: str) -> tuple[int, float]:
    """(status, milliseconds) of one authorised GET."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    started = time.perf_counter()
    connection.request("GET", target, headers={"Authorization": f"Bearer {project_secret(PROJECT)}"})
    response = connection.getresponse()
    response.read()
    elapsed = (time.perf_counter() - started) * 1000
    connection.close()
    return response.status, elapsed


def time_queries(port: int, repeats: int, label: str) -> dict[str, list[float]]:
    """Milliseconds of each stats query over the generated events, `repeats` times, from a running tracker."""
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(START))
    queries = {"one campaign": "/v1/stats?campaign=campaign-3", "whole project": f"/v1/stats?since={since}"}
    timings: dict[str, list[float]] = {name: [] for name in queries}
    for name, target in queries.items():
        for _ in range(repeats):
            status, elapsed = get(port, target)
            if status != 200:
                raise AssertionError(f"GET {target} over {label} answered {status}")
            timings[name].append(elapsed)
    return timings


def run(quick: bool, smoke: bool = False) -> list[dict[str, Any]]:
    mode = Mode(quick, smoke)
    sizes = mode.pick(full=[100_000], quick=[100_000], smoke=[2_000])  # 1 M: the store case, on both backends
    repeats = mode.pick(full=5, quick=3, smoke=1)
    rows = []
    for size in sizes:
        label = f"{size // 1000} k events" if size < 1_000_000 else f"{size // 1_000_000} M events"
        with tempfile.TemporaryDirectory(prefix="bench-stats-") as tmp:
            work = Path(tmp)
            store = work / "events.db"
            fill_seconds = fill_store(store, size)
            port = free_port()
            config = write_config(work / "stats.toml", relay_port=free_port(), tracker_port=port, store=store,
                                  upstream=f"outbox:///{work}/outbox", projects={PROJECT: "ENABLED"})
            with Child("tracker", python("inflight.cli", "tracker", "--config", config), port, work):
                status, _ = get(port, "/v1/stats")
                if status == 404:
                    return [skipped(CASE, "GET /v1/stats", "the tracker answers 404: /v1/stats is not there yet")]
                for name, timings in time_queries(port, repeats, label).items():
                    rows.append(row(CASE, f"{label}: {name}", "ms", timings,
                                    max_value=1000 if size <= 100_000 else None,
                                    note=f"store filled in {fill_seconds:.1f} s"))
    return rows
