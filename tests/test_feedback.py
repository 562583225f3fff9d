"""Delivery feedback end to end: real relay, real SMTP sink answering like Amazon SES
(`250 Ok <id>`), real tracker over HTTP, SNS messages signed with a certificate made here and
served from a local HTTP server the test's `feedback.ses_cert_url_pattern` trusts.

The string SNS signs is rebuilt here from AWS's documentation ("Verifying the signatures of
Amazon SNS messages"), independently of tracker/sns.py, so a mistake there cannot sign and
verify consistently.
"""

from __future__ import annotations

import base64
import datetime
import itertools
import json
import logging
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from relay.pipeline import provider_id
from tests.conftest import (
    PROJECT,
    PROJECT_SECRET,
    Delivered,
    RunningService,
    Sink,
    SinkHandler,
    make_settings,
    running_sink,
)
from tests.processes import ROOT
from tests.test_flow import events, fetch, html_message, send, tracked_urls
from tests.upstreams import faulty_sink
from tracker.feedback import Feedback, ses_feedback

TOPIC = "arn:aws:sns:eu-west-1:123456789012:inflight-ses"
AUTH = {"Authorization": f"Bearer {PROJECT_SECRET}"}


# --- an SNS stand-in: its certificate, its signatures, its SubscribeURL -----------------------


@dataclass
class SnsStandIn:
    """Serves the signing certificate and the SubscribeURL; counts what was fetched."""

    key: rsa.RSAPrivateKey
    certificate_pem: bytes
    base: str = ""
    fetched: list[str] = field(default_factory=list)

    def sign(self, message: dict[str, Any], *, version: str = "1", key: rsa.RSAPrivateKey | None = None) -> dict[str, Any]:
        """`message` with SignatureVersion, SigningCertURL and Signature as SNS sets them."""
        fields = (["Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"] if message["Type"] == "Notification"
                  else ["Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type"])
        canonical = "".join(f"{name}\n{message[name]}\n" for name in fields if name in message)
        digest = hashes.SHA1() if version == "1" else hashes.SHA256()
        signature = (key or self.key).sign(canonical.encode(), padding.PKCS1v15(), digest)
        return {**message, "SignatureVersion": version, "SigningCertURL": f"{self.base}/SimpleNotificationService-test.pem",
                "Signature": base64.b64encode(signature).decode()}


def certificate_for(key: rsa.RSAPrivateKey) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sns.amazonaws.com")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def sns_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def sns(sns_key: rsa.RSAPrivateKey) -> Iterator[SnsStandIn]:
    stand_in = SnsStandIn(sns_key, certificate_for(sns_key))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            stand_in.fetched.append(self.path)
            body = stand_in.certificate_pem if self.path.endswith(".pem") else b"<ConfirmSubscriptionResponse/>"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    stand_in.base = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield stand_in
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class SesLikeHandler(SinkHandler):
    """An upstream answering DATA as Amazon SES's SMTP interface does: `250 Ok <message id>`."""

    ids: list[str] = field(default_factory=list)
    counter: Iterator[int] = field(default_factory=itertools.count)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.messages.append(Delivered(envelope.mail_from or "", list(envelope.rcpt_tos), envelope.original_content or b""))
        self.ids.append(f"0100018c{next(self.counter):08x}-{uuid.uuid4()}-000000")
        return f"250 Ok {self.ids[-1]}"


@pytest.fixture
def ses_sink() -> Iterator[Sink]:
    with running_sink(SesLikeHandler()) as running:
        yield running


@pytest.fixture
def service(request: pytest.FixtureRequest, tmp_path: Path, ses_sink: Sink, sns: SnsStandIn) -> Iterator[RunningService]:
    """The relay and tracker on SQLite, or on PostgreSQL for tests parametrised with backend="postgresql"."""
    backend = request.node.callspec.params.get("backend", "sqlite") if hasattr(request.node, "callspec") else "sqlite"
    url = request.getfixturevalue("pg_url") if backend == "postgresql" else f"sqlite:///{tmp_path}/inflight.db"
    pattern = "^" + sns.base.replace(".", r"\.") + "/"
    settings = make_settings(tmp_path, ses_sink.url, store={"url": url},
                             feedback={"ses_cert_url_pattern": pattern, "ses_topic_arns": [TOPIC]})
    with RunningService(settings) as running:
        yield running


def notification(body: dict[str, Any], *, at: datetime.datetime | None = None, topic: str = TOPIC) -> dict[str, Any]:
    moment = at or datetime.datetime.now(datetime.UTC)
    return {"Type": "Notification", "MessageId": str(uuid.uuid4()), "TopicArn": topic,
            "Message": json.dumps(body), "Timestamp": moment.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"}


def ses_bounce(ses_id: str, message_id: str, recipient: str, *, permanent: bool = True) -> dict[str, Any]:
    """An SES bounce notification as SES documents it (notification contents, Bounce)."""
    return {
        "notificationType": "Bounce",
        "bounce": {"bounceType": "Permanent" if permanent else "Transient", "bounceSubType": "General",
                   "bouncedRecipients": [{"emailAddress": recipient, "action": "failed", "status": "5.1.1",
                                          "diagnosticCode": "smtp; 550 5.1.1 user unknown"}],
                   "timestamp": "2026-12-04T18:00:00.000Z", "feedbackId": "0100018c-feedback"},
        "mail": {"messageId": ses_id, "destination": [recipient], "commonHeaders": {"messageId": message_id}},
    }


def post_sns(service: RunningService, message: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{service.http_base}/v1/feedback/ses", content=json.dumps(message),
                      headers={"Content-Type": "text/plain; charset=UTF-8", "x-amz-sns-message-type": message["Type"]})


def sent_message(service: RunningService, ses_sink: Sink, to: list[str]) -> tuple[str, str]:
    """Relay one message; (its Message-ID, the SES id the sink gave the first copy)."""
    send(service.smtp_port, html_message({"X-Inflight-Campaign": "spring"}), recipients=to)
    message_id = events(service, name="email.sent")[0]["message_id"]
    return message_id, ses_sink.handler.ids[0]  # type: ignore[attr-defined]


# --- SNS signatures, both versions, and the mapping to the right message and contact ------------


BACKENDS = pytest.mark.parametrize("backend", ["sqlite", "postgresql"])


@BACKENDS
@pytest.mark.parametrize("version", ["1", "2"])
def test_signed_bounce_maps_through_the_ses_id_and_suppresses(service, ses_sink, sns, version, backend) -> None:
    message_id, ses_id = sent_message(service, ses_sink, ["a@example.com"])
    # The Message-ID in the notification matches nothing: the SES id alone must find the message.
    response = post_sns(service, sns.sign(notification(ses_bounce(ses_id, "<unrelated@x>", "A@example.com")), version=version))
    assert response.status_code == 200, response.text
    [bounce] = events(service, name="email.bounce")
    assert (bounce["message_id"], bounce["contact"], bounce["recipient"], bounce["campaign"]) == (
        message_id, "a@example.com", "a@example.com", "spring")
    assert bounce["reason"] == "permanent: smtp; 550 5.1.1 user unknown"
    listed = httpx.get(f"{service.http_base}/v1/suppressions", headers=AUTH).json()
    assert [(s["address"], s["reason"]) for s in listed["suppressions"]] == [("a@example.com", "bounce")]


@BACKENDS
def test_complaint_and_delivery_map_through_the_message_id_header(service, ses_sink, sns, backend) -> None:
    message_id, _ = sent_message(service, ses_sink, ["a@example.com"])
    mail = {"messageId": "not-an-id-we-know", "commonHeaders": {"messageId": f"<{message_id}>"}}
    delivery = {"notificationType": "Delivery", "mail": mail,
                "delivery": {"recipients": ["a@example.com"], "smtpResponse": "250 2.0.0 OK 1733335200 gmail"}}
    complaint = {"notificationType": "Complaint", "mail": mail,
                 "complaint": {"complainedRecipients": [{"emailAddress": "a@example.com"}], "complaintFeedbackType": "abuse"}}
    for body in (delivery, complaint):
        assert post_sns(service, sns.sign(notification(body), version="2")).status_code == 200
    [delivered] = events(service, name="email.delivery")
    [complained] = events(service, name="email.complaint")
    assert (delivered["message_id"], delivered["contact"], delivered["reason"]) == (
        message_id, "a@example.com", "250 2.0.0 OK 1733335200 gmail")
    assert (complained["message_id"], complained["reason"]) == (message_id, "complaint: abuse")
    listed = httpx.get(f"{service.http_base}/v1/suppressions", headers=AUTH).json()["suppressions"]
    assert [(s["address"], s["reason"], s["detail"]) for s in listed] == [("a@example.com", "complaint", "complaint: abuse")]


@BACKENDS
def test_transient_bounce_is_recorded_but_does_not_suppress(service, ses_sink, sns, backend) -> None:
    message_id, ses_id = sent_message(service, ses_sink, ["a@example.com"])
    signed = sns.sign(notification(ses_bounce(ses_id, message_id, "a@example.com", permanent=False)))
    assert post_sns(service, signed).status_code == 200
    assert post_sns(service, signed).status_code == 200  # SNS delivers at least once: one event
    [bounce] = events(service, name="email.bounce")
    assert bounce["reason"].startswith("transient: ")
    assert httpx.get(f"{service.http_base}/v1/suppressions", headers=AUTH).json()["suppressions"] == []


def test_certificate_is_fetched_once(service, ses_sink, sns) -> None:
    message_id, ses_id = sent_message(service, ses_sink, ["a@example.com"])
    for _ in range(3):
        signed = sns.sign(notification(ses_bounce(ses_id, message_id, "a@example.com", permanent=False)))
        assert post_sns(service, signed).status_code == 200
    assert [p for p in sns.fetched if p.endswith(".pem")] == ["/SimpleNotificationService-test.pem"]
    assert len(events(service, name="email.bounce")) == 3


# --- every refusal: 403, logged, nothing recorded ---------------------------------------------


def refusals(sns: SnsStandIn, ses_id: str, message_id: str) -> dict[str, dict[str, Any]]:
    good = notification(ses_bounce(ses_id, message_id, "a@example.com"))
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    tampered = sns.sign(good)
    tampered["Message"] = tampered["Message"].replace("a@example.com", "b@example.com")
    unsigned = {**sns.sign(good)}
    del unsigned["Signature"]
    stale = notification(ses_bounce(ses_id, message_id, "a@example.com"),
                         at=datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=1, minutes=1))
    foreign_cert = sns.sign(good)
    foreign_cert["SigningCertURL"] = "https://attacker.example/cert.pem"
    return {
        "unsigned": unsigned,
        "mis-signed (other key)": sns.sign(good, key=other_key),
        "tampered after signing": tampered,
        "stale (> 1 h)": sns.sign(stale),
        "other topic": sns.sign(notification(ses_bounce(ses_id, message_id, "a@example.com"),
                                             topic="arn:aws:sns:eu-west-1:999999999999:someone-else")),
        "certificate URL outside the pattern": foreign_cert,
        "unknown SignatureVersion": {**sns.sign(good), "SignatureVersion": "3"},
        "unknown message type": sns.sign({**good, "Type": "Notification"}) | {"Type": "Surprise"},
    }


def test_every_refusal_is_403_logged_and_records_nothing(service, ses_sink, sns, caplog) -> None:
    message_id, ses_id = sent_message(service, ses_sink, ["a@example.com"])
    caplog.set_level(logging.WARNING, logger="inflight.feedback")
    for case, message in refusals(sns, ses_id, message_id).items():
        caplog.clear()
        response = post_sns(service, message)
        assert response.status_code == 403, case
        assert any("feedback-refused" in r.getMessage() for r in caplog.records), case
    not_json = httpx.post(f"{service.http_base}/v1/feedback/ses", content=b"{not json")
    assert not_json.status_code == 403
    assert events(service, name="email.bounce") == []
    assert httpx.get(f"{service.http_base}/v1/suppressions", headers=AUTH).json()["suppressions"] == []
    assert not any("attacker" in p for p in sns.fetched)


def test_subscription_is_confirmed_only_on_the_trusted_host(service, sns) -> None:
    confirmation = {"Type": "SubscriptionConfirmation", "MessageId": str(uuid.uuid4()), "Token": "tok123",
                    "TopicArn": TOPIC, "Message": "You have chosen to subscribe ...",
                    "SubscribeURL": f"{sns.base}/?Action=ConfirmSubscription&TopicArn={TOPIC}&Token=tok123",
                    "Timestamp": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")}
    response = post_sns(service, sns.sign(confirmation))
    assert response.status_code == 200 and response.json() == {"confirmed": True}
    assert any(p.startswith("/?Action=ConfirmSubscription") for p in sns.fetched)

    elsewhere = sns.sign({**confirmation, "SubscribeURL": "https://attacker.example/?Action=ConfirmSubscription"})
    assert post_sns(service, elsewhere).status_code == 403
    other_topic = sns.sign({**confirmation, "TopicArn": "arn:aws:sns:eu-west-1:999999999999:x"})
    before = len(sns.fetched)
    assert post_sns(service, other_topic).status_code == 403
    assert len(sns.fetched) == before


# --- POST /v1/feedback: any provider's webhook, bridged ------------------------------------------


def test_bridged_feedback_authenticates_validates_and_maps(service, ses_sink) -> None:
    message_id, ses_id = sent_message(service, ses_sink, ["a@example.com", "b@example.com"])
    url = f"{service.http_base}/v1/feedback"
    body = {"type": "bounce", "recipient": "b@example.com", "message_id": f"<{message_id}>", "permanent": True,
            "diagnostic": "550 5.1.1 no such user"}
    assert httpx.post(url, json=body).status_code == 401
    assert httpx.post(url, json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
    bad = httpx.post(url, json={"type": "bounced", "recipient": "", "extra": 1}, headers=AUTH)
    assert bad.status_code == 422
    assert all(word in bad.json()["error"] for word in ("type:", "recipient:", "message_id:", "extra"))
    unknown = httpx.post(url, json={**body, "message_id": "<nothing@x>"}, headers=AUTH)
    assert unknown.status_code == 404

    recorded = httpx.post(url, json=body, headers=AUTH)
    assert recorded.status_code == 200 and recorded.json()["suppressed"] is True
    delivery = {"type": "delivery", "recipient": "a@example.com", "message_id": ses_id, "diagnostic": "250 ok"}
    assert httpx.post(url, json=delivery, headers=AUTH).status_code == 200  # the provider's id works too
    [bounce] = events(service, name="email.bounce")
    [delivered] = events(service, name="email.delivery")
    assert (bounce["contact"], bounce["message_id"], bounce["reason"]) == ("b@example.com", message_id,
                                                                            "permanent: 550 5.1.1 no such user")
    assert (delivered["contact"], delivered["message_id"]) == ("a@example.com", message_id)


# --- the suppression list at RCPT, over the API and forgotten contacts ---------------------------


@BACKENDS
def test_suppressed_address_is_refused_at_rcpt_and_the_others_are_delivered(service, ses_sink, backend) -> None:
    added = httpx.post(f"{service.http_base}/v1/suppressions", json={"address": "B@example.com", "detail": "asked us"},
                       headers=AUTH)
    assert added.status_code == 201
    refused = send(service.smtp_port, html_message(), recipients=["a@example.com", "b@example.com", "c@example.com"])
    assert set(refused) == {"b@example.com"}
    code, text = refused["b@example.com"]
    assert code == 550 and text.decode().startswith("5.1.1 <b@example.com> is on this project's suppression list")
    assert "manual: asked us" in text.decode()
    assert sorted(r for m in ses_sink.messages for r in m.recipients) == ["a@example.com", "c@example.com"]
    assert sorted(e["recipient"] for e in events(service, name="email.sent")) == ["a@example.com", "c@example.com"]


def test_suppression_api_lists_adds_and_removes(service) -> None:
    base = f"{service.http_base}/v1/suppressions"
    assert httpx.get(base).status_code == 401
    assert httpx.post(base, json={"address": "not-an-address"}, headers=AUTH).status_code == 422
    assert httpx.post(base, json={"address": "x@example.com"}, headers=AUTH).status_code == 201
    assert httpx.post(base, json={"address": "X@example.com"}, headers=AUTH).status_code == 200  # already there
    listed = httpx.get(base, headers=AUTH).json()
    assert listed["mode"] == "refuse" and [s["address"] for s in listed["suppressions"]] == ["x@example.com"]
    assert httpx.delete(f"{base}/x@example.com", headers=AUTH).status_code == 204
    assert httpx.delete(f"{base}/x@example.com", headers=AUTH).status_code == 404
    assert httpx.get(base, headers=AUTH).json()["suppressions"] == []


def test_suppression_off_keeps_the_list_but_sends(tmp_path: Path, ses_sink: Sink) -> None:
    settings = make_settings(tmp_path, ses_sink.url, projects=[
        {"id": PROJECT, "secret": PROJECT_SECRET, "tracking": "ENABLED", "suppression": "off"}])
    with RunningService(settings) as service:
        assert httpx.post(f"{service.http_base}/v1/suppressions", json={"address": "b@example.com"},
                          headers=AUTH).status_code == 201
        assert send(service.smtp_port, html_message(), recipients=["a@example.com", "b@example.com"]) == {}
    assert sorted(r for m in ses_sink.messages for r in m.recipients) == ["a@example.com", "b@example.com"]


def test_forgotten_contact_records_no_later_opens_nor_feedback(tmp_path: Path, service, ses_sink, sns) -> None:
    message_id, ses_id = sent_message(service, ses_sink, ["gone@example.com"])
    pixel_url = tracked_urls(ses_sink.messages[0].data)[-1]
    config = tmp_path / "cli.toml"
    config.write_text(f'[store]\nurl = "sqlite:///{tmp_path}/inflight.db"\n'
                      f'[[projects]]\nid = "{PROJECT}"\nsecret = "{PROJECT_SECRET}"\n')
    forget = subprocess.run([sys.executable, "-m", "inflight.cli", "contacts", "forget", "Gone@example.com",
                             "--config", str(config)], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert forget.returncode == 0, forget.stderr
    time.sleep(5.1)  # the tracker re-reads the erased list at most every 5 s
    assert fetch(service, pixel_url).status_code == 200  # old mail still works for the reader
    assert post_sns(service, sns.sign(notification(ses_bounce(ses_id, message_id, "gone@example.com")))).status_code == 200
    assert events(service) == []
    assert httpx.get(f"{service.http_base}/v1/suppressions", headers=AUTH).json()["suppressions"] == []
    with sqlite3.connect(tmp_path / "inflight.db") as db:
        assert db.execute("SELECT count(*) FROM provider_ids").fetchone() == (0,)


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("Ok 0100018c5d3e8a5f-3b1a2c4d-1111-2222-3333-444455556666-000000",
         "0100018c5d3e8a5f-3b1a2c4d-1111-2222-3333-444455556666-000000"),  # Amazon SES
        ("2.0.0 Ok: queued as 4F1D2A3B", "4F1D2A3B"),  # Postfix
        ("2.0.0 written to outbox", None),
        ("2.0.0 Ok: queued", None),
        ("OK", None),
    ],
)
def test_provider_id_from_the_upstreams_reply(reply: str, expected: str | None) -> None:
    assert provider_id(reply) == expected


def test_upstream_refusing_a_mailbox_suppresses_it_but_not_a_policy_refusal(tmp_path: Path) -> None:
    with faulty_sink() as upstream:
        upstream.handler.rcpt_replies = {"gone@example.com": "550 5.1.1 no such user",
                                         "blocked@example.com": "554 5.7.1 rejected by policy"}
        with RunningService(make_settings(tmp_path, upstream.url)) as service:
            reply = send(service.smtp_port, html_message(), recipients=["a@example.com", "gone@example.com",
                                                                         "blocked@example.com"])
            assert reply == {}  # the app gets 250 with the refused named (README: Delivery)
            listed = httpx.get(f"{service.http_base}/v1/suppressions", headers=AUTH).json()["suppressions"]
            assert [(s["address"], s["reason"], s["detail"]) for s in listed] == [
                ("gone@example.com", "bounce", "550 5.1.1 no such user")]
            refused = send(service.smtp_port, html_message(), recipients=["gone@example.com", "a@example.com"])
            assert refused["gone@example.com"][0] == 550


def test_ses_feedback_reads_both_notification_formats() -> None:
    # SES's event publishing (configuration sets) names the kind `eventType`; its notifications `notificationType`.
    published = {"eventType": "Bounce", "bounce": {"bounceType": "Undetermined", "bounceSubType": "Undetermined",
                                                   "bouncedRecipients": [{"emailAddress": "a@x.example"}]}}
    assert ses_feedback(published) == [Feedback("bounce", "a@x.example", False, "Undetermined")]
    complaint = {"notificationType": "Complaint", "complaint": {"complainedRecipients": [{"emailAddress": "b@x.example"}]}}
    [feedback] = ses_feedback(complaint)
    assert feedback.suppresses and feedback.reason == "complaint: unspecified"
    malformed = {"notificationType": "Bounce", "bounce": {"bouncedRecipients": [{"no": "address"}, "junk"]}}
    assert ses_feedback(malformed) == [] and ses_feedback({"notificationType": "Received"}) == []
