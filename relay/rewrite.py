"""Rewrite the links of an HTML document through tracked URLs and place the open pixel, by splicing.

We never parse into a tree and serialise back: that changes quoting, entities, tag case and whitespace, and
it is slow (bs4 takes 60-90 ms on a 100 KB newsletter). Instead a tokenizer that follows the HTML5 tokenization
states (WHATWG HTML §13.2.5) closely enough to know where every tag, comment and raw-text element starts and
ends locates two kinds of spans: the value of each link attribute, and the point where the pixel goes. Output is
the input with only those spans replaced, so everything else stays byte-identical by construction.

The scanner is driven by possessive regular expressions (no backtracking, no recursion): the C regex engine
skips ordinary text, tags, comments and closed raw-text elements and reads each link tag up to its href in
the same match; Python code runs once per link and for the few other tokens that need a decision (Outlook's
conditional comments, `</body>`, what never ends). Time is linear in the input size.
"""

from __future__ import annotations

import bisect
import operator
import re
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from html.entities import html5 as _NAMED_REFERENCES
from itertools import islice
from typing import NamedTuple, Protocol

from tracking.urls import UnserialisableUrl, browser_url

__all__ = [
    "HtmlPlan",
    "LinkMinter",
    "RewriteResult",
    "Slot",
    "Slots",
    "decode_attribute",
    "escape_attribute",
    "link_destination",
    "plan_html",
    "rewrite_html",
    "tracking_markup",
]


class LinkMinter(Protocol):
    """Mints this recipient's tracking URLs (the tracker side signs them; the rewriter only places them)."""

    def click_url(self, destination: str) -> str | None:
        """Tracked URL for this destination (the decoded URL a browser would follow), or None to leave the link
        untouched (excluded host per project `exclude_click_domains`, link to our own tracking host...)."""

    def pixel_url(self) -> str: ...

    def honeypot_url(self) -> str | None:
        """When not None, the rewriter adds one invisible, aria-hidden link to this URL in each tracked HTML part
        (a scanner trap; humans never see or click it)."""

    def is_tracking_url(self, url: str) -> bool:
        """True for a URL that is one of our own valid tracking URLs (used for idempotency: a message already
        instrumented by us is left untouched)."""


# --- tokenizer grammar ------------------------------------------------------------------------------------
# HTML5 whitespace inside tags is TAB, LF, FF, SPACE (CR is turned into LF by input preprocessing, §13.2.3.5).
_WS = r"\t\n\f\r "
# One attribute, exactly as the before-attribute-name / attribute-name / after-attribute-name /
# before-attribute-value / attribute-value states (§13.2.5.32-38) consume it. A name may start with '='
# (parse error, but it is a name); '/' between attributes is skipped (self-closing start tag state, §13.2.5.40).
# If '=' follows the name a value must follow: an unterminated quoted value means EOF inside the tag, so the
# whole tag match fails instead of falling back to some other reading. Possessive quantifiers make every
# step final, which is what a state machine does, and keeps the match linear.
_NAME = rf"[^{_WS}/>][^{_WS}/>=]*+"
_VALUE = rf"(?:\"[^\"]*+\"|'[^']*+'|(?![\"'])[^{_WS}>]*+)"


def _attribute(name: str = _NAME, value: str = _VALUE) -> str:
    """The pattern of one attribute whose name and value match `name` and `value` (which may name groups)."""
    return rf"[{_WS}/]*+{name}(?:[{_WS}]*+=[{_WS}]*+{value}|(?![{_WS}]*+=))"


_ATTR = _attribute(f"(?P<name>{_NAME})", f"(?P<value>{_VALUE})")
_ATTRS = f"(?:{_attribute()})*+"
_TAG_REST = rf"[^{_WS}/>]*+{_ATTRS}[{_WS}/]*+>"

# Elements whose content is text, not markup, up to their end tag (§13.2.5.2-5: RCDATA, RAWTEXT, script data,
# PLAINTEXT). An `<a href>` written inside <style>, <title> or <script> is not a link.
_RAW_TEXT = frozenset({"script", "style", "xmp", "iframe", "noembed", "noframes", "title", "textarea", "plaintext"})
def _anycase(word: str) -> str:
    """ASCII case-insensitive pattern for `word`: tag names fold ASCII only (§13.2.5.8), and re.IGNORECASE
    both folds more (`ſ`, `K`) and makes the scanner about a third slower."""
    return "".join(f"[{char.upper()}{char.lower()}]" if char.isalpha() else re.escape(char) for char in word)


def _anycase_names(names: list[str]) -> str:
    """An alternation of `names` (ASCII case-insensitive) factored by first letter: tried at every tag, so the
    engine should test one letter before a whole name."""
    by_letter: dict[str, list[str]] = {}
    for name in sorted(names):
        by_letter.setdefault(name[0], []).append(name[1:])
    groups = [
        _anycase(letter) + "(?:" + "|".join(map(_anycase, sorted(rests, key=len, reverse=True))) + ")"
        for letter, rests in by_letter.items()
    ]
    return "(?:" + "|".join(groups) + ")"


# Start tags the scanner must look at: links (VML shapes are `v:*`, Outlook's bulletproof buttons) and raw text.
_SPECIAL = f"(?:{_anycase_names(['a', 'area', *_RAW_TEXT])}|{_anycase('v:')}[^{_WS}/>]*+)"
# Tag names that cannot be special by their first one or two letters (td, tr, table, img, p, div, span...): tested
# before the negative lookahead for specials, which costs about as much as the rest of an ordinary tag; the most
# frequent in mail (a table layout's td, tr, table, tbody) first.
_ORDINARY = (
    rf"[tT][a-df-hj-zA-DF-HJ-Z]|[b-hj-moqruwyzB-HJ-MOQRUWYZ]|[sS][abd-su-zABD-SU-Z]|[iI][a-eg-zA-EG-Z]|[pP][a-km-zA-KM-Z]"
    rf"|[b-zB-Z](?=[{_WS}/>])|[aA][b-qs-zB-QS-Z]|[nN][a-np-zA-NP-Z]"
)
# A raw-text element whose end tag follows, skipped with its content (not PLAINTEXT, which never ends).
_CLOSED_RAW_TEXT = "|".join(
    rf"{_anycase(name)}(?=[{_WS}/>]){_ATTRS}[{_WS}/]*+>(?:[^<]++|<(?!/{_anycase(name)}[{_WS}/>]))*+(?=</{_anycase(name)}[{_WS}/>])"
    for name in sorted(_RAW_TEXT - {"plaintext"})
)
# A link start tag, its first href attribute (§13.2.5.33: a duplicate is dropped) in named groups.
_HREF = _anycase("href") + rf"(?![^{_WS}/>=])"
_LINK = (
    rf"<(?:[aA](?:[rR][eE][aA])?(?=[{_WS}/>])|{_anycase('v:')}[^{_WS}/>]*+)"
    rf"(?:{_attribute(f'(?!{_HREF}){_NAME}')})*+"
    rf"(?:{_attribute(f'(?P<href_name>{_HREF})', f'(?P<href>{_VALUE})')})?+"
    rf"{_ATTRS}[{_WS}/]*+>"
)
# One C-level match per link: everything the scanner may skip (text, ordinary start tags, closed raw-text elements,
# end tags other than </body>, plain comments, doctype and bogus comments), then the link tag it stops at, if any.
# Otherwise it stops in front of the other tokens that need a decision. The alternatives exclude one another, so
# their order is only for speed: the common ones first, '<' read once.
_NEXT = re.compile(
    rf"""(?:
        [^<]++
      | <(?:
            /(?:[ac-zAC-Z]|(?!{_anycase("body")}(?:[{_WS}/>]|\Z))[bB]){_TAG_REST}  # end tag but </body> (attributes are tokenized too)
          | (?:{_ORDINARY}|(?!{_SPECIAL}(?:[{_WS}/>]|\Z))[A-Za-z]){_TAG_REST}  # ordinary start tag
          | (?![A-Za-z!/?])                                # '<' that opens no markup is text (§13.2.5.6)
          | />                                             # ignored (§13.2.5.7)
          | /(?![A-Za-z>])[^>]*+>                          # bogus comment
          | !--(?!\[{_anycase("if")})(?:>|->|(?s:.*?)--!?>) # comment, incl. abrupt <!--> and <!---> (§13.2.5.43-52)
          | !(?!--)[^>]*+>                                 # doctype, <![endif]> and other bogus comments
          | \?[^>]*+>                                      # processing instruction: bogus comment
          | {_CLOSED_RAW_TEXT}
        )
    )*+(?P<link>{_LINK})?""",
    re.VERBOSE,
)
_START_TAG = re.compile(rf"<(?P<tag>[A-Za-z][^{_WS}/>]*+)(?P<attrs>{_ATTRS})[{_WS}/]*+>")
_END_TAG = re.compile(rf"</(?P<tag>[A-Za-z][^{_WS}/>]*+){_ATTRS}[{_WS}/]*+>")
_ATTR_RE = re.compile(_ATTR)
_COMMENT_END = re.compile(r"--!?>")
# Microsoft's downlevel-hidden conditional comment: `<!--[if mso]> markup for Outlook <![endif]-->`. To HTML5 it
# is one comment; Outlook renders the markup inside, so its links (VML buttons) are real links.
_CONDITIONAL = re.compile(r"\[if[^\]]*\]>(?P<inner>.*)<!\[endif\]\Z", re.DOTALL | re.IGNORECASE)

# --- attribute values -------------------------------------------------------------------------------------
_CHAR_REFERENCE = re.compile(r"&(?:#[xX](?P<hex>[0-9A-Fa-f]+);?|#(?P<dec>[0-9]+);?|(?P<named>[A-Za-z0-9]+;?))")
_LONGEST_NAME = max(len(name) for name in _NAMED_REFERENCES)
# WHATWG URL parser: strip leading/trailing C0 controls and space, remove every tab and newline.
_URL_EDGES = "".join(map(chr, range(0x21)))
_URL_REMOVED = str.maketrans("", "", "\t\n\r")
_HTTP_URL = re.compile(r"https?://[^/?#]", re.IGNORECASE)
# Template syntax a later system (the sender's ESP) may still substitute: wrapping it would hide it from them.
_PLACEHOLDER = re.compile(r"\{\{.*?\}\}|\{%.*?%\}|\*\|.*?\|\*|%%[^%]*%%", re.DOTALL)
_OPT_OUT = "data-inflight-track"
_UNDECODED = re.compile("[\udc80-\udcff]")  # bytes the charset could not decode (surrogateescape)
# Unquoted values may not contain whitespace, quotes, '=', '<', '>' or '`' (HTML syntax §13.1.2.3).
_UNQUOTED_UNSAFE = re.compile(r"[\t\n\f\r \"'=<>`]")


def _numeric_reference(code: int) -> str:
    """§13.2.5.80 numeric character reference end state."""
    if code == 0 or code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
        return "\ufffd"
    if 0x80 <= code <= 0x9F:  # the windows-1252 reading of C1 controls, as browsers do
        try:
            return bytes([code]).decode("cp1252")
        except UnicodeDecodeError:
            return chr(code)  # 0x81, 0x8D, 0x8F, 0x90, 0x9D have no replacement in the table
    return chr(code)


def decode_attribute(value: str) -> str:
    """Decode character references in an attribute value exactly as a browser does (§13.2.5.72-80).

    Named references may omit the ';' only for the legacy names, and inside an attribute such a reference is
    left alone when followed by '=' or an alphanumeric (the historical rule that keeps `?a=1&copy=2` a query
    string). Python's html.unescape does not know the attribute rule.
    """
    if "&" not in value:
        return value
    if value.count("&") == value.count("&amp;"):
        return value.replace("&amp;", "&")  # the common case: query strings written correctly
    out: list[str] = []
    pos = 0
    for match in _CHAR_REFERENCE.finditer(value):
        if match["hex"] is not None or match["dec"] is not None:
            digits = (match["hex"] or match["dec"]).lstrip("0") or "0"
            code = int(digits, 16 if match["hex"] is not None else 10) if len(digits) < 9 else 0x110000
            out.append(value[pos : match.start()])
            out.append(_numeric_reference(code))
            pos = match.end()
            continue
        candidate = match["named"]
        for length in range(min(len(candidate), _LONGEST_NAME), 0, -1):
            name = candidate[:length]
            if name in _NAMED_REFERENCES:
                after = match.start() + 1 + length
                if (
                    not name.endswith(";")
                    and after < len(value)
                    and (value[after] == "=" or (value[after].isascii() and value[after].isalnum()))
                ):
                    break  # historical rule: not a reference
                out.append(value[pos : match.start()])
                out.append(_NAMED_REFERENCES[name])
                pos = after
                break
    out.append(value[pos:])
    return "".join(out)


def link_destination(raw_value: str) -> str:
    """The URL a browser follows for this raw attribute value: references decoded, URL whitespace removed."""
    url = decode_attribute(raw_value).strip(_URL_EDGES)
    # Substring tests: a character-class search costs microseconds per URL in the regex engine.
    return url.translate(_URL_REMOVED) if "\n" in url or "\t" in url or "\r" in url else url


def escape_attribute(value: str, quote: str) -> str:
    """Escape a value for an attribute written with `quote` ('"', "'" or '' for unquoted)."""
    value = value.replace("&", "&amp;")
    if quote == '"':
        return value.replace('"', "&quot;")
    if quote == "'":
        return value.replace("'", "&#39;")
    return _UNQUOTED_UNSAFE.sub(lambda m: f"&#{ord(m.group())};", value)


# --- the open pixel and the scanner trap -----------------------------------------------------------------
# Each attribute is there for a client: width/height attributes because Outlook's Word engine ignores CSS sizes
# on images; alt="" so image-blocking clients show no placeholder text and screen readers skip it; border="0"
# for old clients that draw a border around images; display:block so Gmail and Apple Mail add no inline
# baseline gap; zero margin/padding so nothing shifts; aria-hidden for assistive technology.
_PIXEL = (
    '<img src="{src}" width="1" height="1" alt="" border="0" '
    'style="display:block;width:1px;height:1px;border:0;margin:0;padding:0" aria-hidden="true" />'
)
# A link with no content has no area to click, display:none hides it in browsers, mso-hide:all in Outlook
# (which ignores display:none); tabindex/aria-hidden keep it out of keyboard and screen-reader navigation.
_HONEYPOT = (
    '<a href="{href}" aria-hidden="true" tabindex="-1" '
    'style="display:none;mso-hide:all;font-size:0;line-height:0;max-height:0;overflow:hidden"></a>'
)
# Our own pixel, recognised on a second pass so a message instrumented by us is never instrumented twice.
_OWN_PIXEL_TAIL = '" width="1" height="1" alt="" border="0" style="display:block;'
_OWN_PIXEL = re.compile(r'<img src="(?P<src>[^"]*)' + re.escape(_OWN_PIXEL_TAIL))


def tracking_markup(minter: LinkMinter) -> str:
    """The honeypot link (when the project has one) followed by the open pixel."""
    pixel = _PIXEL.format(src=escape_attribute(minter.pixel_url(), '"'))
    honeypot = minter.honeypot_url()
    return pixel if honeypot is None else _HONEYPOT.format(href=escape_attribute(honeypot, '"')) + pixel


# --- the plan ----------------------------------------------------------------------------------------------
_UNMINTED = "\0"  # no tracked URL is this: a cache miss
class Slot(NamedTuple):
    """A span of the HTML to replace: a link attribute value, or the empty span where the pixel goes."""

    start: int
    end: int
    destination: str | None  # the decoded URL; None for the pixel slot
    quote: str  # quote character of the attribute ('' when unquoted)
    attribute_start: int  # where the attribute name begins: a safe place for a line break (identity CTE)
    attribute_end: int  # just after the closing quote


class Slots:
    """A plan's slots in document order, kept in parallel arrays; iterating gives `Slot` tuples.

    Compact because a 20 MB newsletter has 100 k links, planned once per message in the CPU pool:
    as Slot tuples with their int objects they took ~22 MB more than these arrays (README "Memory").
    """

    __slots__ = ("_offsets", "destinations", "quotes")

    def __init__(self) -> None:
        self._offsets = array("q")  # per slot: attribute_start, start, end, attribute_end (sorted, as they follow)
        self.destinations: list[str | None] = []  # per slot; None for the pixel slot
        self.quotes: list[str] = []  # per slot

    def add(self, start: int, end: int, destination: str | None, quote: str, attribute_start: int, attribute_end: int) -> None:
        """Append a slot (its fields as in `Slot`) after the last one."""
        self._offsets.extend((attribute_start, start, end, attribute_end))
        self.destinations.append(destination)
        self.quotes.append(quote)

    def place(self, slot: Slot) -> None:
        """Insert `slot` after every slot that starts at or before it; once, after the scanner added the others."""
        starts = self._offsets[1::4]
        if any(map(operator.gt, starts, islice(starts, 1, None))):
            raise ValueError("slots out of document order")  # the scanner's contract; never silently spliced wrong
        at = len(starts) if not starts or starts[-1] <= slot.start else bisect.bisect_right(starts, slot.start)
        for offset, value in enumerate((slot.attribute_start, slot.start, slot.end, slot.attribute_end)):
            self._offsets.insert(4 * at + offset, value)
        self.destinations.insert(at, slot.destination)
        self.quotes.insert(at, slot.quote)

    def offsets(self, attributes: bool) -> array[int]:
        """Every slot's start and end, in document order; with `attributes`, each between its attribute's
        start and end. Sorted, since slots follow each other and an attribute holds its value."""
        if attributes:
            return self._offsets
        spans = array("q", bytes(16 * len(self)))
        spans[0::2], spans[1::2] = self._offsets[1::4], self._offsets[2::4]
        return spans

    def __len__(self) -> int:
        return len(self.destinations)

    def __getitem__(self, index: int) -> Slot:
        index = range(len(self))[index]  # negative indices, and IndexError past the end
        attribute_start, start, end, attribute_end = self._offsets[4 * index : 4 * index + 4]
        return Slot(start, end, self.destinations[index], self.quotes[index], attribute_start, attribute_end)

    def __iter__(self) -> Iterator[Slot]:
        offsets = iter(self._offsets)
        for (attribute_start, start, end, attribute_end), destination, quote in zip(
            zip(offsets, offsets, offsets, offsets, strict=True), self.destinations, self.quotes, strict=True
        ):
            yield Slot(start, end, destination, quote, attribute_start, attribute_end)


@dataclass(frozen=True, slots=True)
class HtmlPlan:
    """What one scan of an HTML document found; rendering it for a recipient is just splicing."""

    slots: Slots  # in document order, non-overlapping; the pixel slot is one of them
    seen_urls: frozenset[str]  # every absolute http(s) link and our-pixel URL: the idempotency check
    untrackable: tuple[str, ...] = ()  # why links a browser follows could not be tracked (no redirect can name them)

    def already_instrumented(self, minter: LinkMinter) -> bool:
        return any(map(minter.is_tracking_url, self.seen_urls))  # every link of every copy: no generator

    def replacements(self, minter: LinkMinter, cache: dict[str, str | None], markup: str) -> tuple[list[str | None], int]:
        """The text for each slot (None: keep the original) and how many links it rewrites; `markup` goes in
        the pixel slot (see `tracking_markup`).

        `cache` maps destination to tracked URL for this recipient, so an Outlook VML button and its HTML twin
        (same destination) carry the same tracked URL, and the minter signs each destination once.
        """
        out: list[str | None] = []
        links = 0
        click_url = minter.click_url
        for destination, quote in zip(self.slots.destinations, self.slots.quotes, strict=True):
            if destination is None:
                out.append(markup)
                continue
            tracked = cache.get(destination, _UNMINTED)
            if tracked is _UNMINTED:
                tracked = cache[destination] = click_url(destination)
            if tracked is None:
                out.append(None)
                continue
            out.append(escape_attribute(tracked, quote))
            links += 1
        return out, links


def _value_span(attribute: re.Match[str]) -> tuple[int, int, str]:
    """Start and end of an attribute's value without its quotes, and the quote character ('' if unquoted)."""
    quote = attribute["value"][:1]
    if quote in ('"', "'"):
        return attribute.start("value") + 1, attribute.end("value") - 1, quote
    return attribute.start("value"), attribute.end("value"), ""



def _same(text: str) -> str:
    return text


def _opted_out(html: str, tag: re.Match[str], read: Callable[[str], str]) -> bool:
    """Whether the link's first data-inflight-track attribute says "off"."""
    start_tag = _START_TAG.match(html, tag.start("link"))
    assert start_tag is not None  # the same tag, as _LINK matched it
    for attribute in _ATTR_RE.finditer(html, *start_tag.span("attrs")):
        if attribute["name"].lower() == _OPT_OUT:
            if attribute["value"] is None:
                return False
            start, end, _ = _value_span(attribute)
            return decode_attribute(read(html[start:end])).strip().lower() == "off"
    return False


def _link_slot(
    html: str, tag: re.Match[str], skip_urls: frozenset[str], seen: set[str], untrackable: list[str], read: Callable[[str], str]
) -> tuple[int, int, str, str, int, int] | None:
    start, end = tag.span("href")
    quote = html[start] if start < end and html[start] in "\"'" else ""
    if quote:
        start, end = start + 1, end - 1
    # link_destination, inlined for the common value: ASCII, at most "&amp;" to decode, no tab or newline.
    value = html[start:end]
    if not value.isascii():
        value = read(value)
    destination = (decode_attribute(value) if "&" in value else value).strip(_URL_EDGES)
    if "\n" in destination or "\t" in destination or "\r" in destination:
        destination = destination.translate(_URL_REMOVED)
    if not _HTTP_URL.match(destination):
        return None  # mailto:, tel:, #anchors, relative URLs, merge tags like *|UNSUB|*
    seen.add(destination)
    # Most links carry no opt-out: a substring test spares them reading their attributes.
    if _OPT_OUT in html[tag.start("link") : tag.end()].lower() and _opted_out(html, tag, read):
        return None
    # The substring tests spare most links the placeholder pattern's scan (every link of every message passes).
    # (One-character tests first: they are memchr; the two-character ones are not.)
    placeholder = (
        "{" in destination or ("|" in destination and "*|" in destination) or ("%" in destination and "%%" in destination)
    ) and _PLACEHOLDER.search(destination)
    if placeholder or destination in skip_urls:
        return None
    if not destination.isascii() and _UNDECODED.search(destination):
        return None  # bytes the charset could not decode: we cannot know the URL the reader would follow
    try:
        browser_url(destination)
    except UnserialisableUrl as exc:
        untrackable.append(str(exc))  # e.g. a host IDNA refuses: no Location could name it
        return None
    return start, end, destination, quote, tag.start("href_name"), tag.end("href")  # Slot's fields (Slots.add)


def plan_html(html: str, *, skip_urls: frozenset[str] = frozenset(), read: Callable[[str], str] = _same) -> HtmlPlan:
    """Scan `html` once: the link values to rewrite and the pixel point.

    Links are `<a href>`, `<area href>` and VML `href` (`<v:roundrect>`, `<v:rect>`...) with an absolute http(s)
    URL, including those inside Outlook conditional comments; never `<link>`, `<base>`, `<img src>` or CSS.
    `skip_urls` are destinations to leave alone (the List-Unsubscribe URLs of the message). `read` turns a
    span of `html` into the text it stands for: the identity, or for a part scanned byte for byte as Latin-1
    (see `Charset.byte_transparent`) the decoding in its real charset.
    """
    slots = Slots()
    seen: set[str] = set()
    untrackable: list[str] = []
    body_end = _scan(html, 0, len(html), slots, skip_urls, seen, untrackable, read)
    pixel_at = len(html) if body_end is None else body_end
    # Link slots come in document order (a conditional comment's are scanned where it is): only the pixel's is placed.
    slots.place(Slot(pixel_at, pixel_at, None, "", pixel_at, pixel_at))
    if _OWN_PIXEL_TAIL in html:  # a substring search is ~10x quicker than the pattern's scan of a whole document
        seen.update(link_destination(match["src"]) for match in _OWN_PIXEL.finditer(html))
    return HtmlPlan(slots, frozenset(seen), tuple(untrackable))


def _scan(
    html: str,
    pos: int,
    end: int,
    slots: Slots,
    skip_urls: frozenset[str],
    seen: set[str],
    untrackable: list[str],
    read: Callable[[str], str],
) -> int | None:
    """Tokenize html[pos:end], appending link slots; returns where the last `</body>` starts."""
    body_end: int | None = None
    while True:
        token = _NEXT.match(html, pos, end)
        assert token is not None  # `(...)*+(...)?` always matches
        pos = token.end()
        if token.start("link") >= 0:
            if token.start("href") >= 0:
                found = _link_slot(html, token, skip_urls, seen, untrackable, read)
                if found is not None:
                    slots.add(*found)
            continue
        if pos >= end:
            return body_end
        if html.startswith("<!--", pos):
            close = _COMMENT_END.search(html, pos + 4, end)
            if close is None:
                return body_end  # EOF in comment: the rest of the document is comment
            conditional = _CONDITIONAL.match(html, pos + 4, close.start())
            if conditional is not None:
                # Outlook's markup inside: its links count, its `</body>` does not place the pixel.
                _scan(html, conditional.start("inner"), conditional.end("inner"), slots, skip_urls, seen, untrackable, read)
            pos = close.end()
        elif html.startswith("</", pos):
            tag = _END_TAG.match(html, pos, end)
            if tag is None:
                return body_end  # EOF in tag
            if tag["tag"].lower() == "body":
                body_end = pos
            pos = tag.end()
        else:
            # An unclosed raw-text element or PLAINTEXT (the rest is text), or EOF in a tag or a bogus comment
            # (nothing after it is markup): nothing after it is a link or `</body>`.
            return body_end


@dataclass(frozen=True, slots=True)
class RewriteResult:
    html: str
    links: int  # link attributes rewritten
    already_instrumented: bool  # our own tracking URLs were found; `html` is the input


def _splice(text: str, slots: Slots, replacements: list[str | None]) -> str:
    pieces: list[str] = []
    pos = 0
    for slot, replacement in zip(slots, replacements, strict=True):
        if replacement is not None:
            pieces.append(text[pos : slot.start])
            pieces.append(replacement)
            pos = slot.end
    pieces.append(text[pos:])
    return "".join(pieces)


def rewrite_html(html: str, minter: LinkMinter, *, skip_urls: frozenset[str] = frozenset()) -> RewriteResult:
    """Track every eligible link of `html` and add the pixel (and honeypot); pure, deterministic for a minter."""
    plan = plan_html(html, skip_urls=skip_urls)
    if plan.already_instrumented(minter):
        return RewriteResult(html, 0, True)
    replacements, links = plan.replacements(minter, {}, tracking_markup(minter))
    return RewriteResult(_splice(html, plan.slots, replacements), links, False)
