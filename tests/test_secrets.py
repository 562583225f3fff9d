"""Secrets from files never surface: every log line (aiosmtpd's and uvicorn's at DEBUG included),
traceback, SMTP reply and /v1/* answer of a session full of successes and failures is searched."""

from __future__ import annotations

import base64
import logging
import smtplib
from pathlib import Path

import httpx
import pytest

from config.settings import ConfigError
from tests.conftest import PROJECT, RunningService, Sink, make_settings

PROJECT_SECRET_FROM_FILE = "file-project-secret-7f3a"
HMAC_KEYS = ("hmac-key-new-91c2", "hmac-key-old-5d08")
UPSTREAM_PASSWORD = "upstream-pass-e61b"


def forms(secret: str) -> list[str]:
    """The secret and the encodings a log could carry it in (AUTH PLAIN and LOGIN blobs)."""
    plain = base64.b64encode(f"\0{PROJECT}\0{secret}".encode()).decode()
    return [secret, base64.b64encode(secret.encode()).decode(), plain, secret.encode().hex()]


def test_no_secret_in_logs_replies_or_api_answers(tmp_path: Path, sink: Sink, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "project.secret").write_text(PROJECT_SECRET_FROM_FILE + "\n")
    (tmp_path / "hmac.keys").write_text("\n".join(HMAC_KEYS) + "\n")
    # The sink offers no AUTH, so every upstream login fails: the error path is exercised too.
    (tmp_path / "upstream.url").write_text(f"smtp+insecure://relay-user:{UPSTREAM_PASSWORD}@127.0.0.1:{sink.port}\n")
    settings = make_settings(tmp_path, "outbox:///unused", upstream={"url": None, "url_file": str(tmp_path / "upstream.url")},
                             tracker={"secrets": None, "secrets_file": str(tmp_path / "hmac.keys")},
                             projects=[{"id": PROJECT, "secret_file": str(tmp_path / "project.secret")}])
    seen: list[str] = [repr(settings)]
    caplog.set_level(logging.DEBUG)
    with RunningService(settings) as service:
        for user, password in ((PROJECT, PROJECT_SECRET_FROM_FILE + "x"), (PROJECT_SECRET_FROM_FILE, PROJECT),
                               (PROJECT, PROJECT_SECRET_FROM_FILE)):
            with smtplib.SMTP("127.0.0.1", service.smtp_port, timeout=10) as client:
                try:
                    seen.append(repr(client.login(user, password)))
                    client.sendmail("app@example.com", ["a@example.com"], b"From: app@example.com\r\n\r\nhi\r\n")
                except smtplib.SMTPException as exc:
                    seen.append(repr(exc))
        with httpx.Client(base_url=service.http_base) as http:
            for bearer in (PROJECT_SECRET_FROM_FILE, HMAC_KEYS[0], UPSTREAM_PASSWORD):
                for path in ("/v1/events", "/v1/settings/tracking", "/healthz", f"/c/{HMAC_KEYS[1]}"):
                    response = http.get(path, headers={"Authorization": f"Bearer {bearer}"})
                    seen.append(f"{response.status_code} {response.headers} {response.text}")
    assert any("Upstream" in s or "451" in s for s in seen)  # the failing upstream login was reached
    for bad in (["tracker", {"secrets": [HMAC_KEYS[0], 5]}], ["upstream", {"url": f"ftp://u:{UPSTREAM_PASSWORD}@x"}]):
        with pytest.raises(ConfigError) as error:
            make_settings(tmp_path, "outbox:///x", **{bad[0]: bad[1]})  # type: ignore[arg-type]
        seen.append(str(error.value))
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    client_side = ("httpx", "httpcore")  # the test's own HTTP client logs the URLs it was asked to fetch
    seen.extend(formatter.format(r) for r in caplog.records if not r.name.startswith(client_side))  # with tracebacks
    text = "\n".join(seen)
    assert len(caplog.records) > 50  # aiosmtpd and uvicorn logged the whole session
    for secret in (PROJECT_SECRET_FROM_FILE, *HMAC_KEYS, UPSTREAM_PASSWORD):
        for form in forms(secret):
            assert form not in text, f"a form of a secret leaked: {form[:6]}…"
