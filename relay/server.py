"""The SMTP listener: aiosmtpd with per-project AUTH, TLS, limits, and a thin handler over the pipeline."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import socket
import ssl
import warnings
from typing import Any, AnyStr

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session, syntax

from config.settings import ProjectSettings, Settings, SuppressionMode
from monitoring.metrics import REFUSALS
from relay import replies
from relay.accept import SharedAcceptor
from relay.headers import without_envelope_line
from relay.memory import MemoryBudget, memory_share
from relay.pipeline import Pipeline, StoreAway
from relay.receive import Body, ChunkedDataSMTP
from relay.senders import domain_allowed
from relay.sessions import Sessions
from relay.throttle import AuthThrottle, RateLimiter, ThrottleSync, client_key
from relay.trace import received_header, tls_description

log = logging.getLogger("inflight.relay")
TLS_HANDSHAKE_TIMEOUT_SECONDS = 10.0
# Per-session command budgets (aiosmtpd answers 421 and closes past them). Commands that carry no
# mail are bounded like Postfix's smtpd_junk_command_limit, and AUTH as a second brute-force bound;
# MAIL/RCPT/DATA/RSET stay unbounded so a long-lived client connection can send any number of messages.
COMMAND_LIMITS = {"NOOP": 100, "VRFY": 10, "HELP": 10, "EXPN": 10, "EHLO": 20, "HELO": 20, "AUTH": 10,
                  "STARTTLS": 5, "*": 10**9}


def has_control_characters(address: str) -> bool:
    return any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in address)


# A path as clients write it: `<dot-atom@domain>` (RFC 5321 §4.1.2 without quoted local parts,
# address literals or comments), then the parameters.
_PLAIN_PATH = re.compile(r"<((?:[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*)"
                         r"@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>")


_HOOK_NAMES: dict[tuple[type, tuple[str, ...]], list[str]] = {}


def _hook_names(cls: type, prefixes: tuple[str, ...]) -> list[str]:
    """The attributes of `cls` named with one of `prefixes`, listed once per class."""
    names = _HOOK_NAMES.get((cls, prefixes))
    if names is None:
        names = _HOOK_NAMES[cls, prefixes] = [name for name in dir(cls) if name.startswith(prefixes)]
    return names


class RelaySMTP(ChunkedDataSMTP):
    """aiosmtpd's SMTP state machine with the two TLS behaviours the relay needs.

    aiosmtpd only recognises TLS it negotiated itself (STARTTLS): on an implicit-TLS listener
    `session.ssl` stays None, AUTH is not advertised and is refused with 538 (aiosmtpd issues
    #281 and #274, open in 1.4.6). Here a connection whose transport is already TLS is marked
    as such, so AUTH works on port 465 exactly as after STARTTLS.
    """

    def __init__(self, handler: Any, *, require_tls: bool, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.require_tls = require_tls
        self.refusal_logged = False  # set by a hook that logged the refusal it returns, with more context

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd reads every MAIL and RCPT path with the email package's header parser (about 60 µs,
        a few % of a small message's CPU); a plain path is read here with one regex, to the same
        result (tests/test_server.py compares the two), anything else by aiosmtpd."""
        match = _PLAIN_PATH.match(arg)
        if match is not None:
            rest = arg[match.end():].lstrip(" \t")
            local = match.group(1).rpartition("@")[0]
            if not rest.startswith("(") and not (self.local_part_limit and len(local) > self.local_part_limit):
                return match.group(1), rest
        return super()._getaddr(arg)

    async def push(self, status: AnyStr) -> None:
        """Every reply goes through here: aiosmtpd's own refusals are made explicit, and every
        4xx/5xx is logged and counted (a hook that logged its own with more context says so)."""
        await super().push(self._reviewed(status.decode("utf-8", "replace") if isinstance(status, bytes) else status))

    def _reviewed(self, status: str) -> str:
        if status.startswith(("4", "5")):
            status = replies.explicit(status, max_bytes=self.data_size_limit)
            REFUSALS.labels(status[:3]).inc()
            if not self.refusal_logged:
                log.info("smtp-refused peer=%s user=%s reply=%r", client_key(self.session.peer) if self.session else None,
                         self.session.auth_data if self.session and self.session.authenticated else None, status)
            self.refusal_logged = False
        return status

    def data_refusal(self, body: Body) -> str:
        return replies.LINE_TOO_LONG_BARE_LF if body.bare_lf else super().data_refusal(body)

    def __dir__(self) -> list[str]:
        """The command and AUTH methods only: aiosmtpd's __init__ finds them with dir() and
        inspect.getmembers() on every connection, and over all 130 attributes that took 60 of the
        100 µs a connection's setup cost (bench case postfix: a connection per message)."""
        return _hook_names(type(self), ("smtp_", "auth_"))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self.session is not None
        if self.session.ssl is None and transport.get_extra_info("ssl_object") is not None:
            self.session.ssl = {k: transport.get_extra_info(k) for k in ("ssl_object", "cipher", "peercert", "compression")}
            self._auth_require_tls = False  # the requirement is met: this whole connection is encrypted

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        if self.require_tls and self.session is not None and self.session.ssl is None:
            await self.push(replies.TLS_REQUIRED)  # RFC 3207 §4: refuse mail on an unprotected session
            return
        await super().smtp_MAIL(arg)


class ProjectAuthenticator:
    """SMTP AUTH: username = project id, password = project secret (compared in constant time).

    Failures are counted per client address and per username (`AuthThrottle`); past the limit
    the attempt gets `454 4.7.0` without its password being looked at. Logs name a username only
    when it is a real project id, so a password typed into the username field never reaches a log.
    """

    def __init__(self, settings: Settings, throttle: AuthThrottle) -> None:
        self._secrets = {p.id: p.secret.encode("utf-8") for p in settings.projects}
        self.throttle = throttle

    def _shown(self, login: str) -> str:
        if login in self._secrets:
            return login
        return "unknown:" + hashlib.sha256(login.encode("utf-8", "surrogateescape")).hexdigest()[:12]

    def __call__(self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any) -> AuthResult:
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        login = auth_data.login.decode("utf-8", "replace")
        client = client_key(session.peer)
        wait = self.throttle.retry_after(client, login)
        server.refusal_logged = True  # type: ignore[attr-defined]  # a failure is logged below, by name
        if wait > 0:
            log.warning("auth-throttled peer=%s user=%s retry_after=%.0f", client, self._shown(login), wait)
            return AuthResult(success=False, handled=False, message=replies.AUTH_THROTTLED)
        expected = self._secrets.get(login)
        # Compare even for an unknown project, so timing does not tell which project ids exist.
        matches = hmac.compare_digest(expected or b"\0" * 32, auth_data.password)
        if expected is None or not matches:
            by_ip, by_user = self.throttle.failed(client, login)
            log.warning("auth-failed peer=%s user=%s mechanism=%s failures_ip=%d failures_user=%d",
                        client, self._shown(login), mechanism, by_ip, by_user)  # never the password
            return AuthResult(success=False, handled=False)
        server.refusal_logged = False  # type: ignore[attr-defined]
        self.throttle.succeeded(client, login)
        return AuthResult(success=True, auth_data=login)


def _take_content(envelope: Envelope) -> bytes:
    """The received message, let go by the envelope (aiosmtpd resets it after DATA anyway)."""
    content = envelope.original_content or b""
    envelope.content = envelope.original_content = None
    return content


class RelayHandler:
    """aiosmtpd hooks: translate protocol events into pipeline calls and pipeline outcomes into replies."""

    def __init__(self, settings: Settings, pipeline: Pipeline, rates: RateLimiter) -> None:
        self.settings = settings
        self.pipeline = pipeline
        self.rates = rates

    def _project(self, session: Session) -> ProjectSettings | None:
        return self.settings.project(str(session.auth_data)) if session.authenticated else None

    def __dir__(self) -> list[str]:
        """The hooks only, for aiosmtpd's lookup of them on every connection (see RelaySMTP.__dir__)."""
        return _hook_names(type(self), ("handle_", "auth_"))

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, mail_options: list[str]
    ) -> str:
        project = self._project(session)
        if project is None:
            return replies.AUTH_REQUIRED
        if has_control_characters(address):
            return replies.BAD_ADDRESS
        if not domain_allowed(address, project.sender_domains):
            server.refusal_logged = True  # type: ignore[attr-defined]
            log.info("sender-refused project=%s mail_from_domain=%s", project.id, address.rpartition("@")[2][:255])
            return replies.SENDER_DOMAIN_REFUSED
        wait = self.rates.retry_after(project.id, project.rate_limit_per_minute)
        if wait > 0:
            return replies.rate_limited(wait)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        project = self._project(session)
        limit = (project.max_recipients if project else 0) or self.settings.relay.max_recipients
        if has_control_characters(address):
            return replies.BAD_ADDRESS
        if len(envelope.rcpt_tos) >= limit:
            return replies.TOO_MANY_RECIPIENTS
        if project is not None and project.suppression is SuppressionMode.REFUSE:
            refusal = await self._suppressed(project, address)
            if refusal is not None:
                return refusal
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def _suppressed(self, project: ProjectSettings, address: str) -> str | None:
        """The refusal for an address on the project's suppression list; None to accept it."""
        try:
            found = await self.pipeline.use_store(lambda: self.pipeline.store.suppressed(project.id, [address]))
        except StoreAway:
            # An unreadable list must not stop all mail (nor hold each RCPT while the store is away: the
            # wait is bounded, README Spool); the provider still bounces bad addresses.
            log.warning("suppression-list-unreadable project=%s", project.id)
            return None
        entry = next(iter(found.values()), None)
        if entry is None:
            return None
        log.info("rcpt-suppressed project=%s reason=%s", project.id, entry.reason)
        return replies.suppressed(address, entry.reason, entry.detail)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        project = self._project(session)
        if project is None:
            return replies.AUTH_REQUIRED
        if b"\0" in (envelope.original_content or b""):
            return replies.NUL_IN_MESSAGE
        wait = self.rates.acquire(project.id, project.rate_limit_per_minute)
        if wait > 0:
            log.info("outcome=deferred project=%s recipients=%d detail='rate limit'", project.id, len(envelope.rcpt_tos))
            return replies.rate_limited(wait)
        recipients = list(envelope.rcpt_tos)
        trace = received_header(
            helo=session.host_name,
            peer_ip=str(session.peer[0]) if isinstance(session.peer, tuple) else None,
            hostname=self.settings.relay.hostname,
            tls=tls_description(session.ssl),
            authenticated=bool(session.authenticated),
            recipients=recipients,
        )
        # Handed over, not kept: the pipeline then holds the message's only copy (README "Memory").
        reply = await self.pipeline.relay(project, envelope.mail_from or "", recipients,
                                          trace + without_envelope_line(_take_content(envelope)))
        server.refusal_logged = True  # type: ignore[attr-defined]  # the pipeline's outcome line has it
        return reply

    async def handle_exception(self, error: Exception) -> str:
        """A bug must not become aiosmtpd's `500 Error: (ValueError) ...`: a permanent refusal that
        leaks internals. Nothing was sent, so the honest answer is "try again later"."""
        log.error("smtp-internal-error %s: %s", type(error).__name__, error, exc_info=error)
        return replies.INTERNAL_ERROR


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    if not settings.relay.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.relay.tls_cert, settings.relay.tls_key)
    return context


class Relay:
    """The SMTP side: one handler, AUTH throttle and rate limiter shared by every listener.

    Sharing matters: an attacker must not get a fresh AUTH budget by switching from the
    submission port to the implicit-TLS port.
    """

    def __init__(self, settings: Settings, pipeline: Pipeline) -> None:
        relay = settings.relay
        self.settings = settings
        self.handler = RelayHandler(settings, pipeline, RateLimiter())
        self.authenticator = ProjectAuthenticator(settings, AuthThrottle(
            per_ip=relay.auth_failures_per_ip,
            per_user=relay.auth_failures_per_user,
            backoff=relay.auth_backoff_seconds,
            window=relay.auth_failure_window_seconds,
        ))
        # Other relay nodes on the same store count toward both (run by the service in the background).
        self.throttle_sync = ThrottleSync(pipeline.store, self.authenticator.throttle, self.handler.rates)
        self.tls = tls_context(settings)
        self.sessions = Sessions()  # every connection on every listener, for the shutdown drain
        self.memory = MemoryBudget(memory_share(relay.max_inflight_bytes, relay.workers, relay.max_message_bytes))

    async def listen(self, sock: socket.socket, *, implicit_tls: bool = False) -> asyncio.Server | SharedAcceptor:
        """Serve SMTP on an already bound socket (so callers and tests can bind port 0).

        With `implicit_tls` every connection starts with the TLS handshake (port 465 style) and
        STARTTLS is not offered; otherwise STARTTLS is offered when a certificate is configured.
        """
        relay = self.settings.relay
        loop = asyncio.get_running_loop()
        if implicit_tls and self.tls is None:
            raise ValueError("relay.smtps_listen needs relay.tls_cert and relay.tls_key")

        def protocol() -> SMTP:
            with warnings.catch_warnings():  # aiosmtpd warns per connection; the service says it once, at start
                warnings.filterwarnings("ignore", "Requiring AUTH while not requiring TLS", UserWarning)
                return self.sessions.track(RelaySMTP(
                    self.handler,
                    require_tls=relay.require_tls and not implicit_tls,
                    data_size_limit=relay.max_message_bytes,
                    hostname=relay.hostname,
                    ident="inflight",
                    tls_context=None if implicit_tls else self.tls,
                    auth_required=True,
                    auth_require_tls=relay.require_tls or not relay.allow_plaintext_auth,
                    command_call_limit=COMMAND_LIMITS,
                    authenticator=self.authenticator,
                    memory=self.memory,
                    loop=loop,
                ))

        if relay.workers > 1:  # the socket is shared with the other workers: take a fair share of it
            return SharedAcceptor(sock, protocol, sessions=lambda: len(self.sessions.live()),
                                  tls=self.tls if implicit_tls else None, tls_handshake_timeout=TLS_HANDSHAKE_TIMEOUT_SECONDS)
        if implicit_tls:
            return await loop.create_server(protocol, sock=sock, ssl=self.tls,
                                            ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT_SECONDS)
        return await loop.create_server(protocol, sock=sock)
