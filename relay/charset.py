"""Charsets of HTML parts: decode for scanning, and map text positions back to exact byte offsets.

The part keeps its charset label and its bytes: we never re-encode a whole body (that is how peers relabelled
ISO-8859-1 mail as UTF-8). Instead the positions of the spans to replace are mapped to byte offsets, and only
the inserted text (ASCII URLs and markup) is encoded in the part's charset. The mapping is verified, so a
charset whose round trip is not byte-exact makes instrumentation fail (and the message go out untouched)
rather than silently change bytes.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from relay.prescan import declared_charsets

__all__ = ["Charset", "CharsetError"]

# WHATWG Encoding Standard: browsers read these labels as a superset, so that is what a link "is" to a reader.
_BROWSER_READING = {"ascii": "cp1252", "iso8859-1": "cp1252", "gb2312": "gbk"}
_LABEL_ALIASES = {"iso-8859-8-i": "iso-8859-8"}
# Everything HTML syntax and our URLs are made of must be plain ASCII bytes for a line break or an edit to be
# placed by byte arithmetic (UTF-16 and EBCDIC are handled, but only through verified offsets).
_SYNTAX_PROBE = "<a href=\"https://x.y/?q=1&amp;r='2'#f\">\r\n</a>"
_ASCII = bytes(range(128)).decode("ascii")
_SNIFF_MIN_UNITS = 4  # ASCII code units needed before their zero bytes tell the byte order


class CharsetError(ValueError):
    """The part declares a charset we cannot decode, or its bytes do not round-trip exactly."""


@dataclass(frozen=True, slots=True)
class Charset:
    """How to read and write one part's bytes."""

    codec: str  # Python codec used in both directions (byte order fixed, no BOM)
    bom: int  # bytes of byte-order mark at the start of the data, kept as they are
    ascii_compatible: bool
    # Every byte below 0x80 is that ASCII character and never part of another one (UTF-8, single-byte
    # charsets; not ISO-2022-JP, Shift_JIS or UTF-16). HTML syntax is ASCII, so such data can be scanned as
    # Latin-1 text whose positions are byte offsets; only link values need decoding (see `read`).
    byte_transparent: bool = False

    @classmethod
    def resolve(cls, label: str | None, data: bytes) -> Charset:
        """The charset for `label` (the part's charset parameter) and its data.

        Without a label (RFC 2045 says US-ASCII, real mail says otherwise) we read what a browser would: a
        byte-order mark, else the `<meta>` charset the HTML5 prescan finds, else UTF-8 when the bytes are valid
        UTF-8 and windows-1252 (the browser default) otherwise.
        """
        name = (_bom_charset(data) or _declared(data) or _utf8_or_windows_1252(data)) if label is None else cls._lookup(label)
        bom = 0
        if name.startswith(("utf-16", "utf-32")):
            name, bom = _byte_order(name, data)
        try:
            ascii_compatible = _SYNTAX_PROBE.encode(name) == _SYNTAX_PROBE.encode("ascii")
        except UnicodeError:
            ascii_compatible = False
        return cls(name, bom, ascii_compatible, ascii_compatible and _byte_transparent(name))

    @staticmethod
    def _lookup(label: str) -> str:
        label = _LABEL_ALIASES.get(label, label)
        for candidate in (label, label[2:] if label.startswith("x-") else None):
            if candidate is None:
                continue
            try:
                name = codecs.lookup(candidate).name
            except LookupError:
                continue
            # Only text codecs: a label like "base64" or "rot13" must not be taken for a charset.
            try:
                "a".encode(name)
            except (LookupError, TypeError, UnicodeError):
                break
            return _BROWSER_READING.get(name, name)
        raise CharsetError(f"unknown charset {label[:40]!r}")

    def decode(self, data: bytes) -> str:
        # surrogateescape keeps undecodable bytes as lone surrogates, so the round trip stays byte-exact; it
        # cannot stand in for ASCII bytes (a truncated UTF-16 unit, a bad ISO-2022 escape), which fail.
        try:
            return data[self.bom :].decode(self.codec, "surrogateescape")
        except UnicodeDecodeError:
            raise CharsetError(f"{self.codec} text does not decode") from None

    def read(self, latin1_text: str) -> str:
        """Text in this charset of a span of a byte-transparent part scanned as Latin-1."""
        if latin1_text.isascii():
            return latin1_text
        return latin1_text.encode("latin-1").decode(self.codec, "surrogateescape")

    def encode(self, text: str) -> bytes:
        # A character the charset lacks becomes a numeric character reference, which HTML decodes back
        # (our URLs and markup are ASCII, so this is a safety net for a minter returning an IRI).
        return text.encode(self.codec, "xmlcharrefreplace")

    def byte_offsets(self, text: str, data: bytes, positions: Sequence[int]) -> Sequence[int]:
        """Byte offsets in `data` of the sorted text `positions`, verified to reproduce `data` exactly."""
        payload = memoryview(data)[self.bom :]
        if self.ascii_compatible and len(text) == len(payload) and text.encode(self.codec, "surrogateescape") == payload:
            return [self.bom + position for position in positions]  # one byte per character
        offsets: list[int] = []
        pieces: list[bytes] = []
        offset = self.bom
        previous = 0
        for position in positions:
            piece = text[previous:position].encode(self.codec, "surrogateescape")
            pieces.append(piece)
            offset += len(piece)
            offsets.append(offset)
            previous = position
        pieces.append(text[previous:].encode(self.codec, "surrogateescape"))
        # Encoding piece by piece equals the original only if the encoder is back in its initial state at
        # every position (ISO-2022-JP in ASCII mode, no BOM), which is also what makes splicing there valid.
        if b"".join(pieces) != payload:
            raise CharsetError(f"{self.codec} bytes do not round-trip exactly")
        return offsets


@lru_cache(maxsize=64)
def _byte_transparent(codec: str) -> bool:
    if codec == "utf-8":
        return True  # multi-byte sequences are made of bytes >= 0x80 only (RFC 3629)
    decoded = bytes(range(256)).decode(codec, "surrogateescape")
    return len(decoded) == 256 and decoded[:128] == _ASCII and all(char >= "\x80" for char in decoded[128:])


def _bom_charset(data: bytes) -> str | None:
    if data.startswith(codecs.BOM_UTF8):
        return "utf-8"
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    return None


def _declared(data: bytes) -> str | None:
    """The first charset the HTML5 prescan finds that we know; a UTF-16 one means UTF-8 (WHATWG HTML §13.2.3.2)."""
    for label in declared_charsets(data):
        try:
            name = Charset._lookup(label)
        except CharsetError:
            continue
        return "utf-8" if name.startswith("utf-16") else name
    return None


def _utf8_or_windows_1252(data: bytes) -> str:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return "cp1252"
    return "utf-8"


def _byte_order(name: str, data: bytes) -> tuple[str, int]:
    """The UTF-16/32 codec with its byte order fixed, and the length of the byte-order mark kept as it is.

    A BOM decides (browsers let it beat even the label). Without one, a label that names the order decides.
    A bare `utf-16` label is where RFC 2781 §4.3 says big-endian but real mail (Outlook Express) is
    little-endian: the order is read from the zero bytes, as browsers sniff it. HTML is mostly ASCII, whose
    code units have their zero byte(s) on the high side. When the zeros do not tell, the part is left alone
    rather than written in an order that may not be the document's.
    """
    family, width = ("utf-16", 2) if name.startswith("utf-16") else ("utf-32", 4)
    little, big = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE) if width == 2 else (codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)
    if width == 2 and data.startswith(codecs.BOM_UTF32_LE):
        raise CharsetError("utf-16 label on UTF-32 data")  # FF FE 00 00 is both BOMs: do not guess
    if data.startswith(little):
        return f"{family}-le", width
    if data.startswith(big):
        return f"{family}-be", width
    if name.endswith(("-le", "-be")):
        return name, 0
    sample = data[: 4096 - 4096 % width]
    little_endian = sample[width - 1 :: width].count(0)  # high byte of an ASCII unit, little-endian
    big_endian = sample[0::width].count(0)
    if max(little_endian, big_endian) >= _SNIFF_MIN_UNITS and min(little_endian, big_endian) * 4 <= max(little_endian, big_endian):
        return f"{family}-{'le' if little_endian > big_endian else 'be'}", 0
    raise CharsetError(f"{family} without a byte-order mark whose byte order cannot be told")
