"""Every corpus file through the instrumenter, checked by independent means.

The oracle is the stdlib email parser (structure, payloads, transfer decoding) and beautifulsoup4's
html.parser (links, attribute decoding): neither shares code with the rewriter. For each file:
- signed, DKIM-signed and malformed messages come back with the original bytes and the documented outcome;
- the output parses as MIME with the same structure, and every header and every non-HTML part is unchanged;
- each instrumented HTML part, decoded, equals its input with only tracked URLs and one pixel spliced in;
  undoing those splices gives the input back, each replaced value decoding to the URL that was tracked;
- every link the oracle sees as eligible is tracked and resolves to its destination, the others are unchanged.
HTML templates are wrapped in a message three ways (8bit, quoted-printable, base64): the encoding must not
change what the reader gets.
"""

from __future__ import annotations

import codecs
import email
import email.message
import html as htmllib
import os
import quopri
import re
from base64 import encodebytes
from email import policy
from itertools import pairwise
from pathlib import Path

import pytest
from bs4 import BeautifulSoup, Comment

from relay.instrument import instrument_message
from tests.conftest import SHARED

CORPUS = Path(os.environ.get("INFLIGHT_CORPUS") or SHARED / "corpus")
FILES = sorted(p for p in CORPUS.glob("*") if p.is_file() and p.name != "SOURCES.md") if CORPUS.is_dir() else []

# From SOURCES.md: files that must pass through untouched (signed) or fail (malformed: original bytes).
EXPECTED = {
    "smime_thunderbird-signed": ("untouched", "signed"),
    "flanker__tests_fixtures_messages_signed": ("untouched", "signed"),
    "raw_email_with_nested_attachment": ("untouched", "signed"),
    "GnuPG_2.1.20_released": ("untouched", "signed"),
    "msg_45.txt": ("untouched", "signed"),
    "mail_malformed_1": ("failed", "malformed MIME"),  # inner multipart reuses the outer boundary
    "bad-final-boundary": ("failed", "malformed MIME"),  # no closing delimiter
    "mail_test_1.eml": ("failed", "malformed MIME"),  # no closing delimiter either (stdlib: CloseBoundaryNotFound)
    "malformed_005": ("failed", "malformed MIME"),  # boundaries that are prefixes of one another
    "content_transfer_encoding_text-html": ("failed", "unsupported transfer encoding"),
    "big5-base64": ("failed", "base64 body"),  # a mailing list appended a plain-text footer to the base64 body
}
EXCLUDED_HOSTS = ("twitter.com", "*.twitter.com")
WS_URL = "".join(map(chr, range(0x21)))
CLICK = r"https://track\.test/c/r1/\d+\?v(?:=|&#61;)1&amp;s(?:=|&#61;)ab"
PIXEL = r'<img src="https://track\.test/o/r1\.gif\?v=1&amp;s=cd" width="1" height="1" alt="" border="0" style="[^"]*" aria-hidden="true" />'
HONEYPOT = r'<a href="https://track\.test/h/r1" aria-hidden="true" tabindex="-1" style="[^"]*"></a>'
ARTIFACT = re.compile(f"(?P<click>{CLICK})|(?P<markup>{HONEYPOT}{PIXEL})")
CONDITIONAL = re.compile(r"\[if[^\]]*\]>(.*)<!\[endif\]\Z", re.DOTALL | re.IGNORECASE)
PLACEHOLDER = re.compile(r"\{\{.*?\}\}|\{%.*?%\}|\*\|.*?\|\*|%%[^%]*%%", re.DOTALL)


def expected_for(path: Path) -> tuple[str, str] | None:
    return next((value for key, value in EXPECTED.items() if key in path.name), None)


def wrap(html: bytes, encoding: str, unsubscribe: str | None) -> bytes:
    body = {"8bit": lambda b: b, "quoted-printable": lambda b: quopri.encodestring(b), "base64": encodebytes}[encoding](html)
    headers = [b"From: sender@example.com", b"To: reader@example.org", b"Subject: corpus", b"MIME-Version: 1.0"]
    if unsubscribe:
        headers.append(b"List-Unsubscribe: <mailto:u@example.com>, <" + unsubscribe.encode() + b">")
    headers += [b"Content-Type: text/html; charset=utf-8", b"Content-Transfer-Encoding: " + encoding.encode()]
    return b"\r\n".join(headers) + b"\r\n\r\n" + body


def codec_for(part: email.message.Message) -> str:
    label = part.get_content_charset() or "utf-8"
    for name in (label, label.removeprefix("x-")):
        try:
            return codecs.lookup(name).name
        except LookupError:
            pass
    return "latin-1"


def text_of(part: email.message.Message) -> str:
    payload = part.get_payload(decode=True)
    assert isinstance(payload, bytes)
    return payload.decode(codec_for(part), "surrogateescape")


def leaves(message: email.message.Message, inside_message: bool = False) -> list[tuple[email.message.Message, bool]]:
    """Leaf parts in order, with whether they sit inside a message/* part (never instrumented)."""
    if message.get_content_maintype() == "message":
        return [(message, True)]
    if message.is_multipart():
        return [leaf for part in message.get_payload() for leaf in leaves(part, inside_message)]
    return [(message, inside_message)]


def is_body_html(part: email.message.Message, inside_message: bool) -> bool:
    disposition = (part.get("Content-Disposition") or "").split(";")[0].strip().lower()
    return part.get_content_type() == "text/html" and disposition != "attachment" and not inside_message


def structure(message: email.message.Message) -> list[tuple[str, str | None, str | None]]:
    return [(part.get_content_type(), part.get("Content-Transfer-Encoding"), part.get_content_charset()) for part in message.walk()]


def oracle_links(html: str) -> list[tuple[str, str, bool]]:
    """(tag, decoded href, opted out) of every <a>/<area>/VML link, including Outlook conditional comments."""
    found: list[tuple[str, str, bool]] = []
    for node in BeautifulSoup(html, "html.parser").descendants:
        if isinstance(node, Comment):
            inner = CONDITIONAL.match(str(node))
            if inner:
                found += oracle_links(inner.group(1))
        elif getattr(node, "name", None) and (node.name in ("a", "area") or node.name.startswith("v:")) and node.has_attr("href"):
            opted_out = str(node.get("data-inflight-track", "")).strip().lower() == "off"
            found.append((node.name, str(node["href"]), opted_out))
    return found


def browser_url(value: str) -> str:
    return value.strip(WS_URL).replace("\t", "").replace("\n", "").replace("\r", "")


def unbroken(text: str) -> str:
    return text.replace("\r", "").replace("\n", "")


def eligible(url: str, opted_out: bool, unsubscribe: set[str]) -> bool:
    from urllib.parse import urlsplit

    host = (urlsplit(url).hostname or "") if re.match(r"https?://[^/?#]", url, re.IGNORECASE) else ""
    excluded = any(host == p or (p.startswith("*.") and host.endswith(p[1:])) for p in EXCLUDED_HOSTS)
    return bool(host) and not opted_out and not excluded and url not in unsubscribe and not PLACEHOLDER.search(url)


def check_html(before: str, after: str, minter, unsubscribe: set[str]) -> int:
    """Check one instrumented HTML part; returns the number of tracked links."""
    # Undo: the output is the input with tracking artifacts in place of some spans. Line breaks are compared
    # apart: on a line pushed past 998 octets the rewriter may add one before and after a replaced attribute.
    matches = list(ARTIFACT.finditer(after))
    assert matches, "nothing instrumented"
    added_breaks = after.count("\n") - before.count("\n")
    assert 0 <= added_breaks <= 2 * len(matches)
    flat_before = unbroken(before)
    texts = [after[: matches[0].start()]] + [after[m.end() : n.start()] for m, n in pairwise(matches)] + [after[matches[-1].end() :]]
    texts = [unbroken(text) for text in texts]
    assert flat_before.startswith(texts[0])
    pos = len(texts[0])
    markups = 0
    for match, following in zip(matches, texts[1:], strict=True):
        if match["markup"]:
            markups += 1
            gap = ""
            assert flat_before.startswith(following, pos), "text after the pixel differs"
        else:
            end = flat_before.find(following, pos) if following else len(flat_before)
            assert end >= pos, "text after a tracked URL differs"
            gap = flat_before[pos:end]
            assert browser_url(htmllib.unescape(gap)) == minter.destination_of(htmllib.unescape(match["click"]))
        pos += len(gap) + len(following)
    assert pos == len(flat_before), "the output does not undo to the input"
    assert markups == 1, "exactly one pixel per tracked HTML part"
    pixel_end = next(m.end() for m in matches if m["markup"])
    if "</body" in before.lower():
        assert after[pixel_end:].lstrip("\r\n").lower().startswith("</body") and "</body" not in after[pixel_end + 6 :].lower()
    else:
        assert pixel_end == len(after)
    # Links: eligible ones tracked to their destination, the others unchanged.
    links_before = oracle_links(before)
    links_after = [link for link in oracle_links(after) if not link[1].startswith("https://track.test/h/")]
    assert [tag for tag, _, _ in links_before] == [tag for tag, _, _ in links_after]
    tracked = 0
    for (tag, href, opted_out), (_, new_href, _) in zip(links_before, links_after, strict=True):
        url = browser_url(href)
        if eligible(url, opted_out, unsubscribe):
            assert minter.destination_of(new_href) == url, (tag, href)
            tracked += 1
        else:
            assert new_href == href, (tag, href)
    return tracked


def check_message(raw: bytes, result, minter, unsubscribe: set[str]) -> int:
    before = email.message_from_bytes(raw, policy=policy.compat32)
    after = email.message_from_bytes(result.data, policy=policy.compat32)
    assert structure(after) == structure(before)
    header_end = raw.find(b"\n\r\n") if b"\n\r\n" in raw[: raw.find(b"\n\n") + 1 or len(raw)] else raw.find(b"\n\n")
    assert result.data[:header_end] == raw[:header_end], "top-level headers changed"
    for old, new in zip(before.walk(), after.walk(), strict=True):
        assert old.items() == new.items()
        if old.is_multipart():
            assert (old.preamble, old.epilogue) == (new.preamble, new.epilogue)
    tracked = 0
    html_parts = 0
    for (old, inside), (new, _) in zip(leaves(before), leaves(after), strict=True):
        if is_body_html(old, inside) and text_of(old).strip():
            html_parts += 1
            tracked += check_html(text_of(old), text_of(new), minter, unsubscribe)
            cte = (old.get("Content-Transfer-Encoding") or "7bit").strip().lower()
            old_lines = str(old.get_payload()).splitlines()
            new_lines = set(str(new.get_payload()).splitlines()) - set(old_lines)
            # Limits of RFC 2045 §6.7 and RFC 5322 §2.1.1; only an input that already broke them may exceed them.
            limit = max([76 if cte in ("quoted-printable", "base64") else 998] + [len(line) for line in old_lines])
            assert all(len(line) <= limit for line in new_lines), "line too long"
        else:
            assert str(new.get_payload()) == str(old.get_payload())
    assert html_parts > 0
    assert result.links == tracked
    return tracked


@pytest.mark.parametrize("path", FILES or [None], ids=lambda p: p.name if p else "absent")
def test_corpus_file(path: Path | None, make_minter) -> None:
    if path is None:
        pytest.skip(f"corpus not found at {CORPUS} (set INFLIGHT_CORPUS)")
    data = path.read_bytes()
    if path.suffix == ".html":
        first_link = next((browser_url(h) for _, h, _ in oracle_links(data.decode()) if h.startswith("http")), None)
        outputs = {}
        for encoding in ("8bit", "quoted-printable", "base64"):
            raw = wrap(data, encoding, first_link)
            minter = make_minter(exclude=EXCLUDED_HOSTS)
            result = instrument_message(raw, minter)
            assert (result.outcome, result.reason) == ("instrumented", "instrumented"), encoding
            check_message(raw, result, minter, {first_link} if first_link else set())
            outputs[encoding] = unbroken(text_of(email.message_from_bytes(result.data, policy=policy.compat32)))
        # The transfer encoding changes nothing a reader sees (8bit may break a line longer than 998 octets).
        assert outputs["quoted-printable"] == outputs["8bit"] == outputs["base64"]
        return
    minter = make_minter(exclude=EXCLUDED_HOSTS)
    result = instrument_message(data, minter)
    expected = expected_for(path)
    if expected is not None:
        assert result.outcome == expected[0] and result.reason.startswith(expected[1]), result.reason
        assert result.data is data or result.data == data
        return
    message = email.message_from_bytes(data, policy=policy.compat32)
    has_html = any(is_body_html(part, inside) and text_of(part).strip() for part, inside in leaves(message))
    if not has_html:
        assert (result.outcome, result.data) == ("untouched", data), result.reason
    else:
        assert result.outcome == "instrumented", result.reason
        unsubscribe = {re.sub(r"\s+", "", u) for u in re.findall(r"<([^>]*)>", str(message.get("List-Unsubscribe", "")))}
        check_message(data, result, minter, unsubscribe)


def crlf_throughout(data: bytes) -> bool:
    return data.count(b"\r\n") == data.count(b"\n") == data.count(b"\r")


@pytest.mark.parametrize("path", FILES or [None], ids=lambda p: p.name if p else "absent")
def test_copies_of_mail_crlf_throughout_are_crlf_throughout(path: Path | None, make_minter) -> None:
    """The relay counts a message's line endings once and sends its copies unscanned (relay/pipeline.py): so
    rendering must add no line ending but the message's own (soft breaks, long-line breaks, base64 lines)."""
    if path is None:
        pytest.skip(f"corpus not found at {CORPUS} (set INFLIGHT_CORPUS)")
    data = path.read_bytes()
    inputs = [wrap(data, encoding, None) for encoding in ("8bit", "quoted-printable", "base64")] if path.suffix == ".html" else [data]
    for raw in (re.sub(rb"\r\n|\r|\n", b"\r\n", message) for message in inputs):
        result = instrument_message(raw, make_minter(exclude=EXCLUDED_HOSTS))
        assert crlf_throughout(raw) and crlf_throughout(result.data), result.reason
