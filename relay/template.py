"""Copies of one message that differ only in their tokens, spliced into one rendered template.

Every tracked copy of a message is the same bytes but for the tokens in its URLs: the same links, the
same markup, the same encodings, and a token of the same length for the same destination (a sealed send
id and the destination: README "Tracking links and domains"). Rendering each copy again (escaping, charset
encoding, quoted-printable wrapping) cost more than minting its tokens. Here the message is rendered once with
placeholder tokens, and each copy is that template with its own tokens' bytes where the placeholders are:
per copy, only the tokens are made.

Only where that is exact, checked, not assumed:
- every tracked part's transfer encoding passes an edit's bytes on as they are, placed by their length
  (identity and quoted-printable; not base64), in a charset that writes ASCII as ASCII;
- the placeholder byte is one the message does not hold, and the template holds exactly as many of them as
  the placeholder tokens have characters;
- a copy's URLs have the template's length, prefix and suffix, and its tokens are URL-safe ASCII, which no
  escaping, charset or quoted-printable line changes.
A copy that does not fit is rendered in full, as every copy was before.
"""

from __future__ import annotations

import functools
import re
import struct
from collections.abc import Callable, Iterator
from typing import NamedTuple, Protocol

from relay.instrument import InstrumentationPlan, Instrumented, LinkMinter
from relay.rewrite import escape_attribute, tracking_markup

__all__ = ["CopyTemplate", "SplicingMinter", "copy_template"]

# Candidates for the placeholder byte: printable ASCII that quoted-printable writes as itself and no attribute
# escaping touches (not '=', '&', quotes, '<', '>', '`'). The first one the message does not hold is used.
PLACEHOLDERS = b"~^|!*$"
# What a token may be made of: base64url (tracking/tokens.py), one byte per character in every encoding used.
_TOKEN_TEXT = re.compile(r"[A-Za-z0-9_-]*")
# Markup keys, beside the destinations (never an http URL, so never one of them).
PIXEL, HONEYPOT = "\0pixel", "\0honeypot"


class SplicingMinter(LinkMinter, Protocol):
    def varying(self, url: str) -> tuple[int, int]:
        """Where, in one of this minter's URLs, the characters of this copy's token are; the rest of the URL
        is the same in every copy of the message."""


class _Shape(NamedTuple):
    """A URL of the template: the length of each copy's, where its token is, and what surrounds it."""

    length: int
    start: int
    end: int
    prefix: str
    suffix: str


class _Placeholders:
    """A LinkMinter for the template: `minter`'s URLs with each token's characters made the placeholder.
    The URLs it was given are kept: they are the first copy's."""

    def __init__(self, minter: SplicingMinter, placeholder: str) -> None:
        self.minter = minter
        self.placeholder = placeholder
        self.urls: dict[str, str | None] = {}  # per destination (or markup key): the minter's URL; None: untracked
        self.shapes: dict[str, _Shape | None] = {}  # the same, as each copy's must be

    def hidden(self, key: str) -> str | None:
        """The template's URL for `key`: the minter's, with the placeholder for its token's characters."""
        shape = self.shapes[key]
        return None if shape is None else shape.prefix + self.placeholder * (shape.end - shape.start) + shape.suffix

    def _hide(self, key: str, mint: Callable[[], str | None]) -> str | None:
        if key not in self.shapes:  # minted once: the markup is asked for again, to learn its order
            url = self.urls[key] = mint()
            if url is None:
                self.shapes[key] = None
            else:
                start, end = self.minter.varying(url)
                self.shapes[key] = _Shape(len(url), start, end, url[:start], url[end:])
        return self.hidden(key)

    def click_url(self, destination: str) -> str | None:
        return self._hide(destination, functools.partial(self.minter.click_url, destination))

    def pixel_url(self) -> str:
        hidden = self._hide(PIXEL, self.minter.pixel_url)
        assert hidden is not None
        return hidden

    def honeypot_url(self) -> str | None:
        return self._hide(HONEYPOT, self.minter.honeypot_url)

    def is_tracking_url(self, url: str) -> bool:
        return self.minter.is_tracking_url(url)


class CopyTemplate:
    """One message rendered with placeholder tokens; `render` gives a recipient's copy by writing its tokens in."""

    def __init__(self, template: Instrumented, between: list[bytes], runs: list[int], order: list[str],
                 shapes: dict[str, _Shape | None], first: tuple[LinkMinter, dict[str, str | None]]) -> None:
        self._links, self._untrackable = template.links, template.untrackable  # its data is `between` and the runs
        self._between = between  # the template's bytes before, between and after the placeholder runs
        self._cut = struct.Struct("".join(f"{run}s" for run in runs))  # a copy's tokens into the runs, in one call
        self._order = order  # whose token each placeholder run holds, token after token
        self._shapes = shapes
        self._first = first  # the minter the template was made with, and its URLs: its copy needs no minting

    def render(self, minter: LinkMinter) -> Instrumented | None:
        """`minter`'s copy, or None when it does not fit the template (then render it in full)."""
        first, urls = self._first
        mint = urls.__getitem__ if minter is first else _minting(minter)
        tokens: dict[str, str] = {}
        for key, shape in self._shapes.items():
            url = mint(key)
            if shape is None or url is None:
                if shape is not url:
                    return None  # tracked in the template, not here, or the other way round
                continue
            length, start, end, prefix, suffix = shape
            if len(url) != length or not url.startswith(prefix) or not url.endswith(suffix):
                return None
            tokens[key] = url[start:end]
        text = "".join([tokens[key] for key in self._order])
        if not _TOKEN_TEXT.fullmatch(text):
            return None
        pieces: list[bytes] = [b""] * (2 * len(self._between) - 1)
        pieces[0::2] = self._between
        pieces[1::2] = self._cut.unpack(text.encode("ascii"))
        return Instrumented(b"".join(pieces), "instrumented", "instrumented", self._links, self._untrackable)


def _minting(minter: LinkMinter) -> Callable[[str], str | None]:
    """The URL for a key, minted by `minter`."""
    def mint(key: str) -> str | None:
        if key == PIXEL:
            return minter.pixel_url()
        if key == HONEYPOT:
            return minter.honeypot_url()
        return minter.click_url(key)
    return mint


def copy_template(plan: InstrumentationPlan, minter: SplicingMinter) -> CopyTemplate | None:
    """The template of `plan`'s copies, made with `minter`'s URLs; None where splicing would not be exact."""
    if not plan.splices:
        return None
    placeholder = next((byte for byte in PLACEHOLDERS if byte not in plan.raw), None)
    if placeholder is None:
        return None
    hidden = _Placeholders(minter, chr(placeholder))
    template = plan.render(hidden)
    if template.outcome != "instrumented":
        return None
    order = list(_token_order(plan, hidden))
    # One C call for the runs and what lies between them (a literal first: the engine then searches fast).
    pieces = re.split(b"(" + re.escape(bytes([placeholder])) * 2 + b"*)", template.data)
    runs = [len(run) for run in pieces[1::2]]
    if sum(runs) != sum(shape.end - shape.start for key in order if (shape := hidden.shapes[key]) is not None):
        return None  # the placeholder byte is in a URL's fixed part too, or some encoding changed it
    return CopyTemplate(template, pieces[0::2], runs, order, hidden.shapes, (minter, hidden.urls))


def _token_order(plan: InstrumentationPlan, hidden: _Placeholders) -> Iterator[str]:
    """The key of each token in the copy, in order: a slot's destination, or the markup's URLs where the pixel goes."""
    markup = tracking_markup(hidden)  # as the render made it
    in_markup = sorted((key for key in (HONEYPOT, PIXEL) if hidden.shapes.get(key) is not None),
                       key=lambda key: markup.find(escape_attribute(hidden.hidden(key) or "", '"')))
    for destination in plan.destinations():
        if destination is None:
            yield from in_markup
        elif hidden.shapes.get(destination) is not None:
            yield destination
