from __future__ import annotations

import base64
import email
import quopri
import re
from email import policy

import pytest

from relay.instrument import instrument_message, plan_instrumentation

T0 = "https://track.test/c/r1/0?v=1&amp;s=ab"
PIXEL = re.compile(rb'<img src="https://track\.test/o/r1\.gif\?v=1&amp;s=cd" [^>]*/>')
HONEYPOT = re.compile(rb'<a href="https://track\.test/h/r1" [^>]*></a>')
HTML = '<html><body><p>Café</p><a href="https://shop.example.com/a?x=1&amp;y=2">Buy</a></body></html>'


def message(
    body: bytes,
    *,
    content_type: str = "text/html; charset=utf-8",
    cte: str | None = "8bit",
    headers: bytes = b"",
    eol: bytes = b"\r\n",
) -> bytes:
    lines = [
        b"From: a@example.com",
        b"To: b@example.org",
        b"Subject: test",
        b"MIME-Version: 1.0",
        b"Content-Type: " + content_type.encode(),
    ]
    if cte:
        lines.append(b"Content-Transfer-Encoding: " + cte.encode())
    return eol.join(lines) + eol + headers + eol + body


def multipart(
    subtype: str,
    *parts: bytes,
    boundary: str = "b1",
    preamble: bytes = b"",
    epilogue: bytes = b"",
    headers: bytes = b"",
) -> bytes:
    body = (
        preamble
        + b"".join(b"--" + boundary.encode() + b"\r\n" + part + b"\r\n" for part in parts)
        + b"--"
        + boundary.encode()
        + b"--\r\n"
        + epilogue
    )
    return (
        b"From: a@example.com\r\nTo: b@example.org\r\nSubject: test\r\nMIME-Version: 1.0\r\n"
        + headers
        + f'Content-Type: multipart/{subtype};\r\n\tboundary="{boundary}"\r\n\r\n'.encode()
        + body
    )


def part(body: bytes, content_type: str = "text/html; charset=utf-8", cte: str | None = "8bit", extra: bytes = b"") -> bytes:
    headers = (
        b"Content-Type: " + content_type.encode() + b"\r\n" + (b"Content-Transfer-Encoding: " + cte.encode() + b"\r\n" if cte else b"")
    )
    return headers + extra + b"\r\n" + body


def html_parts(data: bytes) -> list[str]:
    parsed = email.message_from_bytes(data, policy=policy.compat32)
    return [
        p.get_payload(decode=True).decode(p.get_content_charset() or "utf-8")
        for p in parsed.walk()
        if p.get_content_type() == "text/html" and "attachment" not in str(p.get("Content-Disposition", ""))
    ]


def tracked_form(html: str) -> str:
    """The HTML fixture as instrumented by DeterministicMinter, pixel and honeypot removed."""
    return html.replace("https://shop.example.com/a?x=1&amp;y=2", T0)


def strip_markup(data: bytes) -> bytes:
    return PIXEL.sub(b"", HONEYPOT.sub(b"", data))


def test_8bit_part_is_spliced_in_place(minter):
    raw = message(HTML.encode())
    result = instrument_message(raw, minter)
    assert (result.outcome, result.reason, result.links) == ("instrumented", "instrumented", 1)
    assert strip_markup(result.data) == raw.replace(b"https://shop.example.com/a?x=1&amp;y=2", T0.encode())
    assert minter.destinations == ["https://shop.example.com/a?x=1&y=2"]
    assert result.data.index(b"</body>") == PIXEL.search(result.data).end()


@pytest.mark.parametrize("eol", [b"\r\n", b"\n"])
def test_line_endings_of_the_message_are_kept(minter, eol):
    raw = message(HTML.replace("<p>", "\n<p>").encode().replace(b"\n", eol), eol=eol)
    data = instrument_message(raw, minter).data
    assert strip_markup(data) == raw.replace(b"https://shop.example.com/a?x=1&amp;y=2", T0.encode())


def test_quoted_printable_part_stays_quoted_printable(minter):
    long_url = "https://shop.example.com/" + "p" * 90 + "?q=1&amp;r=2"
    html = (
        f'<html><body>\n<p style="color:red">Café {"é" * 40}</p>'
        f'<a href="{long_url}">x</a> tail text that is quite long here</body></html>\n'
    )
    encoded = quopri.encodestring(html.encode()).replace(b"\n", b"\r\n")
    assert b"=\r\n" in encoded  # the URL is split by soft line breaks in the input
    raw = message(encoded, cte="quoted-printable")
    result = instrument_message(raw, minter)
    out_body = result.data[result.data.index(b"\r\n\r\n") + 4 :]
    assert all(len(line) <= 76 for line in out_body.split(b"\r\n"))
    assert result.data.count(b"Content-Transfer-Encoding: quoted-printable") == 1
    (decoded,) = html_parts(result.data)
    assert PIXEL.sub(b"", HONEYPOT.sub(b"", decoded.encode())).decode() == html.replace(long_url, T0).replace("\n", "\r\n")
    assert minter.destinations == ["https://shop.example.com/" + "p" * 90 + "?q=1&r=2"]
    # Encoded lines the edits do not touch are unchanged.
    first_lines = encoded.split(b"\r\n")[:2]
    assert out_body.split(b"\r\n")[:2] == first_lines


@pytest.mark.parametrize("eol", [b"\r\n", b"\n"])
def test_quoted_printable_wraps_edits_sharing_a_line(minter, eol):
    html = '<a href="https://a.example/">1</a><a href="https://b.example/">2</a><a href="https://c.example/">3</a>'
    raw = message(html.encode(), cte="quoted-printable", eol=eol)  # one 100-char line, literal '=' read as-is
    result = instrument_message(raw, minter)
    out_body = result.data[result.data.index(eol + eol) + 2 * len(eol) :]
    assert max(map(len, out_body.split(eol))) <= 76 and (eol == b"\r\n") == (b"\r" in result.data)
    (decoded,) = html_parts(result.data)
    assert decoded.count("https://track.test/c/r1/") == 3 and len(minter.destinations) == 3


def test_base64_part_stays_base64_with_its_line_length(minter):
    encoded = base64.encodebytes(HTML.encode() * 20).replace(b"\n", b"\r\n")
    raw = message(encoded, cte="base64")
    result = instrument_message(raw, minter)
    body = result.data[result.data.index(b"\r\n\r\n") + 4 :]
    lines = body.split(b"\r\n")
    assert body.endswith(b"\r\n") and lines[-1] == b"" and all(len(line) == 76 for line in lines[:-2])
    (decoded,) = html_parts(result.data)
    assert decoded.count(T0) == 20 and len(PIXEL.findall(decoded.encode())) == 1


def test_7bit_ascii_part(minter):
    raw = message(HTML.replace("é", "&eacute;").encode(), cte="7bit")
    result = instrument_message(raw, minter)
    assert result.outcome == "instrumented" and result.data.isascii()


def test_iso_8859_1_bytes_are_not_relabelled(minter):
    html = '<p>Café déjà</p><a href="https://e.com/café">x</a><a href="https://e.com/b">b</a></body>'
    raw = message(html.encode("iso-8859-1"), content_type="text/html; charset=ISO-8859-1")
    result = instrument_message(raw, minter)
    assert b"Caf\xe9 d\xe9j\xe0" in result.data and b"charset=ISO-8859-1" in result.data
    assert strip_markup(result.data) == raw.replace(b"https://e.com/caf\xe9", T0.encode()).replace(
        b"https://e.com/b", T0.replace("/0?", "/1?").encode()
    )
    assert minter.destinations == ["https://e.com/café", "https://e.com/b"]


def test_iso_8859_1_quoted_printable(minter):
    html = '<p>Caf\xe9</p><a href="https://e.com/caf\xe9">x</a></body>'
    raw = message(
        quopri.encodestring(html.encode("latin-1")),
        content_type="text/html; charset=iso-8859-1",
        cte="quoted-printable",
    )
    result = instrument_message(raw, minter)
    assert b"Caf=E9" in result.data and minter.destinations == ["https://e.com/café"]


@pytest.mark.parametrize("bom", [b"\xff\xfe", b"\xfe\xff", b""])
def test_utf16_html(minter, bom):
    codec = {b"\xff\xfe": "utf-16-le", b"\xfe\xff": "utf-16-be", b"": "utf-16-be"}[bom]
    data = bom + HTML.encode(codec)
    raw = message(base64.encodebytes(data), content_type="text/html; charset=utf-16", cte="base64")
    result = instrument_message(raw, minter)
    assert result.outcome == "instrumented", result.reason
    decoded = base64.decodebytes(result.data[result.data.index(b"\r\n\r\n") + 4 :])
    assert decoded.startswith(bom)
    text = decoded[len(bom) :].decode(codec)
    assert re.sub(r'<img [^>]*/>|<a href="https://track.test/h/[^>]*></a>', "", text) == tracked_form(HTML)


def test_utf16_8bit_html_gets_no_line_breaks(minter):
    html = '<a href="https://e.com/">x</a>' * 40  # one very long "line"
    raw = message(html.encode("utf-16-le"), content_type="text/html; charset=utf-16le", cte="binary")
    result = instrument_message(raw, minter)
    text = result.data[result.data.index(b"\r\n\r\n") + 4 :].decode("utf-16-le")
    assert "\n" not in text and text.count(T0) == 40


def test_iso_2022_jp_html(minter):
    html = '<html><body><p>こんにちは</p><a href="https://e.com/jp">リンク</a><p>さようなら</p></body></html>'
    encoded = html.encode("iso2022_jp")
    raw = message(encoded, content_type="text/html; charset=iso-2022-jp", cte="7bit")
    result = instrument_message(raw, minter)
    assert result.outcome == "instrumented" and result.data.isascii()
    assert strip_markup(result.data) == raw.replace(b"https://e.com/jp", T0.encode())
    assert html_parts(result.data)[0].count("こんにちは") == 1


def test_legacy_label_x_mac_cyrillic(minter):
    html = '<p>Привет</p><a href="https://e.com/">x</a>'
    raw = message(html.encode("mac_cyrillic"), content_type="text/html; charset=x-mac-cyrillic")
    assert instrument_message(raw, minter).links == 1


def test_missing_charset_reads_utf8_or_windows_1252(minter, make_minter):
    for encoded, url in [
        ('<a href="https://e.com/é">x</a>'.encode(), "https://e.com/é"),
        (b'<a href="https://e.com/\x80">x</a>', "https://e.com/€"),
    ]:
        m = make_minter()
        result = instrument_message(message(encoded, content_type="text/html"), m)
        assert m.destinations == [url] and result.outcome == "instrumented"


def test_unknown_charset_fails_with_original_bytes(minter):
    raw = message(HTML.encode(), content_type="text/html; charset=klingon")
    result = instrument_message(raw, minter)
    assert (result.outcome, result.data) == ("failed", raw) and "klingon" in result.reason


@pytest.mark.parametrize(
    ("content_type", "reason"),
    [
        ('multipart/signed; protocol="application/pkcs7-signature"; micalg=sha-256', "signed"),
        ('multipart/signed; protocol="application/pgp-signature"', "signed"),
        ('multipart/encrypted; protocol="application/pgp-encrypted"', "encrypted"),
    ],
)
def test_signed_and_encrypted_multiparts_are_untouched(minter, content_type, reason):
    raw = multipart("mixed", part(HTML.encode()), part(b"signed", content_type=content_type + '; boundary="in"', cte=None)).replace(
        b"\r\n\r\nsigned",
        b'\r\n\r\n--in\r\nContent-Type: text/html\r\n\r\n<a href="https://e.com/">x</a>\r\n'
        b"--in\r\nContent-Type: application/octet-stream\r\n\r\nsig\r\n--in--",
    )
    result = instrument_message(raw, minter)
    assert (result.outcome, result.reason, result.data) == ("untouched", reason, raw)
    assert minter.calls == 0


def test_smime_opaque_message_is_untouched(minter):
    raw = message(
        b"MIAGCSqGSIb3DQEHA6CAMIACAQAx",
        content_type='application/pkcs7-mime; smime-type=enveloped-data; name="smime.p7m"',
        cte="base64",
    )
    assert instrument_message(raw, minter).reason == "s/mime"


def test_dkim_signed_message_is_instrumented_and_its_signature_header_kept(minter):
    """The relay decides what to do with an app's DKIM signature (re-sign or warn); the instrumenter does not skip."""
    signature = b"DKIM-Signature: v=1; a=rsa-sha256; d=example.com; s=s1;\r\n\tbh=abc; b=def\r\n"
    raw = message(HTML.encode(), headers=signature)
    result = instrument_message(raw, minter)
    assert result.outcome == "instrumented" and signature in result.data


def test_only_body_html_is_instrumented(minter):
    raw = multipart(
        "mixed",
        part(b'see https://e.com/plain <a href="https://e.com/text">', content_type="text/plain; charset=utf-8"),
        part(HTML.encode()),
        part(b'<a href="https://e.com/amp">amp</a>', content_type="text/x-amp-html; charset=utf-8"),
        part(
            b'<a href="https://e.com/attached">x</a>',
            extra=b'Content-Disposition: attachment; filename="page.html"\r\n',
        ),
        part(message(b'<a href="https://e.com/forwarded">x</a>'), content_type="message/rfc822", cte=None),
        preamble=b"This is a multi-part message.\r\n",
        epilogue=b"epilogue\r\n",
    )
    result = instrument_message(raw, minter)
    assert result.links == 1 and minter.destinations == ["https://shop.example.com/a?x=1&y=2"]
    assert strip_markup(result.data) == raw.replace(b"https://shop.example.com/a?x=1&amp;y=2", T0.encode())
    assert len(PIXEL.findall(result.data)) == 1


def test_digest_parts_default_to_messages_and_are_not_entered(minter):
    raw = multipart("digest", b'\r\nContent-Type: text/html\r\n\r\n<a href="https://e.com/">x</a>')
    assert instrument_message(raw, minter).reason == "no html part"


def test_nested_multiparts_and_one_pixel_per_html_part(minter):
    alternative = (
        b'Content-Type: multipart/alternative; boundary="alt"\r\n\r\n--alt\r\n'
        + part(b"plain", "text/plain")
        + b"\r\n--alt\r\n"
        + part(HTML.encode())
        + b"\r\n--alt--"
    )
    related = (
        b'Content-Type: multipart/related; boundary="rel"\r\n\r\n--rel\r\n'
        + alternative
        + b"\r\n--rel\r\n"
        + part(b"iVBORw0KGgo=", "image/png", "base64")
        + b"\r\n--rel--"
    )
    raw = multipart("mixed", related, part(HTML.replace("Buy", "Again").encode(), cte="quoted-printable"))
    result = instrument_message(raw, minter)
    assert result.links == 2 and minter.calls == 1  # same destination in both parts: one tracked URL
    assert [len(PIXEL.findall(p.encode())) for p in html_parts(result.data)] == [1, 1]
    assert [PIXEL.sub(b"", HONEYPOT.sub(b"", p.encode())).decode() for p in html_parts(result.data)] == [
        tracked_form(HTML),
        tracked_form(HTML.replace("Buy", "Again")),
    ]


def test_list_unsubscribe_urls_are_not_tracked(minter):
    html = '<a href="https://e.com/unsub?u=1&amp;t=2">Unsubscribe</a><a href="https://e.com/news">News</a>'
    raw = message(
        html.encode(),
        headers=b"List-Unsubscribe: <mailto:u@e.com?subject=unsub>,\r\n <https://e.com/unsub?u=1&t=2>\r\n"
        b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n",
    )
    result = instrument_message(raw, minter)
    assert minter.destinations == ["https://e.com/news"] and b'href="https://e.com/unsub?u=1&amp;t=2"' in result.data


def test_text_only_and_empty_html_get_no_pixel(minter):
    text = message(b"Hello https://e.com/", content_type="text/plain; charset=utf-8")
    empty = multipart("alternative", part(b"hi", "text/plain"), part(b"\r\n  "))
    assert (instrument_message(text, minter).reason, instrument_message(text, minter).data) == ("no html part", text)
    assert (instrument_message(empty, minter).reason, instrument_message(empty, minter).data) == (
        "empty html part",
        empty,
    )


def test_headers_preamble_and_epilogue_are_byte_identical(minter):
    raw = multipart(
        "alternative",
        part(HTML.encode()),
        preamble=b"preamble\r\n",
        epilogue=b"\r\nepilogue  \r\n",
        headers=b"X-Folded: a\r\n  b\r\n\tc\r\n",
    )
    result = instrument_message(raw, minter)
    head = raw[: raw.index(b"--b1\r\n")]
    assert result.data.startswith(head) and result.data.endswith(b"--b1--\r\n\r\nepilogue  \r\n")


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"Content-Type: multipart/mixed\r\n\r\n--x\r\n\r\nbody\r\n--x--\r\n", "without a boundary"),
        (
            b'Content-Type: multipart/mixed; boundary="x"\r\n\r\n--x\r\nContent-Type: text/html\r\n\r\n<a href="https://e.com/">',
            "closing delimiter",
        ),
        (b'Content-Type: multipart/mixed; boundary="x"\r\n\r\nno delimiter at all\r\n', "never occurs"),
        (
            b'Content-Type: multipart/mixed; boundary="x"\r\nContent-Transfer-Encoding: base64\r\n\r\n--x\r\n\r\nb\r\n--x--\r\n',
            "transfer encoding",
        ),
        (
            b'Content-Type: text/html\r\nContent-Transfer-Encoding: x-uuencode\r\n\r\n<a href="https://e.com/">x</a>',
            "unsupported transfer encoding",
        ),
        (b"Content-Type: text/html\r\nContent-Transfer-Encoding: base64\r\n\r\nPGE+!!!", "base64"),
        (b"Content-Type: text/html\r\nContent-Transfer-Encoding: base64\r\n\r\nPGE", "base64"),
        (
            b"Content-Type: text/html\r\nContent-Transfer-Encoding: base64\r\n\r\nPGE+\r\nPA==\r\nPGE+\r\n",
            "after its padding",
        ),
        (b'Content-Type: text/html\r\nbroken header line\r\n\r\n<a href="https://e.com/">x</a>', "malformed MIME"),
        (b"Content-Type: text/html; charset=utf-16\r\n\r\n\xff\xfe<\x00a", "does not decode"),
    ],
)
def test_malformed_messages_fail_with_the_original_bytes(minter, raw, reason):
    result = instrument_message(raw, minter)
    assert result.outcome == "failed" and result.data is raw and reason in result.reason


def test_mime_nesting_is_bounded(minter):
    raw = b""
    for level in range(60):
        raw = f'Content-Type: multipart/mixed; boundary="b{level}"\r\n\r\n--b{level}\r\n'.encode() + raw + f"\r\n--b{level}--".encode()
    result = instrument_message(raw, minter)
    assert result.outcome == "failed" and "nesting" in result.reason


@pytest.mark.parametrize("raw", [b"", b"\r\n", b"garbage without headers", bytes(range(256)) * 4, b"Content-Type: text/html\r\n\r\n"])
def test_odd_input_never_raises(minter, raw):
    result = instrument_message(raw, minter)
    assert result.outcome in ("untouched", "failed") and result.data is raw


def test_a_failing_minter_fails_the_message_not_the_caller(make_minter):
    class BrokenMinter(make_minter):  # type: ignore[misc,valid-type]
        def click_url(self, destination: str) -> str | None:
            raise RuntimeError("token store down")

    raw = message(HTML.encode())
    result = instrument_message(raw, BrokenMinter())
    assert (result.outcome, result.data, result.reason) == ("failed", raw, "render error: RuntimeError")


def test_already_instrumented_message_is_untouched(minter, make_minter):
    once = instrument_message(message(HTML.encode()), minter).data
    again = instrument_message(once, make_minter())
    assert (again.outcome, again.reason, again.data) == ("untouched", "already instrumented", once)


def test_one_plan_renders_each_recipient_with_their_own_tokens(make_minter):
    raw = message(quopri.encodestring(HTML.encode()), cte="quoted-printable")
    plan = plan_instrumentation(raw)
    first, second = make_minter(recipient="alice"), make_minter(recipient="bobby")
    out_first, out_second = plan.render(first), plan.render(second)
    (first_html,), (second_html,) = html_parts(out_first.data), html_parts(out_second.data)
    assert "/c/alice/0" in first_html and "/c/bobby/0" in second_html
    assert first_html.replace("alice", "bobby") == second_html
    assert plan.render(make_minter(recipient="alice")).data == out_first.data  # deterministic


def test_lines_pushed_past_998_octets_are_broken_between_attributes(minter):
    filler = "x" * 900
    html = f'<p>{filler}<a class="c" href="https://e.com/long">x</a> after</p><p>short <a href="https://e.com/s">s</a></p>\r\n<p>{filler}</p></body>'
    raw = message(html.encode())
    result = instrument_message(raw, minter)
    body = result.data[result.data.index(b"\r\n\r\n") + 4 :]
    assert max(map(len, body.split(b"\r\n"))) <= 998
    assert f'<p>{filler}<a class="c" \r\nhref="{T0}"\r\n>x</a>'.encode() in body
    # Whitespace between attributes is all that was added: the HTML reads the same.
    assert html_parts(result.data)[0].replace(" \r\nhref", " href").replace('"\r\n>', '">').count("<a ") == 3


@pytest.mark.parametrize("eol", ["\r\n", "\n"])
@pytest.mark.parametrize("overflow", [-1, 0, 1, 2])
def test_a_line_is_broken_exactly_when_the_edit_pushes_it_past_998_octets(minter, eol, overflow):
    tracked = f'href="{T0}"'
    head = '<p><a class="c" '
    filler = "x" * (998 + overflow - len(head) - len(tracked) - len(">y</a></p>"))
    html = f"{head}{tracked.replace(T0, 'https://e.com/l')}>y</a></p>{filler}{eol}<p>next</p></body>"
    result = instrument_message(message(html.encode().replace(b"\r\n", eol.encode()), eol=eol.encode()), minter)
    body = result.data[result.data.index(eol.encode() * 2) + 2 * len(eol) :]
    first = body.split(eol.encode())[0]
    assert (first == f"{head}{tracked}>y</a></p>{filler}".encode()) is (overflow <= 0)
    assert max(map(len, body.split(eol.encode()))) <= 998


def test_render_is_deterministic_and_never_changes_the_plan(minter, make_minter):
    raw = message(base64.encodebytes(HTML.encode()), cte="base64")
    plan = plan_instrumentation(raw)
    assert plan.outcome == "instrumented"
    outputs = {plan.render(make_minter()).data for _ in range(3)}
    assert len(outputs) == 1


def test_signed_part_is_not_parsed_so_its_defects_do_not_matter(minter):
    raw = multipart("mixed", part(b"--in\r\nno closing delimiter", content_type='multipart/signed; boundary="in"', cte=None))
    assert instrument_message(raw, minter).reason == "signed"
