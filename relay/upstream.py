"""Where accepted mail goes: an SMTP upstream (SES, Postmark, any MTA) or a dev outbox directory.

Every failure is classified as temporary or permanent here, once, so the SMTP side can answer
the app truthfully: 4xx means "retry later, nothing happened", 5xx means "this will never go".
"""

from __future__ import annotations

import asyncio
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlsplit

import aiosmtplib

UPSTREAM_TIMEOUT_SECONDS = 60.0


class UpstreamError(Exception):
    """Delivery did not happen. `code` is the upstream's reply code, or None when unreachable."""

    def __init__(self, message: str, *, code: int | None = None, temporary: bool) -> None:
        super().__init__(message)
        self.code = code
        self.temporary = temporary


class Upstream(Protocol):
    async def send(self, mail_from: str, recipients: list[str], data: bytes) -> None:
        """Deliver or raise UpstreamError; returns only when the upstream accepted every recipient."""


class OutboxUpstream:
    """Writes each delivered message to DIR as an .eml file (development and demos)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    async def send(self, mail_from: str, recipients: list[str], data: bytes) -> None:
        await asyncio.to_thread(self._write, data)

    def _write(self, data: bytes) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            name = f"{uuid.uuid4().hex}.eml"
            temporary = self.directory / f".{name}.tmp"
            temporary.write_bytes(data)
            os.replace(temporary, self.directory / name)  # readers never see half a file
        except OSError as exc:
            raise UpstreamError(f"outbox write failed: {exc.strerror}", temporary=True) from exc


@dataclass(frozen=True)
class SmtpUpstream:
    host: str
    port: int
    use_tls: bool  # implicit TLS (smtps://)
    start_tls: bool  # STARTTLS required (smtp://)
    username: str | None = None
    password: str | None = field(default=None, repr=False)  # never in a log line or traceback
    timeout: float = UPSTREAM_TIMEOUT_SECONDS

    async def send(self, mail_from: str, recipients: list[str], data: bytes) -> None:
        try:
            errors, _ = await aiosmtplib.send(
                data,
                sender=mail_from,
                recipients=recipients,
                hostname=self.host,
                port=self.port,
                use_tls=self.use_tls,
                start_tls=self.start_tls if not self.use_tls else False,
                username=self.username,
                password=self.password,
                timeout=self.timeout,
            )
        except aiosmtplib.SMTPRecipientsRefused as exc:
            codes = [r.code for r in exc.recipients]
            raise UpstreamError(
                "; ".join(f"{r.recipient}: {r.code} {r.message}" for r in exc.recipients),
                code=max(codes),
                temporary=all(400 <= c < 500 for c in codes),
            ) from exc
        except aiosmtplib.SMTPResponseException as exc:
            raise UpstreamError(exc.message, code=exc.code, temporary=exc.code < 500) from exc
        except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
            raise UpstreamError(f"upstream unreachable: {exc}", temporary=True) from exc
        if errors:
            # Some recipients refused at RCPT while others were accepted: report as failure
            # of those recipients (a later issue splits per recipient).
            codes = [code for code, _ in errors.values()]
            raise UpstreamError(
                "; ".join(f"{rcpt}: {code} {msg}" for rcpt, (code, msg) in errors.items()),
                code=max(codes),
                temporary=all(400 <= c < 500 for c in codes),
            )


def upstream_from_url(url: str) -> Upstream:
    """outbox:///DIR, smtp://[user:pass@]host:port (STARTTLS), smtps:// (implicit TLS), smtp+insecure:// (plain)."""
    parts = urlsplit(url)
    if parts.scheme == "outbox":
        path = parts.path.removeprefix("/")  # outbox:///var/outbox → var/outbox; outbox:////abs → /abs
        return OutboxUpstream(Path(path))
    default_port = {"smtp": 587, "smtps": 465, "smtp+insecure": 25}[parts.scheme]
    return SmtpUpstream(
        host=parts.hostname or "localhost",
        port=parts.port or default_port,
        use_tls=parts.scheme == "smtps",
        start_tls=parts.scheme == "smtp",
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
    )
