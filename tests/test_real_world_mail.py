"""Mail as real senders write it, end to end: app → relay (SMTP) → upstream sink; recipient → tracker → events.

One fixture per family of real-world bug (tests/data/mail/, written for these tests): UTF-16 without a byte-order
mark, a leading mbox `From ` line, Content-Transfer-Encoding spellings, non-ASCII links, HTML declaring its
charset only in a <meta>, plain-text-only mail, RFC 2047-encoded X-Inflight ids.
"""

from __future__ import annotations

import base64
import email
import email.policy
import logging
import quopri
import re
from collections.abc import Iterator
from email.message import Message
from pathlib import Path

import httpx
import pytest

from tests.conftest import RunningService, Sink, make_settings
from tests.test_flow import events, fetch, send

FIXTURES = Path(__file__).parent / "data" / "mail"
CLICK = re.compile(r"http://127\.0\.0\.1:1/c/[A-Za-z0-9_.-]+")
PIXEL = re.compile(r'<img src="http://127\.0\.0\.1:1/o/[A-Za-z0-9_.-]+\.gif"[^>]*/>')
AUTH = {"Authorization": "Bearer demo-secret"}


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


@pytest.fixture
def service(tmp_path: Path, sink: Sink) -> Iterator[RunningService]:
    # sent_window 0: clicks right after sending would otherwise be judged a machine's (irrelevant here).
    with RunningService(make_settings(tmp_path, sink.url, tracker={"sent_window_seconds": 0})) as running:
        yield running


def html_part(data: bytes) -> Message:
    parsed = email.message_from_bytes(data, policy=email.policy.compat32)
    [part] = [p for p in parsed.walk() if p.get_content_type() == "text/html"]
    return part


def click(service: RunningService, url: str) -> str:
    response = fetch(service, url)
    assert response.status_code == 302, response.text
    return response.headers["location"]


def test_utf16_without_bom_is_sniffed_little_endian_and_written_in_that_order(service: RunningService, sink: Sink) -> None:
    raw = fixture("utf16-no-bom.eml")
    send(service.smtp_port, raw)
    [delivered] = sink.messages
    body = html_part(delivered.data).get_payload(decode=True)
    original = html_part(raw).get_payload(decode=True)
    assert isinstance(body, bytes) and isinstance(original, bytes)
    assert not body.startswith((b"\xff\xfe", b"\xfe\xff")) and len(body) % 2 == 0
    text = body.decode("utf-16-le")
    assert PIXEL.search(text), "the pixel is little-endian text like the rest of the part"
    [shop, contact] = CLICK.findall(text)
    untracked = PIXEL.sub("", text).replace(shop, "https://shop.example.com/angebote?ref=oe&amp;k=1")
    assert untracked.replace(contact, "http://www.example.org/kontakt") == original.decode("utf-16-le")
    assert click(service, shop) == "https://shop.example.com/angebote?ref=oe&k=1"
    assert [e["tracked"] for e in events(service, name="email.sent")] == [True]


def test_utf16_whose_byte_order_cannot_be_told_goes_untouched(service: RunningService, sink: Sink) -> None:
    # Two code units, neither ASCII: no zero byte tells the order. The part must not get bytes in a guessed order.
    raw = fixture("utf16-no-bom.eml")
    start = raw.index(b"base64\r\n\r\n") + 10
    end = raw.index(b"\r\n------=_NextPart", start)
    raw = raw[:start] + base64.b64encode("東京".encode("utf-16-le")) + raw[end:]
    send(service.smtp_port, raw)
    [delivered] = sink.messages
    assert delivered.data.endswith(raw[raw.index(b"\r\n\r\n") :])
    [sent] = events(service, name="email.sent")
    assert sent["tracked"] is False and "pixel=none" in sent["reason"]


def test_mbox_from_line_is_removed_and_the_message_instrumented(service: RunningService, sink: Sink) -> None:
    send(service.smtp_port, fixture("mbox-from-line.eml"))
    [delivered] = sink.messages
    head, _, body = delivered.data.partition(b"\r\n\r\n")
    assert head.startswith(b"Received: from ") and b"From newsletter@example.com Fri" not in delivered.data
    parsed = email.message_from_bytes(delivered.data, policy=email.policy.strict)
    assert parsed["Subject"] == "December issue" and parsed["Return-Path"] == "<newsletter@example.com>"
    assert parsed.defects == [] and parsed.get_content_type() == "text/html"
    assert b">From the editor" in body  # an escaped body line is the body's business
    [link] = CLICK.findall(body.decode())
    assert click(service, link) == "https://blog.example.com/december"
    assert PIXEL.search(body.decode())


@pytest.mark.parametrize("spelling", ["Quoted-Printable ", "quoted_printable", "QUOTED-PRINTABLE", "quoted-printable"])
def test_quoted_printable_spellings_are_decoded_and_kept(service: RunningService, sink: Sink, spelling: str) -> None:
    raw = fixture("cte-spelling.eml").replace(b"Quoted-Printable \r\n", spelling.encode() + b"\r\n")
    send(service.smtp_port, raw)
    [delivered] = sink.messages
    assert f"Content-Transfer-Encoding: {spelling}\r\n".encode() in delivered.data  # the header as written
    text = quopri.decodestring(delivered.data.split(b"\r\n\r\n")[-1].split(b"\r\n--b-cte--")[0]).decode()
    [link] = CLICK.findall(text)
    assert PIXEL.search(text) and "Caf\u00e9 cr\u00e8me" in text
    assert click(service, link) == "https://cafe.example.com/menu?season=spring&lang=fr"


@pytest.mark.parametrize(("spelling", "tracked"), [("8bits", True), ("7-bit", True), ("8BIT", True), ("x-gzip", False)])
def test_identity_spellings_are_tracked_and_unknown_ones_left_alone(
    service: RunningService, sink: Sink, spelling: str, tracked: bool
) -> None:
    raw = fixture("cte-spelling.eml")
    head, _, rest = raw.partition(b"Content-Transfer-Encoding: Quoted-Printable \r\n\r\n")
    html, _, tail = rest.partition(b"\r\n--b-cte--")
    raw = head + f"Content-Transfer-Encoding: {spelling}\r\n\r\n".encode() + quopri.decodestring(html) + b"\r\n--b-cte--" + tail
    send(service.smtp_port, raw)
    [delivered] = sink.messages
    assert bool(CLICK.search(delivered.data.decode())) is tracked
    if not tracked:
        assert delivered.data.endswith(raw[raw.index(b"\r\n\r\n") :])
    assert [e["tracked"] for e in events(service, name="email.sent")] == [tracked]


def test_non_ascii_links_are_tracked_and_redirect_to_their_browser_form(
    service: RunningService, sink: Sink, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="inflight.relay"):
        send(service.smtp_port, fixture("non-ascii-links.eml"))
    [delivered] = sink.messages
    text = delivered.data.decode()
    umlaut, idn, space = CLICK.findall(text)
    assert 'href="https://☃.example/snow"' in text  # no Location can name that host: left as written
    assert click(service, umlaut) == "https://ex.test/%C3%BC/"
    assert click(service, idn) == "https://xn--r8jz45g.jp/%E3%83%91%E3%82%B9?q=%E6%A4%9C%E7%B4%A2"
    assert click(service, space) == "https://ex.test/spring%20sale/"
    written = {e["link"] for e in events(service, name="email.click")}
    assert written == {"https://ex.test/ü/", "https://例え.jp/パス?q=検索", "https://ex.test/spring sale/"}
    [why] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("link-untracked")]
    assert "message_id=non-ascii-links@example.com" in why and "☃.example" in why and "not allowed" in why


def test_meta_charset_decides_how_an_unlabelled_part_is_read(service: RunningService, sink: Sink) -> None:
    raw = fixture("meta-charset.eml")
    send(service.smtp_port, raw)
    [delivered] = sink.messages
    body = delivered.data[delivered.data.index(b"\r\n\r\n") + 4 :]
    text = body.decode("shift_jis")  # still Shift_JIS, every byte of it
    [link] = CLICK.findall(text)
    assert PIXEL.search(text) and "いつもご利用ありがとうございます。" in text
    assert click(service, link) == "https://shop.example.jp/%E3%82%BB%E3%83%BC%E3%83%AB"
    [clicked] = events(service, name="email.click")
    assert clicked["link"] == "https://shop.example.jp/セール"
    assert events(service, name="email.sent")[0]["subject"] == "お知らせ"


def test_plain_text_only_mail_is_not_counted_as_tracked(service: RunningService, sink: Sink,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    raw = fixture("text-only.eml")
    with caplog.at_level(logging.INFO, logger="inflight.relay"):
        send(service.smtp_port, raw)
        send(service.smtp_port, fixture("mbox-from-line.eml"))
    text_only = sink.messages[0]
    assert text_only.data.endswith(raw[raw.index(b"\r\n\r\n") :])
    by_message = {e["message_id"]: e for e in events(service, name="email.sent")}
    assert by_message["text-only@example.com"]["tracked"] is False
    assert by_message["text-only@example.com"]["reason"] == "mode=ENABLED template_type=MARKETING pixel=none"
    assert by_message["mbox-from-line@example.com"]["tracked"] is True
    stats = httpx.get(f"{service.http_base}/v1/stats", headers=AUTH).json()
    assert (stats["sent"], stats["tracked"]) == (2, 1)
    [line] = [r.getMessage() for r in caplog.records if "message_id=text-only@example.com" in r.getMessage()]
    assert "tracked=false" in line and "instrument=untouched (no html part)" in line


def test_rfc2047_encoded_ids_are_recorded_decoded(service: RunningService, sink: Sink) -> None:
    send(service.smtp_port, fixture("encoded-hints.eml"), ["zoe@example.com"])
    [delivered] = sink.messages
    assert b"X-Inflight" not in delivered.data
    fetch(service, CLICK.findall(delivered.data.decode())[0])
    found = events(service)
    assert {(e["name"], e["campaign"], e["template"], e["contact"]) for e in found} == {
        ("email.sent", "café-printemps", "newsletter-été", "Zoë"),
        ("email.click", "café-printemps", "newsletter-été", "Zoë"),
        ("email.open", "café-printemps", "newsletter-été", "Zoë"),  # implied by the click
    }
    assert events(service, campaign="café-printemps") == found
