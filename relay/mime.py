"""Byte-exact MIME walk: where every entity's headers and body sit in the raw message.

The stdlib parser builds a tree we could not serialise back without refolding headers and rewriting
boundaries (which breaks DKIM and any signature), so this module only *locates* things: every entity is a
set of offsets into the original bytes, and instrumentation splices new bytes into those ranges. Parsing of
header *values* (Content-Type parameters, RFC 2231 continuations) is left to the stdlib, which is good at it.

Strictness is deliberate: a structure we cannot delimit unambiguously (no boundary, no closing delimiter,
an inner multipart reusing its parent's boundary) raises `MalformedMessage`, and the caller relays the
message untouched rather than guess which part a client would render.
"""

from __future__ import annotations

import email.message
import re
from dataclasses import dataclass
from functools import lru_cache

from relay.transfer_encoding import canonical_encoding

__all__ = ["Entity", "Fields", "MalformedMessage", "header_block", "walk"]

Fields = dict[str, list[str]]  # unfolded header field values by lowercase name, in order of appearance

# RFC 5322 §3.6.8: a field name is printable US-ASCII except ':'; obs-syntax (§4.5) allows WSP before the colon.
_FIELD = re.compile(rb"([!-9;-~]+)[ \t]*:")
_BLANK_LINE = re.compile(rb"\n\r?\n")
_MAX_DEPTH = 50  # deeper nesting is no real mail; refuse it rather than recurse without bound


class MalformedMessage(ValueError):
    """The MIME structure cannot be delimited unambiguously."""


@dataclass(frozen=True, slots=True)
class Entity:
    """One MIME entity (the message itself or a body part), as offsets into the raw message."""

    body_start: int
    body_end: int  # RFC 2046 §5.1.1: the line break before a delimiter belongs to the delimiter, not the body
    content_type: str  # lowercase "type/subtype"; RFC 2045 §5.2 default when missing or invalid
    charset: str | None  # lowercase label as written, None when absent
    boundary: str | None
    transfer_encoding: str  # canonical_encoding of the field: "7bit" when absent (RFC 2045 §6.1), aliases mapped
    disposition: str | None  # lowercase disposition type ("inline", "attachment") or None
    depth: int

    @property
    def is_multipart(self) -> bool:
        return self.content_type.startswith("multipart/")


def header_block(raw: bytes, start: int, end: int) -> tuple[Fields, int]:
    """Parse the header block at `start`: unfolded fields by lowercase name, and where the body begins.

    The block ends at the first empty line (RFC 5322 §2.1); with no empty line the whole range is headers
    and the body is empty. Lines may end in CRLF or bare LF (messages written to disk lose their CRs).
    """
    if raw.startswith(b"\r\n", start):
        return {}, start + 2
    if raw.startswith(b"\n", start):
        return {}, start + 1
    blank = _BLANK_LINE.search(raw, start, end)
    block_end, body_start = (blank.start() + 1, blank.end()) if blank else (end, end)
    fields: Fields = {}
    name: str | None = None
    value: list[bytes] = []
    lines = raw[start:block_end].split(b"\n")
    for index, line in enumerate(lines):
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line and index == len(lines) - 1:
            break  # the split after the block's final line break
        if line[:1] in (b" ", b"\t"):
            if name is not None:  # RFC 5322 §2.2.3 unfolding: drop the line break, keep the WSP
                value.append(line)
            continue  # a continuation before any field is a defect every reader ignores
        if name is not None:
            fields.setdefault(name, []).append(b"".join(value).decode("utf-8", "surrogateescape").strip())
            name = None
        match = _FIELD.match(line)
        if match is None:
            if index == 0 and line.startswith(b"From "):
                continue  # mbox separator line of a message saved to disk, not a header
            raise MalformedMessage("header block has a line that is neither a field nor a continuation")
        name = match.group(1).decode("ascii").lower()
        value = [line[match.end() :]]
    if name is not None:
        fields.setdefault(name, []).append(b"".join(value).decode("utf-8", "surrogateescape").strip())
    return fields, body_start


def _first(fields: Fields, name: str) -> str | None:
    values = fields.get(name)
    return values[0] if values else None


@lru_cache(maxsize=1024)
def _content_type(value: str, default_type: str) -> tuple[str, str | None, str | None]:
    """Type, charset and boundary of a Content-Type value; cached, as leaf parts of every message repeat theirs.

    The stdlib's parameter parser handles quoting, comments and RFC 2231 continuations for us.
    """
    probe = email.message.Message()
    probe["Content-Type"] = value
    probe.set_default_type(default_type)
    return probe.get_content_type(), (probe.get_content_charset() or "").strip() or None, probe.get_boundary()


def _entity(raw: bytes, start: int, end: int, depth: int, default_type: str,
            head: tuple[Fields, int] | None = None) -> Entity:
    """The entity at `start`; `head` is its header block when the caller parsed it already."""
    fields, body_start = head if head is not None else header_block(raw, start, end)
    content_type = _first(fields, "content-type")
    if content_type is None:
        ctype, charset, boundary = default_type, None, None
    else:
        ctype, charset, boundary = _content_type(content_type, default_type)
    disposition = _first(fields, "content-disposition")
    return Entity(
        body_start=body_start,
        body_end=end,
        content_type=ctype,
        charset=charset,
        boundary=boundary,
        transfer_encoding=canonical_encoding(_first(fields, "content-transfer-encoding")),
        disposition=disposition.split(";", 1)[0].strip().lower() if disposition else None,
        depth=depth,
    )


def _delimiters(raw: bytes, entity: Entity) -> list[tuple[int, int]]:
    """Body ranges of the parts of a multipart entity (RFC 2046 §5.1.1)."""
    if not entity.boundary:
        raise MalformedMessage(f"{entity.content_type} without a boundary parameter")
    if entity.transfer_encoding not in ("7bit", "8bit", "binary"):
        raise MalformedMessage(f"{entity.content_type} with transfer encoding {entity.transfer_encoding!r}")
    # A delimiter line is "--" boundary, "--" more for the close delimiter, optional transport padding, and
    # nothing else: matching whole lines keeps boundaries that are prefixes of one another apart. The pattern
    # starts with the literal so the regex engine can search for it fast; line starts are checked below.
    delimiter = re.compile(b"--" + re.escape(entity.boundary.encode("utf-8", "surrogateescape")) + rb"(--)?[ \t]*\r?(?=\n|\Z)")
    parts: list[tuple[int, int]] = []
    part_start: int | None = None
    for match in delimiter.finditer(raw, entity.body_start, entity.body_end):
        line_start = match.start()
        if line_start != entity.body_start and raw[line_start - 1] != 0x0A:
            continue
        if part_start is not None:
            # The line break before the delimiter belongs to the delimiter.
            cut = line_start - 2 if raw[line_start - 2 : line_start] == b"\r\n" else line_start - 1
            parts.append((part_start, max(cut, part_start)))
        if match.group(1):
            return parts
        part_start = match.end()
        if raw.startswith(b"\n", part_start):
            part_start += 1
    if part_start is None:
        raise MalformedMessage(f"{entity.content_type} whose boundary never occurs")
    raise MalformedMessage(f"{entity.content_type} without a closing delimiter")


def walk(raw: bytes, *, opaque: frozenset[str] = frozenset(), head: tuple[Fields, int] | None = None) -> list[Entity]:
    """Every entity of the message in document order (pre-order); `head` is the message's header block
    (header_block(raw, 0, len(raw))) when the caller parsed it already: it is the longest of them.

    message/* bodies are never entered: a forwarded or bounced message is someone else's mail, and its links are
    not ours to track. Multiparts whose type is in `opaque` are listed but not entered either (their structure
    is not ours to judge, e.g. a signed part).
    """
    entities: list[Entity] = []
    stack = [_entity(raw, 0, len(raw), 0, "text/plain", head)]
    while stack:
        entity = stack.pop()
        entities.append(entity)
        if not entity.is_multipart or entity.content_type in opaque:
            continue
        if entity.depth >= _MAX_DEPTH:
            raise MalformedMessage("MIME nesting deeper than 50 levels")
        # RFC 2046 §5.1.5: in a digest, parts without Content-Type are messages.
        default = "message/rfc822" if entity.content_type == "multipart/digest" else "text/plain"
        children = [_entity(raw, start, end, entity.depth + 1, default) for start, end in _delimiters(raw, entity)]
        stack.extend(reversed(children))
    return entities
