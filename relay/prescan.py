"""The charset an HTML part declares in its own markup: the HTML5 prescan (WHATWG HTML §13.2.3.2).

A part without a MIME charset is read by browsers and webmail through its `<meta charset>` or
`<meta http-equiv="Content-Type" content="...; charset=...">` in the first 1,024 bytes. Guessing UTF-8 or
windows-1252 instead would make us read (and sign) other link text than the reader follows. The steps below
follow the specification's algorithm byte for byte, including how it skips comments and other tags' attributes.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

__all__ = ["declared_charsets"]

_LIMIT = 1024
_WS = b"\t\n\x0c\r "
_TAG_START = re.compile(rb"</?[A-Za-z]")
_UPPER = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", b"abcdefghijklmnopqrstuvwxyz")


def declared_charsets(data: bytes) -> Iterator[str]:
    """Every charset label the prescan finds, in order; the caller takes the first it knows (the spec's
    "if charset is failure, go on with the next byte") and reads a UTF-16 one as UTF-8, as the spec does
    (a document whose markup reads as ASCII is not UTF-16)."""
    data = data[:_LIMIT]
    pos = 0
    while pos < len(data):
        if data.startswith(b"<!--", pos):
            end = data.find(b"-->", pos + 2)  # "<!-->" ends at once: the '>' follows two '-' after the '<'
            if end < 0:
                return
            pos = end + 3
        elif data[pos : pos + 5].lower() == b"<meta" and pos + 5 < len(data) and data[pos + 5] in b"\t\n\x0c\r /":
            pos, label = _meta(data, pos + 5)
            if label:
                yield label
        elif _TAG_START.match(data, pos):
            pos = _skip_tag(data, pos)
        elif data.startswith((b"<!", b"</", b"<?"), pos):
            end = data.find(b">", pos + 2)
            if end < 0:
                return
            pos = end + 1
        else:
            pos += 1


def _skip_tag(data: bytes, pos: int) -> int:
    """Past a tag other than <meta>: its attribute values may contain '>'."""
    while pos < len(data) and data[pos] not in _WS and data[pos] != 0x3E:
        pos += 1
    while True:
        pos, attribute = _attribute(data, pos)
        if attribute is None:
            return pos


def _meta(data: bytes, pos: int) -> tuple[int, str | None]:
    seen: set[bytes] = set()
    got_pragma = False
    need_pragma: bool | None = None
    charset: bytes | None = None
    while True:
        pos, attribute = _attribute(data, pos)
        if attribute is None:
            break
        name, value = attribute
        if name in seen:
            continue
        seen.add(name)
        if name == b"http-equiv":
            got_pragma = got_pragma or value == b"content-type"
        elif name == b"content" and charset is None:
            found = _charset_in_content(value)
            if found is not None:
                charset, need_pragma = found, True
        elif name == b"charset":
            charset, need_pragma = value, False
    if need_pragma is None or (need_pragma and not got_pragma) or not charset:
        return pos, None
    label = charset.decode("latin-1").strip(" \t\n\x0c\r").lower()
    return pos, "windows-1252" if label == "x-user-defined" else label


def _attribute(data: bytes, pos: int) -> tuple[int, tuple[bytes, bytes] | None]:
    """The spec's "get an attribute": (position after it, (name, value)) or None at '>' or the end."""
    while pos < len(data) and (data[pos] in _WS or data[pos] == 0x2F):
        pos += 1
    if pos >= len(data) or data[pos] == 0x3E:
        return pos, None
    name = bytearray()
    while True:
        if pos >= len(data):
            return pos, None
        byte = data[pos]
        if byte == 0x3D and name:
            pos += 1
            break
        if byte in _WS:
            while pos < len(data) and data[pos] in _WS:
                pos += 1
            if pos >= len(data) or data[pos] != 0x3D:
                return pos, (bytes(name), b"")
            pos += 1
            break
        if byte in (0x2F, 0x3E):
            return pos, (bytes(name), b"")
        name.append(byte)
        pos += 1
    name_bytes = bytes(name).translate(_UPPER)
    while pos < len(data) and data[pos] in _WS:
        pos += 1
    if pos >= len(data):
        return pos, None
    quote = data[pos]
    if quote in (0x22, 0x27):
        end = data.find(bytes([quote]), pos + 1)
        if end < 0:
            return len(data), None
        return end + 1, (name_bytes, data[pos + 1 : end].translate(_UPPER))
    if quote == 0x3E:
        return pos, (name_bytes, b"")
    start = pos
    while pos < len(data) and data[pos] not in _WS and data[pos] != 0x3E:
        pos += 1
    return pos, (name_bytes, data[start:pos].translate(_UPPER))


def _charset_in_content(value: bytes) -> bytes | None:
    """"Extracting a character encoding from a meta element" (WHATWG HTML §2.5.8) for a lowercased value."""
    pos = 0
    while True:
        found = value.find(b"charset", pos)
        if found < 0:
            return None
        pos = found + 7
        while pos < len(value) and value[pos] in _WS:
            pos += 1
        if pos < len(value) and value[pos] == 0x3D:
            break
    pos += 1
    while pos < len(value) and value[pos] in _WS:
        pos += 1
    if pos >= len(value):
        return None
    if value[pos] in (0x22, 0x27):
        end = value.find(value[pos : pos + 1], pos + 1)
        return value[pos + 1 : end] if end >= 0 else None
    end = pos
    while end < len(value) and value[end] not in _WS and value[end] != 0x3B:
        end += 1
    return value[pos:end] or None
