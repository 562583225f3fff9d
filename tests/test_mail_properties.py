"""Property: whatever the MIME tree, charset, transfer encoding and link shapes, instrumenting a message gives
mail that parses, whose HTML parts still decode in their own charset, and that differs from the input only in
the tracked link values and the tracking markup; every other part and header is byte for byte as it was.

The oracle is independent of our MIME and charset code: Python's email package parses both sides, and each
HTML part is decoded with the codec the generator used to write it.
"""

from __future__ import annotations

import base64
import email
import email.policy
import quopri
import re
from dataclasses import dataclass, field
from email.message import Message

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.instrument import instrument_message
from tests.conftest import DeterministicMinter

PROPERTY = settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

# charset label → (codec used to write it, letters its text is made of); UTF-16 gets its byte order below.
CHARSETS = {
    "utf-8": ("utf-8", "aé東€ü😀"),
    "iso-8859-1": ("latin-1", "aéüß"),
    "windows-1252": ("cp1252", "aé€ü"),
    "koi8-r": ("koi8-r", "aпрж"),
    "iso-2022-jp": ("iso2022_jp", "a東京こんにちは"),
    "shift_jis": ("shift_jis", "a東京アセール"),
    "euc-kr": ("euc-kr", "a한국어"),
    "gbk": ("gbk", "a中文"),
    "utf-16": ("utf-16", "aé東ü"),
}
ASCII_SAFE_CTES = ["7bit", "8bit", "8bits", "quoted-printable", "Quoted-Printable ", "quoted_printable", "base64", "BASE64"]
WIDE_CTES = ["base64", "quoted-printable", "Base64"]  # UTF-16 has NUL and line-feed bytes: never as identity
TRACKED = re.compile(r"https://track\.test/c/r1/(\d+)\?v(?:=|&#61;)1&amp;s(?:=|&#61;)ab")
MARKUP = re.compile(r'<a href="https://track\.test/h/r1" [^>]*></a>|<img src="https://track\.test/o/r1\.gif[^>]*/>')


@dataclass
class HtmlSpec:
    """What the generator wrote into one inline HTML part."""

    codec: str
    text: str
    originals: dict[str, str]  # destination → the href text as written, for every link that must be tracked


@dataclass
class Tree:
    specs: list[HtmlSpec] = field(default_factory=list)  # inline HTML parts, in document order


def encodable(text: str, codec: str) -> bool:
    try:
        text.encode(codec)
    except UnicodeError:
        return False
    return True


def reference(text: str, codec: str) -> str:
    """`text` as written in a document of this charset: characters it lacks as numeric references."""
    return "".join(c if encodable(c, codec) else f"&#{ord(c)};" for c in text)


@st.composite
def links(draw: st.DrawFn, codec: str, index: int) -> tuple[str, str | None]:
    """(attribute as written, destination when it must be tracked)."""
    shape = draw(st.sampled_from(["query", "umlaut", "idn", "space", "upper", "single", "unquoted", "mailto",
                                  "anchor", "relative", "snowman", "newline"]))
    if shape == "query":
        return f'href="https://shop.example.com/p/{index}?a=1&amp;b=2"', f"https://shop.example.com/p/{index}?a=1&b=2"
    if shape == "umlaut":
        return f'href="{reference(f"https://ex.test/ü/{index}", codec)}"', f"https://ex.test/ü/{index}"
    if shape == "idn":
        return f'href="{reference(f"https://例え.jp/パス/{index}?q=検索", codec)}"', f"https://例え.jp/パス/{index}?q=検索"
    if shape == "space":
        return f'href=" https://ex.test/a b/{index} "', f"https://ex.test/a b/{index}"
    if shape == "upper":
        return f'HREF="HTTPS://EX.TEST/{index}"', f"HTTPS://EX.TEST/{index}"
    if shape == "single":
        return f"href='https://ex.test/\"{index}\"'", f'https://ex.test/"{index}"'
    if shape == "unquoted":
        return f"href=https://ex.test/u/{index}", f"https://ex.test/u/{index}"
    if shape == "newline":
        return f'href="https://ex.test/\r\nwrapped/{index}"', f"https://ex.test/wrapped/{index}"
    if shape == "snowman":  # no IDNA form: left as written
        return f'href="{reference(f"https://☃.example/{index}", codec)}"', None
    return {"mailto": 'href="mailto:a@example.com"', "anchor": 'href="#top"', "relative": 'href="/x"'}[shape], None


@st.composite
def html_part(draw: st.DrawFn, tree: Tree, *, attachment: bool = False) -> bytes:
    label = draw(st.sampled_from(sorted(CHARSETS)))
    codec, letters = CHARSETS[label]
    words = st.text(alphabet=letters + " ", min_size=1, max_size=12)
    pieces = ["<html><head><title>", draw(words), "</title></head><body>\r\n"]
    originals: dict[str, str] = {}
    for index in range(draw(st.integers(0, 4))):
        attribute, destination = draw(links(codec, len(tree.specs) * 10 + index))
        pieces += ["<p>", draw(words), f"<a {attribute}>", draw(words), "</a></p>\r\n"]
        if destination is not None:
            originals[destination] = attribute
    pieces += ["<p>", draw(words), "</p>\r\n</body></html>\r\n"]
    text = "".join(pieces)
    if label == "utf-16":
        codec = draw(st.sampled_from(["utf-16-le", "utf-16-be", "utf-16"]))  # "utf-16" writes a BOM
        label = draw(st.sampled_from(["utf-16", f"utf-16{codec[-2:]}"])) if codec != "utf-16" else "utf-16"
        cte = draw(st.sampled_from(WIDE_CTES))
    else:
        cte = draw(st.sampled_from(ASCII_SAFE_CTES))
    data = text.encode(codec)
    if cte.strip().lower() == "base64":
        body = base64.encodebytes(data).replace(b"\n", b"\r\n")
    elif "quoted" in cte.lower() and codec.startswith("utf-16"):
        body = binary_qp(data)
    elif "quoted" in cte.lower():
        body = quopri.encodestring(data.replace(b"\r\n", b"\n")).replace(b"\n", b"\r\n")
    else:
        body = data
    disposition = b"Content-Disposition: attachment; filename=page.html\r\n" if attachment else b""
    if not attachment:
        tree.specs.append(HtmlSpec(codec, text, originals))
    return (f'Content-Type: text/html; charset="{label}"\r\nContent-Transfer-Encoding: {cte}\r\n'.encode()
            + disposition + b"\r\n" + body)


def binary_qp(data: bytes) -> bytes:
    """Quoted-printable of binary data (UTF-16): every byte that is not plain ASCII text escaped."""
    tokens = [b"=%02X" % byte if not (33 <= byte <= 126 and byte != 61) else bytes([byte]) for byte in data]
    lines, line = [], b""
    for token in tokens:
        if len(line) + len(token) > 72:
            lines.append(line)
            line = b""
        line += token
    return b"=\r\n".join([*lines, line])


@st.composite
def entity(draw: st.DrawFn, tree: Tree, depth: int) -> bytes:
    kinds = ["html", "html", "plain", "image", "attachment", "forwarded"] + (["multipart"] * 2 if depth < 3 else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "html":
        return draw(html_part(tree))
    if kind == "attachment":
        return draw(html_part(Tree(), attachment=True))
    if kind == "plain":
        return b"Content-Type: text/plain; charset=utf-8\r\n\r\nSee https://ex.test/plain and <a href=\"https://x.test/\">\r\n"
    if kind == "image":
        png = draw(st.binary(min_size=1, max_size=60))
        return b"Content-Type: image/png\r\nContent-Transfer-Encoding: base64\r\n\r\n" + base64.encodebytes(png).replace(b"\n", b"\r\n")
    if kind == "forwarded":  # someone else's mail: never entered
        return (b"Content-Type: message/rfc822\r\n\r\nSubject: fwd\r\nContent-Type: text/html\r\n\r\n"
                b'<a href="https://forwarded.test/">x</a>\r\n')
    subtype = draw(st.sampled_from(["mixed", "alternative", "related"]))
    boundary = f"b{depth}-{draw(st.integers(0, 999))}"
    children = draw(st.lists(entity(tree, depth + 1), min_size=1, max_size=3))
    body = b"".join(b"--" + boundary.encode() + b"\r\n" + child + b"\r\n" for child in children) + b"--" + boundary.encode() + b"--\r\n"
    return f'Content-Type: multipart/{subtype}; boundary="{boundary}"\r\n\r\npreamble\r\n'.encode() + body


@st.composite
def messages(draw: st.DrawFn) -> tuple[bytes, Tree]:
    tree = Tree()
    top = draw(entity(tree, 0))
    return b"From: a@example.com\r\nTo: b@example.org\r\nSubject: property\r\nMIME-Version: 1.0\r\n" + top, tree


def flatten(message: Message, forwarded: bool = False) -> list[tuple[Message, bool]]:
    """Every entity in document order, and whether it sits inside a forwarded message (not ours to track)."""
    out = [(message, forwarded)]
    if message.is_multipart():
        for child in message.get_payload():
            out += flatten(child, forwarded or message.get_content_maintype() == "message")
    return out


def decoded_body(part: Message) -> bytes:
    """The part's body with its transfer encoding undone, reading the spellings as clients do (the stdlib
    decodes the exact names only, and gives the raw bytes for any other)."""
    data = part.get_payload(decode=True)
    assert isinstance(data, bytes)
    if str(part.get("Content-Transfer-Encoding", "")).lower() in ("base64", "quoted-printable"):
        return data
    encoding = re.sub(r"[\s_-]", "", str(part.get("Content-Transfer-Encoding", "")).lower())
    if encoding == "base64":
        return base64.b64decode(data)
    if encoding == "quotedprintable":
        return quopri.decodestring(data)
    return data


@PROPERTY
@given(generated=messages())
def test_instrumented_mail_differs_only_in_tracked_links_and_the_pixel(generated: tuple[bytes, Tree]) -> None:
    raw, tree = generated
    minter = DeterministicMinter()
    result = instrument_message(raw, minter)
    if not tree.specs:
        assert (result.outcome, result.data) == ("untouched", raw)
        return
    assert result.outcome == "instrumented", result.reason
    out = result.data
    assert out[: out.index(b"\r\n\r\n")] == raw[: raw.index(b"\r\n\r\n")]  # the header block, byte for byte
    strict_before = email.message_from_bytes(raw, policy=email.policy.default)
    strict_after = email.message_from_bytes(out, policy=email.policy.default)
    assert [p.defects for p in strict_after.walk()] == [p.defects for p in strict_before.walk()] == [[]] * len(
        list(strict_before.walk()))
    before = flatten(email.message_from_bytes(raw, policy=email.policy.compat32))
    after = flatten(email.message_from_bytes(out, policy=email.policy.compat32))
    assert [(p.items(), f) for p, f in before] == [(p.items(), f) for p, f in after]
    specs = iter(tree.specs)
    for (original, forwarded), (instrumented, _) in zip(before, after, strict=True):
        if original.is_multipart():
            assert (original.preamble, original.epilogue) == (instrumented.preamble, instrumented.epilogue)
            continue
        inline_html = original.get_content_type() == "text/html" and original.get("Content-Disposition") is None
        if forwarded or not inline_html:
            assert original.get_payload() == instrumented.get_payload()
            continue
        spec = next(specs)
        text = decoded_body(instrumented).decode(spec.codec)  # strictly, in the part's own charset and byte order
        found = [minter.destinations[int(index)] for index in TRACKED.findall(text)]
        assert sorted(found) == sorted(spec.originals)  # every trackable link tracked, nothing else
        restored = TRACKED.sub(lambda m: "\0" + m[1] + "\0", MARKUP.sub("", text))
        for destination, attribute in spec.originals.items():
            tracked_index = minter.destinations.index(destination)
            value = re.sub(r"^\w+=", "", attribute)
            quote = value[0] if value[0] in "\"'" else ""
            restored = restored.replace(f"{quote}\0{tracked_index}\0{quote}", value)
        assert restored == spec.text
        assert len(MARKUP.findall(text)) == 2  # honeypot and pixel, once per part
    assert next(specs, None) is None
