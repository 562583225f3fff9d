"""Does a 25 MB tracked message stall other SMTP sessions? Inline vs thread pool vs process pool.

Separate processes so that no GIL is shared with what is measured: an upstream sink (this module
run as `sink`: it answers at once and scans the body in bulk, as a remote MTA's latency does not
depend on our other sessions), the relay (`relay VARIANT`), and a client sending one 25 MB HTML
message with an attachment (`big`). Meanwhile this process sends small tracked messages on
another connection and records each transaction's latency (MAIL to the DATA reply) until the
big message got its reply. Budget: the slowest small message under 100 ms.

Variants: `inline` (MIME parse, rewrite, DKIM signing and dot-stuffing on the event loop),
`thread` (in a thread pool: the loop stays free only while the worker releases the GIL),
`process` (in a process pool, what the service uses).
"""

from __future__ import annotations

import asyncio
import email.policy
import os
import smtplib
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from email.message import EmailMessage
from pathlib import Path

BUDGET_MS = 100.0
ATTACHMENT_BYTES = 19_000_000  # base64 and MIME make it a 25.7 MB message, under max_message_bytes (25 MiB)
SECRET = "bench-secret"
RELAY_CMD = ["-m", "bench.cases.isolation", "relay"]
VARIANTS = ("inline", "thread", "process")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port} after {timeout} s")


def html_message(attachment_bytes: int = 0, subject: str = "small") -> bytes:
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = "app@example.com", "a@example.com", subject
    message.set_content("plain part")
    links = "".join(f'<p><a href="https://example.com/p/{n}">link {n}</a></p>' for n in range(20))
    message.add_alternative(f"<html><body>{links}</body></html>", subtype="html")
    if attachment_bytes:
        message.add_attachment(os.urandom(attachment_bytes), maintype="application", subtype="octet-stream", filename="a.bin")
    return message.as_bytes(policy=email.policy.SMTP)


def serve_sink(port: int, cert: str | None = None, key: str | None = None) -> None:
    """A minimal upstream: every command gets a 250 at once; a body is read in chunks up to its final dot.

    With a certificate it offers STARTTLS (bench/cases/upstream_pool.py).
    """
    tls = None
    if cert is not None:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(cert, key)

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 sink ESMTP\r\n")
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"STAR" and tls is not None:
                writer.write(b"220 go ahead\r\n")
                await writer.drain()
                await writer.start_tls(tls)
                continue
            if verb == b"DATA":
                writer.write(b"354 go ahead\r\n")
                tail = b"\r\n"  # the body's last bytes, so a dot line split across chunks is still found
                while not (tail + (chunk := await reader.read(1 << 20))).endswith(b"\r\n.\r\n"):
                    if not chunk:
                        return
                    tail = (tail + chunk)[-5:]
                writer.write(b"250 2.0.0 queued\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                break
            else:
                extensions = b"250-STARTTLS\r\n" if tls is not None else b""
                writer.write(b"250-sink\r\n" + extensions + b"250 SIZE 52428800\r\n" if verb == b"EHLO" else b"250 ok\r\n")
            await writer.drain()
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(session, "127.0.0.1", port)
        await server.serve_forever()

    asyncio.run(main())


def serve_relay(variant: str, port: int, sink_port: int, db: str) -> None:
    """The relay process: the real pipeline and server, with the CPU work placed as `variant` says."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from config.settings import settings_from_mapping
    from inflight.service import bind
    from relay.pipeline import Pipeline
    from relay.server import Relay
    from relay.upstream import upstream_from_settings
    from relay.workers import cpu_pool
    from tracker.store import SqliteEventStore
    from tracker.tokens import TokenSigner

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key_path = Path(db).with_name("dkim.pem")
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    settings = settings_from_mapping({
        "relay": {"listen": f"127.0.0.1:{port}", "allow_plaintext_auth": True, "hostname": "bench.test"},
        "dkim": [{"domain": "example.com", "selector": "bench", "private_key_path": str(key_path)}],
        "tracker": {"public_url": "http://t.example.com", "secrets": ["bench-key-123"]},
        "store": {"url": f"sqlite:///{db}"},
        "upstream": {"url": f"smtp+insecure://127.0.0.1:{sink_port}"},
        "projects": [{"id": "bench", "secret": SECRET}],
    }, environ={})
    executor: Executor | None = {
        "inline": None,
        "thread": ThreadPoolExecutor(2),
        "process": cpu_pool(2),
    }[variant]

    async def main() -> None:
        store = SqliteEventStore.from_url(settings.store.url)
        await store.open()
        upstream = upstream_from_settings(settings.upstream, local_hostname="bench.test", executor=executor)
        pipeline = Pipeline(settings=settings, upstream=upstream, store=store, signer=TokenSigner(settings.tracker.secrets),
                            executor=executor)
        await Relay(settings, pipeline).listen(bind(settings.relay.listen))
        await asyncio.Event().wait()

    asyncio.run(main())


def send_big(port: int) -> None:
    """The big sender's process: one 25 MB tracked message, then exit (its exit marks the end)."""
    data = html_message(attachment_bytes=ATTACHMENT_BYTES, subject="big")
    with smtplib.SMTP("127.0.0.1", port, timeout=300) as client:
        client.login("bench", SECRET)
        client.sendmail("app@example.com", ["big@example.com"], data)


def probe(client: smtplib.SMTP, data: bytes) -> float:
    started = time.perf_counter()
    client.sendmail("app@example.com", ["small@example.com"], data)
    return (time.perf_counter() - started) * 1000


def measure(variant: str, runs: int) -> tuple[list[float], list[float]]:
    """Latencies (ms) of small messages: alone (baseline), and while the big message is in flight."""
    sink_port, relay_port = free_port(), free_port()
    here = Path(__file__).resolve()
    root = here.parents[2]
    processes = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            sink = subprocess.Popen([sys.executable, "-m", "bench.cases.isolation", "sink", str(sink_port)], cwd=root)
            processes.append(sink)
            relay = subprocess.Popen([sys.executable, *RELAY_CMD, variant, str(relay_port),
                                      str(sink_port), f"{tmp}/bench.db"], cwd=root)
            processes.append(relay)
            wait_for_port(sink_port, sink)
            wait_for_port(relay_port, relay)
            small = html_message()
            baseline: list[float] = []
            loaded: list[float] = []
            with smtplib.SMTP("127.0.0.1", relay_port, timeout=60) as client:
                client.login("bench", SECRET)
                client.sendmail("app@example.com", ["warm@example.com"], html_message(attachment_bytes=400_000))  # start workers
                for _ in range(30):
                    baseline.append(probe(client, small))
                for _ in range(runs):
                    big = subprocess.Popen([sys.executable, "-m", "bench.cases.isolation", "big", str(relay_port)], cwd=root)
                    processes.append(big)
                    time.sleep(0.3)  # let the upload start
                    deadline = time.monotonic() + 300
                    while big.poll() is None and time.monotonic() < deadline:
                        loaded.append(probe(client, small))
                        time.sleep(0.01)
                    if big.wait(timeout=300) != 0:
                        raise RuntimeError("the big message was not accepted")
            return baseline, loaded
        finally:
            for process in processes:
                if process.poll() is None:
                    process.kill()
                    process.wait(10)


def run(quick: bool) -> list[dict]:
    rows = []
    for variant in VARIANTS:
        baseline, loaded = measure(variant, runs=1 if quick else 2)
        base = statistics.median(baseline)
        rows.append({
            "case": "isolation",
            "variant": f"small msg during 25MB, {variant} (n={len(loaded)})",
            "unit": "ms",
            "median": statistics.median(loaded),
            "min": min(loaded),
            "max": max(loaded),
            "baseline": base,
            "ratio": max(loaded) / base,
            "budget": f"max < {BUDGET_MS:.0f} ms: {'ok' if max(loaded) < BUDGET_MS else 'OVER'}",
        })
    return rows


if __name__ == "__main__":
    if sys.argv[1] == "relay":
        serve_relay(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
    elif sys.argv[1] == "sink":
        serve_sink(int(sys.argv[2]), *sys.argv[3:5])
    elif sys.argv[1] == "big":
        send_big(int(sys.argv[2]))
