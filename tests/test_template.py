"""Copies spliced into one template (relay/template.py) are byte for byte the copies rendered in full.

The oracle is the full render of each copy (`InstrumentationPlan.render`, itself checked against the stdlib
parser and an HTML parser in test_corpus and test_mail_properties), with the relay's own minter (real
AES-SIV tokens of the lengths a recipient's copy gets). Every case also checks which path made the copies, so
a template that silently never applies, or applies where it must not, fails.
"""

from __future__ import annotations

import quopri
from base64 import encodebytes
from pathlib import Path

import pytest
from hypothesis import given

from relay import copies
from relay.copies import InlineCopies
from relay.dkim import DkimSigner
from relay.instrument import plan_instrumentation
from relay.links import TrackingLinks
from relay.template import PLACEHOLDERS, copy_template
from tests.test_corpus import CORPUS, EXCLUDED_HOSTS, FILES, wrap
from tests.test_instrument import message, multipart, part
from tests.test_mail_properties import PROPERTY, Tree, messages
from tracking.tokens import TokenKeys, new_send_id

TOKENS = TokenKeys(["a tracker secret"], ["shop"]).project("shop")
LINKS = "".join(f'<p><a href="https://shop.example.com/p/{n}?utm_source=news&amp;utm_medium=email">Item {n}</a></p>'
                for n in range(12))
# Long lines: quoted-printable wraps them, so soft line breaks fall inside the tokens.
HTML = ('<html><body><table><tr><td style="font-family:Arial,sans-serif;font-size:14px;color:#333333">Café crème '
        + LINKS + '<a href="https://twitter.com/shop">not tracked</a> <a href="mailto:a@shop.example.com">mail</a>'
        + "</td></tr></table></body></html>")


def minters(count: int, *, honeypot: bool = True, base: str = "https://t.shop.example") -> list[TrackingLinks]:
    return [TrackingLinks(tokens=TOKENS, base_url=base, send_id=new_send_id(), honeypot=honeypot,
                          exclude_click_domains=EXCLUDED_HOSTS) for _ in range(count)]


def assert_spliced_as_rendered(raw: bytes, copies: list[TrackingLinks], *, spliced: bool, misfits: int = 0) -> None:
    """Every copy from InlineCopies equals its full render; `spliced`: whether a template made them (but the
    last `misfits`, which do not fit it)."""
    plan = plan_instrumentation(raw)
    template = copy_template(plan, copies[0])
    assert (template is not None) is spliced, plan.reason
    expected = [plan.render(minter) for minter in copies]
    if template is not None:
        fits = len(copies) - misfits
        assert [template.render(minter) for minter in copies] == expected[:fits] + [None] * misfits
    rendered = InlineCopies(raw, copies, DkimSigner()).render(copies)
    assert [copy.result for copy in rendered] == expected
    assert len({copy.result.data for copy in rendered}) == len(copies) or expected[0].outcome != "instrumented"


def qp(html: str, charset: str = "utf-8") -> bytes:
    return quopri.encodestring(html.encode(charset))


@pytest.mark.parametrize(("body", "content_type", "cte", "eol"), [
    (HTML.encode(), "text/html; charset=utf-8", "8bit", b"\r\n"),
    (HTML.encode(), "text/html; charset=utf-8", "8bit", b"\n"),
    (HTML.encode("latin-1"), "text/html; charset=iso-8859-1", "8bit", b"\r\n"),
    (HTML.replace("Café crème", "").encode(), "text/html", "7bit", b"\r\n"),
    (qp(HTML), "text/html; charset=utf-8", "quoted-printable", b"\r\n"),
    (qp(HTML).replace(b"\r\n", b"\n"), "text/html; charset=utf-8", "quoted-printable", b"\n"),
    (qp(HTML.replace("Café crème", "東京"), "iso-2022-jp"), "text/html; charset=iso-2022-jp", "quoted-printable", b"\r\n"),
    (HTML.replace("Café crème", "東京").encode("shift_jis"), "text/html; charset=shift_jis", "8bit", b"\r\n"),
    # One line of 4 KB: the identity encoding breaks it around the attributes (RFC 5322's 998 octets).
    (HTML.replace("</p>", "").encode() * 3, "text/html; charset=utf-8", "8bit", b"\r\n"),
], ids=["8bit", "8bit-lf", "latin-1", "7bit-no-charset", "qp", "qp-lf", "iso-2022-jp", "shift_jis", "long-line"])
def test_copies_of_spliceable_parts_are_their_full_renders(body: bytes, content_type: str, cte: str, eol: bytes) -> None:
    raw = message(body.replace(b"\r\n", eol), content_type=content_type, cte=cte, eol=eol)
    assert_spliced_as_rendered(raw, minters(4), spliced=True)


def test_several_html_parts_and_no_honeypot_splice_too() -> None:
    raw = multipart("mixed", part(HTML.encode()), part(b"plain text", content_type="text/plain"),
                    part(qp(HTML), cte="quoted-printable"))
    assert_spliced_as_rendered(raw, minters(3, honeypot=False), spliced=True)


@pytest.mark.parametrize("raw", [
    message(encodebytes(HTML.encode()), cte="base64"),  # re-encoded whole: a token moves its neighbours' bytes
    message(HTML.encode("utf-16-le"), content_type="text/html; charset=utf-16le", cte="binary"),  # two bytes an ASCII character
    message(HTML.encode() + b"<!-- " + PLACEHOLDERS + b" -->"),  # every placeholder byte is the message's own
    multipart("mixed", part(HTML.encode()), part(encodebytes(HTML.encode()), cte="base64")),  # one part of two
], ids=["base64", "utf-16", "all-placeholders-taken", "one-base64-part"])
def test_mail_a_template_cannot_render_exactly_is_rendered_per_copy(raw: bytes) -> None:
    assert_spliced_as_rendered(raw, minters(3), spliced=False)


def test_a_copy_whose_urls_do_not_fit_the_template_is_rendered_in_full() -> None:
    raw = message(HTML.encode())
    # Longer URLs; URLs as long but elsewhere; no trap link.
    misfits = [*minters(1, base="https://t.shop.example:8443"), *minters(1, base="https://u.shop.example"),
               *minters(1, honeypot=False)]
    assert_spliced_as_rendered(raw, [*minters(2), *misfits], spliced=True, misfits=3)


def test_a_placeholder_byte_in_the_tracking_base_is_caught_by_the_count() -> None:
    raw = message(HTML.encode())
    assert_spliced_as_rendered(raw, minters(3, base="https://t.shop.example/~track"), spliced=False)


def test_fewer_than_three_copies_are_rendered_in_full() -> None:
    """A template costs about what two spliced copies save (bench: make bench, case relay)."""
    raw = message(HTML.encode())
    copies = minters(2)
    assert [copy.result for copy in InlineCopies(raw, copies, DkimSigner()).render(copies)] == [
        plan_instrumentation(raw).render(minter) for minter in copies]


@pytest.mark.parametrize("path", FILES or [None], ids=lambda p: p.name if p else "absent")
def test_corpus_copies_splice_as_they_render(path: Path | None) -> None:
    if path is None:
        pytest.skip(f"corpus not found at {CORPUS} (set INFLIGHT_CORPUS)")
    data = path.read_bytes()
    inputs = [wrap(data, cte, None) for cte in ("8bit", "quoted-printable", "base64")] if path.suffix == ".html" else [data]
    for raw in inputs:
        plan = plan_instrumentation(raw)
        copies = minters(3)
        template = copy_template(plan, copies[0])
        if plan.splices and not set(PLACEHOLDERS) <= set(raw):
            assert template is not None, path.name
        expected = [plan.render(minter) for minter in copies]
        assert [copy.result for copy in InlineCopies(raw, copies, DkimSigner()).render(copies)] == expected
        if template is not None:
            assert [template.render(minter) for minter in copies] == expected


@PROPERTY
@given(generated=messages())
def test_generated_mail_splices_as_it_renders(generated: tuple[bytes, Tree]) -> None:
    raw, _ = generated
    plan = plan_instrumentation(raw)
    copies = minters(3)
    expected = [plan.render(minter) for minter in copies]
    assert [copy.result for copy in InlineCopies(raw, copies, DkimSigner()).render(copies)] == expected


def test_a_message_is_planned_and_templated_once_for_all_its_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """The relay renders a 50 KB message's copies five at a time (relay/pipeline.py): the later batches reuse
    the plan and the template of the first."""
    made: list[str] = []
    monkeypatch.setattr(copies, "plan_instrumentation", lambda raw: made.append("plan") or plan_instrumentation(raw))
    monkeypatch.setattr(copies, "copy_template", lambda plan, minter: made.append("template") or copy_template(plan, minter))
    raw = message(qp(HTML), cte="quoted-printable")
    recipients = minters(12)
    inline = InlineCopies(raw, recipients, DkimSigner())
    batches = [inline.render(recipients[start:start + 5]) for start in range(0, 12, 5)]
    plan = plan_instrumentation(raw)
    assert [copy.result for batch in batches for copy in batch] == [plan.render(minter) for minter in recipients]
    assert made == ["plan", "template"]
