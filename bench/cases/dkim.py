"""DKIM signing cost per copy (relay/dkim.py): RSA-2048 and Ed25519, small and large messages.

A tracked message is signed once per recipient, so this is a per-copy cost; the baseline is
the same message without a key for its domain (split + pass-through only).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from bench.harness import Mode, row
from config.dkim_keys import load_key
from relay.dkim import DkimSigner


def message(size: int) -> bytes:
    line = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.\r\n"
    headers = (b"From: App <app@example.com>\r\nTo: a@example.com\r\nSubject: Bench\r\n"
               b"Message-ID: <bench@example.com>\r\nMIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n")
    return headers + line * max(1, size // len(line))


def timed(sign: DkimSigner, data: bytes, repeats: int) -> list[float]:
    values = []
    for _ in range(repeats):
        started = time.perf_counter()
        sign.sign(data)
        values.append((time.perf_counter() - started) * 1000)
    return values


def run(quick: bool, smoke: bool = False) -> list[dict[str, Any]]:
    none = serialization.NoEncryption()
    with tempfile.TemporaryDirectory() as directory:
        rsa_path, ed_path = Path(directory) / "rsa.pem", Path(directory) / "ed.pem"
        rsa_path.write_bytes(rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, none))
        ed_path.write_bytes(ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, none))
        signers = {"rsa-2048": DkimSigner([load_key("example.com", "s", str(rsa_path))]),
                   "ed25519": DkimSigner([load_key("example.com", "s", str(ed_path))])}
    mode = Mode(quick, smoke)
    rows = []
    sizes = mode.pick(full=[10_000, 1_000_000, 25_000_000], quick=[10_000, 1_000_000], smoke=[10_000])
    for size in sizes:
        data = message(size)
        repeats = 3 if size > 1_000_000 else mode.pick(full=20, quick=5, smoke=1)
        baseline = (f"no key {size // 1000} kB", timed(DkimSigner(), data, repeats))
        for name, signer in signers.items():
            rows.append(row("dkim", f"{name} {size // 1000} kB", "ms", timed(signer, data, repeats), baseline=baseline,
                            max_value=20 if size == 10_000 else None))
    return rows
