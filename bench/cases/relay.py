"""Relay throughput: messages/s through `inflight relay` (own process) into a real SMTP sink (own process).

One relay serves two projects, `on` (tracking ENABLED) and `off` (DISABLED, the baseline), so both
run on the same process, store and upstream; the floor is the load generator sending straight to
the sink. Rounds of the variants are interleaved so that a noisy neighbour hurts them alike.
Afterwards the sink must have received exactly the copies the relay answered 250 for.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from bench.harness import (
    Child,
    Mode,
    free_port,
    marketing_message,
    project_secret,
    python,
    row,
    run_json,
    sized,
    transactional_message,
    write_config,
)
from bench.sink import sink_stats

CASE = "relay"
CONNECTIONS = 8  # as Postfix's smtp-source -s 8 in the peer anchor


def sink_counters(port: int) -> tuple[int, int]:
    """(transactions, recipients) the sink has received so far."""
    stats = sink_stats(port)
    return stats["messages"], stats["recipients"]


def run(quick: bool, smoke: bool = False) -> list[dict[str, Any]]:
    mode = Mode(quick, smoke)
    rounds = mode.pick(full=3, quick=2, smoke=1)
    # Smoke: long enough that a loaded CI box completes a 5-copy tracked message inside the window (0.3 s did not).
    seconds = mode.pick(full=3.0, quick=0.8, smoke=1.0)
    warmup = mode.pick(full=0.5, quick=0.3, smoke=0.1)
    size, links = mode.pick(full=(50_000, 50), quick=(50_000, 50), smoke=(5_000, 5))
    with tempfile.TemporaryDirectory(prefix="bench-relay-") as tmp:
        work = Path(tmp)
        messages = {
            "marketing": work / "marketing.eml",
            "transactional": work / "transactional.eml",
        }
        messages["marketing"].write_bytes(marketing_message(size, links))
        messages["transactional"].write_bytes(transactional_message(2_000))
        sink_port, relay_port = free_port(), free_port()
        config = write_config(
            work / "relay.toml", relay_port=relay_port, tracker_port=free_port(), store=work / "events.db",
            upstream=f"smtp+insecure://127.0.0.1:{sink_port}", projects={"on": "ENABLED", "off": "DISABLED"},
        )
        big = sized(messages["marketing"].read_bytes())
        small = sized(messages["transactional"].read_bytes())
        shapes = [
            (f"{big}/{links} links, 1 rcpt", "marketing", 1),
            (f"{big}/{links} links, 5 rcpts", "marketing", 5),
            (f"{small} transactional, 1 rcpt", "transactional", 1),
        ]
        # variant → (port, project or None for the floor, message, recipients, copies per message)
        variants: dict[str, tuple[int, str | None, str, int, int]] = {
            f"{shapes[0][0]}: client → sink (floor)": (sink_port, None, "marketing", 1, 1),
        }
        for label, message, recipients in shapes:
            variants[f"{label}: tracking off"] = (relay_port, "off", message, recipients, 1)
            variants[f"{label}: tracking on"] = (relay_port, "on", message, recipients, recipients)
        samples: dict[str, list[float]] = {name: [] for name in variants}

        with Child("sink", python("bench.sink", "--port", sink_port), sink_port, work), \
                Child("relay", python("inflight.cli", "relay", "--config", config), relay_port, work) as relay:
            for _ in range(rounds):
                for name, (port, project, message, recipients, copies) in variants.items():
                    before = sink_counters(sink_port)
                    argv = python("bench.smtpload", "--port", port, "--message", messages[message],
                                  "--connections", CONNECTIONS, "--recipients", recipients,
                                  "--seconds", seconds, "--warmup", warmup)
                    if project is not None:
                        argv += ["--user", project, "--password", project_secret(project)]
                    result = run_json(argv, timeout=seconds + warmup + 60)
                    after = sink_counters(sink_port)
                    delivered = (after[0] - before[0], after[1] - before[1])
                    expected = (result["accepted"] * copies, result["accepted"] * recipients)
                    if result["refused"] or delivered != expected:
                        raise AssertionError(f"{name}: refused {result['refused']}, sink got {delivered} "
                                             f"(transactions, recipients), expected {expected}\n{relay.log_tail()}")
                    samples[name].append(result["rate"])

    names = list(variants)
    rows = [row(CASE, names[0], "msg/s", samples[names[0]])]
    for label, _, recipients in shapes:
        off, on = f"{label}: tracking off", f"{label}: tracking on"
        floor = names[0] if off.startswith(shapes[0][0]) else None
        rows.append(row(CASE, off, "msg/s", samples[off], baseline=(floor, samples[floor]) if floor else None))
        # Issue 15: >= 0.70 with one recipient, >= 0.5 with five (each tracked recipient is a copy of its own).
        rows.append(row(CASE, on, "msg/s", samples[on], baseline=(off, samples[off]), min_ratio=0.70 if recipients == 1 else 0.5))
    return rows
