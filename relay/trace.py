"""The `Received:` trace field the relay prepends to every message it accepts (RFC 5321 §4.4).

It records which client handed the message over, how (RFC 3848 protocol keyword: ESMTPSA =
ESMTP + TLS + AUTH) and with which TLS version and cipher, in the layout Postfix uses so
existing tooling reads it. Everything below it stays as the app sent it.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

_UNSAFE = re.compile(r"[^\x21-\x7e]|[()\\;]")  # the client's HELO is its own text: keep it inert
MAX_HELO_CHARS = 64


def tls_description(ssl_info: dict[str, Any] | None) -> str | None:
    """`TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)` from a session's TLS facts."""
    if not ssl_info:
        return None
    cipher = ssl_info.get("cipher")
    ssl_object = ssl_info.get("ssl_object")
    version = ssl_object.version() if ssl_object is not None else None
    if not cipher:
        return version
    name, protocol, bits = cipher
    return f"{version or protocol} with cipher {name} ({bits}/{bits} bits)"


def received_header(
    *,
    helo: str | None,
    peer_ip: str | None,
    hostname: str,
    tls: str | None,
    authenticated: bool,
    recipients: list[str],
    newline: bytes = b"\r\n",
    now: datetime | None = None,
) -> bytes:
    """One folded Received field, ending with `newline`. `for` only names a single recipient (no Bcc leak)."""
    helo_text = _UNSAFE.sub("?", helo or "unknown")[:MAX_HELO_CHARS]
    protocol = "ESMTP" + ("S" if tls else "") + ("A" if authenticated else "")
    literal = f"IPv6:{peer_ip}" if peer_ip and ":" in peer_ip else peer_ip or "unknown"  # RFC 5321 §4.1.3
    lines = [f"Received: from {helo_text} ([{literal}])"]
    if tls:
        lines.append(f"(using {tls})")
    lines.append(f"by {hostname} (inflight) with {protocol}")
    if len(recipients) == 1 and _UNSAFE.search(recipients[0]) is None:
        lines.append(f"for <{recipients[0]}>")
    lines[-1] += f"; {format_datetime(now or datetime.now(UTC))}"
    folded = (newline + b"\t").join(line.encode("ascii", "replace") for line in lines)
    return folded + newline
