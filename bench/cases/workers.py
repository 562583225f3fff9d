"""Every core: the tracker's redirects/s with `[tracker] workers = 2` against 1, same store, same load.

Two `inflight tracker` processes groups (1 worker, then 2 on a shared listening socket) answer
the same redirect load from `bench.httpload` (16 keep-alive connections, own process). The
ratio is what a second core buys (budget ≥ 1.7; on a 2-core machine the load generator takes
its share too). Afterwards each store must hold one click per answered redirect.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from bench.cases.tracker import CONNECTIONS, mint_paths, stored_once_drained
from bench.harness import Child, Mode, free_port, python, row, run_json, write_config

CASE = "workers"


def run(quick: bool, smoke: bool = False) -> list[dict[str, Any]]:
    mode = Mode(quick, smoke)
    rounds = mode.pick(full=3, quick=2, smoke=1)
    seconds = mode.pick(full=3.0, quick=0.8, smoke=0.3)
    warmup = mode.pick(full=0.5, quick=0.3, smoke=0.1)
    rates: dict[int, list[float]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as tmp:
        work = Path(tmp)
        for workers in rates:
            port = free_port()
            store = work / f"events-{workers}.db"
            config = write_config(work / f"tracker-{workers}.toml", relay_port=free_port(), tracker_port=port, store=store,
                                  upstream=f"outbox:///{work}/outbox", projects={"bench": "ENABLED"}, workers=workers)
            _, clicks = mint_paths(f"http://127.0.0.1:{port}", mode.pick(full=20_000, quick=10_000, smoke=50), store)
            paths = work / f"click-{workers}.txt"
            paths.write_text("\n".join(clicks))
            answered = 0
            with Child(f"tracker-{workers}", python("inflight.cli", "tracker", "--config", config), port, work) as tracker:
                for _ in range(rounds):
                    result = run_json(python("bench.httpload", "--port", port, "--paths", paths, "--connections",
                                             CONNECTIONS, "--seconds", seconds, "--warmup", warmup),
                                      timeout=seconds + warmup + 60)
                    if set(result["status"]) != {"302"}:
                        raise AssertionError(f"{workers} worker(s): answers {result['status']}\n{tracker.log_tail()}")
                    answered += result["status"]["302"]
                    rates[workers].append(result["rate"])
                stored = stored_once_drained(store, {"email.click": answered}).get("email.click", 0)
            if stored != answered:
                raise AssertionError(f"{workers} worker(s): store holds {stored} clicks, the tracker answered {answered}")
    one = ("redirect: 1 worker", rates[1])
    return [
        row(CASE, one[0], "req/s", rates[1]),
        row(CASE, "redirect: 2 workers", "req/s", rates[2], baseline=one, min_ratio=1.7),
    ]
