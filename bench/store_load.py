"""Store write load: concurrent callers recording pixel hits through the store's own interface.

Each caller records opens one after another, as a tracker's request handlers do (the verdict's
history read included), over many messages of one campaign; the store is opened by URL, so the same
load runs on every backend. Throughput and latency are taken over the measured window after a
warm-up; every call is waited for, and the count of all calls made is printed for the caller to
compare with the rows stored. Prints one JSON line.

    python -m bench.store_load --url sqlite:///x.db --seconds 3 --writers 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Mapping
from typing import Any

import uvloop

from store import open_store
from store.model import Decision, Judgement, NewEvent, now_rfc3339

PROJECT = "bench"


def human(history: list[Mapping[str, Any]]) -> Decision:
    return "human", "bench", {}


async def writer(store: Any, index: int, messages: int, start: float, stop: float, latencies: list[float],
                 made: list[int]) -> None:
    sequence = index
    while (sent := time.monotonic()) < stop:
        message = sequence % messages
        sequence += 7919  # a prime stride: callers spread over the messages, each message sees a few hits
        event = NewEvent(name="email.open", project=PROJECT, contact=f"c{message}@example.net",
                         recipient=f"c{message}@example.net", message_id=f"{message}.bench@relay.bench.example",
                         at=now_rfc3339(), campaign="spring", template_type="MARKETING", tracked=True,
                         ip="198.51.100.7", user_agent="Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7)")
        await store.record_engagements([(event, Judgement(since="1970-01-01T00:00:00Z", decide=human))])
        made[0] += 1
        if sent >= start:
            latencies.append(time.monotonic() - sent)


async def load(args: argparse.Namespace) -> dict[str, object]:
    store = open_store(args.url)
    await store.open()
    try:
        latencies: list[float] = []
        made = [0]
        start = time.monotonic() + args.warmup
        stop = start + args.seconds
        await asyncio.gather(*(writer(store, n, args.messages, start, stop, latencies, made) for n in range(args.writers)))
    finally:
        await store.close()
    latencies.sort()
    return {
        "rate": len(latencies) / args.seconds,
        "p50_ms": latencies[len(latencies) // 2] * 1000 if latencies else None,
        "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000 if latencies else None,
        "recorded": made[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True, help="store URL: sqlite:///path or postgresql://...")
    parser.add_argument("--seconds", type=float, default=3.0, help="measured window")
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--writers", type=int, default=32, help="concurrent callers")
    parser.add_argument("--messages", type=int, default=20_000, help="distinct messages the hits are spread over")
    print(json.dumps(uvloop.run(load(parser.parse_args()))))


if __name__ == "__main__":
    main()
