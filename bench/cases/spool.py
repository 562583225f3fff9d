"""Spool: what making every hit durable before its answer costs, and what group commit saves.

Appends of a tracker-sized record (about 600 bytes of JSON) to the spool (store/spool.py), each
awaited until written and fdatasync'd, by 1, 16 and 64 concurrent writers (16 is the tracker
bench's connection count), in this process on uvloop as `inflight` runs, with the store side
delivering at once. Reported: µs of wall time per durable hit, hits per fsync (the group size)
and fsyncs per second. The journal is in var/ (the default spool's disk, not a tmpfs): the
figures are that disk's fsync latency divided by the group size.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop

from bench.harness import Mode, row
from store.spool import Handler, Spool

CASE = "spool"
HIT = {"event": {"name": "email.click", "project": "shop", "contact": "c1@example.net", "recipient": "c1@example.net",
                 "message_id": "1.bench@relay.bench.example", "at": "2026-12-04T18:00:00.000000Z", "campaign": "spring",
                 "template_type": "MARKETING", "link": "https://shop.example.com/p/7?utm_source=newsletter",
                 "ip": "198.51.100.7", "user_agent": "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15",
                 "tracked": True, "uid": "0" * 32},
       "hit": {"kind": "click", "at": 1_780_000_000.0, "ip": "198.51.100.7", "user_agent": "Mozilla/5.0", "method": "GET",
               "purpose": None, "sent_at": 1_779_999_000, "link": "https://shop.example.com/p/7", "honeypot": False}}


async def _measure(directory: Path, writers: int, seconds: float) -> tuple[float, float, float]:
    """(µs per durable hit, hits per fsync, fsyncs per second) with `writers` concurrent appenders."""

    async def stored(items: list[Any]) -> None:
        return None

    spool = Spool(directory, store_url=f"bench:{writers}")
    spool.register("hit", Handler(decode=lambda body: body, deliver=stored))
    await spool.open()
    hits = 0
    deadline = time.perf_counter() + seconds

    async def writer() -> None:
        nonlocal hits
        while time.perf_counter() < deadline:
            await spool.append("hit", HIT)
            hits += 1

    started = time.perf_counter()
    await asyncio.gather(*(writer() for _ in range(writers)))
    elapsed = time.perf_counter() - started
    fsyncs = spool.fsyncs
    await spool.close()
    return elapsed / hits * 1e6, hits / fsyncs, fsyncs / elapsed


def run(quick: bool, smoke: bool = False) -> list[dict[str, Any]]:
    mode = Mode(quick, smoke)
    rounds = mode.pick(full=3, quick=2, smoke=1)
    seconds = mode.pick(full=2.0, quick=0.7, smoke=0.2)
    results: dict[int, list[tuple[float, float, float]]] = {1: [], 16: [], 64: []}
    Path("var").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-spool-", dir="var") as tmp:  # where the spool lives: a disk, not a tmpfs
        for _ in range(rounds):
            for writers in results:
                results[writers].append(uvloop.run(_measure(Path(tmp), writers, seconds)))
    alone = [us for us, _, _ in results[1]]
    rows = [row(CASE, "durable hit, 1 writer", "us/hit", alone,
                note=f"{_median([f for _, _, f in results[1]]):.0f} fsyncs/s")]
    for writers in (16, 64):
        grouped = [us for us, _, _ in results[writers]]
        rows.append(row(CASE, f"durable hit, {writers} concurrent writers", "us/hit", grouped,
                        baseline=("durable hit, 1 writer", alone), max_ratio=0.5,
                        note=f"{_median([g for _, g, _ in results[writers]]):.1f} hits per fsync, "
                             f"{_median([f for _, _, f in results[writers]]):.0f} fsyncs/s"))
    return rows


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]
