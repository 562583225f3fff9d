"""How an HTML part's bytes are read: UTF-16/32 byte order, the HTML5 <meta> prescan, the fallbacks."""

from __future__ import annotations

import codecs

import pytest

from relay.charset import Charset, CharsetError
from relay.prescan import declared_charsets

HTML = '<html><body><p>Grüße, 東京</p><a href="https://e.com/ü">x</a></body></html>'


@pytest.mark.parametrize("label", ["utf-16", "UTF-16".lower()])
@pytest.mark.parametrize(("codec", "order"), [("utf-16-le", "le"), ("utf-16-be", "be")])
def test_utf16_without_bom_is_read_in_the_order_its_zero_bytes_show(label: str, codec: str, order: str) -> None:
    charset = Charset.resolve(label, HTML.encode(codec))
    assert (charset.codec, charset.bom) == (f"utf-16-{order}", 0)
    assert charset.decode(HTML.encode(codec)) == HTML
    assert charset.encode("<img>") == "<img>".encode(codec)  # inserted bytes in the document's own order


@pytest.mark.parametrize(("codec", "order"), [("utf-32-le", "le"), ("utf-32-be", "be")])
def test_utf32_without_bom_is_sniffed_too(codec: str, order: str) -> None:
    assert Charset.resolve("utf-32", HTML.encode(codec)).codec == f"utf-32-{order}"


@pytest.mark.parametrize("data", ["東京".encode("utf-16-le"), b"", "ab".encode("utf-16-le"), b"\x00<\x00a<\x00a\x00"])
def test_utf16_whose_order_cannot_be_told_is_refused(data: bytes) -> None:
    with pytest.raises(CharsetError, match="byte order cannot be told"):
        Charset.resolve("utf-16", data)


@pytest.mark.parametrize(("bom", "label", "codec"), [
    (codecs.BOM_UTF16_LE, "utf-16", "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16", "utf-16-be"),
    (codecs.BOM_UTF16_BE, "utf-16le", "utf-16-be"),  # the BOM beats the label, as in browsers
    (codecs.BOM_UTF16_LE, None, "utf-16-le"),
])
def test_a_byte_order_mark_decides_and_is_kept(bom: bytes, label: str | None, codec: str) -> None:
    charset = Charset.resolve(label, bom + HTML.encode(codec))
    assert (charset.codec, charset.bom) == (codec, 2)


def test_an_explicit_order_label_without_bom_is_followed() -> None:
    assert Charset.resolve("utf-16be", HTML.encode("utf-16-be")).codec == "utf-16-be"


@pytest.mark.parametrize(("head", "label"), [
    (b'<meta charset="Shift_JIS">', "shift_jis"),
    (b"<META CHARSET=euc-jp>", "euc-jp"),
    (b'<meta http-equiv="Content-Type" content="text/html; charset=ISO-8859-2">', "iso-8859-2"),
    (b"<meta content='text/html; charset=\"koi8-r\"' http-equiv=content-type>", "koi8-r"),
    (b'<!-- <meta charset="koi8-r"> --><meta charset="windows-1250">', "windows-1250"),  # comments are skipped
    (b'<img alt="<meta charset=koi8-r>"><meta charset=gbk>', "gbk"),  # so are other tags' attribute values
    (b'<meta charset="klingon"><meta charset="big5">', "klingon"),  # every label, in order
])
def test_prescan_finds_the_declared_label(head: bytes, label: str) -> None:
    assert next(declared_charsets(b"<!DOCTYPE html><html><head>" + head)) == label


@pytest.mark.parametrize("head", [
    b'<meta content="text/html; charset=koi8-r">',  # content without http-equiv: not a declaration
    b"<meta name=charset content=koi8-r>",
    b" " * 1024 + b'<meta charset="koi8-r">',  # only the first 1,024 bytes count
    b"<!-- unterminated <meta charset=koi8-r>",
])
def test_prescan_ignores_what_is_not_a_declaration(head: bytes) -> None:
    assert list(declared_charsets(head)) == []


def test_unlabelled_part_uses_the_declared_charset_then_the_fallbacks() -> None:
    sjis = '<meta charset="shift_jis"><a href="https://e.jp/セール">x</a>'.encode("shift_jis")
    assert Charset.resolve(None, sjis).codec == "shift_jis"
    assert Charset.resolve(None, b'<meta charset="klingon"><meta charset="koi8-r">').codec == "koi8-r"
    assert Charset.resolve(None, b'<meta charset="utf-16">x').codec == "utf-8"  # the spec's own correction
    assert Charset.resolve(None, "é".encode()).codec == "utf-8"
    assert Charset.resolve(None, b"\xe9").codec == "cp1252"


def test_the_mime_label_beats_the_meta() -> None:
    assert Charset.resolve("iso-8859-1", b'<meta charset="shift_jis">').codec == "cp1252"
