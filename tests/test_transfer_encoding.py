"""Quoted-printable edits: soft line breaks around inserted text, whatever its length and column."""

from __future__ import annotations

import binascii
import contextlib
import quopri
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.transfer_encoding import Edit, QuotedPrintableBody, UnsupportedEncoding, body_for, canonical_encoding


@pytest.mark.parametrize("eol", [b"\r\n", b"\n"])
@pytest.mark.parametrize("column", [0, 1, 40, 74, 75])
@pytest.mark.parametrize("inserted", [
    b"https://t.example/c/" + b"A" * 300,  # no '=' to keep whole: the fixed-width path
    b"https://t.example/c/?v=1&s=" + b"B" * 150,  # '=' escaped as =3D, never split
    b"x", b"",
])
def test_inserted_text_is_wrapped_within_76_and_decodes_back(eol: bytes, column: int, inserted: bytes) -> None:
    before, after = b"p" * column, b"tail"
    data = before + b"OLD" + after + eol + b"next line" + eol
    body = QuotedPrintableBody(data, eol)
    start, end = body.positions([column, column + 3])
    out = b"".join(body.render([Edit(start, end, inserted, None, None)]))
    assert all(len(line) <= 76 for line in out.split(eol))
    assert binascii.a2b_qp(out) == before + inserted + after + eol + b"next line" + eol
    assert out.endswith(eol + b"next line" + eol)  # lines after the edit are copied as they were


@pytest.mark.parametrize(("value", "canonical"), [
    (None, "7bit"), ("", "7bit"), ("  ", "7bit"), ("7BIT", "7bit"), ("7-bit", "7bit"), ("7bits", "7bit"),
    ("8bits", "8bit"), ("8-Bit", "8bit"), ("Binary", "binary"), ("Quoted-Printable ", "quoted-printable"),
    ("quoted_printable", "quoted-printable"), ("QUOTED-PRINTABLE", "quoted-printable"), (' "base64"', "base64"),
    ("x-uuencode", "x-uuencode"), ("X-Gzip ", "x-gzip"),
])
def test_transfer_encoding_spellings_of_real_mail(value: str | None, canonical: str) -> None:
    assert canonical_encoding(value) == canonical


def test_unknown_transfer_encoding_stays_unsupported() -> None:
    with pytest.raises(UnsupportedEncoding, match="x-gzip"):
        body_for(canonical_encoding("X-Gzip"), b"data", b"\r\n")


@pytest.mark.parametrize("data", [b"a=3Db\rc=\r\nd\r\n", b"a\r\rb=\nc", b"x=41\ry", b"ab\r"])
def test_quoted_printable_lines_break_at_lf_only_like_a2b_qp(data: bytes) -> None:
    body = QuotedPrintableBody(data, b"\r\n")
    assert body.decoded == binascii.a2b_qp(data)
    positions = body.positions(list(range(len(body.decoded) + 1)))
    assert all(binascii.a2b_qp(data[:p] + b"x")[:-1] == body.decoded[:i] for i, p in enumerate(positions))


def test_quoted_printable_positions_of_sparse_offsets_skip_lines_exactly() -> None:
    # Lines that decode shorter (escapes, soft breaks), to nothing ("=\n") or long; offsets
    # far apart take the many-lines-at-once path, and must land where mapping every offset line by line puts them.
    lines = [b"caf=C3=A9 " * (i % 9) + b"=\n" * (i % 3 == 0) + b"plain text" * (i % 5) + b"\r\n" for i in range(1_200)]
    data = b"".join(lines) + b"x" * 2_000 + b"\r\nend=3D"
    body = QuotedPrintableBody(data, b"\r\n")
    every = body.positions(list(range(len(body.decoded) + 1)))
    for stride in (7, 300, 5_000, 200_000):
        offsets = [*range(0, len(body.decoded), stride), len(body.decoded)]
        assert body.positions(offsets) == [every[offset] for offset in offsets]
    sample = range(0, len(body.decoded) + 1, 997)
    assert all(binascii.a2b_qp(data[: every[offset]] + b"x")[:-1] == body.decoded[:offset] for offset in sample)


def reference_positions(data: bytes, offsets: list[int]) -> list[int]:
    """The definition positions had before the column was counted in C: per offset, the first line whose decoded text
    ends after it (or the last line), and the column a2b_qp's reading reaches after that many decoded bytes."""
    lines = re.findall(rb"[^\n]*\n|[^\n]+\Z", data) or [b""]
    out = []
    for offset in offsets:
        start = decoded_start = 0
        for index, line in enumerate(lines):
            if decoded_start + len(binascii.a2b_qp(line)) > offset or index == len(lines) - 1:
                break
            start += len(line)
            decoded_start += len(binascii.a2b_qp(line))
        column, count = 0, offset - decoded_start
        while count > 0:  # as a2b_qp reads '=': "==" is one '=', =XX one byte, '=' before anything else itself
            if line[column : column + 1] != b"=":
                column += 1
            elif line[column + 1 : column + 2] == b"=":
                column += 2
            elif re.fullmatch(rb"[0-9A-Fa-f]{2}", line[column + 1 : column + 3]):
                column += 3
            else:
                column += 1
            count -= 1
        if binascii.a2b_qp(line[:column] + b"x")[:-1] != binascii.a2b_qp(line)[: offset - decoded_start]:
            raise UnsupportedEncoding("does not map back")
        out.append(start + column)
    return out


QP_PIECES = [b"a", b"b c", b"=3D", b"=3d", b"=C3=A9", b"==", b"=z", b"=4", b"=", b"=\r\n", b"=\n", b"\r\n", b"\n", b"\r",
             b" ", b"=\r x\n", b"=\r", b"x" * 80]


@settings(max_examples=500, deadline=None, derandomize=True)
@given(st.lists(st.sampled_from(QP_PIECES), max_size=60), st.data())
def test_quoted_printable_positions_equal_the_line_by_line_definition(pieces: list[bytes], draw: st.DataObject) -> None:
    data = b"".join(pieces)
    body = QuotedPrintableBody(data, b"\r\n")
    offsets = sorted(draw.draw(st.lists(st.integers(0, len(body.decoded)), max_size=12)))
    try:
        expected = reference_positions(data, offsets)
    except UnsupportedEncoding:  # the old walk could not place one: any answer must still map back exactly
        with contextlib.suppress(UnsupportedEncoding):
            got = body.positions(offsets)
            assert all(binascii.a2b_qp(data[:p] + b"x")[:-1] == body.decoded[:o] for o, p in zip(offsets, got, strict=True))
        return
    assert body.positions(offsets) == expected


SAFE_URL = st.text(alphabet="abcXYZ019:/.?&#-_~%", max_size=200).map(str.encode)  # what tracked URLs are made of


@settings(max_examples=400, deadline=None, derandomize=True)
@given(st.binary(max_size=600), st.sampled_from([b"\r\n", b"\n"]), st.data())
def test_edits_render_to_the_edited_text_in_lines_of_at_most_76(text: bytes, eol: bytes, draw: st.DataObject) -> None:
    data = quopri.encodestring(text).replace(b"\n", eol)
    body = QuotedPrintableBody(data, eol)
    cuts = sorted(draw.draw(st.lists(st.integers(0, len(body.decoded)), max_size=8)))
    spans = list(zip(cuts[::2], cuts[1::2], strict=False))
    inserted = [draw.draw(st.one_of(SAFE_URL, st.binary(max_size=120))) for _ in spans]
    positions = body.positions([offset for span in spans for offset in span])
    edits = [Edit(positions[2 * i], positions[2 * i + 1], inserted[i], None, None) for i in range(len(spans))]
    out = b"".join(body.render(edits))
    expected, done = [], 0
    for (start, end), new in zip(spans, inserted, strict=True):
        expected += [body.decoded[done:start], new]
        done = end
    assert binascii.a2b_qp(out) == b"".join([*expected, body.decoded[done:]])
    assert all(len(line.rstrip(b"\r")) <= 76 for line in out.split(b"\n"))


def test_text_after_inserted_text_is_wrapped_at_exactly_the_line_limit() -> None:
    # Every column an edit can start at, inserted text that ends on the first or a later line, and every length of the
    # original text after it up to a whole line: the output line after the edit must end exactly where 76 is reached.
    for column in range(76):
        for length in (1, 40, 80, 150):
            for tail in range(0, 77 - column):
                data = b"p" * column + b"OLD" + b"t" * tail + b"\r\nnext\r\n"
                body = QuotedPrintableBody(data, b"\r\n")
                start, end = body.positions([column, column + 3])
                out = b"".join(body.render([Edit(start, end, b"u" * length, None, None)]))
                assert binascii.a2b_qp(out) == b"p" * column + b"u" * length + b"t" * tail + b"\r\nnext\r\n"
                assert max(map(len, out.split(b"\r\n"))) <= 76
                last_u = out.rindex(b"u") + 1
                end_column = last_u - (out.rfind(b"\n", 0, last_u) + 1)
                # A soft break before the tail exactly when the tail would not fit after the inserted text.
                assert out.startswith(b"=\r\n", last_u) is (end_column + tail > 76)
