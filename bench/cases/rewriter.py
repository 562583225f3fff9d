"""Benchmark: instrumenting a marketing message (MIME walk, decode, rewrite, re-encode) for one recipient.

Messages are generated, not read from the corpus: multipart/alternative with a text part and a UTF-8 HTML part
in quoted-printable (what ESPs and most libraries send for long HTML lines), table layout with inline styles,
images and the given number of tracked links. The baseline is the naive approach peers use: stdlib email parse,
beautifulsoup4 parse, modify the hrefs, add the pixel, serialise soup and message.

Budget (issue 11, raised from issue 3's 5 ms): median <= 2 ms for 100 KB / 100 links, linear in size. `python -m bench.cases.rewriter`
prints the rows.
"""

from __future__ import annotations

import email
import hashlib
import hmac
import quopri
import random
import time
from collections.abc import Callable
from email import policy
from functools import partial
from typing import Any

from bs4 import BeautifulSoup

from bench.harness import Mode, row
from relay.instrument import InstrumentationPlan, plan_instrumentation
from relay.links import TrackingLinks
from relay.template import copy_template
from tracking.tokens import TokenKeys, new_send_id

CASE = "rewriter"

_WORDS = [
    "lorem",
    "ipsum",
    "dolor",
    "sit",
    "amet",
    "consectetur",
    "adipiscing",
    "elit",
    "sed",
    "do",
    "eiusmod",
    "tempor",
]


class SigningMinter:
    """Mints URLs the way a real minter does (HMAC per destination), so the rewriter is not flattered."""

    _KEY = b"bench-key-not-a-secret"

    def click_url(self, destination: str) -> str | None:
        digest = hmac.new(self._KEY, destination.encode(), hashlib.sha256).hexdigest()[:32]
        return f"https://t.example.net/c/{digest}"

    def pixel_url(self) -> str:
        return "https://t.example.net/o/0123456789abcdef0123456789abcdef.gif"

    def honeypot_url(self) -> str | None:
        return "https://t.example.net/h/0123456789abcdef"

    def is_tracking_url(self, url: str) -> bool:
        return url.startswith("https://t.example.net/")


def marketing_html(size: int, links: int, *, seed: int = 7) -> str:
    """About `size` bytes of newsletter HTML with `links` distinct tracked links spread through it."""
    rnd = random.Random(seed)
    head = (
        '<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Transitional//EN" "http://www.w3.org/TR/xhtml1/DTD/xhtml1-transitional.dtd">\n'
        '<html xmlns="http://www.w3.org/1999/xhtml" xmlns:v="urn:schemas-microsoft-com:vml"><head><meta charset="utf-8">'
        "<title>Newsletter</title><style>body{margin:0;padding:0} a{color:#1a73e8} "
        "@media (max-width:600px){.col{width:100%!important}}</style></head>\n"
        '<body style="margin:0;padding:0;background:#f4f4f4">\n<table width="100%" cellpadding="0" cellspacing="0" border="0">\n'
    )
    tail = "</table>\n</body></html>\n"
    link_rows = [
        '<tr><td class="col" style="padding:12px 24px;font-family:Arial,sans-serif;font-size:14px;line-height:20px;color:#333333">'
        f'<a href="https://shop.example.com/products/{i}?utm_source=newsletter&amp;utm_medium=email&amp;id={rnd.randrange(10**6)}" '
        f'target="_blank" style="color:#1a73e8;text-decoration:underline">{" ".join(rnd.choices(_WORDS, k=4))}</a> '
        f'<img src="https://cdn.example.com/img/{i}.png" width="120" height="80" alt="" style="display:block;border:0" /></td></tr>\n'
        for i in range(links)
    ]
    remaining = size - len(head) - len(tail) - sum(map(len, link_rows))
    text_rows: list[str] = []
    while remaining > 0:
        words = " ".join(rnd.choices(_WORDS, k=30))
        row = f'<tr><td style="padding:8px 24px;font-family:Arial,sans-serif;color:#555555">{words} — é</td></tr>\n'
        text_rows.append(row)
        remaining -= len(row.encode())
    per_link = len(text_rows) // max(links, 1) + 1
    rows = [row for i, link in enumerate(link_rows) for row in [link, *text_rows[i * per_link : (i + 1) * per_link]]]
    rows += text_rows[len(link_rows) * per_link :]
    return head + "".join(rows) + tail


def marketing_message(html: str, encoding: str = "quoted-printable") -> bytes:
    data = html.encode().replace(b"\n", b"\r\n")
    body = quopri.encodestring(html.encode()).replace(b"\n", b"\r\n") if encoding == "quoted-printable" else data
    return (
        b"From: News <news@example.com>\r\nTo: reader@example.org\r\nSubject: Spring sale\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/alternative; boundary="=_alt_1"\r\n\r\n'
        b"--=_alt_1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nSpring sale: https://shop.example.com/\r\n"
        b"--=_alt_1\r\nContent-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: "
        + encoding.encode()
        + b"\r\n\r\n"
        + body
        + b"\r\n--=_alt_1--\r\n"
    )


def nested_tag_bomb(depth: int) -> bytes:
    """Deep nesting that exhausts recursive parsers (like the corpus' 570 KB htmllargecallstack file)."""
    html = "<div><span>" * depth + '<a href="https://example.com/deep">deep</a>' + "</span></div>" * depth
    return b"Content-Type: text/html; charset=utf-8\r\n\r\n" + html.encode()


def instrument(raw: bytes) -> bytes:
    return plan_instrumentation(raw).render(SigningMinter()).data


def bs4_baseline(raw: bytes) -> bytes:
    message = email.message_from_bytes(raw, policy=policy.default)
    minter = SigningMinter()
    for part in message.walk():
        if part.get_content_type() == "text/html":
            soup = BeautifulSoup(part.get_content(), "html.parser")
            for link in soup.find_all(["a", "area"], href=True):
                href = str(link["href"])
                if href.startswith(("http://", "https://")):
                    link["href"] = minter.click_url(href) or href
            pixel = soup.new_tag("img", src=minter.pixel_url(), width="1", height="1", alt="")
            (soup.body or soup).append(pixel)
            part.set_content(str(soup), subtype="html", cte="quoted-printable")
    return message.as_bytes()


def _measure(run: Callable[[], object], repeat: int) -> list[float]:
    run()  # warm caches (regex compilation, imports) outside the timing
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1000)
    return times


def spliced_rows(plan: InstrumentationPlan, label: str, repeat: int) -> list[dict[str, Any]]:
    """A copy for one more recipient with the relay's minter (AES-SIV tokens): rendered in full, or spliced
    into the message's template (relay/template.py), and what making the template costs once per message."""
    tokens = TokenKeys(["bench-tracker-secret"], ["bench"]).project("bench")
    first, extra = (TrackingLinks(tokens=tokens, base_url="https://t.example.net", send_id=new_send_id()) for _ in range(2))
    template = copy_template(plan, first)
    assert template is not None, "the bench message is quoted-printable UTF-8: it splices"
    rendered = (f"{label} copy per extra recipient, AES-SIV tokens: rendered", _measure(partial(plan.render, extra), repeat))
    return [
        row(CASE, rendered[0], "ms", rendered[1]),
        row(CASE, f"{label} copy per extra recipient, AES-SIV tokens: spliced", "ms", _measure(partial(template.render, extra), repeat),
            baseline=rendered),
        row(CASE, f"{label} template, once per message of 3+ recipients", "ms",
            _measure(partial(copy_template, plan, first), repeat), baseline=rendered),
    ]


def run(quick: bool, smoke: bool = False) -> list[dict[str, Any]]:
    mode = Mode(quick, smoke)
    sizes = [
        ("10KB/10 links", 10_000, 10, 100, 5),
        ("100KB/100 links", 100_000, 100, 60, 3),
        ("1MB/500 links", 1_000_000, 500, 10, 1),
    ]
    rows: list[dict[str, Any]] = []
    for label, size, links, repeat, baseline_repeat in mode.pick(full=sizes, quick=sizes, smoke=sizes[:2]):
        raw = marketing_message(marketing_html(size, links))
        repeat, baseline_repeat = mode.pick(full=(repeat, baseline_repeat), quick=(max(repeat // 4, 3), 1), smoke=(1, 1))
        ours_times = _measure(partial(instrument, raw), repeat)
        base_times = _measure(partial(bs4_baseline, raw), baseline_repeat)
        rows += [
            row(CASE, f"{label} inflight", "ms", ours_times, baseline=(f"{label} bs4", base_times),
                max_value=2 if size == 100_000 else None),
            row(CASE, f"{label} bs4", "ms", base_times),
        ]
        if size == 100_000:
            plan = plan_instrumentation(raw)
            rows.append(row(CASE, f"{label} render per extra recipient", "ms", _measure(partial(plan.render, SigningMinter()), repeat)))
            rows += spliced_rows(plan, label, repeat)
            raw_8bit = marketing_message(marketing_html(size, links), "8bit")
            rows.append(row(CASE, f"{label} inflight 8bit", "ms", _measure(partial(instrument, raw_8bit), repeat)))
    bomb = nested_tag_bomb(mode.pick(full=20_000, quick=20_000, smoke=2_000))
    rows.append(row(CASE, f"{len(bomb) // 1000}KB nested-tag bomb inflight", "ms",
                    _measure(partial(instrument, bomb), mode.pick(full=10, quick=3, smoke=1))))
    return rows


if __name__ == "__main__":
    for result in run(quick=False):
        print(result)
