"""One accepted SMTP transaction → headers read, tracking decided, copies instrumented, relayed upstream.

The SMTP handler is a thin translator; everything a message goes through lives here, and every
outcome is one SMTP reply plus one structured log line.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, replace

from config.settings import ProjectSettings, Settings, TrackingEngine
from config.tracking import TrackingSettings
from relay import replies
from relay.dkim import DkimError, DkimSigner, load_key
from relay.headers import SplitMessage, decoded_header, split_message
from relay.hints import AppHints, Refusal, read_hints, strip_hints
from relay.instrument import plan_instrumentation
from relay.links import TrackingLinks
from relay.policy import Decision, decide
from relay.senders import from_allowed
from relay.upstream import Upstream, UpstreamError
from tracker.store import EventStore, NewEvent, now_rfc3339
from tracker.tokens import TokenSigner, TrackedSend

log = logging.getLogger("inflight.relay")


@dataclass(frozen=True)
class Copy:
    """One upstream transaction: the whole message to several recipients, or one tracked copy."""

    recipients: list[str]
    data: bytes


class Pipeline:
    def __init__(self, *, settings: Settings, upstream: Upstream, store: EventStore, signer: TokenSigner) -> None:
        self.settings = settings
        self.upstream = upstream
        self.store = store
        self.signer = signer
        self.tracking = TrackingSettings(settings, store)
        self.dkim = DkimSigner([load_key(k.domain, k.selector, k.private_key_path) for k in settings.dkim])

    async def relay(self, project: ProjectSettings, mail_from: str, recipients: list[str], raw: bytes) -> str:
        """Return the SMTP reply for this transaction; 250 only once the upstream accepted every copy."""
        started = time.monotonic()
        try:
            message = split_message(raw)
            hints = read_hints(message)
            if hints.project is not None and hints.project != project.id:
                raise Refusal(replies.PROJECT_MISMATCH)
            if hints.contact is not None and len(recipients) > 1:
                raise Refusal(replies.invalid_header("X-Inflight-Contact", "one contact: send one message per recipient"))
            if not from_allowed(message, project.sender_domains):
                raise Refusal(replies.FROM_DOMAIN_REFUSED)
        except Refusal as refusal:
            self._log("refused", project.id, None, recipients, None, len(raw), started, refusal.reply)
            return refusal.reply

        try:
            mode = await self.tracking.mode(project)
        except Exception:
            # Guessing a mode could track a project that turned tracking off: defer instead.
            log.exception("tracking-settings-unreadable project=%s", project.id)
            self._log("deferred", project.id, None, recipients, None, len(raw), started, replies.SETTINGS_UNAVAILABLE)
            return replies.SETTINGS_UNAVAILABLE
        decision = decide(mode, hints.send, allow_override=project.allow_tracking_override)
        if self.settings.upstream.tracking_engine is TrackingEngine.PROVIDER:
            decision = replace(decision, reason=f"{decision.reason} engine=provider")
        message, message_id = self._prepare_headers(strip_hints(message), decision)
        copies, outcome = self._copies(message.to_bytes(), recipients, hints, project, message_id, decision)
        try:
            copies = self._signed(copies, message, message_id, rewritten=outcome == "instrumented")
        except DkimError as exc:
            reply = replies.unsignable(str(exc))
            self._log("refused", project.id, message_id, recipients, decision, len(raw), started, reply)
            return reply
        delivered: list[str] = []
        try:
            for copy in copies:
                await self.upstream.send(mail_from, copy.recipients, copy.data)
                delivered.extend(copy.recipients)
        except UpstreamError as exc:
            reply = replies.upstream_refused(exc.code, str(exc), temporary=exc.temporary)
            if exc.code is None:
                reply = replies.UPSTREAM_UNAVAILABLE
            await self._record_sent(delivered, message, message_id, project, hints, decision)
            self._log("deferred" if exc.temporary else "refused", project.id, message_id, recipients, decision,
                      len(raw), started, f"{reply} delivered={len(delivered)}")
            return reply
        await self._record_sent(delivered, message, message_id, project, hints, decision)
        self._log("queued", project.id, message_id, recipients, decision, len(raw), started, outcome)
        return replies.accepted(message_id, len(recipients))

    def _prepare_headers(self, message: SplitMessage, decision: Decision) -> tuple[SplitMessage, str]:
        message_id = (message.get("Message-ID") or "").strip().strip("<>")
        if not message_id:
            message_id = f"{uuid.uuid4().hex}@{self.settings.relay.hostname}"
            message = message.with_field("Message-ID", f"<{message_id}>")
        upstream = self.settings.upstream
        if upstream.owns_configuration_set:
            # The relay alone chooses the set: an app's own header could name a set that tracks.
            header = upstream.configuration_set_header.lower()
            message = message.without(lambda name: name == header)
            configuration_set = upstream.configuration_set if decision.tracked else upstream.no_tracking_configuration_set
            if configuration_set:
                message = message.with_field(upstream.configuration_set_header, configuration_set)
        return message, message_id

    def _copies(
        self,
        data: bytes,
        recipients: list[str],
        hints: AppHints,
        project: ProjectSettings,
        message_id: str,
        decision: Decision,
    ) -> tuple[list[Copy], str]:
        """Tracked mail goes as one copy per recipient, each with its own tokens; other mail as one transaction."""
        if not decision.tracked:
            return [Copy(recipients, data)], "untracked"
        if self.settings.upstream.tracking_engine is TrackingEngine.PROVIDER:
            return [Copy(recipients, data)], "provider-tracks"  # its configuration set adds pixel and links
        plan = plan_instrumentation(data)
        sent_at = int(time.time())
        copies = []
        for recipient in recipients:
            send = TrackedSend(
                project=project.id,
                message_id=message_id,
                contact=hints.contact or recipient.lower(),
                recipient=recipient,
                sent_at=sent_at,
                campaign=hints.campaign,
                template=hints.template,
                template_type=hints.send.template_type,
                campaign_type=hints.send.campaign_type,
            )
            links = TrackingLinks(
                signer=self.signer,
                public_url=self.settings.tracker.public_url,
                send=send,
                honeypot=project.honeypot_link,
                exclude_click_domains=project.exclude_click_domains,
            )
            result = plan.render(links)
            if result.outcome != "instrumented":
                # Nothing to track in this message (no HTML, signed, or it failed): send it as is, once.
                if result.outcome == "failed":
                    log.warning("instrument-failed message_id=%s reason=%s", message_id, result.reason)
                return [Copy(recipients, data)], f"instrument={result.outcome} ({result.reason})"
            copies.append(Copy([recipient], result.data))
        return copies, "instrumented"

    def _signed(self, copies: list[Copy], message: SplitMessage, message_id: str, *, rewritten: bool) -> list[Copy]:
        """The last step of copy preparation: DKIM over each copy's final bytes."""
        if rewritten:
            for domain in self.dkim.foreign_signatures(message):
                log.warning("dkim-broken message_id=%s domain=%s detail='tracking rewrote a message the app signed; "
                            "configure [[dkim]] for this domain or turn tracking off for these sends'", message_id, domain)
        return [Copy(copy.recipients, self.dkim.sign(copy.data)) for copy in copies]

    async def _record_sent(
        self,
        delivered: list[str],
        message: SplitMessage,
        message_id: str,
        project: ProjectSettings,
        hints: AppHints,
        decision: Decision,
    ) -> None:
        if not delivered:
            return
        at = now_rfc3339()
        subject = decoded_header(message.get("Subject"))
        sender = decoded_header(message.get("From"))
        events = [
            NewEvent(
                name="email.sent",
                project=project.id,
                contact=hints.contact or recipient.lower(),
                recipient=recipient,
                message_id=message_id,
                at=at,
                campaign=hints.campaign,
                template=hints.template,
                template_type=hints.send.template_type,
                campaign_type=hints.send.campaign_type,
                subject=subject,
                sender=sender,
                tracked=decision.tracked,
                reason=decision.reason,
            )
            for recipient in delivered
        ]
        try:
            await self.store.record(events)
        except Exception:
            log.exception("event-store-failed message_id=%s events=%d", message_id, len(events))

    @staticmethod
    def _log(
        outcome: str,
        project: str,
        message_id: str | None,
        recipients: list[str],
        decision: Decision | None,
        size: int,
        started: float,
        detail: str,
    ) -> None:
        tracking = decision.describe() if decision else "tracked=false"
        log.info(
            "outcome=%s project=%s message_id=%s recipients=%d %s bytes=%d ms=%.1f detail=%r",
            outcome, project, message_id, len(recipients), tracking, size, (time.monotonic() - started) * 1000, detail,
        )
