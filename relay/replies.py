"""Every SMTP reply the relay's mail logic gives, in one place (RFC 5321 codes, RFC 3463 enhanced codes)."""

from __future__ import annotations

import re
from collections.abc import Mapping

TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients"
PROJECT_MISMATCH = "550 5.7.1 X-Inflight-Project does not match the authenticated project"
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
SHUTTING_DOWN = "421 4.3.2 Service shutting down, try again later"
# RFC 3463 4.3.1: the relay's memory for messages in flight is spent (relay.max_inflight_bytes).
INSUFFICIENT_STORAGE = "452 4.3.1 Insufficient system storage, try again later"
# aiosmtpd's own refusals, said so that the app's log tells the fix (RFC 3463 codes added).
LINE_TOO_LONG = "500 5.6.0 Line too long: a line is over 998 characters (RFC 5321 4.5.3.1.6); encode the body (quoted-printable or base64)"
LINE_TOO_LONG_BARE_LF = ("500 5.6.0 Line too long: bare LF or line over 998 characters; the message has LF-only line endings, "
                         "SMTP needs CRLF (RFC 5321 2.3.8)")
MAX_LISTED_CHARS = 360  # an SMTP reply line is at most 512 octets (RFC 5321 §4.5.3.1.5)

_ENHANCED = re.compile(r"^\s*([245])\.(\d{1,3})\.(\d{1,3})\b")


def upstream_unavailable(detail: str) -> str:
    """451 naming the cause and host (`refused at mx.example.com:587 (...)`), never the credentials."""
    return f"451 4.4.1 Upstream unavailable: {' '.join(detail.split())[:300]}; try again later"


def too_big(max_bytes: int | None) -> str:
    return f"552 5.3.4 Message too big: the limit is {max_bytes} bytes (relay.max_message_bytes)"


def explicit(status: str, *, max_bytes: int | None) -> str:
    """aiosmtpd's terse wording of the size and line-length refusals replaced by one that states the limit."""
    if status.startswith("552 Error:"):  # "Too much mail data", or a MAIL SIZE= over the limit
        return too_big(max_bytes)
    if status.startswith("500 Line too long"):
        return LINE_TOO_LONG
    return status


def accepted(message_id: str, recipients: int) -> str:
    return f"250 2.0.0 OK: {recipients} recipient(s) sent <{message_id}>"


def suppressed(address: str, reason: str, detail: str) -> str:
    """RCPT refused for an address on the project's suppression list (`suppression = "refuse"`)."""
    why = " ".join(f"{reason}: {detail}".split())[:200]
    return f"550 5.1.1 <{address[:254]}> is on this project's suppression list ({why})"


def rate_limited(retry_after: float) -> str:
    return f"451 4.7.1 Sending rate limit of this project exceeded, try again in {max(1, round(retry_after))} s"


def unsignable(reason: str) -> str:
    return f"550 5.6.0 Message cannot be DKIM-signed: {' '.join(reason.split())[:200]}"


def partially_accepted(message_id: str, sent: int, total: int, refused: Mapping[str, tuple[int, str]]) -> str:
    """250 because the message went to some recipients; the refused ones are named for the app's log."""
    return f"250 2.0.0 OK: {sent} of {total} recipient(s) sent <{message_id}>; refused by upstream: {_listing(refused)}"


def upstream_failures(failed: Mapping[str, tuple[int, str]], total: int, *, temporary: bool, sent: int = 0) -> str:
    """One reply for the recipients the upstream did not take.

    When every recipient got the same answer it is passed on as is; otherwise each one is named,
    so the app (and a human reading its log) sees who failed and why.
    """
    verdicts = set(failed.values())
    if len(verdicts) == 1 and len(failed) == total:
        ((code, text),) = verdicts
        return upstream_refused(code, text, temporary=temporary)
    codes = {code for code, _ in verdicts}
    enhanced = {_enhanced(text) for _, text in verdicts}
    code = codes.pop() if len(codes) == 1 else (451 if temporary else 554)
    detail = enhanced.pop() if len(enhanced) == 1 else None
    detail = detail or ("4.4.1" if temporary else "5.0.0")
    done = f"; {sent} already sent, a retry will not resend them" if sent else ""
    verb = "deferred" if temporary else "refused"
    return f"{code} {detail} Upstream {verb} {len(failed)} of {total} recipient(s): {_listing(failed)}{done}"


def _listing(failed: Mapping[str, tuple[int, str]]) -> str:
    parts = [f"{recipient} ({code} {' '.join(text.split())[:120]})" for recipient, (code, text) in failed.items()]
    listing = parts[0]
    for index, part in enumerate(parts[1:], start=1):
        if len(listing) + len(part) > MAX_LISTED_CHARS:
            return f"{listing}; and {len(parts) - index} more"
        listing = f"{listing}; {part}"
    return listing


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
