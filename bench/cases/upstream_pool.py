"""Upstream throughput: a new connection per message (the old aiosmtplib.send) vs the connection pool.

Messages of 2 KB go one after another into a local sink (bench/cases/isolation.py's, in its own
process), over plain SMTP and over STARTTLS with a certificate the client verifies. On loopback
a round trip costs nothing, so the figures show the CPU cost of connect + EHLO (+ TLS handshake
+ EHLO again) per message; against a remote upstream each of those steps also costs a round
trip, which the pool saves as well (about 7 of 11 per message with STARTTLS and AUTH).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiosmtplib

from bench.cases.isolation import free_port, wait_for_port
from relay.upstream import SmtpEndpoint, SmtpUpstream, Timeouts

MESSAGE = (b"From: app@example.com\r\nTo: a@example.com\r\nSubject: pool\r\n\r\n" + b"x" * 76 + b"\r\n") * 24
TIMEOUTS = Timeouts(connect=10, command=10, data=10)


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
        assert all(r.accepted for r in results.values()), results
    rate = count / (time.perf_counter() - started)
    await upstream.close()
    return rate


def self_signed(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=30)
    return cert, key


def run(quick: bool) -> list[dict]:
    count, repeats = (100, 1) if quick else (300, 3)
    root = Path(__file__).resolve().parents[2]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cert, key = self_signed(Path(tmp))
        os.environ["SSL_CERT_FILE"] = str(cert)  # the client trusts the sink's certificate, and checks it
        for tls in (False, True):
            port = free_port()
            args = [sys.executable, "-m", "bench.cases.isolation", "sink", str(port), *([str(cert), str(key)] if tls else [])]
            sink = subprocess.Popen(args, cwd=root)
            try:
                wait_for_port(port, sink)
                rates = {"new connection per message": [], "pooled connection": []}
                for _ in range(repeats):
                    rates["new connection per message"].append(asyncio.run(per_message(port, count, tls)))
                    rates["pooled connection"].append(asyncio.run(pooled(port, count, tls)))
            finally:
                sink.kill()
                sink.wait(10)
            base = statistics.median(rates["new connection per message"])
            for variant, values in rates.items():
                rows.append({
                    "case": "upstream",
                    "variant": f"{variant}, {'STARTTLS' if tls else 'plain'}",
                    "unit": "msg/s",
                    "median": statistics.median(values),
                    "min": min(values),
                    "max": max(values),
                    "baseline": base,
                    "ratio": statistics.median(values) / base,
                    "budget": None,
                })
    return rows
