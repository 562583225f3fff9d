"""DKIM keys (RFC 6376, RFC 8463): read and checked when the settings load, used by the relay's signer.

Loading lives with the settings so that a bad key stops `check-config` and start-up, naming
the key, instead of failing on the first message; the signer (relay/dkim.py) only signs.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import dkim
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa


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
    signature(key, b"From: check@" + key.domain.encode("ascii") + b"\r\n\r\n")  # fails now, not later
    return key


def signature(key: DkimKey, data: bytes) -> bytes:
    """The DKIM-Signature field (RFC 6376; RFC 8463 for Ed25519) for `data`, a message with CRLF line ends
    (as on the wire), ending in CRLF.

    Written here rather than through dkimpy's signer, which does the RSA operation in Python integers:
    ~9 ms a signature against ~0.5 ms through OpenSSL (`cryptography`), paid by every tracked copy.
    dkimpy still verifies every form of our signatures in the tests.
    """
    header, body = _split(data, key.domain)
    fields = _parsed_fields(header, key.domain)
    names = [name for name, _ in fields if name in _SIGNED]
    if b"from" not in names:
        raise DkimError(f"cannot DKIM-sign for {key.domain}: no From field to sign (RFC 6376 requires it)")
    names += [name for name in names if name in _OVERSIGNED]  # an added From would break the signature
    tags = [
        b"v=1", b"a=" + key.algorithm, b"c=" + b"/".join(CANONICALIZE), b"d=" + key.domain.encode("ascii"),
        b"i=@" + key.domain.encode("ascii"), b"q=dns/txt", b"s=" + key.selector.encode("ascii"),
        b"t=%d" % time.time(), b"h=" + b" : ".join(names),
        b"bh=" + base64.b64encode(hashlib.sha256(body.rstrip(b"\r\n") + b"\r\n").digest()),  # simple: one final CRLF
    ]
    unsigned = _folded(tags) + b";\r\n b="
    hashed = b"".join(_relaxed(name, value) + b"\r\n" for name, value in _signed_instances(fields, names))
    hashed += _relaxed(b"dkim-signature", unsigned[len(b"DKIM-Signature:"):])
    return unsigned + _chunked(base64.b64encode(_sign(key, hashed))) + b"\r\n"


# Header fields signed when present (RFC 6376 §5.4.1, the MIME fields, RFC 8058's one-click unsubscribe).
_SIGNED = frozenset({
    b"from", b"sender", b"reply-to", b"subject", b"date", b"message-id", b"to", b"cc", b"mime-version",
    b"content-type", b"content-transfer-encoding", b"content-id", b"content-description", b"resent-date",
    b"resent-from", b"resent-sender", b"resent-to", b"resent-cc", b"resent-message-id", b"in-reply-to",
    b"references", b"list-id", b"list-help", b"list-unsubscribe", b"list-unsubscribe-post", b"list-subscribe",
    b"list-post", b"list-owner", b"list-archive",
})
_OVERSIGNED = frozenset({b"from"})
_WSP_RUN = re.compile(rb"[ \t]+")
_LINE_WIDTH = 76


def _split(data: bytes, domain: str) -> tuple[bytes, bytes]:
    if data.startswith(b"\r\n"):
        return b"", data[2:]
    header, blank, body = data.partition(b"\r\n\r\n")
    if not blank:
        raise DkimError(f"cannot DKIM-sign for {domain}: no blank line ends the header block")
    return header + b"\r\n", body


def _parsed_fields(header: bytes, domain: str) -> list[tuple[bytes, bytes]]:
    """(lower-case name as written, value as written, folding included) of each header field, top down."""
    fields: list[tuple[bytes, bytes]] = []
    for line in header.split(b"\r\n")[:-1]:
        if line[:1] in (b" ", b"\t") and fields:
            name, value = fields[-1]
            fields[-1] = (name, value + b"\r\n" + line)
            continue
        name, colon, value = line.partition(b":")
        if not colon or not name.strip():
            raise DkimError(f"cannot DKIM-sign for {domain}: a header line that is no field: {line[:40]!r}")
        # As verifiers compare names: `From :` (obsolete syntax) is no `from`, so it is left unsigned.
        fields.append((name.lower(), value))
    return fields


def _signed_instances(fields: list[tuple[bytes, bytes]], names: list[bytes]) -> list[tuple[bytes, bytes]]:
    """The fields `names` (h=) signs, in its order: each name takes its last instance not yet taken (§5.4.2);
    a name past its instances signs their absence."""
    remaining: dict[bytes, list[bytes]] = {}
    for name, value in fields:
        remaining.setdefault(name, []).append(value)
    return [(name, remaining[name].pop()) for name in names if remaining.get(name)]


def _relaxed(name: bytes, value: bytes) -> bytes:
    """A header field in relaxed canonical form (§3.4.2), without its CRLF."""
    return name + b":" + _WSP_RUN.sub(b" ", value.replace(b"\r\n", b"")).strip(b" ")


def _folded(tags: list[bytes]) -> bytes:
    """`DKIM-Signature: ` and the tags, lines folded between tags and in h= between names."""
    lines, line = [], b"DKIM-Signature:"
    for index, tag in enumerate(tags):
        for word in tag.split(b" "):
            if len(line) + 1 + len(word) + 1 > _LINE_WIDTH and line.strip():
                lines.append(line)
                line = b""
            line += b" " + word
        if index + 1 < len(tags):
            line += b";"
    return b"\r\n".join([*lines, line])


def _chunked(value: bytes) -> bytes:
    """A base64 value in lines that fit, folded (whitespace in b= is not part of it, §3.5)."""
    first = _LINE_WIDTH - len(b" b=")
    return b"\r\n ".join([value[:first], *(value[i : i + _LINE_WIDTH - 1] for i in range(first, len(value), _LINE_WIDTH - 1))])


def _sign(key: DkimKey, data: bytes) -> bytes:
    private = _private_key(key.algorithm, key.private_key)
    if isinstance(private, ed25519.Ed25519PrivateKey):
        return private.sign(hashlib.sha256(data).digest())  # RFC 8463: Ed25519 over the SHA-256 digest
    return private.sign(data, padding.PKCS1v15(), hashes.SHA256())


@functools.lru_cache(maxsize=64)
def _private_key(algorithm: bytes, data: bytes) -> ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey:
    """The key object, parsed once per process (the key itself travels as bytes: worker processes get it pickled)."""
    if algorithm == ED25519:
        return ed25519.Ed25519PrivateKey.from_private_bytes(base64.b64decode(data))
    private = serialization.load_pem_private_key(data, password=None)
    if not isinstance(private, rsa.RSAPrivateKey):
        raise DkimError("not an RSA private key")
    return private
