"""What the bench cases share: sizes per mode, result rows, servers in child processes, test messages.

Every server under test and every load generator runs in its own process (`Child`, `run_json`),
so a case measures the product the way it is deployed and the load never steals the server's
interpreter. Messages are generated, not read from the corpus, so a run is reproducible anywhere.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

PROJECT_SECRET = "bench-project-secret"
TRACKER_SECRET = "bench-tracker-secret"
SHOP = "https://shop.example.com"


@dataclass(frozen=True)
class Mode:
    """How hard a case works: the default run, BENCH_QUICK=1, or the CI smoke test (tiny sizes)."""

    quick: bool = False
    smoke: bool = False

    def pick(self, *, full: T, quick: T, smoke: T) -> T:
        return smoke if self.smoke else quick if self.quick else full


# --- rows --------------------------------------------------------------------------------------


def row(
    case: str,
    variant: str,
    unit: str,
    samples: Sequence[float],
    *,
    baseline: tuple[str, Sequence[float]] | None = None,
    min_ratio: float | None = None,
    max_ratio: float | None = None,
    min_value: float | None = None,
    max_value: float | None = None,
    note: str = "",
) -> dict[str, Any]:
    """One result: median/min/max of `samples`, and its ratio to a baseline measured in the same run.

    A budget bounds the ratio to the baseline (`min_ratio`, `max_ratio`) or the median itself
    (`min_value`, `max_value`, in `unit`); `met` says whether this run met it.
    """
    median = statistics.median(samples)
    result: dict[str, Any] = {
        "case": case, "variant": variant, "unit": unit,
        "median": median, "min": min(samples), "max": max(samples), "samples": list(samples),
        "baseline": None, "ratio": None, "budget": None, "met": None, "note": note,
    }
    if baseline is not None:
        name, base_samples = baseline
        result["baseline"] = name
        result["ratio"] = median / statistics.median(base_samples)
    ratio = result["ratio"]
    if min_ratio is not None:
        result["budget"], result["met"] = f"ratio >= {min_ratio:.2f}", ratio is not None and ratio >= min_ratio
    if max_ratio is not None:
        result["budget"], result["met"] = f"ratio <= {max_ratio:.2f}", ratio is not None and ratio <= max_ratio
    if min_value is not None:
        result["budget"], result["met"] = f">= {min_value:g} {unit}", median >= min_value
    if max_value is not None:
        result["budget"], result["met"] = f"<= {max_value:g} {unit}", median <= max_value
    return result


def skipped(case: str, variant: str, reason: str) -> dict[str, Any]:
    """A case that cannot run here says why, on stdout at once and in the results."""
    print(f"skip {case}: {variant}: {reason}", flush=True)
    return {"case": case, "variant": variant, "unit": "", "median": None, "min": None, "max": None, "samples": [],
            "baseline": None, "ratio": None, "budget": None, "met": None, "note": f"skipped: {reason}"}


# --- processes and ports -----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def python(module: str, *args: object) -> list[str]:
    """argv running `python -m module args` with this interpreter (the project's venv)."""
    return [sys.executable, "-m", module, *map(str, args)]


def cpu_seconds(pid: int, *, descendants: bool = True) -> float:
    """CPU time of a process, with its descendants (its workers and their recorders, running or exited)
    unless `descendants` is False."""
    pids, index = [pid], 0
    while descendants and index < len(pids):
        pids += [int(p) for p in subprocess.run(["pgrep", "-P", str(pids[index])], capture_output=True, text=True).stdout.split()]
        index += 1
    total = 0.0
    for each in pids:
        try:
            fields = Path(f"/proc/{each}/stat").read_text().rpartition(")")[2].split()
        except FileNotFoundError:
            continue
        total += sum(int(f) for f in fields[11:15 if descendants else 13]) / os.sysconf("SC_CLK_TCK")  # utime stime [cutime cstime]
    return total


class Child:
    """A server in its own process, ready once its port accepts; stopped with SIGTERM like in production."""

    def __init__(self, name: str, argv: list[str], port: int, log_dir: Path, *, ready_seconds: float = 20.0) -> None:
        self.name = name
        self.argv = argv
        self.port = port
        self.log_path = log_dir / f"{name}.log"
        self.ready_seconds = ready_seconds
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Child:
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + self.ready_seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.name} did not listen on port {self.port} within {self.ready_seconds:g} s:\n{self.log_tail()}")

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def run_json(argv: list[str], *, timeout: float) -> dict[str, Any]:
    """Run a load generator to completion and return the JSON object it prints last."""
    done = subprocess.run(argv, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:4])}… exited {done.returncode}:\n{done.stderr.decode(errors='replace')[-2000:]}")
    return dict(json.loads(done.stdout.decode().strip().splitlines()[-1]))


def write_config(
    path: Path,
    *,
    relay_port: int,
    tracker_port: int,
    store: Path | str,
    upstream: str,
    projects: dict[str, str],
    workers: int | None = None,
) -> Path:
    """An inflight TOML config for one bench: `store` is a SQLite file or a store URL, `projects` maps
    project id → tracking mode.

    `workers` sets relay and tracker workers; None leaves the default (one per core), as deployed.
    """
    per_process = [f"workers = {workers}"] if workers is not None else []
    lines = [
        "[relay]", f'listen = "127.0.0.1:{relay_port}"', 'hostname = "relay.bench.example"',
        "allow_plaintext_auth = true", "max_recipients = 50", *per_process, "",
        "[tracker]", f'listen = "127.0.0.1:{tracker_port}"', f'public_url = "http://127.0.0.1:{tracker_port}"',
        f'secrets = ["{TRACKER_SECRET}"]', *per_process, "",
        "[store]", f'url = "{store if isinstance(store, str) else f"sqlite:///{store}"}"', "",
        "[upstream]", f'url = "{upstream}"', "",
    ]
    for project, tracking in projects.items():
        lines += ["[[projects]]", f'id = "{project}"', f'secret = "{project}-{PROJECT_SECRET}"', f'tracking = "{tracking}"', ""]
    path.write_text("\n".join(lines))
    return path


def project_secret(project: str) -> str:
    return f"{project}-{PROJECT_SECRET}"


# --- messages ----------------------------------------------------------------------------------


def marketing_html(size: int, links: int) -> str:
    """A table-layout newsletter of about `size` characters with `links` distinct tracked-style links."""
    head = (
        '<!DOCTYPE html><html><head><meta charset="utf-8"><title>Spring sale</title>'
        "<style>td{font-family:Arial,sans-serif;font-size:14px;color:#333}.btn{background:#e63;color:#fff}</style>"
        '</head><body style="margin:0;padding:0"><table role="presentation" width="100%" cellpadding="0" cellspacing="0">'
    )
    tail = '<tr><td>You receive this because you subscribed. <a href="{{unsubscribe}}">Unsubscribe</a></td></tr></table></body></html>'
    blocks = []
    for index in range(links):
        blocks.append(
            f'<tr><td class="item"><a href="{SHOP}/p/{index}?utm_source=newsletter&amp;utm_medium=email&amp;utm_campaign=spring">'
            f'<img src="{SHOP}/img/{index}.jpg" width="280" alt="Product {index}"></a>'
            f"<p>Product {index}: hand-made, limited run. "
        )
    filler = "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt. "
    room = max(0, size - len(head) - len(tail) - sum(len(b) + 14 for b in blocks))
    per_block = room // max(1, links)
    body = "".join(f"{b}{(filler * (per_block // len(filler) + 1))[:per_block]}</p></td></tr>" for b in blocks)
    return head + body + tail


def marketing_message(size: int, links: int) -> bytes:
    """multipart/alternative, text + HTML (quoted-printable), about `size` bytes on the wire.

    No Message-ID: the relay adds a fresh one per message, so no retry/duplicate logic ever
    sees the same message twice across a run.
    """
    html_size = size
    for _ in range(3):  # headers, the text part and quoted-printable add to the HTML: converge on `size`
        data = _marketing(marketing_html(html_size, links))
        html_size += size - len(data)
    return data


def _marketing(html: str) -> bytes:
    message = EmailMessage()
    message["From"] = "Shop <news@shop.example.com>"
    message["To"] = "reader@example.net"
    message["Subject"] = "Spring sale: 50 picks for you"
    message["X-Inflight-Template-Type"] = "MARKETING"
    message["X-Inflight-Campaign"] = "spring-sale"
    message.set_content("Spring sale. Open the HTML version to see the products.\n", cte="quoted-printable")
    message.add_alternative(html, subtype="html", cte="quoted-printable")
    return message.as_bytes(policy=message.policy.clone(linesep="\r\n"))


def transactional_message(size: int) -> bytes:
    """A receipt: text + small HTML with two links, about `size` bytes."""
    filler = "Item: one pair of walking shoes, size 42, colour dark blue. Qty 1. EUR 89.00\n"
    text = "Thank you for your order #12345.\n" + filler * max(1, (size // 2 - 400) // len(filler))
    html = (
        f'<html><body><p>Thank you for your order <a href="{SHOP}/orders/12345">#12345</a>.</p>'
        f"<pre>{text}</pre><p><a href=\"{SHOP}/help\">Help</a></p></body></html>"
    )
    message = EmailMessage()
    message["From"] = "Shop <orders@shop.example.com>"
    message["To"] = "buyer@example.net"
    message["Subject"] = "Your order #12345"
    message["X-Inflight-Template-Type"] = "TRANSACTIONAL"
    message.set_content(text)
    message.add_alternative(html, subtype="html")
    return message.as_bytes(policy=message.policy.clone(linesep="\r\n"))


def sized(data: bytes) -> str:
    return f"{len(data) / 1000:.0f} KB" if len(data) >= 1000 else f"{len(data)} B"
