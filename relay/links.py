"""The relay's LinkMinter: opaque tracking URLs for one recipient's copy of a message."""

from __future__ import annotations

from functools import lru_cache
from urllib.parse import urlsplit

from tracking.tokens import ProjectTokens
from tracking.urls import redirect_location

CLICK_PATH = "/c/"
OPEN_PATH = "/o/"


def host_excluded(host: str, patterns: tuple[str, ...]) -> bool:
    """`exclude_click_domains` matching: an exact host, or `*.suffix` for any subdomain of suffix.

    Hosts compare case-insensitively (RFC 4343) and ports never matter (urlsplit drops them).
    `*.example.com` does not match `example.com` itself: list both when both are meant.
    """
    for pattern in patterns:
        if pattern.startswith("*."):
            if host.endswith(pattern[1:]):
                return True
        elif host == pattern:
            return True
    return False


@lru_cache(maxsize=4096)
def trackable(destination: str, own_hosts: frozenset[str], excluded: tuple[str, ...]) -> bool:
    """Whether a link gets a click token; False leaves it as the app wrote it.

    Cached: every copy of a message asks for the same links.
    """
    location = redirect_location(destination)
    if location is None:
        return False  # the tracker would refuse to redirect there: leave the link as the app wrote it
    try:
        host = (urlsplit(location).hostname or "").lower()  # punycode, as a browser asks DNS
    except ValueError:
        return False  # not a URL a browser could follow either (e.g. a broken IPv6 literal)
    # A link to one of the project's own tracking hosts is never wrapped twice.
    return host not in own_hosts and not host_excluded(host, excluded)


class TrackingLinks:
    """Mints the URLs of one copy: `base_url` is the project's tracking base (its first tracking
    domain, else tracker.public_url); `own_hosts` every tracking host whose links stay as they are."""

    def __init__(
        self,
        *,
        tokens: ProjectTokens,
        base_url: str,
        send_id: bytes,
        own_hosts: frozenset[str] = frozenset(),
        honeypot: bool = False,
        exclude_click_domains: tuple[str, ...] = (),
    ) -> None:
        self._tokens = tokens
        self._send_id = send_id
        self._honeypot = honeypot
        self._base = base_url.rstrip("/")
        self._own_hosts = own_hosts | {(urlsplit(self._base).hostname or "").lower()}
        self._excluded = tuple(pattern.lower() for pattern in exclude_click_domains)

    def click_url(self, destination: str) -> str | None:
        if not trackable(destination, self._own_hosts, self._excluded):
            return None
        return f"{self._base}{CLICK_PATH}{self._tokens.click(self._send_id, destination)}"

    def pixel_url(self) -> str:
        return f"{self._base}{OPEN_PATH}{self._tokens.pixel(self._send_id)}.gif"

    def honeypot_url(self) -> str | None:
        """A tracked URL for the invisible trap link, when the project enables honeypot_link."""
        if not self._honeypot:
            return None
        return f"{self._base}{CLICK_PATH}{self._tokens.click(self._send_id, None)}"

    def varying(self, url: str) -> tuple[int, int]:
        """Where the token is in one of this minter's URLs: after the base and the path's first segment, before
        the pixel's `.gif`. The rest is the same in every copy of a message (relay/template.py)."""
        start = len(self._base) + len(CLICK_PATH)  # OPEN_PATH is as long
        return start, len(url) - len(".gif") if url.endswith(".gif") else len(url)

    def is_tracking_url(self, url: str) -> bool:
        """A URL this project minted (any of its keys): its message was instrumented already.

        Asked of every link of every copy: a link elsewhere is told by one prefix test."""
        if not url.startswith(self._base):
            return False
        for prefix, kind in ((self._base + CLICK_PATH, "click"), (self._base + OPEN_PATH, "open")):
            if url.startswith(prefix):
                return self._tokens.verify(url[len(prefix):].removesuffix(".gif"), kind) is not None
        return False
