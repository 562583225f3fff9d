"""DKIM signing (RFC 6376) of each copy over the exact bytes that go upstream.

Tracking rewrites the body, so a signature the app made itself no longer verifies once the
message is instrumented; the relay therefore signs last, after every header change and the
rewrite, with the key of the From domain (or of its nearest parent domain, which still aligns
for DMARC). `sign(data) -> bytes` is a plain function of bytes: no loop, no I/O, so it can run
wherever the CPU-heavy work runs.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from config.dkim_keys import DkimKey, signature
from relay.headers import RawField, SplitMessage, split_message
from relay.senders import domain_of, from_addresses

_D_TAG = re.compile(r"(?:^|;)\s*d\s*=\s*([^;\s]+)", re.IGNORECASE)
# The upstream client (aiosmtplib) turns every bare CR or LF into CRLF on the wire; sign those bytes.
_BARE_LINE_END = re.compile(rb"\r(?!\n)|(?<!\r)\n")


def signature_domain(raw: RawField) -> str | None:
    """The d= tag of a DKIM-Signature field, lower-cased."""
    match = _D_TAG.search(raw.value)
    return match.group(1).lower().rstrip(".") if match else None


class DkimSigner:
    """Signs with the key of the message's From domain; a message no key covers goes unsigned."""

    def __init__(self, keys: Sequence[DkimKey] = ()) -> None:
        self._keys = {key.domain: key for key in keys}

    @property
    def configured(self) -> bool:
        """Whether any key is configured: else `sign` returns its input and needs none of it at once."""
        return bool(self._keys)

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
        if not data.count(b"\r") == data.count(b"\n") == data.count(b"\r\n"):  # counting: the pattern scans slowly
            message = split_message(_BARE_LINE_END.sub(b"\r\n", data))
        kept = tuple(f for f in message.fields
                     if f.name.lower() != "dkim-signature" or signature_domain(f) != key.domain)
        unsigned = SplitMessage(kept, message.body, message.newline).to_bytes()
        return signature(key, unsigned) + unsigned
