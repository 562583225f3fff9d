"""The SMTP listener: aiosmtpd with per-project AUTH, limits, and a thin handler over the pipeline."""

from __future__ import annotations

import asyncio
import hmac
import logging
import socket
import ssl
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from config.settings import Settings
from relay import replies
from relay.pipeline import Pipeline

log = logging.getLogger("inflight.relay")


class ProjectAuthenticator:
    """SMTP AUTH: username = project id, password = project secret (compared in constant time)."""

    def __init__(self, settings: Settings) -> None:
        self._secrets = {p.id: p.secret.encode("utf-8") for p in settings.projects}

    def __call__(self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any) -> AuthResult:
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        project_id = auth_data.login.decode("utf-8", "replace")
        expected = self._secrets.get(project_id)
        ok = expected is not None and hmac.compare_digest(expected, auth_data.password)
        if not ok:
            log.info("auth-failed peer=%s user=%r", session.peer, project_id)  # never the password
            return AuthResult(success=False, handled=False)
        return AuthResult(success=True, auth_data=project_id)


class RelayHandler:
    """aiosmtpd hooks: translate protocol events into pipeline calls and pipeline outcomes into replies."""

    def __init__(self, settings: Settings, pipeline: Pipeline) -> None:
        self.settings = settings
        self.pipeline = pipeline

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        if len(envelope.rcpt_tos) >= self.settings.relay.max_recipients:
            return replies.TOO_MANY_RECIPIENTS
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        project = self.settings.project(str(session.auth_data))
        if not session.authenticated or project is None:
            return "530 5.7.0 Authentication required"
        content = envelope.original_content or b""
        return await self.pipeline.relay(project, envelope.mail_from or "", list(envelope.rcpt_tos), content)


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    if not settings.relay.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.relay.tls_cert, settings.relay.tls_key)
    return context


async def start_relay(settings: Settings, pipeline: Pipeline, sock: socket.socket) -> asyncio.Server:
    """Serve SMTP on an already bound socket (so callers and tests can bind port 0)."""
    handler = RelayHandler(settings, pipeline)
    authenticator = ProjectAuthenticator(settings)
    context = tls_context(settings)
    loop = asyncio.get_running_loop()

    def protocol() -> SMTP:
        return SMTP(
            handler,
            data_size_limit=settings.relay.max_message_bytes,
            hostname=settings.relay.hostname,
            ident="inflight",
            tls_context=context,
            auth_required=True,
            auth_require_tls=not settings.relay.allow_plaintext_auth,
            authenticator=authenticator,
            loop=loop,
        )

    return await loop.create_server(protocol, sock=sock)
