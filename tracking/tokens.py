"""Self-contained, HMAC-signed tracking tokens.

A token carries everything the tracker needs to answer and record the event (project,
message, contact, link, send time), so the pixel and the redirect never read the database
first, and a forged or altered token is refused without one. Format:
`<base64url(compact JSON claims)>.<base64url(HMAC-SHA256(claims)[:16])>`. 128 bits of tag
keeps URLs short and is far beyond online guessing. The first secret signs, every secret
verifies, so keys rotate without breaking mail already delivered.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

TAG_BYTES = 16
MAX_TOKEN_CHARS = 8192  # longer than any URL we mint; bounds work on hostile input


# Visible ASCII except backslash, one or more: the relay checks every link of every copy against it.
_VISIBLE_ASCII = re.compile(r"[\x21-\x5b\x5d-\x7e]+")


def is_redirectable(link: str) -> bool:
    """A link the tracker may answer with `Location: <link>` byte for byte.

    An absolute http(s) URL with a host, in visible ASCII with no backslash: browsers read a
    backslash as `/` in http URLs while Python's parser does not, so such a link could name one host to
    us and another to the browser. The minter leaves any other link untracked, and the tracker
    refuses it even if it was signed, so no input ever redirects elsewhere.
    """
    if len(link) > MAX_TOKEN_CHARS or not _VISIBLE_ASCII.fullmatch(link):
        return False
    try:
        parts = urlsplit(link)
        host = parts.hostname
    except ValueError:
        return False
    return parts.scheme.lower() in ("http", "https") and bool(host) and link[len(parts.scheme):].startswith("://")


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def compact_json(value: Any) -> bytes:
    """The JSON of token claims: no spaces, ASCII only, keys in insertion order."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=True).encode("ascii")


class TokenSigner:
    def __init__(self, secrets: Sequence[str]) -> None:
        if not secrets:
            raise ValueError("TokenSigner needs at least one secret (tracker.secrets)")
        self._secrets = tuple(secrets)
        # Keyed once: copying a keyed HMAC skips the key schedule that every token would otherwise repeat.
        self._macs = [hmac.new(s.encode("utf-8"), digestmod=hashlib.sha256) for s in secrets]

    def __reduce__(self) -> tuple[type[TokenSigner], tuple[tuple[str, ...]]]:
        return TokenSigner, (self._secrets,)  # HMAC objects do not pickle; worker processes get the secrets

    def _tag(self, mac: hmac.HMAC, payload: bytes) -> bytes:
        mac = mac.copy()
        mac.update(payload)
        return mac.digest()[:TAG_BYTES]

    def sign(self, claims: dict[str, Any]) -> str:
        return self.sign_payload(compact_json(claims))

    def sign_payload(self, payload: bytes) -> str:
        """A token over claims already encoded with `compact_json` (the relay builds them from a per-copy prefix)."""
        return f"{_b64encode(payload)}.{_b64encode(self._tag(self._macs[0], payload))}"

    def verify(self, token: str) -> dict[str, Any] | None:
        """The claims when some key signed exactly this token, else None (never raises)."""
        if len(token) > MAX_TOKEN_CHARS or token.count(".") != 1:
            return None
        encoded, _, tag_text = token.partition(".")
        try:
            payload = _b64decode(encoded)
            tag = _b64decode(tag_text)
        except (binascii.Error, ValueError):
            return None
        # Re-encoding must give back the exact token: base64 has several spellings of the same
        # bytes (padding bits), and a token must have exactly one valid form.
        if _b64encode(payload) != encoded or _b64encode(tag) != tag_text:
            return None
        if not any(hmac.compare_digest(self._tag(mac, payload), tag) for mac in self._macs):
            return None
        try:
            claims = json.loads(payload)
        except ValueError:
            return None
        return claims if isinstance(claims, dict) else None


@dataclass(frozen=True)
class TrackedSend:
    """Who and what one tracked copy is about; carried inside every token minted for it."""

    project: str
    message_id: str
    contact: str
    recipient: str
    sent_at: int  # epoch seconds, for timing-based machine detection
    campaign: str | None = None
    template: str | None = None
    template_type: str | None = None
    campaign_type: str | None = None


# Short claim names keep URLs short: every link of every copy carries them.
_CLAIM_NAMES = {
    "project": "p",
    "message_id": "m",
    "contact": "c",
    "recipient": "r",
    "sent_at": "s",
    "campaign": "g",
    "template": "t",
    "template_type": "tt",
    "campaign_type": "ct",
}


@dataclass(frozen=True)
class TrackingClaims:
    kind: str  # "open" | "click"
    send: TrackedSend
    link: str | None = None
    # The invisible trap link (project honeypot_link): no destination, and a click on it
    # is a machine by construction (tracker/agents.py).
    honeypot: bool = False


def claims_to_dict(claims: TrackingClaims) -> dict[str, Any]:
    out: dict[str, Any] = {"k": claims.kind[0]}
    for attr, short in _CLAIM_NAMES.items():
        value = getattr(claims.send, attr)
        if value is not None:
            out[short] = value
    if claims.link is not None:
        out["u"] = claims.link
    if claims.honeypot:
        out["h"] = 1
    return out


def claims_from_dict(data: dict[str, Any]) -> TrackingClaims | None:
    """Rebuild claims from a verified token; None when the shape is not ours (e.g. an old format)."""
    kind = {"o": "open", "c": "click"}.get(data.get("k", ""))
    values = {attr: data.get(short) for attr, short in _CLAIM_NAMES.items()}
    required = ("project", "message_id", "contact", "recipient")
    if kind is None or not all(isinstance(values[a], str) for a in required) or not isinstance(values["sent_at"], int):
        return None
    link = data.get("u")
    honeypot = data.get("h") == 1
    if kind == "click" and not isinstance(link, str) and not honeypot:
        return None
    return TrackingClaims(kind, TrackedSend(**values), link, honeypot)  # type: ignore[arg-type]
