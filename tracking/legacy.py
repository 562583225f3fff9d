"""The tokens minted before opaque ones: HMAC-signed, readable JSON claims.

`<base64url(compact JSON claims)>.<base64url(HMAC-SHA256(claims)[:16])>`, carrying the project,
Message-ID and addresses in clear. They are no longer minted; the tracker verifies them while
`tracker.legacy_tokens = true`, so mail delivered before the change keeps working.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from collections.abc import Sequence
from typing import Any

from tracking.claims import TrackedSend, TrackingClaims

TAG_BYTES = 16


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def compact_json(value: Any) -> bytes:
    """The JSON of token claims: no spaces, ASCII only, keys in insertion order."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=True).encode("ascii")


class LegacyTokens:
    def __init__(self, secrets: Sequence[str]) -> None:
        if not secrets:
            raise ValueError("LegacyTokens needs at least one secret (tracker.secrets)")
        # Keyed once: copying a keyed HMAC skips the key schedule that every token would otherwise repeat.
        self._macs = [hmac.new(s.encode("utf-8"), digestmod=hashlib.sha256) for s in secrets]

    def _tag(self, mac: hmac.HMAC, payload: bytes) -> bytes:
        mac = mac.copy()
        mac.update(payload)
        return mac.digest()[:TAG_BYTES]

    def sign(self, claims: dict[str, Any]) -> str:
        """A legacy token (tests mint them to prove old mail keeps working)."""
        payload = compact_json(claims)
        return f"{_b64encode(payload)}.{_b64encode(self._tag(self._macs[0], payload))}"

    def verify(self, token: str) -> dict[str, Any] | None:
        """The claims when some key signed exactly this token, else None (never raises)."""
        if token.count(".") != 1:
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


# Short claim names kept URLs short: every link of every copy carried them.
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


def claims_to_dict(claims: TrackingClaims) -> dict[str, Any]:
    """The JSON claims of a legacy token for `claims` (which must carry its `send`)."""
    if claims.send is None:
        raise ValueError("a legacy token carries the send itself")
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
    """Rebuild claims from a verified legacy token; None when the shape is not ours."""
    kind = {"o": "open", "c": "click"}.get(data.get("k", ""))
    values = {attr: data.get(short) for attr, short in _CLAIM_NAMES.items()}
    required = ("project", "message_id", "contact", "recipient")
    if kind is None or not all(isinstance(values[a], str) for a in required) or not isinstance(values["sent_at"], int):
        return None
    link = data.get("u")
    honeypot = data.get("h") == 1
    if kind == "click" and not isinstance(link, str) and not honeypot:
        return None
    send = TrackedSend(**values)  # type: ignore[arg-type]
    return TrackingClaims(kind, send.project, None, link if isinstance(link, str) else None, honeypot, send)
