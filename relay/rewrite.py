"""Pure HTML rewriting: str in, str out. Interim regex version for the spine."""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from relay.instrument import LinkMinter

HREF = re.compile(r'(<a\b[^>]*?\bhref\s*=\s*)(["\'])(.*?)\2', re.IGNORECASE | re.DOTALL)
PIXEL = '<img src="{url}" width="1" height="1" alt="" border="0" style="display:block;width:1px;height:1px;border:0" />'


@dataclass(frozen=True)
class RewriteResult:
    html: str
    links: int


def rewrite_html(document: str, minter: LinkMinter) -> RewriteResult:
    count = 0

    def replace(match: re.Match[str]) -> str:
        nonlocal count
        destination = html.unescape(match.group(3)).strip()
        if not destination.lower().startswith(("http://", "https://")):
            return match.group(0)
        tracked = minter.click_url(destination)
        if tracked is None:
            return match.group(0)
        count += 1
        return f"{match.group(1)}{match.group(2)}{html.escape(tracked)}{match.group(2)}"

    out = HREF.sub(replace, document)
    pixel = PIXEL.format(url=html.escape(minter.pixel_url()))
    index = out.lower().rfind("</body>")
    out = out + pixel if index < 0 else out[:index] + pixel + out[index:]
    return RewriteResult(out, count)
