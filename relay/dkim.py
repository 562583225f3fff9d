"""DKIM signing (RFC 6376) of each copy over the exact bytes that go upstream.

Tracking rewrites the body, so a signature the app made itself no longer verifies once the
message is instrumented; the relay therefore signs last, after every header change and the
rewrite, with the key of the From domain (or of its nearest parent domain, which still aligns
for DMARC). `sign(data) -> bytes` is a plain function of bytes: no loop, no I/O, so it can run
wherever the CPU-heavy work runs.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import dkim

from relay.headers import RawField, SplitMessage, split_message
from relay.senders import domain_of, from_addresses

RSA = b"rsa-sha256"
ED25519 = b"ed25519-sha256"
# Relaxed headers survive the refolding MTAs do; the body goes unmodified through SES, Postfix and
# the like, and dkimpy's relaxed body canonicalization costs 6x more (2.3 s vs 0.36 s at 25 MB).
CANONICALIZE = (b"relaxed", b"simple")
# The upstream client (aiosmtplib) turns every bare CR or LF into CRLF on the wire; sign those bytes.
_BARE_LINE_END = re.compile(rb"\r(?!\n)|(?<!\r)\n")
MIN_RSA_BITS = 1024  # receivers treat shorter keys as no signature (RFC 8301)
# PKCS#8 DER of an Ed25519 private key (`openssl genpkey -algorithm ed25519`): fixed prefix + 32-byte seed.
_ED25519_PKCS8_PREFIX = bytes.fromhex("302e020100300506032b657004220420")
_PEM_BODY = re.compile(rb"-----BEGIN [A-Z ]+-----\s*(.*?)\s*-----END", re.DOTALL)
_D_TAG = re.compile(r"(?:^|;)\s*d\s*=\s*([^;\s]+)", re.IGNORECASE)


class DkimError(Exception):
    """The message cannot be signed (malformed header block); the text says why."""


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
    _signature(key, b"From: check@" + key.domain.encode("ascii") + b"\r\n\r\n", b"\r\n")  # fails now, not later
    return key


def signature_domain(raw: RawField) -> str | None:
    """The d= tag of a DKIM-Signature field, lower-cased."""
    match = _D_TAG.search(raw.value)
    return match.group(1).lower().rstrip(".") if match else None


def _signature(key: DkimKey, data: bytes, newline: bytes) -> bytes:
    try:
        return bytes(dkim.sign(
            data, key.selector.encode("ascii"), key.domain.encode("ascii"), key.private_key,
            signature_algorithm=key.algorithm, canonicalize=CANONICALIZE, linesep=newline,
        ))
    except dkim.DKIMException as exc:
        raise DkimError(f"cannot DKIM-sign for {key.domain}: {exc}") from exc


class DkimSigner:
    """Signs with the key of the message's From domain; a message no key covers goes unsigned."""

    def __init__(self, keys: Sequence[DkimKey] = ()) -> None:
        self._keys = {key.domain: key for key in keys}

    def key_for(self, message: SplitMessage) -> DkimKey | None:
        """The key of the first From address's domain, else of its nearest configured parent domain."""
        if not self._keys:
            return None
        addresses = from_addresses(message)
        if not addresses:
            return None
        labels = domain_of(addresses[0]).split(".")
        for start in range(len(labels) - 1):
            key = self._keys.get(".".join(labels[start:]))
            if key is not None:
                return key
        return None

    def foreign_signatures(self, message: SplitMessage) -> list[str]:
        """Domains of existing DKIM signatures that signing will not replace (they break on rewrite)."""
        key = self.key_for(message)
        ours = key.domain if key else None
        domains = (signature_domain(f) or "?" for f in message.fields if f.name.lower() == "dkim-signature")
        return [d for d in domains if d != ours]

    def sign(self, data: bytes) -> bytes:
        """`data` with a DKIM-Signature on top; an existing signature for the same domain is replaced.

        Line endings are made CRLF first, as they will be on the wire, so the signature covers
        exactly the bytes the upstream receives.
        """
        if not self._keys:
            return data  # no key configured: nothing to parse for, on every copy
        message = split_message(data)
        key = self.key_for(message)
        if key is None:
            return data
        message = split_message(_BARE_LINE_END.sub(b"\r\n", data))
        kept = tuple(f for f in message.fields
                     if f.name.lower() != "dkim-signature" or signature_domain(f) != key.domain)
        unsigned = SplitMessage(kept, message.body, message.newline).to_bytes()
        return _signature(key, unsigned, message.newline) + unsigned
