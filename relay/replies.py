"""Every SMTP reply the relay's mail logic gives, in one place (RFC 5321 codes, RFC 3463 enhanced codes)."""

from __future__ import annotations

import re

TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients"
PROJECT_MISMATCH = "550 5.7.1 X-Inflight-Project does not match the authenticated project"
UPSTREAM_UNAVAILABLE = "451 4.4.1 Upstream unavailable, try again later"
SETTINGS_UNAVAILABLE = "451 4.3.0 Tracking settings unavailable, try again later"
AUTH_UNKNOWN_PROJECT = "535 5.7.8 Authentication credentials invalid"
AUTH_REQUIRED = "530 5.7.0 Authentication required"
# RFC 4954 §6: 454 4.7.0 is the temporary authentication failure; the client may retry later.
AUTH_THROTTLED = "454 4.7.0 Too many failed authentication attempts, try again later"
TLS_REQUIRED = "530 5.7.0 Must issue a STARTTLS command first"
SENDER_DOMAIN_REFUSED = "550 5.7.1 Sender domain not allowed for this project (sender_domains)"
BAD_ADDRESS = "553 5.1.3 Address contains control characters"
# NUL is not mail (RFC 5322 §3.5; only BINARYMIME carries it); C-string MTAs downstream would cut there.
NUL_IN_MESSAGE = "550 5.6.0 Message contains NUL bytes"
INTERNAL_ERROR = "451 4.3.0 Internal error, nothing was sent; try again later"
FROM_DOMAIN_REFUSED = "550 5.7.1 From header must be one address in a domain allowed for this project (sender_domains)"

_ENHANCED = re.compile(r"^\s*([245])\.(\d{1,3})\.(\d{1,3})\b")


def accepted(message_id: str, recipients: int) -> str:
    return f"250 2.0.0 OK: {recipients} recipient(s) sent <{message_id}>"


def rate_limited(retry_after: float) -> str:
    return f"451 4.7.1 Sending rate limit of this project exceeded, try again in {max(1, round(retry_after))} s"


def unsignable(reason: str) -> str:
    return f"550 5.6.0 Message cannot be DKIM-signed: {' '.join(reason.split())[:200]}"


def invalid_header(name: str, allowed: str) -> str:
    return f"550 5.6.0 Invalid {name} header: expected {allowed}"


def upstream_refused(code: int | None, text: str, *, temporary: bool) -> str:
    """Pass the upstream's verdict on with a matching code; keep its enhanced code when it gave one."""
    text = " ".join(text.split())[:200] or "no reason given"
    if temporary:
        code = code if code is not None and 400 <= code < 500 else 451
        enhanced = _enhanced(text) or "4.4.1"
    else:
        code = code if code is not None and 500 <= code < 600 else 554
        enhanced = _enhanced(text) or "5.0.0"
    return f"{code} {enhanced} Upstream refused: {text}"


def _enhanced(text: str) -> str | None:
    match = _ENHANCED.match(text)
    return ".".join(match.groups()) if match else None
