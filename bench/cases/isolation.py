"""Does a 25 MB tracked message stall other SMTP sessions? Inline vs thread pool vs process pool.

Every party runs in its own process, so no GIL is shared with what is measured: the fast sink
(bench/sink.py), the relay (this module run as `relay VARIANT`), and a client sending one 25.7 MB
HTML message with an attachment (`big`). Meanwhile this process sends small tracked messages on
another connection and records each transaction's latency (MAIL to the DATA reply) until the
big message got its reply. Every message is tracked and DKIM-signed.

Variants: `inline` (MIME parse, rewrite, DKIM signing and dot-stuffing on the event loop),
`thread` (in a thread pool: the loop stays free only while the worker releases the GIL),
`process` (in a process pool, what `inflight relay` does). Budget: the slowest small message of
a run under 100 ms, for the relay as shipped (`process`).
"""

from __future__ import annotations

import asyncio
import email.policy
import os
import smtplib
import subprocess
import sys
import tempfile
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import uvloop

from bench.harness import Child, Mode, free_port, project_secret, python, row, sized

CASE = "isolation"
BUDGET_MS = 100.0
VARIANTS = ("inline", "thread", "process")


def html_message(attachment_bytes: int = 0, subject: str = "small") -> bytes:
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = "app@example.com", "a@example.com", subject
    message.set_content("plain part")
    links = "".join(f'<p><a href="https://example.com/p/{n}">link {n}</a></p>' for n in range(20))
    message.add_alternative(f"<html><body>{links}</body></html>", subtype="html")
    if attachment_bytes:
        message.add_attachment(os.urandom(attachment_bytes), maintype="application", subtype="octet-stream", filename="a.bin")
    return message.as_bytes(policy=email.policy.SMTP)


def serve_relay(variant: str, port: int, sink_port: int, work: str) -> None:
    """The relay process: the real pipeline and server, with the CPU work placed as `variant` says."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from config.settings import settings_from_mapping
    from inflight.service import bind
    from relay.pipeline import Pipeline
    from relay.server import Relay
    from relay.upstream import upstream_from_settings
    from relay.workers import cpu_pool
    from store.spool import Spool
    from store.sqlite import SqliteEventStore
    from tracking.tokens import TokenKeys

    key = Path(work) / "dkim.pem"
    key.write_bytes(rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    settings = settings_from_mapping({
        "relay": {"listen": f"127.0.0.1:{port}", "allow_plaintext_auth": True, "hostname": "bench.test"},
        "dkim": [{"domain": "example.com", "selector": "bench", "private_key_path": str(key)}],
        "tracker": {"public_url": "http://t.example.com", "secrets": ["bench-key-123"]},
        "store": {"url": f"sqlite:///{work}/{variant}.db"},
        "upstream": {"url": f"smtp+insecure://127.0.0.1:{sink_port}"},
        "projects": [{"id": "bench", "secret": project_secret("bench")}],
    }, environ={})
    executor: Executor | None = {"inline": None, "thread": ThreadPoolExecutor(2), "process": cpu_pool(2)}[variant]

    async def main() -> None:
        store = SqliteEventStore.from_url(settings.store.url)
        await store.open()
        upstream = upstream_from_settings(settings.upstream, local_hostname="bench.test", executor=executor)
        spool = Spool(settings.store.spool_path, store_url=settings.store.url)
        pipeline = Pipeline(settings=settings, upstream=upstream, store=store, keys=TokenKeys(settings.tracker.secrets, ["bench"]),
                            spool=spool, executor=executor)
        await spool.open()
        await Relay(settings, pipeline).listen(bind(settings.relay.listen))
        await asyncio.Event().wait()

    uvloop.run(main())  # as `inflight relay` runs


def send_big(port: int, attachment: int) -> None:
    """The big sender's process: one large tracked message, then exit (its exit marks the end)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=300) as client:
        client.login("bench", project_secret("bench"))
        client.sendmail("app@example.com", ["big@example.com"], html_message(attachment, subject="big"))


def probe(client: smtplib.SMTP, data: bytes) -> float:
    started = time.perf_counter()
    client.sendmail("app@example.com", ["small@example.com"], data)
    return (time.perf_counter() - started) * 1000


def measure(variant: str, work: Path, attachment: int, runs: int) -> tuple[list[float], list[float], list[float]]:
    """Small-message latencies (ms) alone, all of them while a big message is in flight, and the worst of each run."""
    sink_port, relay_port = free_port(), free_port()
    small = html_message()
    alone: list[float] = []
    loaded: list[float] = []
    worst: list[float] = []
    with Child("sink", python("bench.sink", "--port", sink_port), sink_port, work), \
            Child(f"relay-{variant}", python("bench.cases.isolation", "relay", variant, relay_port, sink_port, work),
                  relay_port, work) as relay, \
            smtplib.SMTP("127.0.0.1", relay_port, timeout=60) as client:
        client.login("bench", project_secret("bench"))
        client.sendmail("app@example.com", ["warm@example.com"], html_message(400_000))  # start the workers
        alone.extend(probe(client, small) for _ in range(30))
        for _ in range(runs):
            big = subprocess.Popen(python("bench.cases.isolation", "big", relay_port, attachment), stdin=subprocess.DEVNULL)
            try:
                this_run = []
                deadline = time.monotonic() + 300
                while time.monotonic() < deadline:  # at least one probe, then until the big one is answered
                    this_run.append(probe(client, small))
                    if big.poll() is not None:
                        break
                    time.sleep(0.01)
                if big.wait(timeout=300) != 0:
                    raise AssertionError(f"the big message was not accepted\n{relay.log_tail()}")
            finally:
                if big.poll() is None:
                    big.kill()
            loaded.extend(this_run)
            worst.append(max(this_run))
    return alone, loaded, worst


def run(quick: bool, smoke: bool = False) -> list[dict[str, Any]]:
    mode = Mode(quick, smoke)
    runs = mode.pick(full=3, quick=1, smoke=1)
    attachment = mode.pick(full=19_000_000, quick=19_000_000, smoke=300_000)  # 25.7 MB on the wire; smoke: 0.4 MB
    label = sized(html_message(attachment))
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-isolation-") as tmp:
        for variant in VARIANTS:
            alone, loaded, worst = measure(variant, Path(tmp), attachment, runs)
            note = f"median {sorted(loaded)[len(loaded) // 2]:.1f} ms over {len(loaded)} small messages"
            budget = {"max_value": BUDGET_MS} if variant == "process" else {}
            rows.append(row(CASE, f"slowest small msg while {label} goes, {variant}", "ms", worst,
                            baseline=("small msg alone", alone), note=note, **budget))
    return rows


if __name__ == "__main__":
    if sys.argv[1] == "relay":
        serve_relay(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
    elif sys.argv[1] == "big":
        send_big(int(sys.argv[2]), int(sys.argv[3]))
