"""DKIM keys (RFC 6376, RFC 8463): read and checked when the settings load, used by the relay's signer.

Loading lives with the settings so that a bad key stops `check-config` and start-up, naming
the key, instead of failing on the first message; the signer (relay/dkim.py) only signs.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field
from pathlib import Path

import dkim


class DkimError(Exception):
    """The message cannot be signed (malformed header block); the text says why."""


RSA = b"rsa-sha256"
ED25519 = b"ed25519-sha256"
# Relaxed headers survive the refolding MTAs do; the body goes unmodified through SES, Postfix and
# the like, and dkimpy's relaxed body canonicalization costs 6x more (2.3 s vs 0.36 s at 25 MB).
CANONICALIZE = (b"relaxed", b"simple")
MIN_RSA_BITS = 1024  # receivers treat shorter keys as no signature (RFC 8301)
# PKCS#8 DER of an Ed25519 private key (`openssl genpkey -algorithm ed25519`): fixed prefix + 32-byte seed.
_ED25519_PKCS8_PREFIX = bytes.fromhex("302e020100300506032b657004220420")
_PEM_BODY = re.compile(rb"-----BEGIN [A-Z ]+-----\s*(.*?)\s*-----END", re.DOTALL)


@dataclass(frozen=True)
class DkimKey:
    domain: str  # lower-case
    selector: str
    algorithm: bytes  # RSA | ED25519
    private_key: bytes = field(repr=False)  # as dkimpy takes it: PEM (RSA) or base64 seed (Ed25519)


def load_key(domain: str, selector: str, path: str) -> DkimKey:
    """Read an RSA (PKCS#1/PKCS#8 PEM) or Ed25519 (PKCS#8 PEM, or dknewkey's base64 seed) key.

    Raises ValueError naming what is wrong, so a bad key stops the relay at start, not at the
    first message.
    """
    try:
        text = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {path!r}: {exc.strerror}") from None
    pem = _PEM_BODY.search(text)
    try:
        der = base64.b64decode(b"".join((pem.group(1) if pem else text).split()), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{path!r} is neither a PEM private key nor a base64 Ed25519 seed") from None
    if pem is None:
        if len(der) != 32:
            raise ValueError(f"{path!r}: a base64 Ed25519 seed must decode to 32 bytes")
        key = DkimKey(domain.lower(), selector, ED25519, base64.b64encode(der))
    elif der.startswith(_ED25519_PKCS8_PREFIX) and len(der) == len(_ED25519_PKCS8_PREFIX) + 32:
        key = DkimKey(domain.lower(), selector, ED25519, base64.b64encode(der[len(_ED25519_PKCS8_PREFIX):]))
    else:
        try:
            bits = dkim.crypto.parse_private_key(der)["modulus"].bit_length()
        except dkim.crypto.UnparsableKeyError:
            raise ValueError(f"{path!r} is not an RSA or Ed25519 private key") from None
        if bits < MIN_RSA_BITS:
            raise ValueError(f"{path!r}: RSA key of {bits} bits; use 2048")
        key = DkimKey(domain.lower(), selector, RSA, b"\n".join(text.strip().splitlines()) + b"\n")
    signature(key, b"From: check@" + key.domain.encode("ascii") + b"\r\n\r\n", b"\r\n")  # fails now, not later
    return key


def signature(key: DkimKey, data: bytes, newline: bytes) -> bytes:
    try:
        return bytes(dkim.sign(
            data, key.selector.encode("ascii"), key.domain.encode("ascii"), key.private_key,
            signature_algorithm=key.algorithm, canonicalize=CANONICALIZE, linesep=newline,
        ))
    except dkim.DKIMException as exc:
        raise DkimError(f"cannot DKIM-sign for {key.domain}: {exc}") from exc
