"""Instrument a whole message for one recipient: track its HTML links and add the open pixel, byte-exactly.

`plan_instrumentation` does the expensive part once per message (MIME walk, decoding, HTML scan, position
maps); `InstrumentationPlan.render` runs per recipient (each has their own tokens) and only splices. Nothing
outside the edited spans changes: headers, boundaries, preamble and epilogue, other parts, line endings.

Neither function raises: any failure gives `outcome="failed"` with the original bytes, because a message must
never be lost or refused over its content. Mail we must not touch (signed, encrypted, DKIM-signed, already
instrumented, without HTML) comes back `outcome="untouched"` with the reason.
"""

from __future__ import annotations

import operator
import re
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Literal

from relay.charset import Charset, CharsetError
from relay.mime import Entity, Fields, MalformedMessage, header_block, walk
from relay.rewrite import HtmlPlan, LinkMinter, plan_html, tracking_markup
from relay.transfer_encoding import Body, Edit, UnsupportedEncoding, body_for

__all__ = ["InstrumentationPlan", "Instrumented", "LinkMinter", "instrument_message", "plan_instrumentation"]

Outcome = Literal["instrumented", "untouched", "failed"]

# Any change to these invalidates a signature or makes no sense on ciphertext (RFC 1847, RFC 8551).
_PROTECTED = {
    "multipart/signed": "signed",
    "multipart/encrypted": "encrypted",
    "application/pkcs7-mime": "s/mime",
    "application/x-pkcs7-mime": "s/mime",
}
_ANGLE_URL = re.compile(r"<([^>]*)>")
_WHITESPACE = " \t\r\n\f\v"  # what str.strip() removes from ASCII (not NBSP: in Latin-1 view a byte of UTF-8)


# Where a rendered copy's pieces go instead of being joined (a file's `writelines`).
Writelines = Callable[[Iterable[bytes | memoryview]], object]


@dataclass(frozen=True)
class Instrumented:
    data: bytes  # bytes to send: the input itself when unchanged
    outcome: Outcome
    reason: str  # "instrumented" / why untouched ("signed", "no html part", "already instrumented", ...) / failure reason
    links: int  # links rewritten
    untrackable: tuple[str, ...] = ()  # why links were left untracked although a reader could follow them


@dataclass(frozen=True, slots=True)
class _Part:
    """One HTML part to instrument: where its body is and how to write into it."""

    entity: Entity
    body: Body
    charset: Charset
    html: HtmlPlan
    # Body positions, per slot: where a line break may go before it, start, end, where one may go after it
    # (with `breaks`; else start and end only). One flat array: 100 k links as tuples of ints took 20 MB.
    positions: array[int]
    breaks: bool

    def spans(self) -> Iterator[tuple[int, int, int | None, int | None]]:
        """Per slot: start, end, and where a line break may go before/after it (None: never)."""
        at = iter(self.positions)
        if self.breaks:
            return ((start, end, before, after) for before, start, end, after in zip(at, at, at, at, strict=True))
        return ((start, end, None, None) for start, end in zip(at, at, strict=True))


class InstrumentationPlan:
    """The per-message analysis; `render` is cheap and may be called once per recipient."""

    def __init__(self, raw: bytes, parts: tuple[_Part, ...], outcome: Outcome, reason: str) -> None:
        self._raw = raw
        self._parts = parts
        self._outcome: Outcome = outcome
        self._reason = reason

    @property
    def outcome(self) -> Outcome:
        """What render will do before any minter is involved ("instrumented" means: has parts to track)."""
        return self._outcome

    @property
    def reason(self) -> str:
        return self._reason

    @property
    def raw(self) -> bytes:
        return self._raw

    @property
    def splices(self) -> bool:
        """Whether copies that differ only in their tokens can be spliced into one render (relay/template.py):
        every part's encoding passes an edit's bytes on as they are, in a charset that writes ASCII as ASCII."""
        return self._outcome == "instrumented" and all(p.body.splices and p.charset.ascii_compatible for p in self._parts)

    def destinations(self) -> Iterator[str | None]:
        """Each slot's destination in the order a copy holds them (None: where the tracking markup goes)."""
        for part in self._parts:
            yield from part.html.slots.destinations

    def render(self, minter: LinkMinter, writelines: Writelines | None = None) -> Instrumented:
        """The copy for `minter`. With `writelines` (a file's), an instrumented copy's bytes go through it part
        by part as they are made and are never joined (`data` is then empty): a 100 k-link copy is not held
        whole (README "Memory"). Untouched and failed results carry the original bytes either way; what
        `writelines` got before a failure is then void."""
        if self._outcome != "instrumented":
            return Instrumented(self._raw, self._outcome, self._reason, 0)
        try:
            return self._render(minter, writelines)
        except Exception as exc:  # never raise: the pipeline relays the original bytes
            return Instrumented(self._raw, "failed", f"render error: {type(exc).__name__}", 0)

    def _render(self, minter: LinkMinter, writelines: Writelines | None) -> Instrumented:
        if any(part.html.already_instrumented(minter) for part in self._parts):
            return Instrumented(self._raw, "untouched", "already instrumented", 0)
        pieces: list[bytes | memoryview] = []
        links = self._pieces(minter, pieces.extend if writelines is None else writelines)
        untrackable = tuple(reason for part in self._parts for reason in part.html.untrackable)
        # Joined once the URLs, edits and their cache are gone: for 100 k links they are as large as the copy.
        return Instrumented(b"".join(pieces), "instrumented", "instrumented", links, untrackable)

    def _pieces(self, minter: LinkMinter, emit: Writelines) -> int:
        """Emit the copy's pieces, a list at a time; the number of links rewritten."""
        raw = memoryview(self._raw)  # the bytes around the HTML parts (attachments) are written, not copied
        markup = tracking_markup(minter)
        cache: dict[str, str | None] = {}
        done = 0
        links = 0
        for part in self._parts:
            replacements, count = part.html.replacements(minter, cache, markup)
            links += count
            # Made as the body renders them, never all at once: for 100 k links a list of them was 50 MB.
            edits = (
                Edit(start, end, part.charset.encode(text), before, after)
                for (start, end, before, after), text in zip(part.spans(), replacements, strict=True)
                if text is not None
            )
            emit([raw[done : part.entity.body_start]])
            emit(part.body.render(edits))
            done = part.entity.body_end
        emit([raw[done:]])
        return links


def plan_instrumentation(raw: bytes) -> InstrumentationPlan:
    """Analyse a message (as received over SMTP, CRLF or LF line endings) once for all its recipients."""
    try:
        return _plan(raw)
    except MalformedMessage as exc:
        return InstrumentationPlan(raw, (), "failed", f"malformed MIME: {exc}")
    except (UnsupportedEncoding, CharsetError) as exc:
        return InstrumentationPlan(raw, (), "failed", str(exc))
    except Exception as exc:  # never raise: the pipeline relays the original bytes
        return InstrumentationPlan(raw, (), "failed", f"plan error: {type(exc).__name__}")


def instrument_message(raw: bytes, minter: LinkMinter) -> Instrumented:
    return plan_instrumentation(raw).render(minter)


def _plan(raw: bytes) -> InstrumentationPlan:
    head = header_block(raw, 0, len(raw))
    fields = head[0]
    # A DKIM-Signature does not stop us: the relay re-signs for its own domains and warns for
    # others (issue 5's trade-off, documented in README), so signed senders still get tracking.
    entities = walk(raw, opaque=frozenset(_PROTECTED), head=head)
    for entity in entities:
        if entity.content_type in _PROTECTED:
            return InstrumentationPlan(raw, (), "untouched", _PROTECTED[entity.content_type])
    # Body HTML only: an HTML attachment is a document the recipient opens, not the message they read.
    html_parts = [e for e in entities if e.content_type == "text/html" and e.disposition != "attachment"]
    if not html_parts:
        return InstrumentationPlan(raw, (), "untouched", "no html part")
    skip_urls = _unsubscribe_urls(fields)
    parts = tuple(part for part in (_plan_part(raw, entity, skip_urls) for entity in html_parts) if part is not None)
    if not parts:
        return InstrumentationPlan(raw, (), "untouched", "empty html part")
    return InstrumentationPlan(raw, parts, "instrumented", "instrumented")


def _plan_part(raw: bytes, entity: Entity, skip_urls: frozenset[str]) -> _Part | None:
    eol = b"\r\n" if raw[entity.body_start - 2 : entity.body_start] == b"\r\n" else b"\n"
    body = body_for(entity.transfer_encoding, raw[entity.body_start : entity.body_end], eol)
    charset = Charset.resolve(entity.charset, body.decoded)
    if charset.byte_transparent:
        html = body.decoded.decode("latin-1")  # one character per byte: text positions are byte offsets
        body.release()  # the scan reads `html`, positions need no decoded bytes
        plan = plan_html(html, skip_urls=skip_urls, read=charset.read) if html.strip(_WHITESPACE) else None
        html = ""  # as large as the part; the offsets below are byte offsets already
    else:
        html = charset.decode(body.decoded)
        plan = plan_html(html, skip_urls=skip_urls) if html.strip() else None
    if plan is None:
        return None  # an empty part renders nothing; a pixel would be its only content
    # Line breaks may only be added where they are single ASCII bytes, and only identity encodings need them.
    breaks = body.breaks_lines and charset.ascii_compatible
    # Slots are in document order and never overlap, each attribute around its value: their offsets come
    # sorted, and are mapped in one pass without sets or dicts (for 100 k links those were the plan's
    # peak). Positions take equal offsets in turn.
    offsets: Sequence[int] = plan.slots.offsets(attributes=breaks)
    if any(map(operator.gt, offsets, islice(offsets, 1, None))):
        raise ValueError("overlapping slots")  # never: the scanner's contract; were it broken, relay untouched
    if not charset.byte_transparent:
        offsets = charset.byte_offsets(html, body.decoded, offsets)
        body.release()
    del html
    return _Part(entity, body, charset, plan, array("q", body.positions(offsets)), breaks)


def _unsubscribe_urls(fields: Fields) -> frozenset[str]:
    """URLs of List-Unsubscribe (RFC 2369: in angle brackets, whitespace inside them ignored)."""
    urls = set()
    for value in fields.get("list-unsubscribe", []):
        for match in _ANGLE_URL.finditer(value):
            urls.add(re.sub(r"\s+", "", match.group(1)))
    return frozenset(urls)
