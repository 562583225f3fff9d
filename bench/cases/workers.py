"""Every core: the tracker's redirects/s with `[tracker] workers = 2` against 1, same load, rounds interleaved.

Two `inflight tracker` process groups (1 worker; 2 on a shared listening socket), each on its own
store, run side by side and take the same redirect load from `bench.httpload` (16 keep-alive
connections, own process) in alternate rounds, so both see the same machine. The ratio is what a
second core buys (budget ≥ 1.7). On a 2-core machine it cannot: one worker already keeps more than
one core busy (its event loop, the store's thread, the spool's fsync thread) and the load generator
takes its share too; the row notes the CPU the groups and the load generator used per request.
Afterwards each store must hold one click per answered redirect.
"""

from __future__ import annotations

import resource
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench.cases.tracker import CONNECTIONS, mint_paths, stored_once_drained
from bench.harness import Child, Mode, cpu_seconds, free_port, python, row, run_json, write_config

CASE = "workers"


def children_cpu() -> float:
    """CPU time of this process's children that have exited: here, the load generators run to completion."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(quick: bool, smoke: bool = False) -> list[dict[str, Any]]:
    mode = Mode(quick, smoke)
    rounds = mode.pick(full=3, quick=2, smoke=1)
    seconds = mode.pick(full=3.0, quick=0.8, smoke=0.3)
    warmup = mode.pick(full=0.5, quick=0.3, smoke=0.1)
    rates: dict[int, list[float]] = {1: [], 2: []}
    cpu: dict[int, float] = {1: 0.0, 2: 0.0}
    load_cpu: dict[int, float] = {1: 0.0, 2: 0.0}
    answered: dict[int, int] = {1: 0, 2: 0}
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as tmp, ExitStack() as running:
        work = Path(tmp)
        groups = {}
        for workers in rates:
            port = free_port()
            store = work / f"events-{workers}.db"
            config = write_config(work / f"tracker-{workers}.toml", relay_port=free_port(), tracker_port=port, store=store,
                                  upstream=f"outbox:///{work}/outbox", projects={"bench": "ENABLED"}, workers=workers)
            _, clicks = mint_paths(f"http://127.0.0.1:{port}", mode.pick(full=20_000, quick=10_000, smoke=50), store)
            paths = work / f"click-{workers}.txt"
            paths.write_text("\n".join(clicks))
            child = running.enter_context(Child(f"tracker-{workers}", python("inflight.cli", "tracker", "--config", config),
                                                port, work))
            groups[workers] = (port, store, paths, child)
        for _ in range(rounds):
            for workers, (port, _, paths, child) in groups.items():
                assert child.process is not None  # started by enter_context
                pid = child.process.pid
                before, load_before = cpu_seconds(pid), children_cpu()
                result = run_json(python("bench.httpload", "--port", port, "--paths", paths, "--connections",
                                         CONNECTIONS, "--seconds", seconds, "--warmup", warmup),
                                  timeout=seconds + warmup + 60)
                if set(result["status"]) != {"302"}:
                    raise AssertionError(f"{workers} worker(s): answers {result['status']}\n{child.log_tail()}")
                cpu[workers] += cpu_seconds(pid) - before
                load_cpu[workers] += children_cpu() - load_before
                answered[workers] += result["status"]["302"]
                rates[workers].append(result["rate"])
        for workers, (_, store, _, _) in groups.items():
            stored = stored_once_drained(store, {"email.click": answered[workers]}).get("email.click", 0)
            if stored != answered[workers]:
                raise AssertionError(f"{workers} worker(s): store holds {stored} clicks, the tracker answered {answered[workers]}")
    one = ("redirect: 1 worker", rates[1])

    def note(workers: int) -> str:
        per = max(1, answered[workers]) / 1e6
        return f"CPU per redirect: tracker {cpu[workers] / per:.0f} µs, load generator {load_cpu[workers] / per:.0f} µs"

    return [
        row(CASE, one[0], "req/s", rates[1], note=note(1)),
        row(CASE, "redirect: 2 workers", "req/s", rates[2], baseline=one, min_ratio=1.7, note=note(2)),
    ]
