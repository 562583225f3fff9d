"""Time `SqliteEventStore.stats` over a synthetic store and check its numbers against a plain-Python count.

    .venv/bin/python -m bench.stats_query [EVENTS]     # default 100000

Not a bench case (bench/cases/stats.py times `/v1/stats` over HTTP); this isolates the SQL.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from store.model import StatsCounts, StatsQuery
from store.sql import COLUMNS, HUMAN
from store.sqlite import SqliteEventStore

AGENTS = (None, "human", "image_proxy", "apple_mpp", "scanner", "prefetch")
HUMAN_AGENTS = (None, "human", "image_proxy")
LINKS = tuple(f"https://example.com/p/{n}" for n in range(10))


def synthetic_events(total: int, seed: int = 7) -> list[dict[str, Any]]:
    """20 % sends (100 recipients a message), 50 % opens, 30 % clicks, over three campaigns."""
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    sends = total // 5
    pairs = []
    for n in range(sends):
        message, contact = f"m{n // 100}", f"c{n}@example.com"
        campaign = ("spring", "summer", "autumn")[(n // 100) % 3]
        pairs.append((message, contact, campaign))
        rows.append({"name": "email.sent", "message_id": message, "contact": contact, "campaign": campaign,
                     "tracked": 1, "link": None, "agent": None})
    for n in range(total - sends):
        message, contact, campaign = rng.choice(pairs)
        click = n % 5 >= 3
        rows.append({"name": "email.click" if click else "email.open", "message_id": message, "contact": contact,
                     "campaign": campaign, "tracked": 1, "link": rng.choice(LINKS) if click else None,
                     "agent": rng.choice(AGENTS)})
    for n, row in enumerate(rows):
        row.update(project="bench", recipient=row["contact"], template=f"t-{row['campaign']}",
                   at=f"2026-03-01T{n // 3_600_000 % 24:02d}:{n // 60000 % 60:02d}:{n // 1000 % 60:02d}.{n % 1000:06d}Z")
    return rows


def expected(rows: list[dict[str, Any]], campaign: str) -> dict[str, Any]:
    """The same figures, counted in Python: what the SQL must agree with."""
    mine = [r for r in rows if r["campaign"] == campaign]
    out: dict[str, Any] = {"delivered": sum(r["name"] == "email.sent" for r in mine)}
    for kind in ("open", "click"):
        hits = [r for r in mine if r["name"] == f"email.{kind}"]
        human = [r for r in hits if r["agent"] in HUMAN_AGENTS]
        out[f"{kind}s"] = (len({(r["message_id"], r["contact"]) for r in hits}), len(hits),
                           len({(r["message_id"], r["contact"]) for r in human}), len(human))
    links: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for r in mine:
        if r["name"] == "email.click":
            links[r["link"]][0] += 1
            links[r["link"]][1] += r["agent"] in HUMAN_AGENTS
    out["links"] = dict(links)
    return out


def observed(stats: StatsCounts) -> dict[str, Any]:
    out: dict[str, Any] = {"delivered": stats.delivered}
    for kind in ("opens", "clicks"):
        s = getattr(stats, kind)
        out[kind] = (s.unique, s.total, s.unique_human, s.total_human)
    out["links"] = {link.link: [link.total, link.total_human] for link in stats.links}
    return out


async def measure(total: int, repeats: int = 7) -> None:
    rows = synthetic_events(total)
    with tempfile.TemporaryDirectory() as tmp:
        store = SqliteEventStore(Path(tmp) / "bench.db")
        await store.open()
        try:
            columns = [c for c in COLUMNS if c in rows[0]] + ["agent"]
            await store.db.executemany(
                f"INSERT INTO events ({', '.join(columns)}) VALUES ({', '.join('?' for _ in columns)})",
                [[row[c] for c in columns] for row in rows])
            await store.db.commit()
            await store.db.execute("ANALYZE")
            want = expected(rows, "spring")
            got = observed(await store.stats(StatsQuery(project="bench", campaign="spring")))
            assert got == want, f"stats disagree with the reference count:\n{got}\n{want}"
            print(f"{total} events; campaign 'spring' holds {sum(r['campaign'] == 'spring' for r in rows)}; "
                  f"numbers match the reference count (human = {HUMAN})")
            queries = {
                "campaign=spring": StatsQuery(project="bench", campaign="spring"),
                "template=t-spring": StatsQuery(project="bench", template="t-spring"),
                "whole project": StatsQuery(project="bench"),
                "campaign=spring since=…": StatsQuery(project="bench", campaign="spring", since="2026-03-01T00:00:50Z"),
            }
            for label, query in queries.items():
                times = []
                for _ in range(repeats):
                    started = time.perf_counter()
                    await store.stats(query)
                    times.append((time.perf_counter() - started) * 1000)
                print(f"  {label:<28} median {statistics.median(times):7.1f} ms  min {min(times):7.1f}  max {max(times):7.1f}")
        finally:
            await store.close()


if __name__ == "__main__":
    asyncio.run(measure(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000))
