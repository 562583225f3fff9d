"""Delivery feedback: what happened to a message after the upstream took it.

Amazon SES reports deliveries, bounces and complaints through SNS (`POST /v1/feedback/ses`,
authenticated by SNS's signature, tracker/sns.py); any other provider's webhook can be bridged
to `POST /v1/feedback` with the project's bearer secret. Either way the report becomes an
`email.delivery`, `email.bounce` or `email.complaint` event on the contact and message of the
`email.sent` it answers, found through the id the upstream gave the copy (SES's `250 Ok <id>`,
kept by the relay) or the message's Message-ID. A permanent bounce or a complaint also puts
the address on the project's suppression list, which the relay enforces at RCPT.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from config.settings import ProjectSettings, Settings
from store.model import MAX_LIMIT, EventQuery, EventStore, NewEvent, address_key, is_forgotten, now_rfc3339
from tracker.sns import ConfirmationFailed, Refused, SnsVerifier

log = logging.getLogger("inflight.feedback")

FeedbackKind = Literal["bounce", "complaint", "delivery"]
KINDS: tuple[FeedbackKind, ...] = ("bounce", "complaint", "delivery")
FORBIDDEN = JSONResponse({"error": "forbidden"}, status_code=403)


@dataclass(frozen=True)
class Feedback:
    """One recipient's outcome as a provider reported it."""

    kind: FeedbackKind
    recipient: str
    permanent: bool = False  # bounces: the address will never accept mail
    diagnostic: str = ""  # the bounce's diagnostic code, the complaint's feedback type, the delivery's SMTP reply

    @property
    def suppresses(self) -> bool:
        return self.kind == "complaint" or (self.kind == "bounce" and self.permanent)

    @property
    def reason(self) -> str:
        """The event's `reason`: what kind of outcome, then the provider's words."""
        if self.kind == "bounce":
            return f"{'permanent' if self.permanent else 'transient'}: {self.diagnostic}".strip()
        if self.kind == "complaint":
            return f"complaint: {self.diagnostic or 'unspecified'}"
        return self.diagnostic


class FeedbackRecorder:
    """Turns reports into events and suppressions, for both routes."""

    def __init__(self, settings: Settings, store: EventStore) -> None:
        self.settings = settings
        self.store = store

    async def _sent(self, project: str, message_id: str, recipient: str) -> Mapping[str, Any] | None:
        """The email.sent event of this message to this recipient, if the relay sent it."""
        query = EventQuery(project=project, message_id=message_id, name="email.sent", limit=MAX_LIMIT)
        wanted = address_key(recipient)
        return next((e for e in await self.store.events(query) if address_key(e["recipient"]) == wanted), None)

    async def record(self, candidates: list[tuple[str, str]], feedback: Feedback, *, key: str) -> dict[str, Any] | None:
        """Record `feedback` on the first (project, message_id) that sent to its recipient; None when none did.

        `key` identifies the report: the same report delivered twice (SNS retries, a bridge
        retrying) stores one event.
        """
        for project, message_id in candidates:
            sent = await self._sent(project, message_id, feedback.recipient)
            if sent is not None:
                return await self._record_on(sent, feedback, key)
        return None

    async def _record_on(self, sent: Mapping[str, Any], feedback: Feedback, key: str) -> dict[str, Any]:
        project = sent["project"]
        if is_forgotten(await self.store.forgotten_keys(), project, sent["recipient"], sent["contact"]):
            # The contact was erased: nothing about them is recorded again (not even a suppression).
            log.info("feedback-ignored project=%s message_id=%s reason=forgotten-contact", project, sent["message_id"])
            return {"recorded": False, "suppressed": False, "reason": "forgotten contact"}
        uid = hashlib.blake2b(f"{key}\0{feedback.kind}\0{address_key(feedback.recipient)}".encode(), digest_size=16).hexdigest()
        event = NewEvent(
            name=f"email.{feedback.kind}",
            project=project,
            contact=sent["contact"],
            recipient=sent["recipient"],
            message_id=sent["message_id"],
            at=now_rfc3339(),
            campaign=sent.get("campaign"),
            template=sent.get("template"),
            template_type=sent.get("template_type"),
            campaign_type=sent.get("campaign_type"),
            subject=sent.get("subject"),
            sender=sent.get("from", sent.get("sender")),
            tracked=sent.get("tracked"),
            reason=feedback.reason[:1000],
            uid=uid,
        )
        await self.store.record([event])
        suppressed = False
        if feedback.suppresses:
            suppressed = await self.store.suppress(project, sent["recipient"], reason=feedback.kind, detail=feedback.reason)
        log.info("feedback-recorded project=%s message_id=%s event=email.%s suppressed=%s",
                 project, sent["message_id"], feedback.kind, suppressed)
        return {"recorded": True, "event": event.name, "suppressed": feedback.suppresses}

    async def messages_with_id(self, message_id: str, projects: list[ProjectSettings]) -> list[tuple[str, str]]:
        """(project, message_id) pairs for an id: the upstream's own id first, else a Message-ID."""
        copies = await self.store.provider_copies(message_id)
        allowed = {p.id for p in projects}
        found = list(dict.fromkeys((c.project, c.message_id) for c in copies if c.project in allowed))
        header_id = message_id.strip().strip("<>")
        return found + [(p.id, header_id) for p in projects if (p.id, header_id) not in found]


def ses_feedback(notification: Mapping[str, Any]) -> list[Feedback]:
    """The per-recipient outcomes in an SES notification (notification or event-publishing format)."""
    kind = str(notification.get("notificationType") or notification.get("eventType") or "")
    if kind == "Bounce":
        bounce = notification.get("bounce") or {}
        permanent = bounce.get("bounceType") == "Permanent"
        return [
            Feedback("bounce", r["emailAddress"], permanent, str(r.get("diagnosticCode") or bounce.get("bounceSubType") or ""))
            for r in bounce.get("bouncedRecipients") or () if isinstance(r, dict) and isinstance(r.get("emailAddress"), str)
        ]
    if kind == "Complaint":
        complaint = notification.get("complaint") or {}
        feedback_type = str(complaint.get("complaintFeedbackType") or "")
        return [
            Feedback("complaint", r["emailAddress"], True, feedback_type)
            for r in complaint.get("complainedRecipients") or () if isinstance(r, dict) and isinstance(r.get("emailAddress"), str)
        ]
    if kind == "Delivery":
        delivery = notification.get("delivery") or {}
        response = str(delivery.get("smtpResponse") or "")
        return [Feedback("delivery", r, False, response) for r in delivery.get("recipients") or () if isinstance(r, str)]
    return []


class FeedbackRoutes:
    """The HTTP side: `/v1/feedback/ses` (SNS) and `/v1/feedback` (a project's bearer secret)."""

    def __init__(self, settings: Settings, store: EventStore, verifier: SnsVerifier | None = None) -> None:
        self.settings = settings
        self.recorder = FeedbackRecorder(settings, store)
        feedback = settings.feedback
        self.verifier = verifier or SnsVerifier(cert_url_pattern=feedback.ses_cert_url_pattern, topic_arns=feedback.ses_topic_arns)

    async def ses(self, request: Request) -> Response:
        try:
            message = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError):
            message = None
        if not isinstance(message, dict):
            log.warning("feedback-refused source=ses reason='body is not a JSON object'")
            return FORBIDDEN
        try:
            await self.verifier.verify(message)
        except Refused as refused:
            log.warning("feedback-refused source=ses reason=%r topic=%r", str(refused), str(message.get("TopicArn"))[:200])
            return FORBIDDEN
        kind = message["Type"]
        if kind == "SubscriptionConfirmation":
            try:
                await self.verifier.confirm_subscription(message)
            except Refused as refused:
                log.warning("feedback-refused source=ses reason=%r", str(refused))
                return FORBIDDEN
            except ConfirmationFailed as failed:
                log.warning("sns-subscription-failed topic=%r error=%s", message.get("TopicArn"), failed)
                return JSONResponse({"error": "could not confirm the subscription"}, status_code=502)
            return JSONResponse({"confirmed": True})
        if kind != "Notification":
            return JSONResponse({"ignored": kind})
        try:
            notification = json.loads(message["Message"])
        except (json.JSONDecodeError, TypeError):
            notification = None
        if not isinstance(notification, dict):
            log.warning("feedback-unreadable source=ses sns_message_id=%r", str(message.get("MessageId"))[:100])
            return JSONResponse({"ignored": "Message is not an SES notification"})
        mail = notification.get("mail") or {}
        ses_id = str(mail.get("messageId") or "")
        header_id = str((mail.get("commonHeaders") or {}).get("messageId") or "")
        candidates = await self.recorder.messages_with_id(ses_id, list(self.settings.projects)) if ses_id else []
        if header_id:
            candidates += [c for c in await self.recorder.messages_with_id(header_id, list(self.settings.projects))
                           if c not in candidates]
        results = []
        for feedback in ses_feedback(notification):
            outcome = await self.recorder.record(candidates, feedback, key=str(message.get("MessageId")))
            if outcome is None:
                log.warning("feedback-unmatched source=ses ses_message_id=%r message_id=%r event=email.%s",
                            ses_id[:200], header_id[:200], feedback.kind)
            results.append(outcome or {"recorded": False, "reason": "no email.sent matches"})
        return JSONResponse({"results": results})

    async def bridged(self, request: Request, project: ProjectSettings) -> Response:
        """`POST /v1/feedback` for `project` (authenticated by the caller)."""
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError):
            body = None
        feedback, problems = parse_feedback(body)
        if feedback is None:
            return JSONResponse({"error": "; ".join(problems)}, status_code=422)
        message_id = str(body["message_id"])  # type: ignore[index]
        candidates = await self.recorder.messages_with_id(message_id, [project])
        # The same report bridged twice (a provider's webhook retried) is one event.
        key = f"{project.id}\0{message_id}\0{feedback.permanent}\0{feedback.diagnostic}"
        outcome = await self.recorder.record(candidates, feedback, key=key)
        if outcome is None:
            return JSONResponse({"error": "no email.sent of this project matches message_id and recipient"}, status_code=404)
        return JSONResponse(outcome)


def parse_feedback(body: object) -> tuple[Feedback | None, list[str]]:
    """The bridged report, or the problems with it (every one at once)."""
    if not isinstance(body, dict):
        return None, ['body: expected a JSON object {"type", "recipient", "message_id", "permanent", "diagnostic"}']
    problems = []
    unknown = sorted(set(body) - {"type", "recipient", "message_id", "permanent", "diagnostic"})
    if unknown:
        problems.append(f"unknown field(s): {', '.join(unknown)}")
    kind = next((k for k in KINDS if k == body.get("type")), None)
    if kind is None:
        problems.append(f"type: expected one of {', '.join(KINDS)}")
    for name in ("recipient", "message_id"):
        if not isinstance(body.get(name), str) or not body[name].strip():
            problems.append(f"{name}: expected a non-empty string")
    if not isinstance(body.get("permanent", False), bool):
        problems.append("permanent: expected true or false")
    if not isinstance(body.get("diagnostic", ""), str):
        problems.append("diagnostic: expected a string")
    if problems or kind is None:
        return None, problems
    permanent = bool(body.get("permanent", False)) or kind == "complaint"
    return Feedback(kind, body["recipient"].strip(), permanent, body.get("diagnostic", "")), []
