"""Peak memory of `inflight relay` (and its worker processes) while large tracked messages go through.

A 20 MB HTML newsletter with 100 k links is sent once alone, then 4 at once on 4 connections,
through `inflight relay` (one SMTP worker, its CPU pool) into the fast sink. A thread samples the
resident memory of the relay and every process below it every 10 ms. Reported: the peak above
the idle relay, per message, as a multiple of the larger of what came in and what went out.
Budget (README "Memory"): at most 3× per message in flight.

Idle means warmed up: as many messages as the CPU pool has processes are sent at once first, so
every pool process has started and imported what it runs (~50 MB each, once per process, not
per message). Copies wait in files in the relay's TMPDIR: page cache, not resident memory, when
that is on disk; the note names its file system, since on tmpfs they would be RAM after all.
"""

from __future__ import annotations

import contextlib
import smtplib
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from bench.harness import Child, Mode, free_port, project_secret, python, row, write_config
from bench.sink import sink_stats
from config.settings import RelaySettings

CASE = "memory"
BUDGET = 3.0
SAMPLE_SECONDS = 0.01
CPU_WORKERS = RelaySettings.cpu_workers  # the relay's default, which the bench's config keeps


def file_system(path: str) -> str:
    """The type of the file system `path` is on (its longest mount point), from /proc/mounts."""
    best, kind = "", "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            _, mount, fs, *_ = line.split()
            if (path == mount or path.startswith(mount.rstrip("/") + "/")) and len(mount) > len(best):
                best, kind = mount, fs
    return kind


def tree(pid: int) -> set[int]:
    """`pid` and every process below it."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    found, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, of in parents.items() if of == parent and child not in found]
        found.update(children)
        frontier.extend(children)
    return found


def rss_bytes(pids: set[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


class PeakRss:
    """The highest summed RSS of a process tree while the block runs (the tree re-read every 0.2 s)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        pids, listed = tree(self.pid), time.monotonic()
        while not self._stop.is_set():
            if time.monotonic() - listed > 0.2:
                pids, listed = tree(self.pid), time.monotonic()
            self.peak = max(self.peak, rss_bytes(pids))
            time.sleep(SAMPLE_SECONDS)


def newsletter(size: int, links: int) -> bytes:
    """An HTML message (quoted-printable) of about `size` bytes with `links` distinct links, text filling the rest."""
    link = '<p><a href="https://shop.example.com/p/{0}?utm_campaign=spring">Product {0}</a> '
    filler = "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor. "
    per_link = max(0, size // links - len(link) - 12)
    text = (filler * (per_link // len(filler) + 1))[:per_link]
    html = "<html><body>" + "".join(link.format(n) + text + "</p>\n" for n in range(links)) + "</body></html>"
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = "Shop <news@shop.example.com>", "reader@example.net", "Sale"
    message["X-Inflight-Template-Type"] = "MARKETING"
    message.set_content(html, subtype="html", cte="quoted-printable")
    return message.as_bytes(policy=message.policy.clone(linesep="\r\n"))


def send(port: int, message: bytes, index: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=300) as client:
        client.login("on", project_secret("on"))
        client.sendmail("news@shop.example.com", [f"reader{index}@example.net"], message)


def run(quick: bool, smoke: bool = False) -> list[dict[str, Any]]:
    mode = Mode(quick, smoke)
    size, links = mode.pick(full=(20_000_000, 100_000), quick=(20_000_000, 100_000), smoke=(2_000_000, 2_000))
    message = newsletter(size, links)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        work = Path(tmp)
        sink_port, relay_port = free_port(), free_port()
        config = write_config(work / "relay.toml", relay_port=relay_port, tracker_port=free_port(), store=work / "events.db",
                              upstream=f"smtp+insecure://127.0.0.1:{sink_port}", projects={"on": "ENABLED"}, workers=1)
        with Child("sink", python("bench.sink", "--port", sink_port), sink_port, work), \
                Child("relay", python("inflight.cli", "relay", "--config", config), relay_port, work) as relay:
            assert relay.process is not None
            with ThreadPoolExecutor(CPU_WORKERS) as senders:  # warm-up: the CPU pool's processes start and stay
                list(senders.map(lambda i: send(relay_port, message, i), range(CPU_WORKERS)))
            for concurrent in (1, 4):
                time.sleep(1.0)
                idle = rss_bytes(tree(relay.process.pid))
                before = sink_stats(sink_port)
                with PeakRss(relay.process.pid) as peak, ThreadPoolExecutor(concurrent) as senders:
                    list(senders.map(lambda i: send(relay_port, message, i), range(concurrent)))
                after = sink_stats(sink_port)
                if after["messages"] - before["messages"] != concurrent:
                    raise AssertionError(f"sink got {after['messages'] - before['messages']} of {concurrent}\n{relay.log_tail()}")
                out = (after["bytes"] - before["bytes"]) / concurrent
                larger = max(len(message), out)
                above = peak.peak - idle
                rows.append(row(CASE, f"{concurrent} × {len(message) / 1e6:.0f} MB/{links // 1000} k links at once",
                                "×", [above / (concurrent * larger)], max_value=BUDGET,
                                note=f"peak {peak.peak / 1e6:.0f} MB, idle {idle / 1e6:.0f} MB, "
                                     f"in {len(message) / 1e6:.1f} MB, out {out / 1e6:.1f} MB per message, "
                                     f"TMPDIR on {file_system(tempfile.gettempdir())}"))
    return rows
