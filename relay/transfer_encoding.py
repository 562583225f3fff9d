"""Content-Transfer-Encodings (RFC 2045 §6) with position maps, so a part keeps its encoding when edited.

Peers re-encoded bodies and kept the old Content-Transfer-Encoding header, garbling mail. Here each encoding
decodes a body for scanning, maps decoded byte offsets to positions it can edit at, and renders edits as the
pieces of a new body in the *same* encoding:

- 7bit/8bit/binary: edits are spliced into the original bytes; a line that an edit would push past the 998
  octets of RFC 5322 §2.1.1 is broken at attribute boundaries (some MTAs otherwise break it anywhere, even
  inside a URL).
- quoted-printable: only the edited lines change. The original encoded text before and after each edit is kept
  and the inserted bytes are encoded and wrapped with soft line breaks so no line exceeds 76 characters
  (RFC 2045 §6.7 rule 5).
- base64: the decoded bytes are edited and re-encoded whole (base64 has no local edits), in lines of the
  original length (76 when unusual), with the original line ending and trailing whitespace.
"""

from __future__ import annotations

import binascii
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple, Protocol

__all__ = [
    "Base64Body",
    "Body",
    "Edit",
    "IdentityBody",
    "QuotedPrintableBody",
    "UnsupportedEncoding",
    "body_for",
    "canonical_encoding",
]


# Spellings real mail carries (`8bits`, `7-bit`, `quoted_printable`, `Quoted-Printable `), keyed without case,
# whitespace, '-' or '_': clients decode these as the encoding they obviously mean, so a part written that way is
# read, and must be tracked, like one spelled right. Anything else stays unknown (RFC 2045 §6.4: opaque).
_SPELLINGS = {
    "7bit": "7bit",
    "7bits": "7bit",
    "8bit": "8bit",
    "8bits": "8bit",
    "binary": "binary",
    "quotedprintable": "quoted-printable",
    "base64": "base64",
}
_SEPARATORS = re.compile(r"[\s_\-\"]+")


def canonical_encoding(value: str | None) -> str:
    """The RFC 2045 name of a Content-Transfer-Encoding value ("7bit" when absent or empty); an unknown one lowercased."""
    if value is None or not value.strip():
        return "7bit"
    return _SPELLINGS.get(_SEPARATORS.sub("", value.lower()), value.strip().lower())


class UnsupportedEncoding(ValueError):
    """The part's transfer encoding is unknown or its content does not decode."""


class Edit(NamedTuple):
    """Replace body positions [start, end) with `data` (positions from `Body.positions`)."""

    start: int
    end: int
    data: bytes
    # Where a line break may be inserted if the line grows too long (identity encodings); None: nowhere.
    break_before: int | None
    break_after: int | None


class Body(Protocol):
    decoded: bytes
    breaks_lines: bool  # whether render may use an edit's break positions (then they must be given)
    # Whether an edit's QP-safe bytes reach the output as they are (wrapped at most) and where they go depends
    # only on their length: copies differing only in such bytes can be spliced into one render (relay/template.py).
    splices: bool

    def positions(self, offsets: Sequence[int]) -> Sequence[int]:
        """Edit positions for sorted offsets into `decoded`."""

    def release(self) -> None:
        """Let go of `decoded` when rendering does not read it (called once it has been scanned)."""

    def render(self, edits: Iterable[Edit]) -> Iterable[bytes]:
        """Pieces of the new encoded body; `edits` sorted and non-overlapping. Both may be lazy: a body with
        100 k links then never holds all its edits or pieces at once (README "Memory")."""


def body_for(encoding: str, data: bytes, eol: bytes) -> Body:
    """The body codec for a Content-Transfer-Encoding value (as `canonical_encoding` gives it); `eol` is the message's line ending,
    used for line breaks we add when the body itself has none to copy."""
    eol = _line_ending(data, eol)
    if encoding in ("7bit", "8bit", "binary"):
        # RFC 3030 BINARYMIME has no line length limit; 7bit and 8bit do.
        return IdentityBody(data, eol, line_limit=encoding != "binary")
    if encoding == "quoted-printable":
        return QuotedPrintableBody(data, eol)
    if encoding == "base64":
        return Base64Body(data, eol)
    # RFC 2045 §6.4: an unrecognised encoding makes the part opaque (application/octet-stream) to a reader.
    raise UnsupportedEncoding(f"unsupported transfer encoding {encoding[:40]!r}")


def _line_ending(data: bytes, default: bytes) -> bytes:
    newline = data.find(b"\n")
    if newline < 0:
        return default
    return b"\r\n" if newline > 0 and data[newline - 1] == 0x0D else b"\n"


class IdentityBody:
    """7bit, 8bit and binary: the encoded bytes are the decoded bytes."""

    splices = True

    _MAX_LINE = 998  # RFC 5322 §2.1.1, excluding CRLF

    def __init__(self, data: bytes, eol: bytes, *, line_limit: bool) -> None:
        self.decoded = data
        self.breaks_lines = line_limit
        self._eol = eol

    def positions(self, offsets: Sequence[int]) -> Sequence[int]:
        return offsets

    def release(self) -> None:
        pass  # `decoded` is the body itself

    def render(self, edits: Iterable[Edit]) -> Iterator[bytes]:
        data = self.decoded
        if self.breaks_lines:
            edits = self._break_long_lines(list(edits))
        pos = 0
        for edit in edits:
            yield data[pos : edit.start]
            yield edit.data
            pos = edit.end
        yield data[pos:]

    def _break_long_lines(self, edits: list[Edit]) -> list[Edit]:
        data = self.decoded
        out: list[Edit] = []
        index = 0
        while index < len(edits):
            # Edits on one line: from the line start of the first to the line end after the last.
            line_start = data.rfind(b"\n", 0, edits[index].start) + 1
            # The common case, on every link of every copy: the only edit on a line that stays short enough
            # (measured to its line feed, a CR included: when that is too long, the exact reckoning below decides).
            start, end, inserted, _, _ = edits[index]
            newline = data.find(b"\n", end)
            line_feed = len(data) if newline < 0 else newline
            if (index + 1 == len(edits) or edits[index + 1].start >= line_feed) and (
                line_feed - line_start + len(inserted) - (end - start) <= self._MAX_LINE
            ):
                out.append(edits[index])
                index += 1
                continue
            group = [edits[index]]
            line_end = self._line_end(edits[index].end)
            while index + len(group) < len(edits) and edits[index + len(group)].start < line_end:
                group.append(edits[index + len(group)])
                line_end = self._line_end(group[-1].end)
            index += len(group)
            length = line_end - line_start + sum(len(edit.data) - (edit.end - edit.start) for edit in group)
            if length <= self._MAX_LINE or any(edit.break_before is None for edit in group):
                out.extend(group)
                continue
            # Break before the attribute name and after its value: there a line break is just whitespace
            # between attributes (or in the body text, around the pixel).
            for edit in group:
                before, after = edit.break_before, edit.break_after
                assert before is not None and after is not None
                out.append(Edit(before, before, self._eol, None, None))
                out.append(edit)
                out.append(Edit(after, after, self._eol, None, None))
        return out

    def _line_end(self, pos: int) -> int:
        end = self.decoded.find(b"\n", pos)
        if end < 0:
            return len(self.decoded)
        return end - 1 if end > 0 and self.decoded[end - 1] == 0x0D else end


_HEX_DIGITS = frozenset(b"0123456789ABCDEFabcdef")
# RFC 2045 §6.7 rule 2: printable ASCII except '=' may stand for itself; space too, except at a line end.
_QP_UNSAFE = re.compile(rb"[^ !-<>-~]")
_QP_SAFE = bytes(byte for byte in range(256) if _QP_UNSAFE.match(bytes([byte])) is None)
_QP_LINE = 76  # rule 5, including the '=' of a soft line break
_QP_NEAR = 2 * _QP_LINE  # encoded bytes within which lines are walked one by one rather than skipped
_QP_SKIP = 1 << 16  # encoded bytes decoded at once when skipping lines with no offset: bounds the temporary


def _qp_escape(match: re.Match[bytes]) -> bytes:
    return b"=%02X" % match[0][0]


class QuotedPrintableBody:
    """quoted-printable, decoded exactly as binascii.a2b_qp (what the stdlib email package uses) does."""

    breaks_lines = False
    splices = True

    def __init__(self, data: bytes, eol: bytes) -> None:
        self._data = data
        # Decoding the whole equals decoding line by line: a2b_qp never looks past a line feed. No per-line
        # lists are kept: for a 20 MB body they held five times its size (bench case memory).
        self.decoded = binascii.a2b_qp(data)
        self._eol = eol
        self._soft_break = b"=" + eol

    def positions(self, offsets: Sequence[int]) -> Sequence[int]:
        """One pass over the physical lines (offsets come sorted); lines between offsets are decoded in bulk."""
        data = self._data
        if not data:
            return [0] * len(offsets)
        out = []
        size, find, rfind, a2b_qp, view, walk = len(data), data.find, data.rfind, binascii.a2b_qp, memoryview(data), self._walk
        last = size - 1
        start, end = 0, find(b"\n") + 1 or size  # the current line, its line feed included (a bare CR ends none)
        line = data[start:end]
        line_decoded = a2b_qp(line)
        decoded_start, decoded_end = 0, len(line_decoded)  # where the current line's decoded text starts and ends
        for offset in offsets:
            if decoded_end <= offset and end < size:
                # Encoded text is never shorter than what it decodes to, so every whole line before the one holding
                # encoded position start + (offset - decoded_start) ends at or before the offset: decode them in
                # one call (a view, in bounded steps) instead of line by line. The last line is never skipped.
                # (Not worth it for an offset a line or two on, such as the end of a link after its start.)
                while (bound := start + offset - decoded_start) - end > _QP_NEAR:
                    bound = last if bound > last else bound
                    skip_to = rfind(b"\n", start, bound if bound - start <= _QP_SKIP else start + _QP_SKIP) + 1
                    if skip_to <= end:
                        break
                    decoded_start = decoded_end = decoded_start + len(a2b_qp(view[start:skip_to]))
                    start = end = skip_to
                # The last line whose decoded text starts at or before the offset (lines that decode to nothing are passed).
                while decoded_end <= offset and end < size:
                    start = end
                    end = find(b"\n", start) + 1 or size
                    line = data[start:end]
                    line_decoded = a2b_qp(line)
                    decoded_start, decoded_end = decoded_end, decoded_end + len(line_decoded)
            # The column before the line's wanted-th decoded byte. When every '=' before it is an =XX escape, it is
            # the least fixed point of wanted + 2 x (number of '=' before it), counted in C from below (with no
            # '=', the first count ends it). It is taken when no '=' is among the two bytes before it (no escape
            # is cut) and the text before it decodes to exactly what it must; otherwise ("==", a literal '=')
            # the line is walked escape by escape.
            column = wanted = offset - decoded_start
            while (following := wanted + 2 * line.count(b"=", 0, column)) != column:
                column = following
            if column != wanted and not (
                column <= len(line) and line.find(b"=", column - 2, column) < 0 and a2b_qp(line[:column]) == line_decoded[:wanted]
            ):
                column = walk(line, line_decoded, wanted)
            out.append(start + column)
        return out

    def release(self) -> None:
        self.decoded = b""  # rendering edits the encoded text: for a 20 MB body that is 19 MB less

    @classmethod
    def _walk(cls, line: bytes, decoded: bytes, wanted: int) -> int:
        """Column in `line` before its `wanted`th decoded byte, walked as a2b_qp reads '=' and checked."""
        column = cls._advance(line, 0, wanted)
        # The sentinel keeps a literal '=' at the cut from being read as a soft line break.
        if binascii.a2b_qp(line[:column] + b"x")[:-1] != decoded[:wanted]:
            raise UnsupportedEncoding("quoted-printable position does not map back exactly")
        return column

    @staticmethod
    def _advance(line: bytes, pos: int, count: int) -> int:
        """Column after `count` more decoded bytes of `line` from column `pos`, mirroring a2b_qp's reading of '='."""
        while count > 0:
            equals = line.find(b"=", pos, pos + count)
            if equals < 0:
                return pos + count
            count -= equals - pos
            pos = equals
            if count == 0:
                return pos
            if line[pos + 1 : pos + 2] == b"=":  # a2b_qp reads "==" as one '='
                pos += 2
            elif len(pair := line[pos + 1 : pos + 3]) == 2 and pair[0] in _HEX_DIGITS and pair[1] in _HEX_DIGITS:
                pos += 3
            else:
                pos += 1
            count -= 1
        return pos

    def render(self, edits: Iterable[Edit]) -> Iterator[bytes]:
        """Pieces of the body with `edits` made, as they come (see `_copy` and `_wrap`, which this inlines for
        the common edit: safe bytes, such as a tracked URL, on a line that has room for them)."""
        data, soft_break, find = self._data, self._soft_break, self._data.find
        out: list[bytes] = []  # pieces of the uncommon cases, handed on as they are made
        pos = 0
        column: int | None = None  # output column once our output diverged from the original line
        for start, end, inserted, _, _ in edits:
            newline = find(b"\n", pos, start)
            if column is None or newline < 0 or data[newline - 1 : newline + 1] != b"\r\n" or data[newline - 2] == 0x0D:
                column = self._copy(out, pos, start, column, more=True)
                yield from out
                out.clear()
            else:  # _copy where the original text ends our line with one CRLF
                if newline - 1 > pos and column + newline - 1 - pos > _QP_LINE:
                    yield soft_break
                yield data[pos:start]
                column = None
            if column is None:
                column = start - (data.rfind(b"\n", 0, start) + 1)
            if inserted and not inserted.translate(None, _QP_SAFE) and not inserted.endswith(b" "):
                # _wrap of bytes that need no escape: as they are, or cut at fixed widths.
                room, size = max(_QP_LINE - 1 - column, 0), len(inserted)
                if size <= room:
                    yield inserted
                    column += size
                elif size - room <= _QP_LINE - 1:
                    yield inserted[:room] + soft_break
                    yield inserted[room:]
                    column = size - room
                else:
                    yield soft_break.join([inserted[:room], *(inserted[i : i + _QP_LINE - 1] for i in range(room, size, _QP_LINE - 1))])
                    column = (size - room - 1) % (_QP_LINE - 1) + 1
            else:
                column = self._wrap(out, inserted, column)
                yield from out
                out.clear()
            pos = end
        self._copy(out, pos, len(data), column, more=False)
        yield from out

    def _copy(self, out: list[bytes], start: int, end: int, column: int | None, *, more: bool) -> int | None:
        """Copy original encoded text, with a soft break first if its first line would overflow ours."""
        segment = self._data[start:end]
        newline = segment.find(b"\n")
        if column is not None:
            first = segment if newline < 0 else segment[:newline].rstrip(b"\r")
            # Text followed by another edit on the same line must leave room for that edit's soft break.
            limit = _QP_LINE - 1 if newline < 0 and more else _QP_LINE
            if first and column + len(first) > limit:
                out.append(self._soft_break)
                column = 0
            column = column + len(first) if newline < 0 else None
        out.append(segment)
        return column

    def _wrap(self, out: list[bytes], data: bytes, column: int) -> int:
        """Append `data` quoted-printable encoded from `column`, with soft breaks; returns the end column."""
        # Tracked URLs need no escape: deleting the safe bytes finds that ~6x quicker than the regex's search.
        encoded = _QP_UNSAFE.sub(_qp_escape, data) if data.translate(None, _QP_SAFE) else data
        if encoded.endswith(b" "):
            encoded = encoded[:-1] + b"=20"  # rule 3: no literal space at a line end
        room = _QP_LINE - 1 - column
        if len(encoded) <= room:
            out.append(encoded)
            return column + len(encoded)
        if encoded and b"=" not in encoded:  # no escape to keep whole (a tracked URL): cut at fixed widths
            first = max(room, 0)
            lines = [encoded[:first], *(encoded[i : i + _QP_LINE - 1] for i in range(first, len(encoded), _QP_LINE - 1))]
            out.append(self._soft_break.join(lines))
            return len(lines[-1])
        start = 0
        while len(encoded) - start > room:
            cut = start + max(room, 0)
            if cut > start and encoded[cut - 1] == 0x3D:  # never split an "=XX" escape
                cut -= 1
            elif cut - 2 >= start and encoded[cut - 2] == 0x3D:
                cut -= 2
            out += (encoded[start:cut], self._soft_break)
            start = cut
            room = _QP_LINE - 1
        out.append(encoded[start:])
        return _QP_LINE - 1 - room + len(encoded) - start


_BASE64_TEXT = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\r\n\t "


class Base64Body:
    """base64 (RFC 2045 §6.8): re-encoded whole in the original line length and line ending."""

    breaks_lines = False
    splices = False  # an edit's bytes are re-encoded with their neighbours

    def __init__(self, data: bytes, eol: bytes) -> None:
        if data.translate(None, _BASE64_TEXT):
            raise UnsupportedEncoding("base64 body with characters outside the base64 alphabet")
        try:
            self.decoded = binascii.a2b_base64(data)
        except binascii.Error as exc:
            raise UnsupportedEncoding(f"base64 body does not decode: {exc}") from None
        # a2b_base64 silently stops at the first padding: data after it (concatenated encodings) would be lost.
        if len(data.translate(None, b" \t\r\n")) != 4 * ((len(self.decoded) + 2) // 3):
            raise UnsupportedEncoding("base64 body with data after its padding")
        content = data.strip()
        self._leading = data[: len(data) - len(data.lstrip())]
        self._trailing = data[len(data.rstrip()) :]
        first_line = len(content.split(b"\n", 1)[0].rstrip(b"\r"))
        self._line_length = first_line if 4 <= first_line <= 76 and first_line % 4 == 0 and b"\n" in content else 76
        self._eol = eol

    def positions(self, offsets: Sequence[int]) -> Sequence[int]:
        return offsets

    def release(self) -> None:
        pass  # rendering re-encodes the decoded bytes

    def render(self, edits: Iterable[Edit]) -> list[bytes]:
        pieces: list[bytes] = []
        pos = 0
        for edit in edits:
            pieces.append(self.decoded[pos : edit.start])
            pieces.append(edit.data)
            pos = edit.end
        pieces.append(self.decoded[pos:])
        encoded = binascii.b2a_base64(b"".join(pieces), newline=False)
        step = self._line_length
        lines = [encoded[i : i + step] for i in range(0, len(encoded), step)]
        return [self._leading, self._eol.join(lines), self._trailing]
