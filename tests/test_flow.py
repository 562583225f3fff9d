"""End to end over real sockets: app → relay (SMTP) → upstream sink; recipient → tracker (HTTP) → events."""

from __future__ import annotations

import email
import email.policy
import re
import smtplib
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.conftest import PROJECT, PROJECT_SECRET, RunningService, Sink, make_settings

LINK = "https://example.com/x?a=1&b=2"
HTML = '<html><body><p><a href="https://example.com/x?a=1&amp;b=2">x</a></p></body></html>'
TRACKED_URL = re.compile(r'(?:href|src)="(http://127\.0\.0\.1:1/[co]/[^"]+)"')


def html_message(headers: dict[str, str] | None = None, html: str = HTML, to: str = "a@example.com") -> EmailMessage:
    message = EmailMessage()
    message["From"] = "app@example.com"
    message["To"] = to
    message["Subject"] = "Hello"
    for name, value in (headers or {}).items():
        message[name] = value
    message.set_content("plain text part")
    message.add_alternative(html, subtype="html")
    return message


def send(port: int, message: EmailMessage | bytes, recipients: list[str] | None = None,
         user: str = PROJECT, password: str = PROJECT_SECRET) -> dict[str, tuple[int, bytes]]:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.login(user, password)
        if isinstance(message, bytes):
            return client.sendmail("app@example.com", recipients or ["a@example.com"], message)
        return client.send_message(message, to_addrs=recipients)


def html_of(data: bytes) -> str:
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    part = parsed.get_body(preferencelist=("html",))
    assert part is not None
    return str(part.get_content())


def tracked_urls(data: bytes) -> list[str]:
    return TRACKED_URL.findall(html_of(data).replace("&amp;", "&"))


@pytest.fixture
def service(tmp_path: Path, sink: Sink) -> Iterator[RunningService]:
    with RunningService(make_settings(tmp_path, sink.url)) as running:
        yield running


def events(service: RunningService, **params: str) -> list[dict]:
    response = httpx.get(f"{service.http_base}/v1/events", params=params,
                         headers={"Authorization": f"Bearer {PROJECT_SECRET}"})
    assert response.status_code == 200, response.text
    return response.json()["events"]


def fetch(service: RunningService, url: str, **kwargs: object) -> httpx.Response:
    """Fetch a tracking URL from the mail at the tracker's real port (public_url is a placeholder)."""
    return httpx.get(service.http_base + urlsplit(url).path, follow_redirects=False, **kwargs)  # type: ignore[arg-type]


def test_walkthrough_send_open_click_and_read_events(service: RunningService, sink: Sink) -> None:
    send(service.smtp_port, html_message({"X-Inflight-Template-Type": "MARKETING", "X-Inflight-Campaign": "spring"}))

    [delivered] = sink.messages
    assert b"X-Inflight" not in delivered.data
    click_url, pixel_url = tracked_urls(delivered.data)
    assert "/c/" in click_url and "/o/" in pixel_url and pixel_url.endswith(".gif")
    assert "plain text part" in delivered.data.decode()

    pixel = fetch(service, pixel_url, headers={"User-Agent": "Mozilla/5.0 test"})
    assert pixel.status_code == 200
    assert pixel.headers["content-type"] == "image/gif"
    assert pixel.content.startswith(b"GIF89a")
    assert "no-store" in pixel.headers["cache-control"]

    click = fetch(service, click_url)
    assert click.status_code == 302
    assert click.headers["location"] == LINK

    found = events(service)
    assert [e["name"] for e in found] == ["email.click", "email.open", "email.sent"]
    click_event, open_event, sent_event = found
    assert click_event["link"] == LINK
    for event in found:
        assert event["project"] == PROJECT
        assert event["contact"] == "a@example.com"
        assert event["recipient"] == "a@example.com"
        assert event["campaign"] == "spring"
        assert event["template_type"] == "MARKETING"
        assert event["message_id"] == sent_event["message_id"]
        assert event["at"].endswith("Z")
    assert open_event["user_agent"] == "Mozilla/5.0 test"
    assert open_event["ip"] == "127.0.0.1"
    assert sent_event["tracked"] is True
    assert events(service, name="email.click", campaign="spring")[0]["id"] == click_event["id"]
    assert events(service, contact="nobody@example.com") == []


def test_each_recipient_gets_its_own_copy_and_tokens(service: RunningService, sink: Sink) -> None:
    recipients = ["A@example.com", "b@example.com", "c@example.com"]
    send(service.smtp_port, html_message(), recipients)

    assert sorted(m.recipients[0] for m in sink.messages) == sorted(recipients)
    assert all(len(m.recipients) == 1 for m in sink.messages)
    for message in sink.messages:
        click_url, _ = tracked_urls(message.data)
        assert fetch(service, click_url).status_code == 302
    contacts = sorted(e["contact"] for e in events(service, name="email.click"))
    assert contacts == ["a@example.com", "b@example.com", "c@example.com"]


def test_untracked_send_is_one_transaction_with_body_untouched(tmp_path: Path, sink: Sink) -> None:
    settings = make_settings(tmp_path, sink.url, projects=[{"id": PROJECT, "secret": PROJECT_SECRET, "tracking": "DISABLED"}])
    with RunningService(settings) as service:
        original = html_message({"X-Inflight-Template-Type": "MARKETING"}).as_bytes(policy=email.policy.SMTP)
        send(service.smtp_port, original, ["a@example.com", "b@example.com"])
        [delivered] = sink.messages
        assert delivered.recipients == ["a@example.com", "b@example.com"]
        assert tracked_urls(delivered.data) == []
        assert delivered.data.split(b"\r\n\r\n", 1)[1] == original.split(b"\r\n\r\n", 1)[1]
        sent = events(service)
        assert len(sent) == 2 and all(e["tracked"] is False for e in sent)


def test_marketing_only_tracks_marketing_but_not_transactional(tmp_path: Path, sink: Sink) -> None:
    settings = make_settings(tmp_path, sink.url,
                             projects=[{"id": PROJECT, "secret": PROJECT_SECRET, "tracking": "MARKETING_ONLY"}])
    with RunningService(settings) as service:
        send(service.smtp_port, html_message({"X-Inflight-Template-Type": "TRANSACTIONAL"}))
        send(service.smtp_port, html_message({"X-Inflight-Campaign-Type": "HEADLESS"}))
        send(service.smtp_port, html_message())
        transactional, headless, untyped = sink.messages
        assert tracked_urls(transactional.data) == []
        assert len(tracked_urls(headless.data)) == 2
        assert tracked_urls(untyped.data) == []


def test_message_id_is_added_when_missing_and_kept_when_present(service: RunningService, sink: Sink) -> None:
    send(service.smtp_port, html_message())
    with_id = html_message()
    with_id["Message-ID"] = "<keep-me@app.example>"
    send(service.smtp_port, with_id)
    added, kept = sink.messages
    assert re.search(rb"\r\nMessage-ID: <[0-9a-f]{32}@relay\.test>\r\n", added.data)
    assert b"Message-ID: <keep-me@app.example>" in kept.data
    assert {e["message_id"] for e in events(service)} >= {"keep-me@app.example"}


@pytest.mark.parametrize(
    ("headers", "code", "fragment"),
    [
        ({"X-Inflight-Project": "other"}, 550, b"5.7.1"),
        ({"X-Inflight-Template-Type": "NEWSLETTER"}, 550, b"X-Inflight-Template-Type"),
        ({"X-Inflight-Campaign-Type": "x"}, 550, b"X-Inflight-Campaign-Type"),
        ({"X-Inflight-Tracking": "maybe"}, 550, b"X-Inflight-Tracking"),
    ],
)
def test_bad_inflight_headers_are_refused_before_250(
    service: RunningService, sink: Sink, headers: dict[str, str], code: int, fragment: bytes
) -> None:
    with pytest.raises(smtplib.SMTPDataError) as refused:
        send(service.smtp_port, html_message(headers))
    assert refused.value.smtp_code == code
    assert fragment in refused.value.smtp_error
    assert sink.messages == []


def test_matching_project_header_is_accepted_and_removed(service: RunningService, sink: Sink) -> None:
    send(service.smtp_port, html_message({"x-inflight-project": PROJECT}))
    assert b"inflight-project" not in sink.messages[0].data.lower()


def test_wrong_password_and_unknown_project_are_refused(service: RunningService) -> None:
    for user, password in ((PROJECT, "wrong-secret"), ("nobody", PROJECT_SECRET)):
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            send(service.smtp_port, html_message(), user=user, password=password)
        assert refused.value.smtp_code == 535


def test_mail_without_auth_is_refused_no_open_relay(service: RunningService, sink: Sink) -> None:
    with smtplib.SMTP("127.0.0.1", service.smtp_port, timeout=10) as client:
        client.ehlo()
        code, _ = client.mail("app@example.com")
        assert code == 530
    assert sink.messages == []


def test_auth_over_plaintext_is_refused_unless_allowed(tmp_path: Path, sink: Sink) -> None:
    settings = make_settings(tmp_path, sink.url, relay={"allow_plaintext_auth": False})
    with RunningService(settings) as service, smtplib.SMTP("127.0.0.1", service.smtp_port, timeout=10) as client:
        client.ehlo()
        assert not client.has_extn("auth")
        code, _ = client.docmd("AUTH", "PLAIN AGRlbW8AZGVtby1zZWNyZXQ=")
        assert code == 538  # RFC 4954: encryption required for requested authentication mechanism


def test_too_many_recipients_are_refused_at_rcpt(tmp_path: Path, sink: Sink) -> None:
    settings = make_settings(tmp_path, sink.url, relay={"max_recipients": 2})
    with RunningService(settings) as service:
        refused = send(service.smtp_port, html_message(), ["a@example.com", "b@example.com", "c@example.com"])
        assert refused == {"c@example.com": (452, b"4.5.3 Too many recipients")}
        assert sorted(m.recipients[0] for m in sink.messages) == ["a@example.com", "b@example.com"]


def test_upstream_down_is_a_temporary_failure(tmp_path: Path) -> None:
    from tests.conftest import free_port

    settings = make_settings(tmp_path, f"smtp+insecure://127.0.0.1:{free_port()}")
    with RunningService(settings) as service:
        with pytest.raises(smtplib.SMTPDataError) as deferred:
            send(service.smtp_port, html_message())
        assert deferred.value.smtp_code == 451
        assert b"4.4.1" in deferred.value.smtp_error
        assert events(service) == []


@pytest.mark.parametrize(("upstream_reply", "code"), [("554 5.7.1 Rejected by policy", 554), ("452 4.3.1 Full", 452)])
def test_upstream_refusal_is_passed_on_with_matching_code(
    service: RunningService, sink: Sink, upstream_reply: str, code: int
) -> None:
    sink.handler.data_reply = upstream_reply
    with pytest.raises(smtplib.SMTPDataError) as refused:
        send(service.smtp_port, html_message())
    assert refused.value.smtp_code == code
    assert upstream_reply.split(" ", 1)[1].encode() in refused.value.smtp_error


def test_forged_and_tampered_tokens_get_404_never_a_redirect(service: RunningService, sink: Sink) -> None:
    send(service.smtp_port, html_message())
    click_url, pixel_url = tracked_urls(sink.messages[0].data)
    token = urlsplit(click_url).path.removeprefix("/c/")
    flipped = token[:-1] + ("A" if token[-1] != "A" else "B")
    for path in (f"/c/{flipped}", f"/c/{token[:-1]}", f"/c/{token}.x", "/c/garbage", "/o/x.gif",
                 # an open token is not a click token, and vice versa
                 "/c/" + urlsplit(pixel_url).path.removeprefix("/o/").removesuffix(".gif"),
                 "/o/" + urlsplit(click_url).path.removeprefix("/c/") + ".gif"):
        response = httpx.get(service.http_base + path, follow_redirects=False)
        assert response.status_code == 404, path
        assert "location" not in response.headers
    assert [e["name"] for e in events(service)] == ["email.sent"]


def test_events_api_requires_the_project_bearer(service: RunningService) -> None:
    assert httpx.get(f"{service.http_base}/v1/events").status_code == 401
    wrong = httpx.get(f"{service.http_base}/v1/events", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    bad = httpx.get(f"{service.http_base}/v1/events", params={"limit": "0"},
                    headers={"Authorization": f"Bearer {PROJECT_SECRET}"})
    assert bad.status_code == 422 and "limit" in bad.json()["error"]


def test_healthz_reports_the_store(service: RunningService) -> None:
    response = httpx.get(f"{service.http_base}/healthz")
    assert response.status_code == 200 and response.json()["store"] == "ok"
