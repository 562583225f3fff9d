"""Byte-exact header surgery on a raw message.

Re-serialising a message with the stdlib generator refolds headers and breaks DKIM, so the
relay never does that: it splits the header block into raw fields and only removes or adds
whole fields, leaving every other byte (folding, order, line endings) as the app sent it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from email.errors import HeaderParseError
from email.header import decode_header, make_header


@dataclass(frozen=True)
class RawField:
    name: str  # as written; compare with .lower()
    raw: bytes  # the whole field: first line, continuation lines, line endings

    @property
    def value(self) -> str:
        """Unfolded value, decoded as Latin-1 so no byte is ever an error."""
        _, _, value = self.raw.partition(b":")
        return b" ".join(line.strip() for line in value.splitlines()).strip().decode("latin-1")


@dataclass(frozen=True)
class SplitMessage:
    fields: tuple[RawField, ...]
    body: bytes  # from the blank separator line on, or b"" when the message has no body
    newline: bytes  # the message's own line ending, used for fields we add

    def get(self, name: str) -> str | None:
        lowered = name.lower()
        return next((f.value for f in self.fields if f.name.lower() == lowered), None)

    def without(self, predicate: Callable[[str], bool]) -> SplitMessage:
        """Drop every field whose lower-cased name matches."""
        kept = tuple(f for f in self.fields if not predicate(f.name.lower()))
        return SplitMessage(kept, self.body, self.newline)

    def with_field(self, name: str, value: str) -> SplitMessage:
        """Append one field, replacing any field of the same name (case-insensitive)."""
        lowered = name.lower()
        kept = tuple(f for f in self.fields if f.name.lower() != lowered)
        added = RawField(name, f"{name}: {value}".encode("ascii") + self.newline)
        return SplitMessage((*kept, added), self.body, self.newline)

    def to_bytes(self) -> bytes:
        return b"".join(f.raw for f in self.fields) + self.body


_HEADER_NAMED_FROM = re.compile(rb"From[ \t]*:")


def without_envelope_line(raw: bytes) -> bytes:
    """The message without a leading mbox `From sender date` line, as MTAs read a file submitted as it is.

    That line is the envelope of a mailbox file, not a header field: left in place it would sit under our
    `Received:` field, and a strict parser ends the header block at it (every later field becomes body).
    A `From :` header field (obsolete syntax, RFC 5322 §4.5.3) is kept.
    """
    if not raw.startswith(b"From ") or _HEADER_NAMED_FROM.match(raw):
        return raw
    end = raw.find(b"\n")
    return b"" if end < 0 else raw[end + 1 :]


def split_message(raw: bytes) -> SplitMessage:
    """Split the header block into raw fields (RFC 5322 §2.2.3 folding) and keep the rest verbatim."""
    newline = b"\r\n" if b"\r\n" in raw[:4096] or not raw else b"\n"
    fields: list[RawField] = []
    position = 0
    while position < len(raw):
        end = raw.find(b"\n", position)
        end = len(raw) if end < 0 else end + 1
        line = raw[position:end]
        if line in (b"\r\n", b"\n"):
            break
        if line[:1] in (b" ", b"\t") and fields:
            last = fields[-1]
            fields[-1] = RawField(last.name, last.raw + line)
        else:
            name = line.split(b":", 1)[0] if b":" in line else b""
            fields.append(RawField(name.strip().decode("latin-1"), line))
        position = end
    return SplitMessage(tuple(fields), raw[position:], newline)


def decoded_header(value: str | None) -> str | None:
    """RFC 2047 encoded-words decoded, for what events record (Subject, From, the X-Inflight-* ids).

    Mail libraries encode any non-ASCII value by themselves (`=?utf-8?q?caf=C3=A9?=`); raw 8-bit values
    (RFC 6532, read as Latin-1 by `RawField.value`) are UTF-8 when they decode as such.
    """
    if value is None:
        return None
    if not value.isascii():
        try:
            return value.encode("latin-1").decode("utf-8")
        except UnicodeError:
            return value
    try:
        return str(make_header(decode_header(value)))
    except (HeaderParseError, LookupError, UnicodeDecodeError):
        return value
