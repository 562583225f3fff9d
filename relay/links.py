"""The relay's LinkMinter: signed tracking URLs for one recipient's copy of a message."""

from __future__ import annotations

from functools import lru_cache
from urllib.parse import urlsplit

from tracking.tokens import TokenSigner, TrackedSend, TrackingClaims, claims_to_dict, compact_json
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
def link_claim(destination: str, tracking_host: str, excluded: tuple[str, ...]) -> bytes | None:
    """The end of a click token's claims for this link, or None when the link must stay as it is.

    Cached: every copy of a message asks for the same links, and only the claims before it differ.
    """
    location = redirect_location(destination)
    if location is None:
        return None  # the tracker would refuse to redirect there: leave the link as the app wrote it
    try:
        host = (urlsplit(location).hostname or "").lower()  # punycode, as a browser asks DNS
    except ValueError:
        return None  # not a URL a browser could follow either (e.g. a broken IPv6 literal): leave it alone
    if host == tracking_host or host_excluded(host, excluded):
        return None  # a link to our own tracking host is never wrapped twice
    return b',"u":' + compact_json(destination) + b"}"


class TrackingLinks:
    def __init__(
        self,
        *,
        signer: TokenSigner,
        public_url: str,
        send: TrackedSend,
        honeypot: bool = False,
        exclude_click_domains: tuple[str, ...] = (),
    ) -> None:
        self._signer = signer
        self._honeypot = honeypot
        self._base = public_url.rstrip("/")
        self._tracking_host = (urlsplit(public_url).hostname or "").lower()
        self._excluded = tuple(pattern.lower() for pattern in exclude_click_domains)
        self._send = send
        # A click token's claims are this copy's claims, then the link (see link_claim): encode them once.
        self._click_prefix = compact_json(claims_to_dict(TrackingClaims("click", send)))[:-1]

    def click_url(self, destination: str) -> str | None:
        claim = link_claim(destination, self._tracking_host, self._excluded)
        if claim is None:
            return None
        token = self._signer.sign_payload(self._click_prefix + claim)
        return f"{self._base}{CLICK_PATH}{token}"

    def pixel_url(self) -> str:
        token = self._signer.sign(claims_to_dict(TrackingClaims("open", self._send)))
        return f"{self._base}{OPEN_PATH}{token}.gif"

    def honeypot_url(self) -> str | None:
        """A tracked URL for the invisible trap link, when the project enables honeypot_link."""
        if not self._honeypot:
            return None
        token = self._signer.sign(claims_to_dict(TrackingClaims("click", self._send, honeypot=True)))
        return f"{self._base}{CLICK_PATH}{token}"

    def is_tracking_url(self, url: str) -> bool:
        for path in (CLICK_PATH, OPEN_PATH):
            prefix = self._base + path
            if url.startswith(prefix):
                return self._signer.verify(url[len(prefix):].removesuffix(".gif")) is not None
        return False
