"""Peer anchor: inflight driven by Postfix's own C load generator, beside Postfix's published figures.

`smtp-source -s 8` (one connection per message, as Postfix's anchor runs) sends into `smtp-sink`
directly (the floor) and through inflight (`bench.noauth_relay`: smtp-source cannot AUTH) into
the same `smtp-sink`. On these 2-core machines Postfix 3.7 relays 50 KB messages at ~300 msg/s
end to end (~350 msg/s at 2 KB) while the floor is ~1,250 msg/s: Postfix reaches about 0.24 of
its floor, the ratio to compare ours with. Skipped, with the reason, where Postfix's tools are
absent (Debian package `postfix`; CI does not install it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.harness import (
    Child,
    Mode,
    free_port,
    marketing_message,
    python,
    row,
    sized,
    skipped,
    transactional_message,
    write_config,
)

CASE = "postfix"
SESSIONS = 8
POSTFIX_FIGURES = "Postfix 3.7 on this kind of machine: ~300 msg/s at 50 KB, ~350 at 2 KB, floor ~1,250 (ratio ~0.24)"


def postfix_tool(name: str) -> str | None:
    return shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None)


def send(source: str, port: int, message: Path, count: int) -> float:
    """Seconds smtp-source takes to send `count` messages over SESSIONS parallel sessions."""
    started = time.monotonic()
    done = subprocess.run(
        [source, "-s", str(SESSIONS), "-m", str(count), "-F", str(message), "-f", "news@shop.example.com",
         "-t", "reader@example.net", f"127.0.0.1:{port}"],
        capture_output=True, timeout=300, check=False, stdin=subprocess.DEVNULL,
    )
    if done.returncode != 0:
        raise AssertionError(f"smtp-source exited {done.returncode}: {done.stderr.decode(errors='replace')[-500:]}")
    return time.monotonic() - started


def run(quick: bool, smoke: bool = False) -> list[dict[str, Any]]:
    source, sink = postfix_tool("smtp-source"), postfix_tool("smtp-sink")
    if source is None or sink is None:
        return [skipped(CASE, "smtp-source → inflight → smtp-sink",
                        "Postfix's smtp-source/smtp-sink not installed (Debian package postfix)")]
    mode = Mode(quick, smoke)
    rounds = mode.pick(full=3, quick=1, smoke=1)
    seconds = mode.pick(full=2.5, quick=1.0, smoke=0.2)
    size, links = mode.pick(full=(50_000, 50), quick=(50_000, 50), smoke=(5_000, 5))
    with tempfile.TemporaryDirectory(prefix="bench-postfix-") as tmp:
        work = Path(tmp)
        files = {}
        for name, data in (("marketing", marketing_message(size, links)), ("transactional", transactional_message(2_000))):
            files[name] = work / f"{name}.txt"  # smtp-source -F wants plain lines; it adds the CRLFs
            files[name].write_bytes(data.replace(b"\r\n", b"\n"))
        big, small = sized(marketing_message(size, links)), sized(transactional_message(2_000))
        sink_port, on_port, off_port = free_port(), free_port(), free_port()
        user = ["-u", "nobody"] if os.geteuid() == 0 else []  # smtp-sink refuses to keep root privileges
        configs = {
            project: write_config(work / f"{project}.toml", relay_port=port, tracker_port=free_port(),
                                  store=work / f"{project}.db", upstream=f"smtp+insecure://127.0.0.1:{sink_port}",
                                  projects={project: mode_name})
            for project, port, mode_name in (("on", on_port, "ENABLED"), ("off", off_port, "DISABLED"))
        }
        variants = {
            f"{big}: smtp-source → smtp-sink (floor)": (sink_port, "marketing"),
            f"{big}/{links} links: → inflight, tracking off → smtp-sink": (off_port, "marketing"),
            f"{big}/{links} links: → inflight, tracking on → smtp-sink": (on_port, "marketing"),
            f"{small}: smtp-source → smtp-sink (floor)": (sink_port, "transactional"),
            f"{small} transactional: → inflight, tracking on → smtp-sink": (on_port, "transactional"),
        }
        samples: dict[str, list[float]] = {name: [] for name in variants}
        sent = {on_port: 0, off_port: 0, sink_port: 0}
        with Child("smtp-sink", [sink, *user, f"127.0.0.1:{sink_port}", "1024"], sink_port, work), \
                Child("relay-on", python("bench.noauth_relay", "--config", configs["on"], "--project", "on"), on_port, work) as on, \
                Child("relay-off", python("bench.noauth_relay", "--config", configs["off"], "--project", "off"), off_port, work) as off:
            for _ in range(rounds):
                for name, (port, message) in variants.items():
                    warmup = mode.pick(full=80, quick=40, smoke=8)
                    rate = warmup / send(source, port, files[message], warmup)  # warms up and sizes the run
                    count = max(SESSIONS, int(rate * seconds))
                    samples[name].append(count / send(source, port, files[message], count))
                    sent[port] += warmup + count
            relayed = {port: relay.log_path.read_text().count("outcome=queued") for port, relay in ((on_port, on), (off_port, off))}
        for port, count in relayed.items():
            if count != sent[port]:
                raise AssertionError(f"relay on port {port} queued {count} messages, smtp-source sent {sent[port]}")

    names = list(variants)
    floor, small_floor = names[0], names[3]
    return [
        row(CASE, floor, "msg/s", samples[floor], note=POSTFIX_FIGURES),
        row(CASE, names[1], "msg/s", samples[names[1]], baseline=(floor, samples[floor])),
        row(CASE, names[2], "msg/s", samples[names[2]], baseline=(floor, samples[floor]),
            note="Postfix relaying 50 KB reaches ~0.24 of this floor"),
        row(CASE, small_floor, "msg/s", samples[small_floor]),
        row(CASE, names[4], "msg/s", samples[names[4]], baseline=(small_floor, samples[small_floor])),
    ]
