"""Upstream throughput: a new connection per message (the old aiosmtplib.send) vs the connection pool.

Messages of 2 KB go one after another from this process into the fast sink (bench/sink.py, its
own process), over plain SMTP and over STARTTLS with a certificate the client verifies. On
loopback a round trip costs nothing, so the figures show the CPU cost of connect + EHLO
(+ TLS handshake + EHLO again) per message; against a remote upstream each of those steps also
costs a round trip, which the pool saves as well (about 7 of 11 per message with STARTTLS and AUTH).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import aiosmtplib

from bench.harness import Child, Mode, free_port, python, row
from relay.upstream import SmtpEndpoint, SmtpUpstream, Timeouts

CASE = "upstream"
MESSAGE = (b"From: app@example.com\r\nTo: a@example.com\r\nSubject: pool\r\n\r\n" + b"x" * 76 + b"\r\n") * 24
TIMEOUTS = Timeouts(connect=10, command=10, data=10)
NEW, POOLED = "new connection per message", "pooled connection"


async def per_message(port: int, count: int, tls: bool) -> float:
    started = time.perf_counter()
    for _ in range(count):
        await aiosmtplib.send(MESSAGE, sender="app@example.com", recipients=["a@example.com"], hostname="127.0.0.1",
                              port=port, start_tls=tls, local_hostname="bench.test")
    return count / (time.perf_counter() - started)


async def pooled(port: int, count: int, tls: bool) -> float:
    upstream = SmtpUpstream(SmtpEndpoint("smtp" if tls else "smtp+insecure", "127.0.0.1", port), timeouts=TIMEOUTS,
                            local_hostname="bench.test")
    started = time.perf_counter()
    for _ in range(count):
        results = await upstream.send("app@example.com", ["a@example.com"], MESSAGE)
        if not all(r.accepted for r in results.values()):
            raise AssertionError(f"the sink refused a message: {results}")
    rate = count / (time.perf_counter() - started)
    await upstream.close()
    return rate


def self_signed(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=30)
    return cert, key


def run(quick: bool, smoke: bool = False) -> list[dict[str, Any]]:
    mode = Mode(quick, smoke)
    count, repeats = mode.pick(full=(300, 3), quick=(100, 2), smoke=(10, 1))
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-upstream-") as tmp:
        work = Path(tmp)
        cert, key = self_signed(work)
        trusted = os.environ.get("SSL_CERT_FILE")
        os.environ["SSL_CERT_FILE"] = str(cert)  # the client trusts the sink's certificate, and checks it
        try:
            for tls in (False, True):
                port = free_port()
                extra = ["--tls-cert", cert, "--tls-key", key] if tls else []
                samples: dict[str, list[float]] = {NEW: [], POOLED: []}
                with Child("sink-tls" if tls else "sink", python("bench.sink", "--port", port, *extra), port, work):
                    for _ in range(repeats):  # interleaved, so a noisy neighbour hurts both alike
                        samples[NEW].append(asyncio.run(per_message(port, count, tls)))
                        samples[POOLED].append(asyncio.run(pooled(port, count, tls)))
                transport = "STARTTLS" if tls else "plain"
                rows.append(row(CASE, f"{NEW}, {transport}", "msg/s", samples[NEW]))
                rows.append(row(CASE, f"{POOLED}, {transport}", "msg/s", samples[POOLED],
                                baseline=(f"{NEW}, {transport}", samples[NEW]), min_ratio=1.2))
        finally:
            if trusted is None:
                os.environ.pop("SSL_CERT_FILE", None)
            else:
                os.environ["SSL_CERT_FILE"] = trusted
    return rows
